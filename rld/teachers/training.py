"""`train`: every missing teacher of the chosen pairs as one multirun of `rld.train`
(`-m role=teacher distiller=vanilla pair=<one pair per missing teacher>` with the user's
other overrides, hydra's launcher included), which writes each teacher where
`teacher.checkpoint` points."""

from __future__ import annotations

import shlex
import subprocess
import sys

from rld.config import key_in
from rld.teachers.configs import Selection, TeacherError, UsageError

# set by this command: a teacher is trained alone
OWN_KEYS = ("role", "distiller", "distiller.")


def train_command(sel: Selection, pairs: list[str]) -> list[str]:
    return [sys.executable, "-m", "rld.train", "-m", "role=teacher", "distiller=vanilla",
            f"pair={','.join(pairs)}", *sel.overrides, *sel.hydra_overrides]


def train_missing(sel: Selection, say) -> None:
    """Train the selection's missing teachers; TeacherError naming those still missing."""
    own = [o for o in sel.overrides if key_in(o.lstrip("+~").partition("=")[0], OWN_KEYS)]
    if own:
        raise UsageError(f"{own[0]} is not allowed here: teachers train with role=teacher "
                         "distiller=vanilla")
    missing = [t for t in sel.teachers if not t.present]
    if not missing:
        say(f"every teacher of the chosen pairs is present ({len(sel.teachers)}): "
            "nothing to train")
        return
    for t in missing:
        say(f"to train: {t.arch} (pair {t.pairs[0]}) -> {t.path}")
    cmd = train_command(sel, [t.pairs[0] for t in missing])
    say("running: python " + shlex.join(cmd[1:]))
    code = subprocess.run(cmd).returncode
    still = [t for t in missing if not t.present]
    if code != 0 or still:
        names = ", ".join(str(t.path) for t in still) or "none"
        raise TeacherError(f"rld.train ended with exit code {code}; still missing: {names} "
                           "(see each run's train.log; a teacher run recalled as finished "
                           "does not write its file again: pass trainer.resume=false or "
                           "another tag=)")
    say(f"trained {len(missing)} teacher(s)")
