"""What makes a run reproducible: its result-deciding config keys, the library versions,
and every random number generator's state."""

from __future__ import annotations

import platform
import random
import subprocess
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from rld.config import PLACEMENT_PREFIXES


def fingerprint(cfg) -> dict:
    """The keys that decide a run's result (flattened), without placement keys."""
    container = OmegaConf.to_container(cfg, resolve=True)
    flat: dict = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = node

    walk("", {k: v for k, v in container.items() if k not in ("paths", "tag", "hparams",
                                                               "teacher", "objective")})
    return {k: v for k, v in flat.items() if not k.startswith(PLACEMENT_PREFIXES)
            or k in ("distiller.beta", "distiller.tau")}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "platform": platform.platform()}
    try:
        import torchvision

        out["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        repo = Path(__file__).resolve().parent.parent
        out["git"] = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"],
                                    capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["git"] = ""
    return out


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
