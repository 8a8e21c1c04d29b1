"""Feature distillers of the RLD paper's Figure 2: FitNet, OFD, ReviewKD and CRD, with the
extra modules they train beside the student (the losses are in
`rld.distillers.feature_losses`).

They follow mdistiller (`mdistiller/distillers/{FitNet,OFD,ReviewKD,CRD}.py`) and CRD's
original release (HobbitLong/RepDistiller: memory, NCE loss, "exact" sampling of negatives
from the other classes), with the pair's channels and sizes read from the models'
`forward_features` (`rld.models.features.feature_shapes`, given to `build` and
`pair_problem` as `s_shapes` / `t_shapes`) instead of per-pair tables:

- FitNet: `ConvRegressor` (conv + BN + ReLU) from the student's feature `hint_layer` (0 = stem)
  to the teacher's; MSE.
- OFD: a 1x1 conv + BN connector per stage on the student's pre-ReLU features; the teacher's
  pre-ReLU features through a margin ReLU (margins from its BN before each ReLU); partial L2.
  Student, teacher and margin lists are aligned from their last entries.
- ReviewKD: attention-based fusion (`ABF`) of the student's last n stages and its pooled
  feature, from the deepest up (`ReviewFusion`); n = the teacher's stages; HCL against the
  teacher's pre-ReLU stages and pooled feature.
- CRD: linear embeddings (`Embed`, L2-normalised) of both pooled features and a momentum
  memory of every training sample's embeddings (`ContrastMemory`); NCE on one positive and
  `nce_k` negatives drawn from the samples of other classes, on the device.

The extra-parameter counts follow the reference releases: the regressor, connectors and
fusion modules' trainable parameters (no BN running statistics); CRD adds its two memories.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rld.distillers.base import (
    AT_LEAST_ONE,
    POSITIVE,
    UNIT_INTERVAL,
    DistillationWeights,
    Distiller,
    register_distiller,
    setting,
)
from rld.distillers.feature_losses import fitnet_loss, hcl_loss, nce_loss, ofd_loss, ofd_margins

# ReviewKD's fusion width: min(this, channels of the student's pooled feature) (reference).
REVIEW_MAX_MID = 512


# --------------------------------------------------------------------------- FitNet
def regressor_kind(s_shape: tuple, t_shape: tuple) -> str | None:
    """Which convolution maps a (C, H, W) student feature to the teacher's size (mdistiller's
    ConvReg rule): "stride2" (H_s = 2 H_t), "transpose" (2 H_s = H_t), "valid" (H_s >= H_t,
    kernel 1 + H_s - H_t), or None when none fits."""
    (_, sh, _), (_, th, _) = s_shape, t_shape
    if sh == 2 * th:
        return "stride2"
    if 2 * sh == th:
        return "transpose"
    return "valid" if sh >= th else None


class ConvRegressor(nn.Module):
    """FitNet's regressor: conv (by `regressor_kind`) - BN - ReLU, student -> teacher shape."""

    def __init__(self, s_shape: tuple, t_shape: tuple):
        super().__init__()
        (sc, sh, sw), (tc, th, tw) = s_shape, t_shape
        kind = regressor_kind(s_shape, t_shape)
        if kind == "stride2":
            self.conv = nn.Conv2d(sc, tc, 3, stride=2, padding=1)
        elif kind == "transpose":
            self.conv = nn.ConvTranspose2d(sc, tc, 4, stride=2, padding=1)
        elif kind == "valid":
            self.conv = nn.Conv2d(sc, tc, (1 + sh - th, 1 + sw - tw))
        else:
            raise ValueError(f"no regressor maps a student feature {s_shape} to {t_shape}")
        self.bn = nn.BatchNorm2d(tc)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


# --------------------------------------------------------------------------- OFD
def connector(s_channels: int, t_channels: int, kernel_size: int = 1) -> nn.Sequential:
    """OFD's connector: conv (no bias, weights N(0, 2 / (k^2 C_t))) - BN (1, 0)."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size, padding=(kernel_size - 1) // 2,
                     bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel_size**2 * t_channels)))
    return nn.Sequential(conv, nn.BatchNorm2d(t_channels))


def ofd_stage_count(s_shapes: dict, t_shapes: dict, n_margins: int) -> int:
    """Stages OFD distils: the last n of the student's and teacher's pre-ReLU stages (stem
    excluded) and of the teacher's margins."""
    return min(len(s_shapes["preact_feats"]) - 1, len(t_shapes["preact_feats"]) - 1, n_margins)


