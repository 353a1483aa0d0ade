"""Data sets as uint8 tensors on the target device, and a reproducible batch loader.

Every data set is held whole in memory as ``uint8`` images ``(N, C, H, W)`` and ``int64`` labels, moved to the
target device once; batches are converted to float in ``[0, 1]`` on the fly. Names:

* ``"mnist-5k"`` -- 5000 MNIST digits embedded in the package (``engine/assets``), split 4000 / 1000 with a fixed
  stratified split (400 / 100 per class), identical on every machine.
* ``"mnist"`` / ``"cifar10"`` -- the full sets through torchvision, from ``root`` (downloaded when asked).
* ``"synthetic"`` -- small learnable 10-class 1x28x28 data made from ``seed``; needs no files.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from robprune.engine.errors import DataError

DATASET_NAMES = ("mnist-5k", "mnist", "cifar10", "synthetic")

ASSETS = Path(__file__).parent / "assets"
MNIST5K_IMAGES = "mnist5k-images-idx3-ubyte.gz"
MNIST5K_LABELS = "mnist5k-labels-idx1-ubyte.gz"
MNIST5K_PER_CLASS = 500
MNIST5K_TRAIN_PER_CLASS = 400
# Constant seed of the mnist-5k split: the split never depends on the run seed.
MNIST5K_SPLIT_SEED = 20190501

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049

# Zero padding (pixels) of the CIFAR random crop.
CROP_PADDING = 4

_MASK63 = (1 << 63) - 1


@dataclass(frozen=True)
class DataSpec:
    """Shape facts about a loaded data set."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    train_size: int
    test_size: int


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]."""
    return x.float().div_(255)


@dataclass
class Dataset:
    """A loaded data set: uint8 images ``(N, C, H, W)`` and int64 labels, already on the target device."""

    spec: DataSpec
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    to_float = staticmethod(to_float)


# ----------------------------------------------------------------------------------------------------------------
# Embedded mnist-5k


def parse_idx(data: bytes, magic: int) -> torch.Tensor:
    """Parse an uncompressed IDX file holding uint8 data (MNIST format: big-endian header, then the bytes)."""
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX data too short: {len(data)} bytes")
    found, *shape = struct.unpack(f">I{ndim}I", data[:header])
    if found != magic:
        raise DataError(f"IDX data: expected magic {magic}, found {found}")
    count = 1
    for s in shape:
        count *= s
    if len(data) != header + count:
        raise DataError(f"IDX data: header says {count} values, found {len(data) - header}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header, count=count).reshape(shape)


def read_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5000 embedded digits in file order: uint8 images ``(5000, 28, 28)`` and int64 labels ``(5000,)``."""
    try:
        images = parse_idx(gzip.decompress((ASSETS / MNIST5K_IMAGES).read_bytes()), IDX_IMAGES_MAGIC)
        labels = parse_idx(gzip.decompress((ASSETS / MNIST5K_LABELS).read_bytes()), IDX_LABELS_MAGIC)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{ASSETS}: embedded mnist-5k files unreadable ({e}); reinstall the package") from e
    return images, labels.long()


