"""Intermediate features of the zoo models, for feature distillers (FitNet, OFD, ReviewKD, CRD).

Every model has, beside ``forward(x) -> logits``:

* ``forward_features(x) -> Features``: the logits (bit-identical to ``forward(x)``, same
  arithmetic) and mdistiller's ``feats`` / ``preact_feats`` / ``pooled_feat``;
* ``stage_channels() -> list[int]``: channels of each entry of ``feats`` (always one per
  entry; where mdistiller's ``get_stage_channels`` omits the stem or is hard-coded, ours
  differs, see the model modules);
* ``bn_before_relu() -> list[nn.BatchNorm2d]``: mdistiller's ``get_bn_before_relu`` (OFD's
  margins), aligned with the *last* entries of ``feats`` (OFD aligns its lists from the end).

Which tensors the lists hold is documented per architecture in each model module.

Why `forward` is not `forward_features(x).logits`: the two run the same aten operations in
the same order (checked on every zoo model, train and eval mode; the exceptions are
ShuffleV2, whose `forward_features` adds one concatenation per stage for its pre-activation
features, and MobileNetV1, whose ReLUs there are out of place to keep them) and give
bit-identical logits (tests/test_features.py), so neither is faster; but `forward` calls each
stage as a module, so forward hooks on `layer1`, ... fire (feature extractors, CAM, the zoo's
structural tests rely on them), which `forward_features` cannot do while it takes the last
block's pre-activation from inside the stage.
"""

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class Features(NamedTuple):
    """Output of ``forward_features``.

    logits: ``[B, num_classes]``, bit-identical to ``model(x)``.
    feats: stem output (where mdistiller has it) then each stage's output (mdistiller's
        ``feats["feats"]``).
    preact_feats: the same features before their final ReLU (mdistiller's
        ``feats["preact_feats"]``; where mdistiller gives the post-ReLU tensor, so do we).
    pooled: ``[B, D]``, the flattened feature fed to the classifier.
    """

    logits: Tensor
    feats: list[Tensor]
    preact_feats: list[Tensor]
    pooled: Tensor


class PreactBlock(nn.Module):
    """A block whose output is ``relu(preact(x))``; subclasses define ``preact``."""

    def preact(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define preact()")

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.preact(x))

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, pre-activation)``."""
        pre = self.preact(x)
        return F.relu(pre), pre


def run_stage(stage: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    """Run the blocks of ``stage``, the last one through its ``forward_preact``; returns
    ``(output, pre-activation output)`` of the stage."""
    last = len(stage) - 1
    for i, block in enumerate(stage):
        if i == last:
            return block.forward_preact(x)
        x = block(x)
    raise ValueError("empty stage")


class FeaturesCall(nn.Module):
    """``forward`` = the wrapped model's ``forward_features`` (so that ``functional_call``
    can run it with other parameters, or DDP wrap it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Features:
        return self.model.forward_features(x)


def feature_shapes(model: nn.Module, image_size: int) -> dict:
    """Shapes of ``model.forward_features`` for square ``image_size`` inputs:
    ``{"feats": [(C, H, W), ...], "preact_feats": [...], "pooled": D, "logits": classes}``.

    Runs one batch-1 forward in eval mode on the meta device (parameters and buffers replaced
    by meta tensors of the same shapes and dtypes through ``torch.func.functional_call``): no
    arithmetic, nothing copied or changed, wherever the model lives (CPU, GPU or meta).  Every
    module's training flag is restored afterwards."""
    wrapper = FeaturesCall(model)
    meta = {name: torch.empty_like(t, device="meta") for name, t in (
        *wrapper.named_parameters(remove_duplicate=False),
        *wrapper.named_buffers(remove_duplicate=False))}
    dtype = next((t.dtype for t in meta.values() if t.is_floating_point()), torch.float32)
    x = torch.empty(1, 3, image_size, image_size, dtype=dtype, device="meta")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = torch.func.functional_call(wrapper, meta, (x,), strict=True)
    finally:
        for m, training in modes:
            m.training = training
    return {
        "feats": [tuple(f.shape[1:]) for f in out.feats],
        "preact_feats": [tuple(f.shape[1:]) for f in out.preact_feats],
        "pooled": out.pooled.shape[1],
        "logits": out.logits.shape[1],
    }
