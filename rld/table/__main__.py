"""The command line: ``python -m rld.table [SWEEP_DIR ...] [--out DIR] [--metric ...]``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rld.cli import ArgumentParser, check_writable

from .render import table_markdown, write_outputs
from .runs import collect_runs
from .summary import METRICS


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(
        prog="python -m rld.table",
        description="Collect sweep runs into results/runs.csv and the paper's tables.",
    )
    ap.add_argument("sweeps", nargs="*", default=["sweeps"], metavar="SWEEP_DIR",
                    help="directories to search for runs (default: sweeps)")  # fmt: skip
    ap.add_argument("--out", default="results", help="output directory (default: results)")
    ap.add_argument("--metric", choices=METRICS, default="top1_best",
                    help="best-epoch (default, published convention) or last-epoch top-1")  # fmt: skip
    args = ap.parse_args(argv)
    missing = [d for d in args.sweeps if not os.path.isdir(d)]
    if missing:
        print(f"rld.table: error: no such directory: {', '.join(missing)} (SWEEP_DIR: folders "
              "holding run directories, default: sweeps)", file=sys.stderr)
        return 2
    check_writable(args.out, "--out")
    runs = collect_runs(args.sweeps)
    if not runs:
        print(f"warning: no run directories (.hydra/config.yaml) under {', '.join(args.sweeps)}",
              file=sys.stderr)  # fmt: skip
    written, tables = write_outputs(runs, Path(args.out), args.metric)
    for t in tables:
        print(table_markdown(t))
    print("Wrote:")
    for p in written:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    from rld.cli import run

    sys.exit(run("rld.table", main))  # a user error (an unwritable --out, ...): one line, exit 2
