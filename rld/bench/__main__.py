"""Dispatch ``python -m rld.bench <subcommand> [options]`` to ``rld.bench.<subcommand>.main``."""

from __future__ import annotations

import importlib
import sys

from rld.bench import SUBCOMMANDS
from rld.registry import closest


def _usage() -> str:
    lines = ["usage: python -m rld.bench {" + ",".join(SUBCOMMANDS) + "} [options]", ""]
    lines += [f"  {name:<6} {text}" for name, text in SUBCOMMANDS.items()]
    lines += ["", "python -m rld.bench <subcommand> --help: the options of a subcommand"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        near = closest(name, SUBCOMMANDS)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        print(f"rld.bench: error: {name!r} is not a subcommand{hint}; use one of "
              f"{', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module_name = f"rld.bench.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(
            f"rld.bench: the subcommand {name!r} is not available in this checkout "
            f"({module_name.replace('.', '/')}.py is missing)",
            file=sys.stderr,
        )
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    from rld.cli import run

    sys.exit(run("rld.bench", main))  # a user error (an unwritable --out, ...): one line, exit 2
