"""Model registry: LeNet, VGG-16, ResNet-18 and wide ResNet, scaled by a width factor.

Width conventions follow the robust-pruning papers: ``width = 16`` is the standard network
(LeNet -> Madry's MNIST net, VGG-16 / ResNet-18 -> their usual CIFAR sizes); for ``wrn`` the
width is the widen factor ``k``. Inputs are raw [0, 1] pixels; the models contain no
normalisation of the input.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import nn

from robprune.engine.errors import ConfigError

MODELS: dict[str, Callable[..., nn.Module]] = {}

_T = TypeVar("_T")


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a builder ``fn(width, *, num_classes, in_channels, image_size, depth)`` to MODELS."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return deco


def build_model(
    arch: str,
    width: int,
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    depth: int = 28,
    source: str = "profile",
) -> nn.Module:
    """Build ``arch`` at ``width``; bad arch / width / depth raise ConfigError naming ``source``."""
    if arch not in MODELS:
        choices = ", ".join(repr(k) for k in MODELS)
        raise ConfigError(source, "model.arch", f"one of {choices}", arch)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ConfigError(source, "model.width", "an integer >= 1", width)
    if arch == "wrn" and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6):
        raise ConfigError(source, "model.depth", "an integer >= 10 with (depth - 4) % 6 == 0", depth)
    return MODELS[arch](
        width, num_classes=num_classes, in_channels=in_channels, image_size=image_size, depth=depth
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode inside the block, back in the mode it had after it (an attack must not leave a
    training model in eval mode, nor the reverse)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def float32_stem(x: torch.Tensor):
    """A context in which the stem computes in float32: autocast off on ``x``'s device when it is on there (and
    nothing otherwise). See :class:`StemConv2d`."""
    dev = x.device.type
    return torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext()


class StemConv2d(nn.Conv2d):
    """A network's first convolution, the one the input pixels enter: it computes in float32 even under
    autocast. Under bf16 autocast a plain Conv2d would round its input to bfloat16 first (8 significant bits:
    up to 2**-9, half a grey level, on a pixel in [0.5, 1]), so the network would see an adversarial example up
    to 0.5/255 further from the clean image than the attack's eps (8.5/255 at eps 8/255). The stem is the
    smallest convolution of the network (3 or 1 input channels), so float32 costs little there; its output is
    float32 and the next layer autocasts it as usual. Without autocast it is a plain Conv2d (the same
    parameters and state_dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            with float32_stem(x):
                return super().forward(x.float())
        return super().forward(x)


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The ``.weight`` of every Conv2d and Linear, keyed by parameter name, in named_parameters order."""
    prunable = {
        id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight is not None
    }
    return {name: p for name, p in model.named_parameters() if id(p) in prunable}


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter entries (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- LeNet


class LeNet(nn.Module):
    """Two 5x5 conv + max-pool stages and two linear layers; width 16 is Madry's MNIST network."""

    def __init__(self, width: int, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        c1, c2, hidden = 2 * width, 4 * width, 64 * width
        self.conv1 = StemConv2d(in_channels, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        side = image_size // 4
        self.fc1 = nn.Linear(side * side * c2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


@register("lenet")
def lenet(width: int, *, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **_: object) -> nn.Module:
    return LeNet(width, num_classes, in_channels, image_size)


# --------------------------------------------------------------------------------------------- VGG-16

VGG16_CONFIG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    """VGG with conv3x3-BN-ReLU blocks and a single linear head after global average pooling.

    Max-pools use ``ceil_mode`` so 28x28 inputs reach 1x1 (28-14-7-4-2-1); 32x32 inputs are unchanged.
    """

    def __init__(self, config: list[int | str], width: int, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
                continue
            c_out = max(1, int(item) * width // 16)
            conv = (StemConv2d if not layers else nn.Conv2d)(c_in, c_out, 3, padding=1, bias=False)
            layers += [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register("vgg16")
def vgg16(width: int, *, num_classes: int = 10, in_channels: int = 1, **_: object) -> nn.Module:
    return VGG(VGG16_CONFIG, width, num_classes, in_channels)


# --------------------------------------------------------------------------------------------- ResNet-18


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN plus (1x1 conv-BN) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem (no max-pool), four stages of BasicBlocks, average pool, linear head."""

    def __init__(self, blocks: list[int], width: int, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        widths = [4 * width, 8 * width, 16 * width, 32 * width]
        self.conv1 = StemConv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c_in = widths[0]
        stages = []
        for i, (n, c_out) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(c_in, c_out, stride=2 if i > 0 and j == 0 else 1))
                c_in = c_out
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


@register("resnet18")
def resnet18(width: int, *, num_classes: int = 10, in_channels: int = 1, **_: object) -> nn.Module:
    return ResNet([2, 2, 2, 2], width, num_classes, in_channels)


# --------------------------------------------------------------------------------------------- WRN


class WideBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, 1x1 conv shortcut when shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.relu(self.bn1(x))
        # With a projection shortcut the pre-activation feeds both paths (as in the reference code).
        skip = x if self.shortcut is None else self.shortcut(act)
        out = self.conv2(torch.relu(self.bn2(self.conv1(act))))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis): stage widths 16k, 32k, 64k, (depth - 4) / 6 blocks each."""

    def __init__(self, depth: int, k: int, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * k, 32 * k, 64 * k]
        self.conv1 = StemConv2d(in_channels, 16, 3, padding=1, bias=False)
        c_in = 16
        stages = []
        for i, c_out in enumerate(widths):
            layers = []
            for j in range(n):
                layers.append(WideBlock(c_in, c_out, stride=2 if i > 0 and j == 0 else 1))
                c_in = c_out
            stages.append(nn.Sequential(*layers))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(c_in)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = torch.relu(self.bn(x))
        return self.fc(self.pool(x).flatten(1))


@register("wrn")
def wrn(width: int, *, num_classes: int = 10, in_channels: int = 1, depth: int = 28, **_: object) -> nn.Module:
    return WideResNet(depth, width, num_classes, in_channels)


def cpu_channels_last_hazard(model: nn.Module) -> str | None:
    """Why ``model`` cannot train in channels_last on the CPU, or None: torch 2.14's CPU channels_last path
    crashes (oneDNN corrupts the heap) in the weight gradient of a 1x1 convolution with stride > 1 and 2 to 7
    input channels, such as ResNet-18 width 1's shortcuts."""
    for name, m in model.named_modules():
        if (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and max(m.stride) > 1
                and 2 <= m.in_channels <= 7):
            stride = "x".join(str(v) for v in m.stride) if len(set(m.stride)) > 1 else str(m.stride[0])
            return (f"torch {torch.__version__} crashes in the weight gradient of the 1x1 stride-{stride} conv "
                    f"{name} with fewer than 8 input channels in channels_last")
    return None


class PerModel(Generic[_T]):
    """A value worked out once per model by ``compute(model)`` on first use, and kept as long as the model lives
    (weak keys). ``compute`` must not return None."""

    def __init__(self, compute: Callable[[nn.Module], _T]):
        self._compute = compute
        self._values: weakref.WeakKeyDictionary[nn.Module, _T] = weakref.WeakKeyDictionary()

    def get(self, model: nn.Module, default: _T) -> _T:
        """``model``'s value, computed now if it is not known yet; ``default`` (nothing computed) for a model
        that is not weak-referenceable."""
        try:
            value = self._values.get(model)
        except TypeError:  # not weak-referenceable
            return default
        if value is None:
            value = self._values[model] = self._compute(model)
        return value
