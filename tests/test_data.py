"""Data sets, the fixed mnist-5k split, torchvision loading from real on-disk formats, and the batch loader."""

import gzip
import os
import pickle
import struct
from urllib.error import URLError

import numpy as np
import pytest
import torch
from torchvision.datasets import cifar as tv_cifar
from torchvision.datasets import mnist as tv_mnist

from robprune.engine import data
from robprune.engine.data import (
    BatchLoader,
    DataSpec,
    Dataset,
    augment_batch,
    eval_subset,
    load_dataset,
    make_synthetic,
    mnist5k_split,
    read_mnist5k,
    stratified_order,
    to_float,
)
from robprune.engine.errors import DataError

# ---------------------------------------------------------------------------------------------------------------
# Embedded mnist-5k


def test_embedded_files_are_idx_with_mnist_magic():
    images = gzip.decompress((data.ASSETS / data.MNIST5K_IMAGES).read_bytes())
    labels = gzip.decompress((data.ASSETS / data.MNIST5K_LABELS).read_bytes())
    assert struct.unpack(">IIII", images[:16]) == (2051, 5000, 28, 28)
    assert struct.unpack(">II", labels[:8]) == (2049, 5000)
    assert len(images) == 16 + 5000 * 784
    assert len(labels) == 8 + 5000


def test_embedded_files_read_by_torchvision_match(tmp_path):
    # torchvision's own IDX reader agrees with ours byte for byte.
    for name in (data.MNIST5K_IMAGES, data.MNIST5K_LABELS):
        (tmp_path / name[:-3]).write_bytes(gzip.decompress((data.ASSETS / name).read_bytes()))
    images, labels = read_mnist5k()
    assert torch.equal(tv_mnist.read_image_file(str(tmp_path / data.MNIST5K_IMAGES[:-3])), images)
    assert torch.equal(tv_mnist.read_label_file(str(tmp_path / data.MNIST5K_LABELS[:-3])), labels)


def test_embedded_digits_counts_and_values():
    images, labels = read_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [500] * 10
    # sorted by label, as shipped
    assert torch.equal(labels, torch.arange(10).repeat_interleave(500))
    assert int(images.min()) == 0 and int(images.max()) == 255


def test_mnist5k_split_is_fixed_stratified_and_disjoint():
    _, labels = read_mnist5k()
    train_idx, test_idx = mnist5k_split()
    assert train_idx.shape == (4000,) and test_idx.shape == (1000,)
    assert torch.bincount(labels[train_idx], minlength=10).tolist() == [400] * 10
    assert torch.bincount(labels[test_idx], minlength=10).tolist() == [100] * 10
    assert len(set(train_idx.tolist()) & set(test_idx.tolist())) == 0
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(5000))
    train2, test2 = mnist5k_split()
    assert torch.equal(train_idx, train2) and torch.equal(test_idx, test2)
    # Pinned: the split must never change between machines or releases.
    assert train_idx[:8].tolist() == [493, 1785, 1303, 1953, 1017, 2908, 901, 2903]
    assert test_idx[:8].tolist() == [1658, 4736, 1693, 3990, 4831, 948, 1018, 4971]
    # The order is mixed, not sorted by class.
    assert len(set(labels[train_idx[:50]].tolist())) == 10


def test_load_mnist5k_bundle():
    ds = load_dataset("mnist-5k", "unused-root", False, "cpu")
    assert isinstance(ds, Dataset)
    assert ds.spec == DataSpec("mnist-5k", 10, 1, 28, 4000, 1000)
    assert ds.train_x.shape == (4000, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (1000, 1, 28, 28) and ds.test_x.dtype == torch.uint8
    assert ds.train_y.dtype == torch.int64 and ds.test_y.dtype == torch.int64
    images, labels = read_mnist5k()
    train_idx, test_idx = mnist5k_split()
    assert torch.equal(ds.train_x[:, 0], images[train_idx]) and torch.equal(ds.train_y, labels[train_idx])
    assert torch.equal(ds.test_x[:, 0], images[test_idx]) and torch.equal(ds.test_y, labels[test_idx])
    again = load_dataset("mnist-5k", "unused-root", False, "cpu", seed=7)  # the run seed does not move the split
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)


def test_float_conversion_range():
    ds = load_dataset("mnist-5k", "data", False, "cpu")
    xf = ds.to_float(ds.test_x)
    assert xf.dtype == torch.float32 and xf.shape == ds.test_x.shape
    assert float(xf.min()) == 0.0 and float(xf.max()) == 1.0
    assert torch.equal(to_float(torch.tensor([0, 51, 255], dtype=torch.uint8)), torch.tensor([0.0, 0.2, 1.0]))
    assert ds.test_x.dtype == torch.uint8  # the source is not modified