def mnist5k_split(labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into :func:`read_mnist5k` of the fixed 4000 / 1000 train / test split (``labels``: its labels).

    For each class, its 500 indices are permuted with a generator seeded by a constant; the first 400 go to
    train and the last 100 to test. Train and test are then each put in a fixed permuted order.
    """
    if labels is None:
        _, labels = read_mnist5k()
    g = torch.Generator().manual_seed(MNIST5K_SPLIT_SEED)
    train, test = [], []
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() != MNIST5K_PER_CLASS:
            raise DataError(f"{ASSETS}: embedded mnist-5k has {idx.numel()} digits of class {c}, expected 500")
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        train.append(idx[:MNIST5K_TRAIN_PER_CLASS])
        test.append(idx[MNIST5K_TRAIN_PER_CLASS:])
    train_idx, test_idx = torch.cat(train), torch.cat(test)
    train_idx = train_idx[torch.randperm(train_idx.numel(), generator=g)]
    test_idx = test_idx[torch.randperm(test_idx.numel(), generator=g)]
    return train_idx, test_idx


def _load_mnist5k():
    images, labels = read_mnist5k()
    train_idx, test_idx = mnist5k_split(labels)
    images = images.unsqueeze(1)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


# ----------------------------------------------------------------------------------------------------------------
# torchvision data sets


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _torchvision(kind: str, root: str, download: bool, with_train: bool = True):
    """(train, test) torchvision data sets (train None unless ``with_train``); torchvision's errors become
    one-line DataErrors."""
    from torchvision import datasets

    if kind == "mnist":
        cls, title, state = datasets.MNIST, "MNIST", "not found"
        where = os.path.join(root, "MNIST", "raw")
        manual = f"copy the 4 unpacked MNIST IDX files (train-images-idx3-ubyte, ...) to {where}"
    else:  # torchvision checks the md5 sums of the CIFAR-10 files
        cls, title, state = datasets.CIFAR10, "CIFAR-10", "not found or corrupted"
        where = os.path.join(root, "cifar-10-batches-py")
        manual = f"unpack cifar-10-python.tar.gz in {root}"
    try:
        train = cls(root, train=True, download=download) if with_train else None
        test = cls(root, train=False, download=download)
    except Exception as e:
        missing = isinstance(e, RuntimeError) and str(e).startswith("Dataset not found")
        if download:
            cause = _one_line(e)
            raise DataError(f"{root}: downloading {title} failed ({cause}); check the network, or {manual}") from e
        if missing:
            raise DataError(
                f"{where}: {title} {state}; set data.download = true on a machine with internet "
                f"(or --set data.download=true), or {manual}"
            ) from e
        if isinstance(e, (OSError, ValueError, TypeError, AssertionError, EOFError, pickle.UnpicklingError)):
            cause = _one_line(e)
            raise DataError(f"{where}: {title} files unreadable ({cause}); delete them and download again") from e
        raise
    return train, test


def _load_mnist(root: str, download: bool, with_train: bool = True):
    train, test = _torchvision("mnist", root, download, with_train)
    if train is None:
        return _no_train(test.data.unsqueeze(1)) + (test.data.unsqueeze(1), test.targets.long())
    return train.data.unsqueeze(1), train.targets.long(), test.data.unsqueeze(1), test.targets.long()


def _no_train(test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty training set shaped like ``test_x``'s examples (an evaluation loads only the test set)."""
    return test_x[:0], torch.zeros(0, dtype=torch.int64)


def _load_cifar10(root: str, download: bool, with_train: bool = True):
    train, test = _torchvision("cifar10", root, download, with_train)

    def images(ds):
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()

    def labels(ds):
        return torch.tensor(ds.targets, dtype=torch.int64)

    if train is None:
        return _no_train(images(test)) + (images(test), labels(test))
    return images(train), labels(train), images(test), labels(test)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic


def make_synthetic(n_train: int, n_test: int, seed: int):
    """Learnable 10-class 1x28x28 uint8 data, deterministic in ``seed``.

    Each class has a prototype of 7x7 random black/white blocks (4x4 pixels each); an example is its class
    prototype plus Gaussian noise (std 0.15), clipped to [0, 1]. Prototypes differ in about half their pixels by
    1.0, so a small convolutional network separates them quickly, also under L-inf perturbations of 0.3.
    Labels are balanced (``i % 10``) and shuffled.
    """
    g = torch.Generator().manual_seed(seed)
    proto = (torch.rand(10, 1, 7, 7, generator=g) < 0.5).float()
    proto = proto.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # 10 x 1 x 28 x 28

    def draw(n: int):
        y = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
        x = proto[y] + 0.15 * torch.randn(n, 1, 28, 28, generator=g)
        return x.clamp_(0, 1).mul_(255).round_().to(torch.uint8), y

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return train_x, train_y, test_x, test_y


# ----------------------------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    root: str | os.PathLike = "data",
    download: bool = False,
    device: str | torch.device = "cpu",
    *,
    train_subset: int = 0,
    synthetic_train: int = 512,
    synthetic_test: int = 256,
    seed: int = 0,
    test_only: bool = False,
) -> Dataset:
    """Load a data set by name (one of :data:`DATASET_NAMES`) onto ``device``.

    ``train_subset > 0`` keeps the first ``train_subset`` training examples (the orders are already mixed).
    ``seed`` only affects ``"synthetic"``. ``test_only``: MNIST and CIFAR-10 leave the training set unread (empty),
    for an evaluation. Missing or broken files raise :class:`DataError`.
    """
    root = os.fspath(root)
    if name == "mnist-5k":
        parts = _load_mnist5k()
    elif name == "mnist":
        parts = _load_mnist(root, download, not test_only)
    elif name == "cifar10":
        parts = _load_cifar10(root, download, not test_only)
    elif name == "synthetic":
        parts = make_synthetic(synthetic_train, synthetic_test, seed)
    else:
        raise DataError(f"unknown data set {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    train_x, train_y, test_x, test_y = parts
    if train_subset > 0:
        train_x, train_y = train_x[:train_subset], train_y[:train_subset]
    dev = torch.device(device)
    train_x, train_y, test_x, test_y = (t.contiguous().to(dev) for t in (train_x, train_y, test_x, test_y))
    spec = DataSpec(
        name=name,
        num_classes=10,
        in_channels=train_x.shape[1],
        image_size=train_x.shape[2],
        train_size=train_x.shape[0],
        test_size=test_x.shape[0],
    )
    return Dataset(spec, train_x, train_y, test_x, test_y)


_SHAPES = {"mnist-5k": (1, 28), "mnist": (1, 28), "synthetic": (1, 28), "cifar10": (3, 32)}


def dataset_spec(name: str) -> DataSpec:
    """The shape facts of a data set without loading it (sizes are 0: unknown until loaded)."""
    if name not in _SHAPES:
        raise DataError(f"unknown data set {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    c, s = _SHAPES[name]
    return DataSpec(name=name, num_classes=10, in_channels=c, image_size=s, train_size=0, test_size=0)


def stratified_order(y: torch.Tensor) -> torch.Tensor:
    """Indices interleaving the classes: the 1st example of each class (in class order), then the 2nd, ...

    Any prefix of it is as balanced as the data allow. Deterministic; no random numbers.
    """
    y = y.detach().long().cpu()
    if y.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    onehot = F.one_hot(y, int(y.max()) + 1)
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # rank of each example within its class
    return torch.argsort(rank * onehot.shape[1] + y, stable=True)


def eval_subset(x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples of :func:`stratified_order` (kept in their original order); ``n = 0`` -> all."""
    if n <= 0 or n >= y.shape[0]:
        return x, y
    idx = stratified_order(y)[:n].sort().values.to(y.device)
    return x[idx], y[idx]


# ----------------------------------------------------------------------------------------------------------------
# Batches


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps), so (seed, epoch) pairs get unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK63


_SALT_SHUFFLE = 1
_SALT_AUGMENT = 2


def augment_batch(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Random-crop (zero padding ``CROP_PADDING``) and horizontal flip of a batch ``(B, C, H, W)``.

    ``dy``, ``dx`` in ``[0, 2 * CROP_PADDING]`` are the crop offsets in the padded image (``CROP_PADDING`` =
    no shift) and ``flip`` is a bool per example. Works on any dtype, on the batch's device.
    """
    b, _, h, w = x.shape
    p = CROP_PADDING
    padded = F.pad(x, (p, p, p, p))
    rows = dy.view(b, 1) + torch.arange(h, device=x.device)  # B x H
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = torch.where(flip.view(b, 1), cols.flip(1), cols) + dx.view(b, 1)  # B x W
    out = padded[torch.arange(b, device=x.device).view(b, 1, 1), :, rows.view(b, h, 1), cols.view(b, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()  # advanced indexing put channels last


class BatchLoader:
    """Batches ``(x_float, y)`` over uint8 images on their own device, reproducible per (seed, epoch).

    The shuffle order and the augmentation draws of an epoch depend only on ``(seed, epoch)`` -- they are drawn
    for the whole epoch from CPU generators, so they are the same on every device -- and iterating with
    ``start_batch = k`` yields exactly the batches ``k, k+1, ...`` of that epoch (exact resume). With ``shard =
    (rank, world)`` each batch is this rank's share (:meth:`batch_rows`) of the global batch.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        augment: bool = False,
        drop_last: bool = False,
        shard: tuple[int, int] | None = None,
    ):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment
        self.drop_last = drop_last
        self.shard = shard  # (rank, world): each batch is the global one, of which this rank takes its share
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        n = self.x.shape[0]
        full, rest = divmod(n, self.batch_size)
        if self.drop_last or (self.shard is not None and rest < self.shard[1]):
            return full  # sharded: a last batch smaller than the number of ranks would leave a rank nothing
        return full + (rest > 0)

    def batch_rows(self, k: int) -> tuple[int, int, int]:
        """``(start, stop, total)``: the rows of global batch ``k`` (of ``total`` examples) this rank takes."""
        from .distributed import shard_rows

        total = min(self.batch_size, self.x.shape[0] - k * self.batch_size)
        rank, world = self.shard if self.shard is not None else (0, 1)
        return (*shard_rows(total, rank, world), total)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose order the next iteration uses, starting at batch ``start_batch``."""
        self.epoch = epoch
        self.start_batch = start_batch

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The example order (CPU int64 indices) of ``epoch`` (default: the current one)."""
        n = self.x.shape[0]
        if not self.shuffle:
            return torch.arange(n)
        epoch = self.epoch if epoch is None else epoch
        g = torch.Generator().manual_seed(_mix(self.seed, epoch, _SALT_SHUFFLE))
        return torch.randperm(n, generator=g)

    def augment_params(self, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Crop offsets ``dy``, ``dx`` and flips of every position of ``epoch``'s order (CPU tensors)."""
        n = self.x.shape[0]
        epoch = self.epoch if epoch is None else epoch
        g = torch.Generator().manual_seed(_mix(self.seed, epoch, _SALT_AUGMENT))
        shifts = torch.randint(0, 2 * CROP_PADDING + 1, (2, n), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        return shifts[0], shifts[1], flip

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate the batches of ``epoch`` from batch ``start_batch`` on."""
        dev = self.x.device
        order = self.order(epoch).to(dev)
        if self.augment:
            dy, dx, flip = (t.to(dev) for t in self.augment_params(epoch))
        bs = self.batch_size
        for k in range(max(start_batch, 0), len(self)):
            sl = slice(k * bs, (k + 1) * bs)
            if self.shard is not None:
                start, stop, _ = self.batch_rows(k)
                sl = slice(k * bs + start, k * bs + stop)
            idx = order[sl]
            xb = self.x[idx]
            if self.augment:
                xb = augment_batch(xb, dy[sl], dx[sl], flip[sl])
            yield to_float(xb), self.y[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(self.epoch, self.start_batch)
