"""Loading published / our own checkpoints into zoo models with short, file-naming errors."""

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from rld.errors import CheckpointError

STATE_DICT_ENTRIES = ("model", "state_dict")
_SHOWN = 5


def _reason(exc: BaseException, limit: int = 160) -> str:
    """One short line: the first sentence after ``WeightsUnpickler error:`` in a weights-only
    failure (its message starts with a generic notice), else the message's first sentence."""
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0].split(". ")[0] if lines else ""
    return f"{type(exc).__name__}: {first[:limit]}"


def _listing(items: list[str]) -> str:
    more = f", ... (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def split_checkpoint(obj, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with any ``module.`` prefix removed, metadata) of a loaded checkpoint.

    Accepted: a plain state dict, or a dict whose ``"model"`` or ``"state_dict"`` entry is one;
    the metadata is every other entry of that dict (``{}`` for a plain state dict).
    """
    if _is_state_dict(obj):
        state, meta = obj, {}
    else:
        key = next((k for k in STATE_DICT_ENTRIES
                    if isinstance(obj, Mapping) and _is_state_dict(obj.get(k))), None)
        if key is None:
            kind = (f"dict with keys {_listing([str(k) for k in obj])}"
                    if isinstance(obj, Mapping) else type(obj).__name__)
            raise CheckpointError(f"{path}: not a checkpoint (no state dict found in a {kind})")
        state, meta = obj[key], {k: v for k, v in obj.items() if k != key}
    return {k.removeprefix("module."): v for k, v in state.items()}, meta


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Raise a CheckpointError listing (in model / file order) the first few missing keys,
    unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    problems = [f"{label} [{_listing(items)}]" for label, items in (
        ("missing keys", missing), ("unexpected keys", unexpected),
        ("shape mismatches", mismatched)) if items]
    if problems:
        raise CheckpointError(
            f"{path}: checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))


def load_checkpoint(model: nn.Module, path: str | Path) -> dict:
    """Load ``path`` into ``model`` (strict, on CPU, ``weights_only=True``); return the metadata.

    Raises CheckpointError (naming the file) when the file is missing, unreadable, truncated,
    not a checkpoint, or its keys/shapes differ from the model's.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files; report them uniformly
        raise CheckpointError(
            f"{path}: unreadable, truncated or not a PyTorch checkpoint ({_reason(exc)})"
        ) from None
    state, meta = split_checkpoint(obj, path)
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True)
    return meta