def test_train_subset_keeps_first_examples():
    full = load_dataset("mnist-5k", "data", False, "cpu")
    sub = load_dataset("mnist-5k", "data", False, "cpu", train_subset=200)
    assert sub.spec.train_size == 200 and sub.spec.test_size == 1000
    assert torch.equal(sub.train_x, full.train_x[:200]) and torch.equal(sub.train_y, full.train_y[:200])
    counts = torch.bincount(sub.train_y, minlength=10)
    assert int(counts.min()) >= 10 and int(counts.max()) <= 30
    big = load_dataset("mnist-5k", "data", False, "cpu", train_subset=10_000)
    assert big.spec.train_size == 4000


def test_unknown_name_is_data_error():
    with pytest.raises(DataError, match="unknown data set 'svhn'"):
        load_dataset("svhn", "data", False, "cpu")


# ---------------------------------------------------------------------------------------------------------------
# Synthetic


def test_synthetic_is_deterministic_with_ten_classes():
    a = load_dataset("synthetic", "data", False, "cpu", seed=3)
    b = load_dataset("synthetic", "data", False, "cpu", seed=3)
    c = load_dataset("synthetic", "data", False, "cpu", seed=4)
    assert a.spec == DataSpec("synthetic", 10, 1, 28, 512, 256)
    for t1, t2 in zip((a.train_x, a.train_y, a.test_x, a.test_y), (b.train_x, b.train_y, b.test_x, b.test_y)):
        assert torch.equal(t1, t2)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.train_x.dtype == torch.uint8 and a.train_y.dtype == torch.int64
    assert torch.bincount(a.train_y).tolist() == [52, 52] + [51] * 8
    assert torch.bincount(a.test_y).tolist() == [26] * 6 + [25] * 4
    small = load_dataset("synthetic", "data", False, "cpu", synthetic_train=30, synthetic_test=20)
    assert small.train_x.shape == (30, 1, 28, 28) and small.test_x.shape == (20, 1, 28, 28)


def test_synthetic_is_learnable():
    # Nearest class mean (a linear classifier) already separates the test set.
    trx, try_, tex, tey = make_synthetic(512, 256, seed=0)
    means = torch.stack([to_float(trx[try_ == c]).mean(0).flatten() for c in range(10)])
    pred = torch.cdist(to_float(tex).flatten(1), means).argmin(1)
    assert (pred == tey).float().mean().item() == 1.0


# ---------------------------------------------------------------------------------------------------------------
# eval_subset


def test_stratified_order_interleaves_classes():
    assert stratified_order(torch.tensor([0, 0, 0, 1, 1, 2, 0, 2])).tolist() == [0, 3, 5, 1, 4, 7, 2, 6]


def test_eval_subset():
    ds = load_dataset("mnist-5k", "data", False, "cpu")
    x, y = eval_subset(ds.test_x, ds.test_y, 0)
    assert x is ds.test_x and y is ds.test_y
    x, y = eval_subset(ds.test_x, ds.test_y, 200)
    assert x.shape == (200, 1, 28, 28) and torch.bincount(y, minlength=10).tolist() == [20] * 10
    x2, y2 = eval_subset(ds.test_x, ds.test_y, 200)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x, y = eval_subset(ds.test_x, ds.test_y, 5000)
    assert x.shape[0] == 1000


# ---------------------------------------------------------------------------------------------------------------
# BatchLoader


def _indexed(n):
    """Images whose first pixel encodes the example index (n <= 256), labels = index."""
    x = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return x, torch.arange(n)


def _epoch(loader, epoch, start_batch=0):
    loader.set_epoch(epoch, start_batch)
    return list(loader)


def test_batchloader_covers_every_example_once():
    x, y = _indexed(103)
    loader = BatchLoader(x, y, 10, shuffle=True, seed=1)
    assert len(loader) == 11
    batches = _epoch(loader, 0)
    assert len(batches) == 11 and [b[1].shape[0] for b in batches] == [10] * 10 + [3]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(103))
    assert seen.tolist() != list(range(103))  # shuffled
    for xb, yb in batches:  # images travel with their labels, converted to float
        assert xb.dtype == torch.float32 and xb.shape[1:] == (1, 4, 4)
        assert torch.equal((xb[:, 0, 0, 0] * 255).round().long(), yb)
    dropped = BatchLoader(x, y, 10, shuffle=True, seed=1, drop_last=True)
    assert len(dropped) == 10 and sum(b[1].shape[0] for b in _epoch(dropped, 0)) == 100


