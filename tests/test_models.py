"""Model zoo: state dicts equal the published manifest, forwards are the published architectures
(torchvision equality, golden logits, block-level semantics, feature-map sizes), checkpoints."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from rld.models import MODELS, CheckpointError, build_model, load_checkpoint
from rld.models.shufflenetv1 import channel_shuffle

DATA = Path(__file__).parent / "data"
_spec = importlib.util.spec_from_file_location("make_model_golden", DATA / "make_model_golden.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)

MANIFEST = json.loads(golden.MANIFEST.read_text())
GOLDEN = json.loads(golden.GOLDEN.read_text())
ALL = [(family, name) for family, models in MANIFEST.items() for name in models]


def _build(family: str, name: str) -> nn.Module:
    return build_model(name, MANIFEST[family][name]["logits_shape"][1], family)


def _close(actual, expected, scale: float) -> bool:
    return all(abs(a - e) <= 1e-4 * abs(e) + 1e-5 * scale for a, e in zip(actual, expected))


# ---------------------------------------------------------------- registry and manifest


def test_registry_names_are_the_manifest_names():
    assert {f: set(m) for f, m in MODELS.items()} == {f: set(m) for f, m in MANIFEST.items()}


@pytest.mark.parametrize(("name", "family", "listed"), [
    ("resnet9", "cifar", "resnet8x4"), ("MobileNetV1", "cifar", "ShuffleV2"),
    ("resnet8", "imagenet", "MobileNetV1"), ("resnet8", "tiny", "imagenet"),
])
def test_unknown_name_or_family_lists_allowed(name, family, listed):
    with pytest.raises(ValueError, match=listed):
        build_model(name, 10, family)


@pytest.mark.parametrize(("family", "name"), ALL)
def test_state_dict_and_params_equal_manifest(family, name):
    spec = MANIFEST[family][name]
    with torch.device("meta"):  # shapes only: skips allocating and initialising weights
        model = _build(family, name)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == spec["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == spec["params"]


@pytest.mark.parametrize(("family", "name"), ALL)
@torch.no_grad()
def test_forward_shape_and_golden_logits(family, name):
    spec = MANIFEST[family][name]
    shape = golden.golden_batch(family, spec)
    model = golden.fixed_init(_build(family, name))
    logits = model(golden.fixed_input(shape))
    assert isinstance(logits, torch.Tensor)
    assert list(logits.shape) == [shape[0], spec["logits_shape"][1]]
    got, want = golden.summary(logits), GOLDEN[family][name]
    scale = want["abs_sum"] / logits.numel()
    for key in ("sum", "abs_sum"):
        assert _close([got[key]], [want[key]], scale * logits.numel()), (key, got[key], want[key])
    for key in ("head", "tail"):
        assert _close(got[key], want[key], scale), (key, got[key], want[key])
    assert got["argmax"] == want["argmax"]


# ---------------------------------------------------------------- ImageNet: torchvision


@pytest.mark.parametrize("depth", [18, 34, 50])
@torch.no_grad()
def test_imagenet_resnet_equals_torchvision(depth):
    reference = golden.fixed_init(getattr(torchvision.models, f"resnet{depth}")(weights=None))
    ours = build_model(f"ResNet{depth}", 1000, "imagenet").eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = golden.fixed_input([1, 3, 112, 112])  # fully convolutional: 112 exercises every layer
    assert torch.equal(ours(x), reference(x))


# ---------------------------------------------------------------- feature-map sizes

SIZES = {
    ("cifar", "resnet56"): {"conv1": [16, 32, 32], "layer1": [16, 32, 32],
                            "layer2": [32, 16, 16], "layer3": [64, 8, 8]},
    ("cifar", "resnet8x4"): {"layer1": [64, 32, 32], "layer3": [256, 8, 8]},
    ("cifar", "ResNet18"): {"conv1": [64, 32, 32], "layer1": [64, 32, 32], "layer4": [512, 4, 4]},
    ("cifar", "ResNet50"): {"layer1": [256, 32, 32], "layer4": [2048, 4, 4]},
    ("cifar", "wrn_40_2"): {"conv1": [16, 32, 32], "block1": [32, 32, 32],
                            "block2": [64, 16, 16], "block3": [128, 8, 8]},
    ("cifar", "vgg13"): {"block0": [64, 32, 32], "block1": [128, 16, 16], "block2": [256, 8, 8],
                         "block3": [512, 4, 4], "block4": [512, 4, 4]},
    ("cifar", "MobileNetV2"): {"conv1": [16, 16, 16], "blocks.0": [8, 16, 16],
                               "blocks.1": [12, 16, 16], "blocks.2": [16, 8, 8],
                               "blocks.3": [32, 4, 4], "blocks.4": [48, 4, 4],
                               "blocks.5": [80, 2, 2], "blocks.6": [160, 2, 2],
                               "conv2": [1280, 2, 2], "avgpool": [1280, 1, 1]},
    ("cifar", "ShuffleV1"): {"conv1": [24, 32, 32], "layer1": [240, 16, 16],
                             "layer2": [480, 8, 8], "layer3": [960, 4, 4]},
    ("cifar", "ShuffleV2"): {"conv1": [24, 32, 32], "layer1": [116, 16, 16],
                             "layer2": [232, 8, 8], "layer3": [464, 4, 4], "conv2": [1024, 4, 4]},
    ("imagenet", "MobileNetV1"): {"model.0": [32, 112, 112], "model.2": [128, 56, 56],
                                  "model.4": [256, 28, 28], "model.6": [512, 14, 14],
                                  "model.13": [1024, 7, 7], "model.14": [1024, 1, 1]},
}


def _output_sizes(model: nn.Module, names, x: torch.Tensor) -> dict[str, list[int]]:
    sizes: dict[str, list[int]] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(
        lambda _m, _i, out, n=n: sizes.__setitem__(n, list(out.shape[1:]))) for n in names]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return sizes


@pytest.mark.parametrize(("family", "name"), list(SIZES))
def test_feature_map_sizes(family, name):
    shape = [1, *MANIFEST[family][name]["input"][1:]]
    expected = SIZES[family, name]
    assert _output_sizes(_build(family, name), expected, torch.randn(shape)) == expected


def test_vgg_pools_after_block3_only_for_64px_inputs():
    model = build_model("vgg8", 100)
    assert _output_sizes(model, ["block4"], torch.randn(1, 3, 64, 64)) == {"block4": [512, 4, 4]}
    assert _output_sizes(model, ["block4"], torch.randn(1, 3, 32, 32)) == {"block4": [512, 4, 4]}
    assert isinstance(model.block3[-1], nn.BatchNorm2d)  # block's last ReLU is in forward()


# ---------------------------------------------------------------- block semantics


def _silence(bn: nn.BatchNorm2d) -> None:
    """Make a BN output exactly zero, removing its branch from the block."""
    nn.init.zeros_(bn.weight)
    nn.init.zeros_(bn.bias)


@torch.no_grad()
def test_cifar_resnet_shortcuts_are_projections_option_b():
    model = build_model("resnet20", 100).eval()
    ds = model.layer2[0].downsample
    assert isinstance(ds, nn.Sequential) and isinstance(ds[1], nn.BatchNorm2d)
    assert (ds[0].kernel_size, ds[0].stride, ds[0].bias) == ((1, 1), (2, 2), None)
    x = torch.randn(2, 16, 32, 32)
    identity_block, down_block = model.layer1[1], model.layer2[0]
    _silence(identity_block.bn2)
    _silence(down_block.bn2)
    assert torch.equal(identity_block(x), F.relu(x))
    assert torch.allclose(down_block(x), F.relu(ds(x)), atol=1e-6)
    assert isinstance(build_model("resnet8x4", 100).layer1[0].downsample[0], nn.Conv2d)


@torch.no_grad()
def test_wrn_preactivation_and_shortcut():
    model = build_model("wrn_16_2", 100).eval()
    same, wider = model.block2.layer[1], model.block2.layer[0]
    for block in (same, wider):
        nn.init.zeros_(block.conv2.weight)
    y = torch.randn(2, 64, 16, 16)
    assert torch.equal(same(y), y)  # raw input as shortcut, no ReLU after the sum
    x = torch.randn(2, 32, 32, 32)
    expected = wider.convShortcut(F.relu(wider.bn1(x)))  # 1x1/2 conv on the pre-activation
    assert wider.convShortcut.stride == (2, 2)
    assert torch.allclose(wider(x), expected, atol=1e-6)


def test_channel_shuffle_permutation():
    x = torch.arange(6.0).reshape(1, 6, 1, 1)
    assert channel_shuffle(x, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]


@torch.no_grad()
def test_shufflenet_v1_units():
    model = build_model("ShuffleV1", 100).eval()
    assert [model.layer1[0].conv1.groups, model.layer1[1].conv1.groups,
            model.layer2[0].conv1.groups, model.layer1[0].conv3.groups] == [1, 3, 3, 3]
    down, unit = model.layer2[0], model.layer2[1]
    _silence(down.bn3)
    _silence(unit.bn3)
    x = torch.randn(2, 240, 16, 16)
    out = down(x)  # relu(cat[branch = 0, avgpool3x3/2(x)])
    assert out.shape == (2, 480, 8, 8)
    assert torch.equal(out[:, :240], torch.zeros(2, 240, 8, 8))
    assert torch.allclose(out[:, 240:], F.relu(F.avg_pool2d(x, 3, 2, 1)))
    y = torch.randn(2, 480, 8, 8)
    assert torch.equal(unit(y), F.relu(y))


@torch.no_grad()
def test_shufflenet_v2_units():
    model = build_model("ShuffleV2", 100).eval()
    unit = model.layer2[1]
    _silence(unit.bn3)
    x = torch.randn(2, 232, 8, 8)
    out = unit(x)  # shuffle(cat[first half, relu(0)], 2): first half on even channels
    assert torch.equal(out[:, 0::2], x[:, :116])
    assert torch.equal(out[:, 1::2], torch.zeros(2, 116, 8, 8))
    down = model.layer2[0]
    _silence(down.bn5)  # right branch silent: left branch on even channels
    out = down(torch.randn(2, 116, 16, 16))
    assert out.shape == (2, 232, 8, 8)
    assert torch.equal(out[:, 1::2], torch.zeros(2, 116, 8, 8))
    assert out[:, 0::2].abs().sum() > 0


@torch.no_grad()
def test_mobilenetv2_inverted_residuals():
    model = build_model("MobileNetV2", 100).eval()
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())  # the zoo uses ReLU
    residual, strided = model.blocks[2][1], model.blocks[2][0]
    _silence(residual.conv[7])
    _silence(strided.conv[7])
    assert strided.conv[3].stride == (2, 2) and strided.conv[3].groups == 72
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(residual(x), x)
    assert torch.equal(strided(torch.randn(2, 12, 16, 16)), torch.zeros(2, 16, 8, 8))


# ---------------------------------------------------------------- checkpoints


def _small():
    return golden.fixed_init(build_model("resnet8", 10))


@pytest.mark.parametrize("fmt", ["plain", "model", "state_dict", "module", "legacy"])
@torch.no_grad()
def test_load_checkpoint_formats_round_trip(tmp_path, fmt):
    source = _small()
    sd = source.state_dict()
    crd = {"epoch": 240, "model": sd, "accuracy": torch.tensor(77.5),
           "optimizer": {"state": {}, "param_groups": [{"lr": 0.05, "params": [0, 1]}]}}
    obj = {
        "plain": sd,
        "model": crd,
        "state_dict": {"state_dict": sd, "top1": 71.0},
        "module": {f"module.{k}": v for k, v in sd.items()},
        "legacy": {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 240},
    }[fmt]
    torch.save(obj, tmp_path / "ckpt.pth", _use_new_zipfile_serialization=fmt != "legacy")
    target = build_model("resnet8", 10).eval()
    meta = load_checkpoint(target, tmp_path / "ckpt.pth")
    expected = {"model": {k: v for k, v in crd.items() if k != "model"},
                "state_dict": {"top1": 71.0}, "legacy": {"epoch": 240}}
    assert meta == expected.get(fmt, {})
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(target(x), source(x))


def test_wrong_architecture_names_keys(tmp_path):
    path = tmp_path / "resnet8.pth"
    torch.save({"model": build_model("resnet8", 10).state_dict()}, path)
    with pytest.raises(CheckpointError, match="resnet8.pth") as err:
        load_checkpoint(build_model("resnet14", 10), path)
    assert "missing keys" in str(err.value) and "layer1.1.conv1.weight" in str(err.value)
    with pytest.raises(CheckpointError, match=r"fc\.weight \(10, 64\) vs model \(100, 64\)"):
        load_checkpoint(build_model("resnet8", 100), path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \[layer1\.0\.conv1\.weight, "):
        load_checkpoint(build_model("wrn_16_1", 10), path)


@pytest.mark.parametrize("damage", ["truncated", "random", "not_a_checkpoint", "directory"])
def test_unreadable_checkpoint_names_file(tmp_path, damage):
    path = tmp_path / "bad.pth"
    if damage == "truncated":
        torch.save(build_model("resnet8", 10).state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif damage == "not_a_checkpoint":
        torch.save({"epoch": 3, "lr": 0.1}, path)
    else:
        path.mkdir()
    with pytest.raises(CheckpointError, match="bad.pth") as err:
        load_checkpoint(build_model("resnet8", 10), path)
    assert isinstance(err.value, ValueError) and len(str(err.value)) < 400


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_checkpoint(build_model("resnet8", 10), tmp_path / "nope.pth")
