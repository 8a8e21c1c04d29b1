"""Intermediate features of every zoo model (rld/models/features.py): logits bit-identical to
``forward``, feature lists as mdistiller indexes them, channel counts, shapes for an input size,
the BNs before each stage's final ReLU (OFD), compile-friendliness."""

from functools import cache

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rld.models import MODELS, Features, build_model, feature_shapes
from rld.models.shufflenetv1 import channel_shuffle

ALL = [(family, name) for family, models in MODELS.items() for name in models]
CLASSES = {"cifar": 100, "imagenet": 1000}


def _size(family: str, name: str) -> int:
    """Smallest cheap input size: MobileNetV1 ends in AvgPool2d(7) (needs 224), the ImageNet
    ResNets pool adaptively."""
    return 32 if family == "cifar" else 224 if name == "MobileNetV1" else 112


@cache
def _model(family: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, CLASSES[family], family)


def _meta(family: str, name: str) -> nn.Module:
    with torch.device("meta"):  # shapes only: no weights allocated or initialised
        return build_model(name, CLASSES[family], family)


def _head(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _check_relation(family: str, name: str, f: Features, model: nn.Module) -> None:
    """How ``feats`` follow from ``preact_feats`` for each architecture."""
    pairs = list(zip(f.feats, f.preact_feats, strict=True))
    if family == "cifar":  # stem entry: the post-ReLU stem in both lists (mdistiller)
        assert f.preact_feats[0] is f.feats[0]
    if name == "MobileNetV2":  # linear bottlenecks: no ReLU after a group, same tensors
        assert all(a is b for a, b in pairs)
    elif name.startswith("wrn"):  # pre-activation: preact = the next unit's BN of the feature
        for bn, (feat, pre) in zip(model.bn_before_relu(), pairs[1:], strict=True):
            assert torch.equal(pre, bn(feat))
    elif name == "ShuffleV2":  # preact is unshuffled (mdistiller)
        for feat, pre in pairs[1:]:
            assert torch.equal(feat, channel_shuffle(F.relu(pre), 2))
    else:  # the stage's final op is a ReLU; ImageNet: the stem entry too (pre-ReLU stem BN)
        for feat, pre in pairs:
            assert torch.equal(feat, F.relu(pre))
        first = 0 if family == "imagenet" else 1
        assert all((pre < 0).any() for _, pre in pairs[first:])  # really before the ReLU


@pytest.mark.parametrize(("family", "name"), ALL)
def test_forward_features_agree_with_forward_and_shapes(family, name):
    model = _model(family, name)
    size, classes = _size(family, name), CLASSES[family]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.train()  # batch statistics: every BN runs once, logits still bit-identical
        batches = [m.num_batches_tracked.clone() for m in model.modules()
                   if isinstance(m, nn.BatchNorm2d)]
        f = model.forward_features(x)
        assert [m.num_batches_tracked - b for m, b in zip(
            (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)), batches)] == [1] * len(
            batches)
        assert torch.equal(f.logits, model(x))
        model.eval()
        f = model.forward_features(x)
        assert torch.equal(f.logits, model(x))
    assert isinstance(f, Features)
    channels = model.stage_channels()
    assert len(f.feats) == len(f.preact_feats) == len(channels)
    assert [t.shape[1] for t in f.feats] == [t.shape[1] for t in f.preact_feats] == channels
    assert [t.shape for t in f.feats] == [t.shape for t in f.preact_feats]
    head = _head(model)
    assert f.pooled.shape == (2, head.in_features) and f.logits.shape == (2, classes)
    assert torch.equal(head(f.pooled), f.logits)
    _check_relation(family, name, f, model)
    assert feature_shapes(model, size) == {
        "feats": [tuple(t.shape[1:]) for t in f.feats],
        "preact_feats": [tuple(t.shape[1:]) for t in f.preact_feats],
        "pooled": head.in_features, "logits": classes,
    }
    assert not model.training  # feature_shapes restored eval mode


def _stages(*chw):
    return [tuple(s) for s in chw]


# Written from the published architectures (CRD zoo / torchvision / MobileNetV1 paper) and
# mdistiller's feature lists, not from running the code: (feats shapes, pooled dim).
EXPECTED = {
    ("cifar", "resnet8x4"): (_stages((32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)), 256),
    ("cifar", "resnet32x4"): (_stages((32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)),
                              256),
    ("cifar", "resnet56"): (_stages((16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)), 64),
    ("cifar", "ResNet50"): (_stages((64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8),
                                    (2048, 4, 4)), 2048),
    ("cifar", "wrn_40_2"): (_stages((16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)), 128),
    ("cifar", "vgg8"): (_stages((64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4),
                                (512, 4, 4)), 512),
    ("cifar", "vgg13"): (_stages((64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4),
                                 (512, 4, 4)), 512),
    ("cifar", "MobileNetV2"): (_stages((16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4),
                                       (160, 2, 2)), 1280),
    ("cifar", "ShuffleV1"): (_stages((24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4)), 960),
    ("cifar", "ShuffleV2"): (_stages((24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4)),
                             1024),
    ("imagenet", "ResNet18"): (_stages((64, 112, 112), (64, 56, 56), (128, 28, 28),
                                       (256, 14, 14), (512, 7, 7)), 512),
    ("imagenet", "ResNet34"): (_stages((64, 112, 112), (64, 56, 56), (128, 28, 28),
                                       (256, 14, 14), (512, 7, 7)), 512),
    ("imagenet", "ResNet50"): (_stages((64, 112, 112), (256, 56, 56), (512, 28, 28),
                                       (1024, 14, 14), (2048, 7, 7)), 2048),
    ("imagenet", "MobileNetV1"): (_stages((128, 56, 56), (256, 28, 28), (512, 14, 14),
                                          (1024, 7, 7)), 1024),
}

