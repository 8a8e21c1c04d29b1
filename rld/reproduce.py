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

from rld.config import NOT_IN_FINGERPRINT, key_in

TEACHER_KEY = "teacher.sha256"  # the fingerprint's entry for the teacher's identity


def flatten(cfg) -> dict:
    """A config's resolved values as one flat dict of dotted keys (`optim.lr`, ...)."""
    flat: dict = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = node

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return flat


def fingerprint(cfg, teacher_sha256: str | None = None) -> dict:
    """The keys that decide a run's result, flattened (`optim.lr`, ...; the distiller's
    node holds its own settings only), without those of `NOT_IN_FINGERPRINT`, plus the
    teacher's identity (the SHA-256 of its checkpoint) for distillation runs."""
    flat = flatten(cfg)
    out = {k: v for k, v in flat.items() if not key_in(k, NOT_IN_FINGERPRINT)}
    if teacher_sha256 is not None:
        out[TEACHER_KEY] = teacher_sha256
    return out


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, cached beside it in `<file>.sha256` (keyed by size and
    modification time, so a replaced file is hashed again; an unwritable folder only costs
    the hash)."""
    import json

    path = Path(path)
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache = path.with_name(path.name + ".sha256")
    try:
        cached = json.loads(cache.read_text())
        if {k: cached.get(k) for k in stamp} == stamp:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    value = sha256_of(path)
    try:
        from rld.io import write_text

        write_text(cache, json.dumps({**stamp, "sha256": value}) + "\n")
    except OSError:
        pass
    return value


def sha256_of(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks (no cache: `file_sha256` keeps one)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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
