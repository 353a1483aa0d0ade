import pytest
import torch
from torch import nn

from robprune.engine.errors import ConfigError
from robprune.engine.models import MODELS, build_model, count_parameters, prunable_parameters, register

SMALL = [
    ("lenet", 1, {}),
    ("lenet", 2, {}),
    ("lenet", 4, {}),
    ("vgg16", 1, {}),
    ("resnet18", 1, {}),
    ("wrn", 1, {"depth": 10}),
]


@pytest.mark.parametrize("arch,width,extra", SMALL)
@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32)])
def test_forward_shapes(arch, width, extra, in_channels, size):
    torch.manual_seed(0)
    model = build_model(arch, width, in_channels=in_channels, image_size=size, **extra)
    x = torch.rand(3, in_channels, size, size)
    out = model(x)
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()
    model.eval()
    assert model(x).shape == (3, 10)


def test_registry_has_the_four_archs():
    assert list(MODELS) == ["lenet", "vgg16", "resnet18", "wrn"]


def test_register_rejects_duplicates():
    with pytest.raises(ValueError):
        register("lenet")(lambda width, **_: nn.Linear(1, 1))


def test_num_classes():
    assert build_model("lenet", 1, num_classes=7)(torch.rand(2, 1, 28, 28)).shape == (2, 7)


def test_lenet_w16_is_madry_mnist_net():
    model = build_model("lenet", 16)
    expected = (1 * 32 * 25 + 32) + (32 * 64 * 25 + 64) + (7 * 7 * 64 * 1024 + 1024) + (1024 * 10 + 10)
    assert expected == 3_274_634
    assert count_parameters(model) == expected
    assert model.conv1.out_channels == 32 and model.conv2.out_channels == 64
    assert model.fc1.out_features == 1024


def test_lenet_32x32_fc1_size():
    model = build_model("lenet", 16, in_channels=3, image_size=32)
    assert model.fc1.in_features == 8 * 8 * 64


def test_resnet18_w16_is_standard_cifar_count():
    assert count_parameters(build_model("resnet18", 16, in_channels=3, image_size=32)) == 11_173_962


def test_resnet18_w16_stage_widths():
    model = build_model("resnet18", 16, in_channels=3, image_size=32)
    assert [getattr(model, f"layer{i}")[0].conv1.out_channels for i in range(1, 5)] == [64, 128, 256, 512]
    # no max-pool in the stem
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_vgg16_w16_structure():
    model = build_model("vgg16", 16, in_channels=3, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][0].in_features == 512
    # standard CIFAR VGG-16 with BN, bias-free convs and a 512 -> 10 head
    assert count_parameters(model) == 14_724_042


def test_vgg16_channels_at_least_one():
    convs = [m for m in build_model("vgg16", 1).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 4, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 32]


def test_wrn_28_10_count_and_widths():
    model = build_model("wrn", 10, in_channels=3, image_size=32, depth=28)
    assert count_parameters(model) == 36_479_194  # the published WRN-28-10 size (36.5M)
    assert len(model.block1) == len(model.block2) == len(model.block3) == 4
    assert [b[0].conv1.out_channels for b in (model.block1, model.block2, model.block3)] == [160, 320, 640]
    assert model.conv1.out_channels == 16
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_prunable_names_lenet():
    names = list(prunable_parameters(build_model("lenet", 2)))
    assert names == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