# --------------------------------------------------------------------------- ReviewKD
class ABF(nn.Module):
    """Attention-based fusion: 1x1 conv-BN of the student feature, fused with the residual
    from the deeper level by per-pixel sigmoid weights (all but the deepest level), resized
    to the teacher's size, then 3x3 conv-BN to the teacher's channels.  Returns (output,
    residual for the next level)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1,
                                             bias=False), nn.BatchNorm2d(out_channels))
        self.att_conv = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid())
                         if fuse else None)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, size: int,
                out_size: int) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, (size, size), mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, 0:1] + residual * z[:, 1:2]
        if size != out_size:
            x = F.interpolate(x, (out_size, out_size), mode="nearest")
        return self.conv2(x), x


class ReviewFusion(nn.Module):
    """ReviewKD's review path over levels listed shallow to deep (the last one the pooled
    feature as [B, D, 1, 1]): level i has `in_channels[i]` at the student's `sizes[i]` and
    gives `out_channels[i]` at the teacher's `out_sizes[i]`."""

    def __init__(self, in_channels: list[int], out_channels: list[int], sizes: list[int],
                 out_sizes: list[int]):
        super().__init__()
        mid = min(REVIEW_MAX_MID, in_channels[-1])
        last = len(in_channels) - 1
        self.abfs = nn.ModuleList(ABF(c, mid, o, i < last)
                                  for i, (c, o) in enumerate(zip(in_channels, out_channels)))
        self.sizes, self.out_sizes = list(sizes), list(out_sizes)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        out: list[Tensor] = [None] * len(features)  # type: ignore[list-item]
        residual = None
        for i in reversed(range(len(features))):
            out[i], residual = self.abfs[i](features[i], residual, self.sizes[i],
                                            self.out_sizes[i])
        return out


def review_stages(t_shapes: dict) -> int:
    """Stages ReviewKD fuses (then the pooled feature): the teacher's, stem excluded."""
    return len(t_shapes["preact_feats"]) - 1


