"""Golden logits of every zoo model under fixed weights and a fixed input.

Weights and inputs are closed-form functions of the element index (an integer hash, exact on
every platform), so they do not depend on torch's RNG.  ``tests/test_models.py`` imports the
helpers below and compares against ``model_golden.json``.  Regenerate (only after an intended,
verified architecture change) from the repository root with::

    python tests/data/make_model_golden.py

``models_manifest.json`` is a verbatim copy of the project spec (shared/spec/), kept here so the
tests need nothing outside the repository.
"""

import functools
import json
import math
from pathlib import Path

import torch
from torch import nn

MANIFEST = Path(__file__).with_name("models_manifest.json")
GOLDEN = Path(__file__).with_name("model_golden.json")
_PERIOD = 1_000_003  # prime, larger than any fan-in


@functools.cache
def _table() -> torch.Tensor:
    """``_PERIOD`` float64 values in [-0.5, 0.5): xorshift-multiply hash of the index (int64
    arithmetic, all products < 2**62, so identical on every platform)."""
    h = torch.arange(_PERIOD, dtype=torch.int64)
    for mult in (1_103_515_245, 1_664_525):
        h = ((h ^ (h >> 13)) * mult) % 2**31
    return (h ^ (h >> 16)).double() / 2**31 - 0.5


def noise(n: int, salt: int) -> torch.Tensor:
    """``n`` hashed values in [-0.5, 0.5): the table read cyclically from offset ``7919 salt``."""
    start = salt * 7_919 % _PERIOD
    table = _table() if start + n <= _PERIOD else _table().repeat(-(-(start + n) // _PERIOD))
    return table[start : start + n]


@torch.no_grad()
def fixed_init(model: nn.Module) -> nn.Module:
    """Overwrite every float entry of the state dict (sorted by key, so the values depend only
    on the keys): conv/linear weights noise * sqrt(24 / fan_in) (He variance), BN weight and
    running_var 1 + noise / 2, biases and running_mean noise / 10.  Returns it in eval mode."""
    for i, (key, t) in enumerate(sorted(model.state_dict().items())):
        if not t.is_floating_point():
            continue
        w = noise(t.numel(), i).reshape(t.shape)
        if t.dim() > 1:
            w = w * math.sqrt(24.0 / t[0].numel())
        elif key.endswith(("running_mean", "bias")):
            w = w / 10
        else:
            w = 1 + w / 2
        t.copy_(w)
    return model.eval()


def fixed_input(shape: list[int]) -> torch.Tensor:
    """Noise in [-1, 1), a fixed function of the element index."""
    return (2 * noise(math.prod(shape), 7_777)).reshape(shape).float()


def golden_batch(family: str, spec: dict) -> list[int]:
    """Input shape of the golden forward: the manifest's with batch 2 (CIFAR) or 1 (ImageNet)."""
    return [2 if family == "cifar" else 1, *spec["input"][1:]]


def summary(logits: torch.Tensor) -> dict:
    z = logits.double()
    return {
        "shape": list(z.shape),
        "sum": z.sum().item(),
        "abs_sum": z.abs().sum().item(),
        "head": z[0, :5].tolist(),
        "tail": z[-1, -3:].tolist(),
        "argmax": z.argmax(1).tolist(),
    }


def main() -> None:
    from rld.models import build_model

    manifest = json.loads(MANIFEST.read_text())
    golden: dict = {}
    for family, models in manifest.items():
        for name, spec in models.items():
            model = fixed_init(build_model(name, spec["logits_shape"][1], family))
            with torch.no_grad():
                logits = model(fixed_input(golden_batch(family, spec)))
            golden.setdefault(family, {})[name] = summary(logits)
            print(family, name, golden[family][name]["head"][:2])
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