# mdistiller's get_bn_before_relu, as module names (ShuffleV1: added here, see shufflenetv1.py).
BN_NAMES = {
    ("cifar", "resnet8x4"): ["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"],
    ("cifar", "resnet32x4"): ["layer1.4.bn2", "layer2.4.bn2", "layer3.4.bn2"],
    ("cifar", "ResNet50"): ["layer1.2.bn3", "layer2.3.bn3", "layer3.5.bn3", "layer4.2.bn3"],
    ("cifar", "wrn_40_2"): ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"],
    ("cifar", "vgg13"): ["block1.4", "block2.4", "block3.4", "block4.4"],
    ("cifar", "MobileNetV2"): ["blocks.1.1.conv.7", "blocks.2.2.conv.7", "blocks.4.2.conv.7",
                               "blocks.6.0.conv.7"],
    ("cifar", "ShuffleV1"): ["layer1.3.bn3", "layer2.7.bn3", "layer3.3.bn3"],
    ("imagenet", "ResNet18"): ["layer2.1.bn2", "layer3.1.bn2", "layer4.1.bn2"],
    ("imagenet", "ResNet50"): ["layer2.3.bn3", "layer3.5.bn3", "layer4.2.bn3"],
    ("imagenet", "MobileNetV1"): ["model.3.4", "model.5.4", "model.11.4", "model.13.4"],
}


@pytest.mark.parametrize(("family", "name"), list(EXPECTED))
def test_published_feature_shapes(family, name):
    feats, pooled = EXPECTED[family, name]
    model = _meta(family, name)  # feature_shapes works on a model without weights too
    size = 32 if family == "cifar" else 224
    assert feature_shapes(model, size) == {
        "feats": feats, "preact_feats": feats, "pooled": pooled, "logits": CLASSES[family]}
    assert model.stage_channels() == [c for c, _, _ in feats]


@pytest.mark.parametrize(("family", "name"), list(BN_NAMES))
def test_bn_before_relu_are_mdistillers_modules(family, name):
    model = _meta(family, name)
    names = {id(m): n for n, m in model.named_modules()}
    bns = model.bn_before_relu()
    assert all(isinstance(bn, nn.BatchNorm2d) for bn in bns)
    assert [names.get(id(bn)) for bn in bns] == BN_NAMES[family, name]


@pytest.mark.parametrize(("family", "name"), [a for a in ALL if a != ("cifar", "ShuffleV2")])
def test_bn_before_relu_match_the_last_stage_channels(family, name):
    model = _meta(family, name)
    bns, channels = model.bn_before_relu(), model.stage_channels()
    modules = {id(m) for m in model.modules()}
    assert 3 <= len(bns) <= len(channels) and all(id(bn) in modules for bn in bns)
    assert [bn.num_features for bn in bns] == channels[-len(bns):]


@pytest.mark.parametrize(("family", "name"), [
    ("cifar", "resnet8x4"), ("cifar", "ResNet18"), ("cifar", "wrn_16_1"), ("cifar", "vgg8"),
    ("cifar", "MobileNetV2"), ("cifar", "ShuffleV1"), ("imagenet", "ResNet18"),
    ("imagenet", "MobileNetV1"),
])
@torch.no_grad()
def test_bn_before_relu_output_enters_the_preactivation(family, name):
    """Shifting a BN's output by 1 shifts its stage's pre-activation (aligned from the end, as
    OFD aligns them) by exactly 1: the BN is the last op before the residual sum / ReLU."""
    model = _model(family, name).eval()
    size = _size(family, name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    base = model.forward_features(x).preact_feats
    bns = model.bn_before_relu()
    for k, bn in enumerate(bns):
        handle = bn.register_forward_hook(lambda _m, _i, out: out + 1.0)
        try:
            pre = model.forward_features(x).preact_feats[len(base) - len(bns) + k]
        finally:
            handle.remove()
        ref = base[len(base) - len(bns) + k]
        assert torch.allclose(pre, ref + 1.0, atol=1e-4 * ref.abs().max().item()), (name, k)


def test_shufflenet_v2_has_no_bn_before_relu():
    with pytest.raises(NotImplementedError, match="ShuffleV2 .* OFD teacher"):
        _meta("cifar", "ShuffleV2").bn_before_relu()


def test_feature_shapes_change_nothing():
    model = _model("cifar", "vgg8")
    model.train()
    model.block2.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # follows the input size, with VGG's extra pool after block 3 for 64x64 inputs
    assert feature_shapes(model, 64)["feats"][-2:] == [(512, 8, 8), (512, 4, 4)]
    assert model.training and model.block1[1].training and not model.block2[1].training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())
    model.eval()


@pytest.mark.parametrize(("family", "name"), [
    ("cifar", "resnet8"), ("cifar", "wrn_16_1"), ("cifar", "vgg8"), ("cifar", "ShuffleV2"),
])
def test_forward_features_compile_in_one_graph(family, name):
    """No graph break (no Python side effect or data-dependent branch): Dynamo alone, whole
    graph, same numbers."""
    model = _model(family, name).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model.forward_features, backend="eager", fullgraph=True)
        with torch.no_grad():
            got, want = compiled(x), model.forward_features(x)
    finally:
        torch._dynamo.reset()
    assert isinstance(got, Features)
    for a, b in zip([got.logits, *got.feats, *got.preact_feats, got.pooled],
                    [want.logits, *want.feats, *want.preact_feats, want.pooled], strict=True):
        assert torch.equal(a, b)
