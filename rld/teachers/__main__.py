"""`python -m rld.teachers COMMAND [options] [overrides]` (`make teachers ARGS="..."`).

    python -m rld.teachers list [pair=a,b] [dataset=cifar100] [paths.teachers=DIR]
    python -m rld.teachers fetch [--dataset cifar100|imagenet|NAME] [--from URL|PATH] [--sha256 HEX]
    python -m rld.teachers verify [--dataset NAME] [--expected CSV] [--tolerance 0.1]
    python -m rld.teachers train [pair=a,b] [any override of rld.train, hydra/launcher=...]

The overrides are those of `python -m rld.train` (composed over the same `conf/`);
`pair=a,b` chooses pairs (default: the paper's pairs of the data set, else every pair its
model family has).  Exit codes: 0 done (`list`: always); 1 a teacher still missing, not
verified, or a download or archive that failed (one line); 2 bad input (one line, before
any work).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rld.cli import ArgumentParser
from rld.teachers.configs import Selection, TeacherError, UsageError, published_table, select
from rld.teachers.download import is_url, name_of
from rld.teachers.status import verification

ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def say(line: str) -> None:
    print(line, flush=True)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m rld.teachers", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    helps = {"list": "every teacher the configured pairs need: where, present, SHA-256, "
                     "verification",
             "fetch": "download and install the published teachers (or --from an archive)",
             "verify": "evaluate each teacher and compare with its published top-1",
             "train": "train every missing teacher of the chosen pairs (one multirun)"}
    cmds = {name: sub.add_parser(name, help=text, description=text)
            for name, text in helps.items()}
    for c in cmds.values():
        c.add_argument("--dataset", help="the data set (as dataset=NAME)")
    cmds["fetch"].add_argument("--from", dest="source", metavar="URL|PATH",
                               help="a mirror URL or a local path instead of "
                                    "dataset.teacher_source (ImageNet: a folder or base URL "
                                    "of torchvision's weight files)")
    cmds["fetch"].add_argument("--sha256", help="the archive's expected SHA-256")
    cmds["verify"].add_argument("--expected", type=Path, metavar="CSV",
                                help="expected accuracies (columns teacher, top1 or "
                                     "teacher_top1, optionally dataset) instead of the "
                                     "published ones")
    cmds["verify"].add_argument("--tolerance", type=float, default=0.1,
                                help="allowed |top-1 - expected| in points (default 0.1)")
    return p


def with_dataset(dataset: str | None, overrides: list[str]) -> list[str]:
    given = [o.partition("=")[2] for o in overrides if o.partition("=")[0] == "dataset"]
    if dataset is None:
        return overrides
    if given and given[-1] != dataset:
        raise UsageError(f"--dataset {dataset} and dataset={given[-1]} disagree")
    return [*overrides, f"dataset={dataset}"] if not given else overrides


def recorded_state(sel: Selection, path: Path) -> str:
    """What MANIFEST.json says of a present teacher file."""
    from rld.reproduce import file_sha256
    from rld.teachers.fetch import Manifest

    try:
        entry = Manifest(sel.folder, str(sel.dataset.name)).file(
            str(path.relative_to(sel.folder)))
    except (ValueError, TeacherError):
        entry = None
    if entry is None:
        return "not fetched (not in MANIFEST.json)"
    if entry["sha256"] != file_sha256(path):
        return f"DIFFERS from the {entry['sha256']} recorded in MANIFEST.json"
    return f"as fetched from {entry['source']} (MANIFEST.json)"


def cmd_list(sel: Selection, args) -> int:
    from rld.reproduce import file_sha256

    table = published_table()
    say(f"{len(sel.teachers)} teacher(s) of the chosen pairs on {sel.dataset.name}, "
        f"under {sel.folder}")
    for t in sel.teachers:
        say(f"{t.arch}  {'present' if t.present else 'MISSING'}  {t.path}")
        say(f"    pairs         {', '.join(t.pairs)}")
        if t.present:
            say(f"    sha256        {file_sha256(t.path)}  {recorded_state(sel, t.path)}")
            result = verification(t.path)
            say(f"    verification  {result.status}: {result.describe()}")
        row = table.get((str(sel.dataset.name), t.arch))
        say("    published     " + (f"top-1 {row.top1:g} ({row.source})" if row else "none"))
    return 0


def fetch_mode(sel: Selection, source: str | None) -> tuple[str, str]:
    """("archive" | "weights", location) of a fetch; UsageError when there is none or a
    local path is missing."""
    location = source or str(sel.dataset.teacher_source)
    if not location:
        raise UsageError(f"no published teachers for dataset {sel.dataset.name} "
                         "(dataset.teacher_source is empty): pass --from URL|PATH (an archive "
                         f"of <arch>_vanilla/{sel.dataset.teacher_file}) or train them with "
                         "python -m rld.teachers train")
    weights = location == "torchvision" or (str(sel.dataset.teacher_source) == "torchvision"
                                            and not name_of(location).endswith(ARCHIVES))
    if not is_url(location) and location != "torchvision":
        local = Path(location)
        if not (local.is_dir() if weights else local.is_file()):
            kind = "folder of torchvision's weight files" if weights else "archive"
            raise UsageError(f"--from {location}: no such {kind}")
    return ("weights" if weights else "archive"), location


def cmd_fetch(sel: Selection, args) -> int:
    from rld.teachers.fetch import fetch_archive, fetch_lock, fetch_weights

    if any(o.partition("=")[0] == "teacher.checkpoint" for o in sel.overrides):
        raise UsageError("teacher.checkpoint is not allowed here: fetch installs into "
                         "<paths.teachers>/<dataset>/<arch>_vanilla/")
    if args.sha256 and (len(args.sha256) != 64 or
                        any(c not in "0123456789abcdef" for c in args.sha256.lower())):
        raise UsageError(f"--sha256 {args.sha256}: not 64 hexadecimal digits")
    mode, location = fetch_mode(sel, args.source)
    differing = [t for t in sel.teachers if t.present
                 and recorded_state(sel, t.path).startswith("DIFFERS")]
    for t in differing:
        say(f"warning: {t.path} {recorded_state(sel, t.path)}: remove it and fetch again")
    if all(t.present for t in sel.teachers):
        say(f"all {len(sel.teachers)} teacher(s) of the chosen pairs are present: nothing "
            "to fetch")
        return 1 if differing else 0
    with fetch_lock(sel.folder):
        if mode == "weights":
            fetch_weights(sel, args.source, say)
        else:
            fetch_archive(sel, location, args.sha256, say)
    still = [t for t in sel.teachers if not t.present]
    for t in still:
        say(f"not fetched: {t.path} (not in {name_of(location)}); train it with: python -m "
            f"rld.teachers train {shlex.join([f'pair={t.pairs[0]}', *sel.overrides])}")
    return 1 if still or differing else 0


def cmd_verify(sel: Selection, args) -> int:
    from rld.teachers.verify import verify

    if not args.tolerance >= 0:
        raise UsageError(f"--tolerance {args.tolerance}: must be >= 0")
    bad = verify(sel, args.expected, args.tolerance, say)
    if bad:
        say(f"{bad} of {len(sel.teachers)} teacher(s) not verified")
    return 1 if bad else 0


def cmd_train(sel: Selection, args) -> int:
    from rld.teachers.training import train_missing

    train_missing(sel, say)
    return 0


COMMANDS = {"list": cmd_list, "fetch": cmd_fetch, "verify": cmd_verify, "train": cmd_train}


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            args, rest = build_parser().parse_known_args(argv)
        except SystemExit as e:  # --help (0) or the parser's one-line error (2)
            return int(e.code or 0)
        sel = select(with_dataset(args.dataset, rest))
        return COMMANDS[args.command](sel, args)
    except UsageError as e:
        print(f"rld.teachers: error: {e}", file=sys.stderr)
        return 2
    except TeacherError as e:
        print(f"rld.teachers: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rld.teachers: interrupted (a download resumes when run again)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