# --------------------------------------------------------------------------- CRD
class Embed(nn.Module):
    """CRD's embedding: linear map of the flattened feature, then L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class ContrastMemory(nn.Module):
    """CRD's memory of every training sample's student and teacher embeddings, its negative
    sampling and its scores.

    `forward(v_s, v_t, index)` (embeddings [B, D] of the batch's rows `index` of the training
    set) returns the scores [B, K + 1] of the student against the teacher memory and of the
    teacher against the student memory, P = exp(<v, m> / T) / Z (column 0: the sample itself,
    then K negatives from other classes).  Z, per view, is fixed at the first call to N times
    the mean of its unnormalised scores (kept in the buffer `z`, -1 until set).  Then the
    batch's rows of each memory become normalize(momentum * m + (1 - momentum) * v).

    Negatives: uniformly among the samples of other classes, without replacement when every
    class's pool holds K samples and `replace` is False (the "exact" mode of CRD's CIFAR
    sampler), else with replacement (its ImageNet sampler).  Random draws use torch's global
    RNG on the memory's device.
    """

    def __init__(self, dim: int, labels: Tensor, k: int, temperature: float, momentum: float,
                 replace: bool = False):
        super().__init__()
        labels = labels.detach().long().flatten()
        n = labels.numel()
        self.k, self.temperature, self.momentum, self.num_data = k, temperature, momentum, n
        stdv = 1.0 / math.sqrt(dim / 3)
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, torch.rand(n, dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("z", torch.full((2,), -1.0))
        count = torch.bincount(labels)
        self.replace = bool(replace or k > n - int(count.max()))
        # derived from the labels at every build: not saved
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("count", count, persistent=False)
        self.register_buffer("start", torch.cumsum(count, 0) - count, persistent=False)

    def sample(self, index: Tensor) -> Tensor:
        """[B] rows -> [B, K + 1]: each row itself, then K samples of other classes."""
        y = self.labels[index]
        shape = (index.numel(), self.k)
        if self.replace:  # position r in the class-sorted order with class y cut out
            count = self.count[y].unsqueeze(1)
            pool = self.num_data - count
            r = (torch.rand(shape, device=index.device) * pool).long()
            r = torch.minimum(r, pool - 1)
            negatives = self.order[r + (r >= self.start[y].unsqueeze(1)) * count]
        else:  # the K largest of uniform keys, own class excluded: a uniform K-subset
            keys = torch.rand(shape[0], self.num_data, device=index.device)
            keys = keys.masked_fill(self.labels.unsqueeze(0) == y.unsqueeze(1), -1.0)
            negatives = keys.topk(self.k, dim=1, sorted=False).indices
        return torch.cat([index.unsqueeze(1), negatives], dim=1)

    def forward(self, v_s: Tensor, v_t: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        idx = self.sample(index)
        # all N scores, then the K + 1 of each sample: with K + 1 = 16,385 rows per sample,
        # gathering B (K + 1) memory rows moves more memory than these B x N scores and one
        # copy of each memory (the memories change below; their old values stay for the
        # backward pass).  Measured on the CPU, resnet32x4 -> resnet8x4, batch 64: CRD's
        # step 1,317 ms this way, 2,209 ms gathering the rows
        old_s, old_t = self.memory_s.clone(), self.memory_t.clone()
        out = [torch.exp(torch.gather(v @ m.T, 1, idx) / self.temperature)
               for v, m in ((v_s, old_t), (v_t, old_s))]
        with torch.no_grad():
            z = torch.stack([o.mean() for o in out]) * self.num_data
            z = torch.where(self.z > 0, self.z, z)
            self.z.copy_(z)
            for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                rows = memory[index] * self.momentum + v * (1 - self.momentum)
                memory.index_copy_(0, index, F.normalize(rows, dim=1))
        return out[0] / z[0], out[1] / z[1]


# --------------------------------------------------------------------------- distillers
class FeatureDistiller(Distiller):
    """A distiller on the models' `Features` with extra trainable modules."""

    needs_features = True

    def counted_modules(self) -> list[nn.Module]:
        """The modules whose trainable parameters the reference counts as extra."""
        return list(self.children())

    def extra_parameters(self) -> int:
        return sum(p.numel() for m in self.counted_modules() for p in m.parameters())


def _weights(s: DistillationWeights) -> dict[str, Any]:
    return dict(ce_weight=float(s.ce_weight), kd_weight=float(s.kd_weight), warmup=int(s.warmup))


@dataclass
class FitNetSettings(DistillationWeights):
    hint_layer: int = setting(2, "index of the hinted feature map (0 = stem, then stages)")


@register_distiller("fitnet", label="FitNet", defaults={"kd_weight": 100.0})
class FitNet(FeatureDistiller):
    """FitNet (Romero et al. 2015): mse(regressor(student.feats[h]), teacher.feats[h]);
    mdistiller's defaults: hint 2, feature weight 100, CE 1, no warm-up."""

    Settings = FitNetSettings

    def __init__(self, s_shapes: dict, t_shapes: dict, hint_layer: int, **weights: Any):
        super().__init__("fitnet", **weights)
        self.hint_layer = hint_layer
        self.regressor = ConvRegressor(s_shapes["feats"][hint_layer],
                                       t_shapes["feats"][hint_layer])

    def distill(self, student, teacher, target, index=None) -> Tensor:
        h = self.hint_layer
        return fitnet_loss(self.regressor(student.feats[h]), teacher.feats[h])

    @classmethod
    def build(cls, settings, *, s_shapes, t_shapes, **context) -> FitNet:
        return cls(s_shapes, t_shapes, int(settings.hint_layer), **_weights(settings))

    @classmethod
    def pair_problem(cls, settings, s_shapes, t_shapes, teacher) -> str | None:
        h, n = settings.hint_layer, min(len(s_shapes["feats"]), len(t_shapes["feats"]))
        if not 0 <= h < n:
            return f"distiller.hint_layer={h} is out of range: use 0..{n - 1}"
        s, t = s_shapes["feats"][h], t_shapes["feats"][h]
        if regressor_kind(s, t) is None:
            return (f"distiller.hint_layer={h}: no regressor maps the student's feature "
                    f"{s} to the teacher's {t} (sizes must be equal, half or double, or the "
                    "student's larger); choose another hint_layer")
        return None


