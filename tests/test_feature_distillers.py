"""Feature distillers (rld.distillers.feature): construction from the models' features, the
reference releases' extra-parameter counts, gradients, CRD's memory and sampling, resume
exactness, the fast path (bf16 autocast, torch.compile without graph breaks), the per-pair
configs and the checks of a pair."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rld.config import register_configs
from rld.distillers import build_distiller
from rld.distillers.feature import OFD, ContrastMemory, ConvRegressor, FitNet, ReviewKD
from rld.errors import ConfigError
from rld.models import build_model
from rld.validate import validate

CONF = Path(__file__).resolve().parent.parent / "conf"
register_configs()

BASE = dict(ce_weight=1.0, kd_weight=1.0, warmup=0)
CFGS = {
    "fitnet": dict(hint_layer=2),
    "ofd": {},
    "reviewkd": dict(student_preact=False),
    "crd": dict(feat_dim=16, nce_k=20, nce_t=0.07, nce_momentum=0.5, nce_replace=False),
}
FEATURE_DISTILLERS = tuple(CFGS)
NUM_TRAIN, NUM_CLASSES = 60, 10
LABELS = torch.arange(NUM_TRAIN) % NUM_CLASSES


def _cfg(name: str, **overrides) -> SimpleNamespace:
    return SimpleNamespace(name=name, **{**BASE, **CFGS[name], **overrides})


def _models(student: str = "resnet8", teacher: str = "resnet14", family: str = "cifar"):
    torch.manual_seed(0)
    s = build_model(student, NUM_CLASSES, family)
    t = build_model(teacher, NUM_CLASSES, family).eval()
    return s, t


def _build(name: str, s, t, image_size: int = 32, **overrides):
    return build_distiller(_cfg(name, **overrides), student=s, teacher=t, image_size=image_size,
                           num_train=NUM_TRAIN, train_labels=LABELS)


def _batch(n: int = 4, size: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=g), torch.randint(0, NUM_CLASSES, (n,)),
            torch.randperm(NUM_TRAIN, generator=g)[:n])


# --------------------------------------------------------------------------- counts
def test_extra_parameters_of_resnet32x4_resnet8x4_follow_the_construction_rule():
    """resnet32x4 and resnet8x4 have the same maps: stem 32@32, stages 64@32, 128@16,
    256@8, pooled 256.  mdistiller's get_extra_parameters counts trainable parameters (not BN
    running statistics) and, for CRD, its memory buffers."""
    s, t = _models("resnet8x4", "resnet32x4")
    bn = lambda c: 2 * c  # noqa: E731  (BN weight + bias)
    # FitNet, hint 2: 128@16 -> 128@16, a 1x1 conv with bias, then BN
    fitnet = 128 * 128 + 128 + bn(128)
    # OFD: a 1x1 conv (no bias) + BN per stage, 64, 128, 256 channels
    ofd = sum(c * c + bn(c) for c in (64, 128, 256))
    # ReviewKD: levels (in = out) 64, 128, 256 and pooled 256, mid = min(512, 256) = 256; ABF =
    # 1x1 conv in->mid + BN, 3x3 conv mid->out + BN, and (not the deepest) 1x1 conv 2mid->2
    mid = 256
    abf = lambda c, fuse: c * mid + bn(mid) + 9 * mid * c + bn(c) + fuse * (2 * mid * 2 + 2)  # noqa: E731
    reviewkd = abf(64, 1) + abf(128, 1) + abf(256, 1) + abf(256, 0)
    # CRD on CIFAR-100: two 256 -> 128 linear embeddings and two 50000 x 128 memories
    crd = 2 * (256 * 128 + 128) + 2 * 50000 * 128
    assert (fitnet, ofd, reviewkd, crd) == (16768, 86912, 1808774, 12865792)
    labels = torch.arange(50000) % 100
    got = {n: build_distiller(_cfg(n, **({"feat_dim": 128} if n == "crd" else {})), student=s,
                              teacher=t, image_size=32, num_train=50000, train_labels=labels)
           .extra_parameters() for n in FEATURE_DISTILLERS}
    assert got == {"fitnet": fitnet, "ofd": ofd, "reviewkd": reviewkd, "crd": crd}


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", FEATURE_DISTILLERS)
def test_gradients_reach_the_extra_modules_and_the_student_never_the_teacher(name):
    s, t = _models()
    d = _build(name, s, t).train()
    assert d.needs_teacher and d.needs_features and d.needs_index == (name == "crd")
    x, y, index = _batch()
    ft = t.forward_features(x)  # no torch.no_grad: a leak would reach the teacher
    loss = d.distill(s.forward_features(x), ft, y, index)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in t.parameters())
    extra = list(d.named_parameters())
    assert extra and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in extra)
    assert s.conv1.weight.grad.abs().sum() > 0  # the feature term alone reaches the student


def test_crd_needs_the_indices():
    s, t = _models()
    x, y, _ = _batch()
    d = _build("crd", s, t)
    with pytest.raises(ValueError, match="indices"):
        d.terms(s.forward_features(x), t.forward_features(x), y, epoch=1)


def test_reviewkd_warms_up_over_20_epochs_of_its_weight():
    s, t = _models()
    d = _build("reviewkd", s, t, kd_weight=5.0, warmup=20)
    x, y, _ = _batch()
    fs, ft = s.forward_features(x), t.forward_features(x)
    raw = d.distill(fs, ft, y)
    for epoch, ramp in ((5, 0.25), (20, 1.0), (30, 1.0)):
        terms = d.terms(fs, ft, y, epoch)
        assert terms.keys() == {"ce", "reviewkd"}
        torch.testing.assert_close(terms["reviewkd"], ramp * 5.0 * raw)


# --------------------------------------------------------------------------- CRD memory
def _memory(k: int = 5, replace: bool = False, dim: int = 8) -> ContrastMemory:
    torch.manual_seed(0)
    return ContrastMemory(dim, LABELS, k, temperature=0.07, momentum=0.5, replace=replace)


@pytest.mark.parametrize("k, replace", [(5, False), (45, False), (5, True)])
def test_crd_negatives_come_uniformly_from_other_classes(k, replace):
    mem = _memory(k, replace)
    # 60 rows, 10 classes of 6: pools of 54; k = 45 <= 54 draws without replacement too
    assert mem.replace == replace
    index = torch.tensor([0, 7, 13]).repeat(3000)
    torch.manual_seed(3)
    idx = mem.sample(index)
    assert idx.shape == (9000, k + 1) and idx.dtype == torch.int64
    assert torch.equal(idx[:, 0], index)
    neg = idx[:, 1:]
    assert (LABELS[neg] != LABELS[idx[:, :1]]).all()  # other classes only: no positive
    if not replace:
        assert (neg.sort(dim=1).values.diff(dim=1) != 0).all()  # distinct in each row
    counts = torch.bincount(neg[::3].flatten(), minlength=NUM_TRAIN).double()  # row 0's
    pool = LABELS != LABELS[0]
    expected = 3000 * k / 54  # each of the 54 others equally likely (> 6 std margins)
    assert (counts[~pool] == 0).all()
    assert counts[pool].min() > 0.6 * expected and counts[pool].max() < 1.4 * expected


def test_crd_draws_with_replacement_when_a_pool_is_smaller_than_k():
    mem = _memory(k=80)
    assert mem.replace
    idx = mem.sample(torch.tensor([5, 6]))
    assert idx.shape == (2, 81) and (LABELS[idx[:, 1:]] != LABELS[idx[:, :1]]).all()


def test_crd_scores_normalisation_and_momentum_update():
    mem = _memory()
    old_s, old_t = mem.memory_s.double().clone(), mem.memory_t.double().clone()
    g = torch.Generator().manual_seed(4)
    v_s = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    v_t = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    index = torch.tensor([2, 30, 41])
    torch.manual_seed(9)
    idx = mem.sample(index).numpy()
    torch.manual_seed(9)
    out_s, out_t = mem(v_s, v_t, index)
    assert out_s.shape == out_t.shape == (3, 6) and out_s.dtype == torch.float32
    # student against the teacher memory and vice versa, P = exp(<v, m> / T) / Z with Z
    # = N * mean of the first batch's exp scores
    vs, vt = v_s.double().numpy(), v_t.double().numpy()
    raw_s = np.exp(np.einsum("bd,bkd->bk", vs, old_t.numpy()[idx]) / 0.07)
    raw_t = np.exp(np.einsum("bd,bkd->bk", vt, old_s.numpy()[idx]) / 0.07)
    z = np.array([raw_s.mean(), raw_t.mean()]) * NUM_TRAIN
    np.testing.assert_allclose(mem.z.numpy(), z, rtol=1e-5)
    np.testing.assert_allclose(out_s.numpy(), raw_s / z[0], rtol=1e-4)
    np.testing.assert_allclose(out_t.numpy(), raw_t / z[1], rtol=1e-4)
    # the batch's rows: normalize(0.5 * old + 0.5 * v); the others unchanged
    for memory, old, v in ((mem.memory_s, old_s, vs), (mem.memory_t, old_t, vt)):
        rows = 0.5 * old.numpy()[index] + 0.5 * v
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        np.testing.assert_allclose(memory[index].numpy(), rows, rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(memory[index].numpy(), axis=1), 1, rtol=1e-6)
        keep = torch.ones(NUM_TRAIN, dtype=torch.bool)
        keep[index] = False
        assert torch.equal(memory[keep].double(), old[keep])
    # Z is fixed by the first batch
    z_first = mem.z.clone()
    mem(v_s * 0.5, v_t, torch.tensor([1, 2, 3]))
    assert torch.equal(mem.z, z_first)


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize("name", FEATURE_DISTILLERS)
def test_state_dict_round_trip_gives_the_same_next_loss(name):
    s, t = _models()
    a = _build(name, s, t).train()
    opt = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    for seed in (1, 2):  # two steps: memories, Z, BN statistics and weights all move
        x, y, index = _batch(seed=seed)
        with torch.no_grad():
            fs, ft = s.forward_features(x), t.forward_features(x)
        opt.zero_grad()
        a.distill(fs, ft, y, index).backward()
        opt.step()
    state = copy.deepcopy(a.state_dict())
    torch.manual_seed(123)  # a fresh distiller starts elsewhere
    b = _build(name, s, t).train()
    b.load_state_dict(state)
    x, y, index = _batch(seed=3)
    with torch.no_grad():
        fs, ft = s.forward_features(x), t.forward_features(x)
    losses = []
    for d in (a, b):
        torch.manual_seed(7)  # the engine restores the RNG state on resume
        losses.append(d.distill(fs, ft, y, index))
    assert torch.equal(losses[0], losses[1])


def test_crd_state_holds_memories_and_z_not_the_label_tables():
    s, t = _models()
    keys = set(_build("crd", s, t).state_dict())
    assert {"memory.memory_s", "memory.memory_t", "memory.z"} <= keys
    assert not keys & {"memory.labels", "memory.order", "memory.count", "memory.start"}


# --------------------------------------------------------------------------- fast path
@pytest.mark.parametrize("name", FEATURE_DISTILLERS)
def test_bf16_autocast_keeps_the_losses_in_float32(name):
    s, t = _models()
    d = _build(name, s, t).train()
    x, y, index = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fs = s.forward_features(x)
        with torch.no_grad():
            ft = t.forward_features(x)
        terms = d.terms(fs, ft, y, 1, index)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in d.parameters())


@pytest.mark.parametrize("name", FEATURE_DISTILLERS)
def test_distill_compiles_as_one_graph_and_matches_eager(name):
    """fullgraph=True fails on any graph break: no host sync, no data-dependent Python."""
    s, t = _models()
    x, y, index = _batch()
    with torch.no_grad():
        fs, ft = s.forward_features(x), t.forward_features(x)
    eager = _build(name, s, t).train()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    fn = torch.compile(compiled.distill, backend="aot_eager", fullgraph=True)
    try:
        for step in range(2):  # the second step: CRD's Z already set
            torch.manual_seed(step)
            want = eager.distill(fs, ft, y, index)
            torch.manual_seed(step)
            torch.testing.assert_close(fn(fs, ft, y, index), want)
    finally:
        torch._dynamo.reset()
    for (k, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


# --------------------------------------------------------------------------- pairs
def test_reviewkd_and_fitnet_on_mixed_families_match_the_reference_tables():
    """ReviewKD's original CIFAR tables (dvlab-research/ReviewKD build_review_kd): vgg13 ->
    MobileNetV2 in [12, 16, 48, 160, 1280], out [128, 256, 512, 512, 512], student sizes
    16, 8, 4, 2, 1, teacher sizes 16, 8, 4, 4, 1; resnet32x4 -> ShuffleV1 in [240, 480, 960,
    960], out [64, 128, 256, 256]; FitNet's hint 2 on ShuffleV1 (480@8 -> 128@16) needs the
    transposed convolution."""
    s, t = _models("MobileNetV2", "vgg13")
    d = _build("reviewkd", s, t)
    abfs = d.fusion.abfs
    assert [a.conv1[0].in_channels for a in abfs] == [12, 16, 48, 160, 1280]
    assert [a.conv2[0].out_channels for a in abfs] == [128, 256, 512, 512, 512]
    assert (d.fusion.sizes, d.fusion.out_sizes) == ([16, 8, 4, 2, 1], [16, 8, 4, 4, 1])
    x, y, _ = _batch(2)
    assert torch.isfinite(d.distill(s.forward_features(x), t.forward_features(x), y))
    s, t = _models("ShuffleV1", "resnet32x4")
    d = _build("reviewkd", s, t)
    assert [a.conv1[0].in_channels for a in d.fusion.abfs] == [240, 480, 960, 960]
    assert [a.conv2[0].out_channels for a in d.fusion.abfs] == [64, 128, 256, 256]
    fitnet = _build("fitnet", s, t)
    assert isinstance(fitnet.regressor.conv, torch.nn.ConvTranspose2d)
    assert torch.isfinite(fitnet.distill(s.forward_features(x), t.forward_features(x), y))


def test_imagenet_resnet50_mobilenetv1_matches_mdistiller_configs():
    """mdistiller configs/imagenet/r50_mv1/reviewkd.yaml: IN_CHANNELS [128, 256, 512, 1024,
    1024], OUT_CHANNELS [256, 512, 1024, 2048, 2048], SHAPES [1, 7, 14, 28, 56]; OFD connects
    the last three stages (MobileNetV1 256, 512, 1024 -> ResNet50 512, 1024, 2048)."""
    with torch.device("meta"):
        s, t = _models("MobileNetV1", "ResNet50", "imagenet")
    t.to_empty(device="cpu")  # OFD reads the teacher's BN weights: give them values
    for m in t.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_parameters()
    review = _build("reviewkd", s, t, image_size=224, student_preact=True)
    abfs = review.fusion.abfs
    assert [a.conv1[0].in_channels for a in abfs] == [128, 256, 512, 1024, 1024]
    assert [a.conv2[0].out_channels for a in abfs] == [256, 512, 1024, 2048, 2048]
    assert review.fusion.sizes == review.fusion.out_sizes == [56, 28, 14, 7, 1]
    ofd = _build("ofd", s, t, image_size=224)
    assert [(c[0].in_channels, c[0].out_channels) for c in ofd.connectors] == [
        (256, 512), (512, 1024), (1024, 2048)]
    assert [m.numel() for m in ofd.margins()] == [512, 1024, 2048]


def test_regressor_kinds():
    assert isinstance(ConvRegressor((8, 16, 16), (4, 8, 8)).conv, torch.nn.Conv2d)
    assert ConvRegressor((8, 16, 16), (4, 8, 8)).conv.stride == (2, 2)
    assert ConvRegressor((8, 6, 6), (4, 4, 4)).conv.kernel_size == (3, 3)
    x = torch.randn(2, 8, 6, 6)
    assert ConvRegressor((8, 6, 6), (4, 4, 4))(x).shape == (2, 4, 4, 4)
    with pytest.raises(ValueError):
        ConvRegressor((8, 4, 4), (4, 16, 16))


def test_pair_problems_name_the_key():
    shapes = lambda maps, pooled=8: {"feats": maps, "preact_feats": maps, "pooled": pooled}  # noqa: E731
    small, big = shapes([(8, 8, 8), (8, 4, 4)]), shapes([(8, 32, 32), (8, 32, 32), (8, 16, 16)])
    fit = SimpleNamespace(hint_layer=1)
    assert "no regressor" in FitNet.pair_problem(fit, small, big, None)
    assert "hint_layer=1" in FitNet.pair_problem(fit, small, big, None)
    review = SimpleNamespace(student_preact=False)
    deep = shapes([(8, 32, 32)] * 4)  # stem + 3 stages: fuses 3 student maps, small has 2
    assert "ReviewKD fuses" in ReviewKD.pair_problem(review, small, deep, None)
    assert ReviewKD.pair_problem(review, small, big, None) is None

    def teacher(*channels):
        bns = [torch.nn.BatchNorm2d(c) for c in channels]
        return SimpleNamespace(bn_before_relu=lambda: bns)

    assert "margins" in OFD.pair_problem(None, big, big, teacher(8, 4))
    assert OFD.pair_problem(None, big, big, teacher(8, 8)) is None
    assert "no BN before" in OFD.pair_problem(None, big, big, SimpleNamespace())


# --------------------------------------------------------------------------- configs
@pytest.fixture(scope="module")
def hydra_conf():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda *o: compose("train", overrides=list(o))


@pytest.mark.parametrize("pair, distiller, want", [
    ("resnet32x4_resnet8x4", "fitnet", dict(kd_weight=100.0, ce_weight=1.0, warmup=0,
                                            hint_layer=2)),
    ("resnet32x4_resnet8x4", "ofd", dict(kd_weight=1e-3, ce_weight=1.0, warmup=0)),
    ("resnet32x4_resnet8x4", "reviewkd", dict(kd_weight=5.0, warmup=20, student_preact=False)),
    ("vgg13_vgg8", "reviewkd", dict(kd_weight=1.0, warmup=20)),
    ("resnet32x4_resnet8x4", "crd", dict(kd_weight=0.8, ce_weight=1.0, warmup=0, feat_dim=128,
                                         nce_k=16384, nce_t=0.07, nce_momentum=0.5,
                                         nce_replace=False)),
    ("resnet34_resnet18", "reviewkd", dict(kd_weight=1.0, warmup=1, student_preact=True)),
    ("resnet50_mobilenetv1", "reviewkd", dict(kd_weight=8.0, warmup=1, student_preact=True)),
    ("resnet50_mobilenetv1", "ofd", dict(kd_weight=1e-4)),
    ("resnet34_resnet18", "crd", dict(kd_weight=0.8, nce_replace=True)),
])
def test_per_pair_settings_of_the_reference_releases(hydra_conf, pair, distiller, want):
    dataset = "imagenet" if pair.startswith("resnet34_") or "mobilenetv1" in pair else "cifar100"
    cfg = hydra_conf(f"dataset={dataset}", f"pair={pair}", f"distiller={distiller}")
    d = OmegaConf.to_container(cfg.distiller, resolve=True)
    assert {k: d[k] for k in want} == want
    validate(cfg)


def test_settings_can_be_swept_from_the_command_line(hydra_conf):
    cfg = hydra_conf("distiller=crd", "distiller.nce_t=0.1", "distiller.kd_weight=2")
    assert (cfg.distiller.nce_t, cfg.distiller.kd_weight) == (0.1, 2.0)
    with pytest.raises(Exception, match="nce_tau"):
        hydra_conf("distiller=crd", "distiller.nce_tau=0.1")


@pytest.mark.parametrize("overrides, message", [
    (("distiller=fitnet", "distiller.hint_layer=7"),
     "pair=resnet32x4_resnet8x4 distiller=fitnet: distiller.hint_layer=7 is out of range"),
    (("distiller=ofd", "pair.teacher=ShuffleV2"), "no BN before"),
    (("distiller=crd", "distiller.nce_t=0"), "distiller.nce_t=0.0 is not allowed: must be > 0"),
    (("distiller=crd", "distiller.nce_momentum=1"), "distiller.nce_momentum=1.0"),
])
def test_validation_rejects_what_cannot_run(hydra_conf, overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(hydra_conf(*overrides))
    assert message in str(e.value) and "\n" not in str(e.value)