def test_batchloader_order_reproducible_per_seed_and_epoch():
    x, y = _indexed(100)
    a = BatchLoader(x, y, 16, shuffle=True, seed=5)
    b = BatchLoader(x, y, 16, shuffle=True, seed=5)
    order = lambda ld, ep: torch.cat([yb for _, yb in _epoch(ld, ep)]).tolist()  # noqa: E731
    assert order(a, 3) == order(b, 3)
    assert order(a, 3) == order(a, 3)  # iterating twice gives the same epoch
    assert order(a, 3) != order(a, 4)
    assert order(a, 3) != order(BatchLoader(x, y, 16, shuffle=True, seed=6), 3)
    assert order(a, 3) == a.order(3).tolist()
    assert order(BatchLoader(x, y, 16, shuffle=False), 3) == list(range(100))


def test_batchloader_start_batch_gives_tail_of_same_order():
    x, y = _indexed(100)
    for augment in (False, True):
        loader = BatchLoader(x, y, 16, shuffle=True, seed=2, augment=augment)
        full = _epoch(loader, 7)
        tail = _epoch(loader, 7, start_batch=4)
        assert len(full) == 7 and len(tail) == 3
        for (xf, yf), (xt, yt) in zip(full[4:], tail):
            assert torch.equal(xf, xt) and torch.equal(yf, yt)
        assert _epoch(loader, 7, start_batch=7) == []


def test_augment_batch_exact():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.uint8).view(2, 3, 5, 6)
    p = data.CROP_PADDING
    # centre crop without flip is the identity; with flip it mirrors
    same = augment_batch(x, torch.tensor([p, p]), torch.tensor([p, p]), torch.tensor([False, False]))
    assert torch.equal(same, x)
    flipped = augment_batch(x, torch.tensor([p, p]), torch.tensor([p, p]), torch.tensor([True, True]))
    assert torch.equal(flipped, x.flip(-1))
    # offset 0 shows the zero padding at the top/left: the content moves down/right by p pixels
    shifted = augment_batch(x, torch.tensor([0, 2 * p]), torch.tensor([0, 2 * p]), torch.tensor([False, False]))
    assert torch.equal(shifted[0, :, p:, p:], x[0, :, : 5 - p, : 6 - p])
    assert int(shifted[0, :, :p].sum()) == 0 and int(shifted[0, :, :, :p].sum()) == 0
    assert torch.equal(shifted[1, :, : 5 - p, : 6 - p], x[1, :, p:, p:])
    assert int(shifted[1, :, 5 - p :].sum()) == 0
    assert shifted.shape == x.shape and shifted.dtype == torch.uint8


def test_augmentation_changes_images_and_off_leaves_them():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(64)
    plain = BatchLoader(x, y, 64, shuffle=True, seed=0)
    (xb, yb), = _epoch(plain, 0)
    assert torch.equal(xb, to_float(x[yb]))  # untouched without augmentation
    aug = BatchLoader(x, y, 64, shuffle=True, seed=0, augment=True)
    (xa, ya), = _epoch(aug, 0)
    assert torch.equal(ya, yb)  # augmentation does not change the order
    assert xa.shape == (64, 3, 32, 32) and xa.dtype == torch.float32
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    changed = (xa != xb).flatten(1).any(1)
    dy, dx, flip = aug.augment_params(0)
    identity = (dy == 4) & (dx == 4) & ~flip
    assert torch.equal(changed, ~identity)
    assert int(changed.sum()) >= 56
    # crops bring in zero padding (the images have no zeros themselves)
    shifted = (dy != 4) | (dx != 4)
    assert bool(((xa == 0).flatten(1).any(1) == shifted).all())
    # all 9 offsets and both flip states occur over an epoch of 1000
    big = BatchLoader(torch.zeros(1000, 1, 8, 8, dtype=torch.uint8), torch.zeros(1000), 100, shuffle=True, augment=True)
    dy, dx, flip = big.augment_params(0)
    assert sorted(set(dy.tolist())) == list(range(9)) and sorted(set(dx.tolist())) == list(range(9))
    assert 400 < int(flip.sum()) < 600
    assert not torch.equal(big.augment_params(1)[0], dy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batchloader_same_batches_on_cuda():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(50)
    ds = load_dataset("synthetic", "data", False, "cuda", synthetic_train=20, synthetic_test=10)
    assert ds.train_x.device.type == "cuda"
    cpu = _epoch(BatchLoader(x, y, 16, shuffle=True, seed=3, augment=True), 2)
    gpu = _epoch(BatchLoader(x.cuda(), y.cuda(), 16, shuffle=True, seed=3, augment=True), 2)
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.device.type == "cuda"
        assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())


# ---------------------------------------------------------------------------------------------------------------
# torchvision data sets from real on-disk formats


def _idx_bytes(t: torch.Tensor) -> bytes:
    magic = 0x0800 + t.dim()  # unsigned byte data
    return struct.pack(f">I{t.dim()}I", magic, *t.shape) + bytes(t.flatten().tolist())