def _bn_channels(teacher: nn.Module) -> list[int] | None:
    try:
        return [bn.num_features for bn in teacher.bn_before_relu()]
    except (NotImplementedError, AttributeError):
        return None


@register_distiller("ofd", label="OFD", defaults={"kd_weight": 0.001})
class OFD(FeatureDistiller):
    """OFD (Heo et al. 2019): partial L2 between connected student pre-ReLU stages and the
    teacher's, through the margin ReLU; margins (buffers `margin0..`) from the teacher's
    `bn_before_relu()`.  As in both reference releases (mdistiller's `OFD.train`, the
    authors' training script), the teacher runs in training mode: its batch-norm layers use
    the batch's statistics.  mdistiller's CIFAR-100 weight 1e-3 (ImageNet pairs: 1e-4)."""

    teacher_train = True

    def __init__(self, s_shapes: dict, t_shapes: dict, bns: list[nn.BatchNorm2d],
                 **weights: Any):
        super().__init__("ofd", **weights)
        n = self.stages = ofd_stage_count(s_shapes, t_shapes, len(bns))
        s_pre, t_pre = s_shapes["preact_feats"][-n:], t_shapes["preact_feats"][-n:]
        self.connectors = nn.ModuleList(connector(s[0], t[0]) for s, t in zip(s_pre, t_pre))
        for i, bn in enumerate(bns[-n:]):
            self.register_buffer(f"margin{i}", ofd_margins(bn.weight, bn.bias))

    def margins(self) -> list[Tensor]:
        return [getattr(self, f"margin{i}") for i in range(self.stages)]

    def distill(self, student, teacher, target, index=None) -> Tensor:
        n = self.stages
        connected = [c(f) for c, f in zip(self.connectors, student.preact_feats[-n:])]
        return ofd_loss(connected, teacher.preact_feats[-n:], self.margins())

    @classmethod
    def build(cls, settings, *, s_shapes, t_shapes, teacher, **context) -> OFD:
        return cls(s_shapes, t_shapes, teacher.bn_before_relu(), **_weights(settings))

    @classmethod
    def pair_problem(cls, settings, s_shapes, t_shapes, teacher) -> str | None:
        bns = _bn_channels(teacher)
        if bns is None:
            return "the teacher has no BN before its stages' ReLU: OFD cannot take its margins"
        n = ofd_stage_count(s_shapes, t_shapes, len(bns))
        if n < 1:
            return "the student or the teacher has no stage after its stem to connect"
        t_channels = [c for c, _, _ in t_shapes["preact_feats"][-n:]]
        if bns[-n:] != t_channels:
            return (f"the teacher's margins (BN channels {bns}) do not match its "
                    f"stages ({t_channels})")
        return None


@dataclass
class ReviewKDSettings(DistillationWeights):
    student_preact: bool = setting(False, "fuse the student's pre-ReLU maps (ImageNet: true)")


@register_distiller("reviewkd", label="ReviewKD", defaults={"warmup": 20})
class ReviewKD(FeatureDistiller):
    """ReviewKD (Chen et al. 2021): HCL between the review path's outputs and the teacher's
    pre-ReLU stages + pooled feature; mdistiller: weight 1.0 (5.0 for resnet32x4 ->
    resnet8x4, per pair), warm-up 20 epochs, CE 1, student post-ReLU maps (ImageNet:
    pre-ReLU, warm-up 1)."""

    Settings = ReviewKDSettings

    def __init__(self, s_shapes: dict, t_shapes: dict, student_preact: bool, **weights: Any):
        super().__init__("reviewkd", **weights)
        self.student_preact = student_preact
        n = self.stages = review_stages(t_shapes)
        s_maps = s_shapes["preact_feats" if student_preact else "feats"][-n:]
        t_maps = t_shapes["preact_feats"][-n:]
        self.fusion = ReviewFusion([s[0] for s in s_maps] + [s_shapes["pooled"]],
                                   [t[0] for t in t_maps] + [t_shapes["pooled"]],
                                   [s[1] for s in s_maps] + [1], [t[1] for t in t_maps] + [1])

    def distill(self, student, teacher, target, index=None) -> Tensor:
        n = self.stages
        maps = student.preact_feats if self.student_preact else student.feats
        outputs = self.fusion([*maps[-n:], student.pooled[:, :, None, None]])
        return hcl_loss(outputs, [*teacher.preact_feats[-n:], teacher.pooled[:, :, None, None]])

    @classmethod
    def build(cls, settings, *, s_shapes, t_shapes, **context) -> ReviewKD:
        return cls(s_shapes, t_shapes, bool(settings.student_preact), **_weights(settings))

    @classmethod
    def pair_problem(cls, settings, s_shapes, t_shapes, teacher) -> str | None:
        n = review_stages(t_shapes)
        key = "preact_feats" if settings.student_preact else "feats"
        if n < 1 or len(s_shapes[key]) < n:
            return (f"the student has {len(s_shapes[key])} feature maps and the teacher "
                    f"{n} stages: ReviewKD fuses one student map per teacher stage")
        return None