def test_prunable_resnet18_only_conv_and_linear_weights():
    model = build_model("resnet18", 1)
    params = prunable_parameters(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(params) == len(convs) + 1 == 21
    assert "layer1.0.conv1.weight" in params and "layer2.0.shortcut.0.weight" in params
    assert list(params)[-1] == "fc.weight"
    assert all(p.dim() in (2, 4) for p in params.values())
    order = [n for n, _ in model.named_parameters() if n in params]
    assert order == list(params)


def test_prunable_wrn_and_vgg_counts():
    wrn = prunable_parameters(build_model("wrn", 1, depth=10))
    # stem + 3 stages x 1 block x 2 convs + 2 projection shortcuts (stage 1 keeps 16 channels at k=1) + fc
    assert len(wrn) == 1 + 6 + 2 + 1
    vgg = prunable_parameters(build_model("vgg16", 1))
    assert len(vgg) == 14


@pytest.mark.parametrize("arch", ["lenet", "vgg16", "resnet18"])
def test_parameters_grow_like_width_squared(arch):
    counts = [count_parameters(build_model(arch, w, in_channels=3, image_size=32)) for w in (2, 4, 8)]
    for small, big in zip(counts, counts[1:]):
        assert 3.5 < big / small < 4.1


def test_unknown_arch_is_config_error():
    with pytest.raises(ConfigError) as info:
        build_model("alexnet", 16)
    msg = str(info.value)
    assert msg == "profile: model.arch: expected one of 'lenet', 'vgg16', 'resnet18', 'wrn', found 'alexnet'"
    with pytest.raises(ConfigError, match=r"^my\.toml: model\.arch"):
        build_model("alexnet", 16, source="my.toml")


@pytest.mark.parametrize("depth", [8, 12, 27])
def test_bad_wrn_depth(depth):
    with pytest.raises(ConfigError, match="model.depth"):
        build_model("wrn", 1, depth=depth)


@pytest.mark.parametrize("width", [0, -1, True, 1.5])
def test_bad_width(width):
    with pytest.raises(ConfigError, match="model.width"):
        build_model("lenet", width)


@pytest.mark.parametrize("arch,width,extra", SMALL[1:])
def test_stem_computes_in_float32_under_bf16_autocast(arch, width, extra):
    """The first convolution sees the input unrounded under autocast (a bf16 stem rounds pixels by up to
    2**-9); the layers after it still autocast. CPU autocast stands in for CUDA's: the same mechanism."""
    from robprune.engine.attacks.fastpath import _AttackConv, _AttackConvPool, attack_model
    from robprune.engine.models import StemConv2d

    torch.manual_seed(0)
    model = build_model(arch, width, in_channels=3, image_size=32, **extra).eval()
    stems = [m for m in model.modules() if type(m) is StemConv2d]
    assert len(stems) == 1
    stem = stems[0]
    assert next(m for m in model.modules() if isinstance(m, nn.Conv2d)) is stem  # the first convolution
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        exact = nn.functional.conv2d(x, stem.weight, stem.bias, stem.stride, stem.padding)
        rounded = nn.functional.conv2d(x.bfloat16().float(), stem.weight.bfloat16().float(), None if stem.bias is None
                                       else stem.bias.bfloat16().float(), stem.stride, stem.padding)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = stem(x)
            plain = nn.Conv2d.forward(stem, x)
            logits = model(x)
    assert out.dtype == torch.float32 and torch.equal(out, exact)
    assert plain.dtype == torch.bfloat16 and (plain.float() - exact).abs().max() > 1e-3  # what it avoids
    assert (rounded - exact).abs().max() > 0
    assert logits.dtype == torch.bfloat16  # the rest of the network still autocasts
    # the attacks' rewrite of the model keeps the stem float32 too, and still folds / rearranges it
    net = attack_model(model)
    assert net is not model
    fast = [m for m in net.modules() if isinstance(m, _AttackConv)]
    assert fast[0].stem and not any(m.stem for m in fast[1:])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = next(m for m in net.modules() if isinstance(m, (_AttackConv, _AttackConvPool)))
        y = first(x)
    assert y.dtype == torch.float32


def test_stem_keeps_state_dict_keys_and_plain_conv_results():
    from robprune.engine.models import StemConv2d

    torch.manual_seed(0)
    model = build_model("lenet", 1)
    assert type(model.conv1) is StemConv2d and "conv1.weight" in model.state_dict()
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(model.conv1(x), nn.Conv2d.forward(model.conv1, x))  # no autocast: a plain Conv2d
    x64 = x.double()
    assert model.double().conv1(x64).dtype == torch.float64  # no cast without autocast
