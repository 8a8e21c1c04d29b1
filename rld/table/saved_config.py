"""Values of a saved Hydra config (``.hydra/config.yaml``), its plain ``${a.b}``
interpolations resolved without OmegaConf."""

from __future__ import annotations

import re
from typing import Any


class _Unresolved(Exception):
    pass


_MISSING = object()
_INTERP = re.compile(r"\$\{([^${}]+)\}")


def _lookup(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return _MISSING
    return node


def _resolve(cfg: dict, value: Any, depth: int = 0) -> Any:
    """Resolve plain absolute ``${a.b}`` interpolations (nested ones too) of a saved
    Hydra config without OmegaConf; custom resolvers and relative keys are not handled."""
    if not isinstance(value, str) or "${" not in value:
        return value
    if depth > 16:
        raise _Unresolved(value)
    while True:
        m = _INTERP.search(value)
        if m is None:
            return value
        key = m.group(1).strip()
        if ":" in key or key.startswith("."):
            raise _Unresolved(value)
        target = _lookup(cfg, key)
        if target is _MISSING:
            raise _Unresolved(value)
        target = _resolve(cfg, target, depth + 1)
        if m.start() == 0 and m.end() == len(value):
            return target
        value = value[: m.start()] + str(target) + value[m.end() :]


def _cfg_get(cfg: dict, dotted: str, default: Any = None) -> Any:
    value = _lookup(cfg, dotted)
    if value is _MISSING:
        return default
    try:
        return _resolve(cfg, value)
    except _Unresolved:
        return default