@dataclass
class CRDSettings(DistillationWeights):
    feat_dim: int = setting(128, "dimension of the embeddings of both pooled features",
                            AT_LEAST_ONE)
    nce_k: int = setting(16384, "negatives per sample, drawn from the other classes",
                         AT_LEAST_ONE)
    nce_t: float = setting(0.07, "temperature of the contrastive scores", POSITIVE)
    nce_momentum: float = setting(0.5, "momentum of the memory of each sample's embeddings",
                                  UNIT_INTERVAL)
    nce_replace: bool = setting(False, "negatives with replacement (else without, where "
                                       "possible)")


@register_distiller("crd", label="CRD", defaults={"kd_weight": 0.8})
class CRD(FeatureDistiller):
    """CRD (Tian et al. 2020): NCE of the embedded pooled features against a momentum
    memory of every training sample, L(student) + L(teacher); 16384 negatives from other
    classes, T 0.07, momentum 0.5, weight 0.8, CE 1 (mdistiller / RepDistiller defaults).
    Embeddings and scores are computed in float32 (autocast off): T = 0.07 amplifies
    rounding errors 14-fold in the exponent."""

    Settings = CRDSettings
    needs_index = True
    single_process = ("CRD's memory of every sample and its negatives drawn per process "
                      "would diverge over the ranks")

    def __init__(self, s_shapes: dict, t_shapes: dict, labels: Tensor, feat_dim: int,
                 nce_k: int, nce_t: float, nce_momentum: float, nce_replace: bool,
                 **weights: Any):
        super().__init__("crd", **weights)
        self.embed_s = Embed(s_shapes["pooled"], feat_dim)
        self.embed_t = Embed(t_shapes["pooled"], feat_dim)
        self.memory = ContrastMemory(feat_dim, labels, nce_k, nce_t, nce_momentum, nce_replace)

    def counted_modules(self) -> list[nn.Module]:
        return [self.embed_s, self.embed_t]

    def extra_parameters(self) -> int:
        """Embeddings + both memories (the reference also counts the 5 scalars of its
        hyperparameter buffer: K, T, Z_s, Z_t, momentum)."""
        return super().extra_parameters() + self.memory.memory_s.numel() * 2

    def distill(self, student, teacher, target, index=None) -> Tensor:
        if index is None:
            raise ValueError("CRD needs the batch's sample indices (needs_index)")
        with torch.autocast(student.pooled.device.type, enabled=False):
            v_s = self.embed_s(student.pooled.float())
            v_t = self.embed_t(teacher.pooled.detach().float())
            out_s, out_t = self.memory(v_s, v_t, index)
            n = self.memory.num_data
            return nce_loss(out_s, n) + nce_loss(out_t, n)

    @classmethod
    def build(cls, settings, *, s_shapes, t_shapes, num_train=None, train_labels=None,
              **context) -> CRD:
        """CRD needs `train_labels` (int64 [num_train], the training set's labels in
        dataset-row order)."""
        if train_labels is None or (num_train is not None and len(train_labels) != num_train):
            raise ValueError("CRD needs train_labels: the labels of all num_train training rows")
        s = settings
        return cls(s_shapes, t_shapes, train_labels, int(s.feat_dim), int(s.nce_k),
                   float(s.nce_t), float(s.nce_momentum), bool(s.nce_replace), **_weights(s))