def _write_mnist(root, n_train=30, n_test=12):
    # MNIST._check_exists only asks for the four unpacked files in <root>/MNIST/raw (no checksums).
    g = torch.Generator().manual_seed(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (n,), dtype=torch.uint8, generator=g)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx_bytes(x))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(y))
        out[prefix] = (x, y)
    return out


def test_mnist_through_torchvision(tmp_path):
    written = _write_mnist(tmp_path)
    ds = load_dataset("mnist", str(tmp_path), False, "cpu")
    assert ds.spec == DataSpec("mnist", 10, 1, 28, 30, 12)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert torch.equal(ds.train_x[:, 0], written["train"][0]) and torch.equal(ds.train_y, written["train"][1].long())
    assert torch.equal(ds.test_x[:, 0], written["t10k"][0]) and torch.equal(ds.test_y, written["t10k"][1].long())
    sub = load_dataset("mnist", tmp_path, False, "cpu", train_subset=7)
    assert torch.equal(sub.train_x, ds.train_x[:7])


def _write_cifar(root, per_batch=4, n_test=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        d = rng.integers(0, 256, (n, 3072), dtype=np.uint8)  # each row: 1024 red, 1024 green, 1024 blue
        lab = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": d, "labels": lab, "batch_label": name}, f)
        rows.append(d)
        labels.append(lab)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return rows, labels


@pytest.fixture
def no_cifar_checksums(monkeypatch):
    # torchvision checks the md5 sums of the real CIFAR-10 files (batches and batches.meta) through
    # torchvision.datasets.cifar.check_integrity; the small files written here have other sums, so only
    # their existence is checked.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_cifar10_through_torchvision(tmp_path, no_cifar_checksums):
    rows, labels = _write_cifar(tmp_path)
    ds = load_dataset("cifar10", str(tmp_path), False, "cpu")
    assert ds.spec == DataSpec("cifar10", 10, 3, 32, 20, 6)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.train_x.is_contiguous()
    expected_train = torch.from_numpy(np.concatenate(rows[:5])).view(20, 3, 32, 32)
    assert torch.equal(ds.train_x, expected_train)
    assert ds.train_y.tolist() == sum(labels[:5], []) and ds.train_y.dtype == torch.int64
    assert torch.equal(ds.test_x, torch.from_numpy(rows[5]).view(6, 3, 32, 32))
    assert ds.test_y.tolist() == labels[5]
    # channel order: the first 1024 bytes of a row are the red plane
    assert torch.equal(ds.train_x[0, 0].flatten(), torch.from_numpy(rows[0][0, :1024]))


def test_missing_mnist_is_data_error(tmp_path):
    root = tmp_path / "nothing-here"
    with pytest.raises(DataError) as e:
        load_dataset("mnist", str(root), False, "cpu")
    msg = str(e.value)
    assert str(root / "MNIST" / "raw") in msg and "download" in msg and "\n" not in msg


def test_missing_cifar_is_data_error(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(tmp_path), False, "cpu")
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "download" in msg and "\n" not in msg


def test_failed_download_is_data_error(tmp_path, monkeypatch):
    # Simulate a machine without network: the fetch helper torchvision uses raises as urllib does offline.
    def offline(url, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    for name, title in (("mnist", "MNIST"), ("cifar10", "CIFAR-10")):
        with pytest.raises(DataError) as e:
            load_dataset(name, str(tmp_path), True, "cpu")
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path}: downloading {title} failed")
        assert "name resolution" in msg and "\n" not in msg


def test_malformed_mnist_is_data_error(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x00\x00garbage")
    with pytest.raises(DataError, match="unreadable"):
        load_dataset("mnist", str(tmp_path), False, "cpu")


def test_test_only_leaves_the_training_set_unread(tmp_path, no_cifar_checksums, monkeypatch):
    """An evaluation loads the test set only: torchvision is never asked for the training split (50k CIFAR images
    an eval does not need), and the test set is the same as a full load's."""
    rows, labels = _write_cifar(tmp_path)
    full = load_dataset("cifar10", str(tmp_path), False, "cpu")
    asked = []
    real = tv_cifar.CIFAR10.__init__

    def spy(self, root, train=True, **kw):
        asked.append(train)
        real(self, root, train=train, **kw)

    monkeypatch.setattr(tv_cifar.CIFAR10, "__init__", spy)
    ds = load_dataset("cifar10", str(tmp_path), False, "cpu", test_only=True)
    assert asked == [False]
    assert torch.equal(ds.test_x, full.test_x) and torch.equal(ds.test_y, full.test_y)
    assert ds.train_x.shape == (0, 3, 32, 32) and ds.spec.train_size == 0 and ds.spec.in_channels == 3
    _write_mnist(tmp_path)
    m = load_dataset("mnist", str(tmp_path), False, "cpu", test_only=True)
    assert m.train_x.shape == (0, 1, 28, 28) and m.test_x.shape == (12, 1, 28, 28)
