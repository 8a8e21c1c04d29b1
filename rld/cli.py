"""What the command-line tools print for the errors a user causes, and how they stop.

Every error a user can cause (a misspelt key or option, a value of the wrong type, a name that
is not registered, a path that cannot be written, bad data or checkpoints) ends the command
with one line on stderr naming the key or path and what is allowed, exit code 2, no
traceback; `--debug` (or `HYDRA_FULL_ERROR=1`) keeps the traceback for developers.  Hydra's
own composition errors are turned into such lines here (`hydra_message`), with the closest
valid keys or options.  An interrupt (Ctrl-C, SIGTERM outside a Slurm job) ends with one line
and exit code 130; the engine has recorded `status: "interrupted"` for the runs it stopped.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rld.errors import ConfigError, RecordError, RunError
from rld.registry import closest

DEBUG_FLAG = "--debug"
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (`prog: error: ...`, the closest option
    of a misspelt one, exit 2) instead of the usage block and the error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m:
            options = [o for a in self._actions for o in a.option_strings]
            near = closest(m.group(1).split("=")[0], options)
            message += f" (did you mean {', '.join(near)}?)" if near else ""
        prog = self.prog.removeprefix("python -m ")
        self.exit(EXIT_USAGE, f"{prog}: error: {message} (--help: the options)\n")


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """ConfigError naming `what` (an option or key) when `folder` cannot be created or
    written, checked before any work starts; nothing is created."""
    path = os.path.abspath(folder)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"{what} {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {folder}: {probe} is not writable")


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


# argparse types: an integer >= 0 (`natural`), >= 1 (`positive`)
natural, positive = _int_at_least(0), _int_at_least(1)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into what Ctrl-C raises, so that a run stops the same way."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted("SIGTERM")


def catch_sigterm() -> None:
    """SIGTERM stops the command as Ctrl-C does, except in a Slurm/submitit job, whose
    signals (requeue on time-out or preemption) submitit handles, and under torchrun, whose
    SIGTERM ends the ranks left when one fails (they may wait in a collective, where a
    Python handler would not run)."""
    managed = ("SUBMITIT_EXECUTOR", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "LOCAL_RANK")
    if not any(os.environ.get(name) for name in managed):
        signal.signal(signal.SIGTERM, _on_sigterm)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types a user's input causes (the others are bugs: traceback)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rld.errors import CheckpointError, DataError

    out: list[type[BaseException]] = [ConfigError, RunError, DataError, CheckpointError,
                                      RecordError, HydraException, OmegaConfBaseException,
                                      OSError]
    try:
        from rld.storage import StorageError

        out.append(StorageError)
    except ImportError:  # pragma: no cover - the storage module needs SQLAlchemy
        pass
    return tuple(out)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in str(text).splitlines() if line.strip()]


def _setting_names(schema: str, argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """(the node's key, its valid keys) of a config schema named in an OmegaConf message:
    a distiller's (`RldDistillerConfig`) or one of `rld.config`'s dataclasses."""
    import dataclasses

    from rld import config
    from rld.distillers import DISTILLERS

    for name, spec in DISTILLERS.items():
        if spec.config_schema().__name__ == schema:
            return f"distiller ({name})", ["name", *spec.setting_names()]
    cls = getattr(config, schema, None)
    if cls is not None and dataclasses.is_dataclass(cls):
        return "", [f.name for f in dataclasses.fields(cls)]
    return None


def _unknown_key(e: BaseException, argv: Sequence[str]) -> str | None:
    """`distiller.bta is not a setting of ...` for Hydra's "Could not override" error."""
    m = re.search(r"Could not override '([^']+)'", str(e))
    cause = re.search(r"Key '([^']+)' not in '([^']+)'", str(e.__cause__ or ""))
    if m is None:
        return None
    key = m.group(1)
    found = _setting_names(cause.group(2), argv) if cause else None
    if found is None:
        return f"{key} is not a key of this config"
    where, names = found
    parts, missing = key.split("."), cause.group(1)
    at = parts.index(missing) if missing in parts else len(parts) - 1
    prefix, key = ".".join(parts[:at]), ".".join(parts[:at + 1])
    where = where or prefix or "the top level"
    near = [f"{prefix}.{k}" if prefix else k for k in closest(missing, names)]
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    return f"{key} is not a key of {where}{hint}; it has {', '.join(names)}"


def _bad_value(e: BaseException) -> str | None:
    """`seed='x' is not allowed: an integer` for Hydra's "Error merging override"."""
    m = re.search(r"Error merging override ([^=\s]+)=(.*)", str(e))
    cause = re.search(r"(?:could not be converted to|is not a valid) (\w+)",
                      str(e.__cause__ or ""))
    if m is None or cause is None:
        return None
    kind = {"float": "a number", "integer": "an integer", "int": "an integer",
            "boolean": "true or false", "bool": "true or false"}.get(
        cause.group(1).lower(), f"a {cause.group(1).lower()}")
    return f"{m.group(1)}={m.group(2).strip()!r} is not allowed: {kind}"


def _missing_option(e: BaseException) -> str | None:
    """`pair=nosuch is not an option ...` for Hydra's "Could not find 'pair/nosuch'"."""
    m = re.search(r"Could not find '([^']+)/([^'/]+)'", str(e))
    if m is None:
        return None
    group, name = m.groups()
    text = str(e)
    options = re.findall(r"^\t(\S+)$", text.split("Available options", 1)[-1], re.M) \
        if "Available options" in text else []
    near = closest(name, options)
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    allowed = f"; use one of {', '.join(options)}" if options else ""
    return f"{group}={name} is not an option of {group}{hint}{allowed}"


def hydra_message(e: BaseException, argv: Sequence[str] = ()) -> str:
    """One line for an error of Hydra's composition or of OmegaConf."""
    from hydra.errors import OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    special = _unknown_key(e, argv) or _bad_value(e) or _missing_option(e)
    if special:
        return special
    if isinstance(e, OverrideParseException):
        return f"cannot parse the override {e.override!r}: {_lines(e)[0]} (quote values " \
               "with special characters: key='a,b')"
    head = _lines(e)[:1]
    cause = e.__cause__
    if isinstance(cause, OmegaConfBaseException):
        head += _lines(getattr(cause, "msg", None) or cause)[:1]
    elif isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
        head = [f"{e.full_key}: {(_lines(getattr(e, 'msg', '') or e) or [''])[0]}"]
    text = ": ".join(head) or type(e).__name__
    return re.sub(r"\s*See https://\S+.*$", "", text)


def message(e: BaseException, argv: Sequence[str] = ()) -> str:
    """The one line a user error gets."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, HydraException | OmegaConfBaseException):
        return hydra_message(e, argv)
    if isinstance(e, OSError) and not isinstance(e, ValueError):
        return _path_message(e, argv)
    return "; ".join(line.rstrip(":;") for line in _lines(e)) or type(e).__name__


def _path_message(e: OSError, argv: Sequence[str]) -> str:
    """`paths.sweeps=/x: cannot create /x/main/...: Not a directory`: the path, why, and the
    override of `argv` it comes from."""
    if not e.filename:
        return str(e)
    path = str(e.filename)
    given = [a.lstrip("+") for a in argv if "=" in a and a.lstrip("+").startswith("paths.")]
    given = [a for a in given if path.startswith(a.partition("=")[2])]
    source = max(given, key=len, default=None)  # the most specific: paths.sweeps=<root>/x
    head = f"{source}: " if source else ""
    return f"{head}cannot create, write or read {path}: {e.strerror or e}"


# whether this process's command asked for tracebacks (`debug_requested`)
_debug = False


def debug_requested(argv: list[str]) -> bool:
    """Whether the traceback is wanted (`--debug`, removed from `argv`, or
    HYDRA_FULL_ERROR=1); `stop` and `run` follow it."""
    global _debug
    _debug = _debug or DEBUG_FLAG in argv or os.environ.get("HYDRA_FULL_ERROR") == "1"
    while DEBUG_FLAG in argv:
        argv.remove(DEBUG_FLAG)
    return _debug


def stop(prog: str, e: BaseException, argv: Sequence[str] = ()) -> None:
    """For a user error (unless tracebacks were asked for): its line on stderr and exit
    code 2; for anything else, return (the caller re-raises)."""
    if isinstance(e, user_errors()) and not _debug:
        print(f"{prog}: error: {message(e, argv)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def run(prog: str, fn: Callable[[], Any], argv: Sequence[str] = ()) -> Any:
    """Call `fn` (a command's body): a user error is one line on stderr and exit 2 (unless
    tracebacks were asked for), an interrupt one line and exit 130."""
    try:
        return fn()
    except KeyboardInterrupt as e:
        what = "SIGTERM" if isinstance(e, Interrupted) else "Ctrl-C"
        print(f"{prog}: interrupted ({what}); run the same command again to resume",
              file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except user_errors() as e:
        stop(prog, e, argv)
        raise
