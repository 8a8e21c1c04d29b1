"""Which teachers a command is about: the configs `rld.train` would compose for the chosen
pairs (Hydra's compose API over the same `conf/`, with the user's overrides), and the
published teachers' table (`published.csv`)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the source tree's config groups


class UsageError(Exception):
    """Bad input: one line on stderr, exit code 2, before any work."""


class TeacherError(Exception):
    """A command that could not do its work (download, archive, checks): one line, exit 1."""


@dataclass
class Published:
    """A row of `published.csv`: a published teacher's top-1, its weights and the source."""

    dataset: str
    teacher: str
    top1: float
    weights: str  # an archive's file name, or torchvision:<Weights enum name>
    source: str


def published_table() -> dict[tuple[str, str], Published]:
    """`published.csv` by (dataset, teacher architecture)."""
    text = files("rld.teachers").joinpath("published.csv").read_text()
    rows = csv.DictReader(io.StringIO(text))
    return {(r["dataset"], r["teacher"]): Published(r["dataset"], r["teacher"],
                                                     float(r["top1"]), r["weights"], r["source"])
            for r in rows}


@dataclass
class Teacher:
    """One teacher file the chosen pairs need."""

    arch: str
    path: Path
    pairs: list[str]
    cfg: Any  # the composed config of its first pair

    @property
    def present(self) -> bool:
        return self.path.is_file()


@dataclass
class Selection:
    """The teachers of a command's pairs on one data set, and the overrides it was given."""

    dataset: Any  # the composed `dataset` node
    teachers_root: Path  # paths.teachers
    teachers: list[Teacher]
    overrides: list[str]  # the user's overrides but pair= and hydra's
    hydra_overrides: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        """`<paths.teachers>/<dataset>`: the data set's teachers and MANIFEST.json."""
        return self.teachers_root / str(self.dataset.name)


def compose_all(pairs: list[str] | None, overrides: list[str]) -> list[Any]:
    """The config of every pair (None: `train.yaml`'s default) with `overrides`."""
    from hydra import compose, initialize_config_dir

    from rld.config import register_configs
    from rld.errors import ConfigError
    from rld.registry import load_plugins, plugins_from_argv

    try:
        load_plugins(plugins_from_argv(overrides))
    except ConfigError as e:
        raise UsageError(str(e)) from None
    register_configs()
    out = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for pair in pairs or [None]:
            extra = [] if pair is None else [f"pair={pair}"]
            try:
                out.append(compose("train", overrides=[*overrides, *extra]))
            except Exception as e:  # noqa: BLE001 - Hydra and OmegaConf raise many types
                from rld.cli import hydra_message

                raise UsageError(hydra_message(e, overrides)) from None
    return out


def pair_files() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "pair").glob("*.yaml"))


def default_pairs(cfg) -> list[str]:
    """The pairs a command covers without pair=: the paper's pairs of the data set (its rows
    in rld/data/paper_results.csv), else every pair whose models the data set's family has."""
    from omegaconf import OmegaConf

    from rld.models import MODELS

    text = files("rld").joinpath("data/paper_results.csv").read_text()
    paper = {(r["teacher"], r["student"]) for r in csv.DictReader(io.StringIO(text))
             if r["dataset"] == cfg.dataset.name}
    models = MODELS.get(str(cfg.dataset.family), {})
    pairs = {}
    for name in pair_files():
        node = OmegaConf.load(CONF_DIR / "pair" / f"{name}.yaml")
        pairs[name] = (str(node.teacher), str(node.student))
    chosen = [n for n, ts in pairs.items() if ts in paper]
    return chosen or [n for n, (t, s) in pairs.items() if t in models and s in models]


def split_overrides(overrides: list[str]) -> tuple[list[str] | None, list[str], list[str]]:
    """(pairs of pair=a,b or None, the other overrides, hydra's overrides)."""
    pairs, rest, hydra = None, [], []
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq and not item.startswith("~"):
            raise UsageError(f"{item!r} is not an override (key=value) nor an option of "
                             "this command")
        if key.startswith(("hydra.", "hydra/")):
            hydra.append(item)
        elif key == "pair":
            pairs = [p.strip() for p in value.split(",") if p.strip()]
            unknown = sorted(set(pairs) - set(pair_files()))
            if unknown or not pairs:
                raise UsageError(f"pair={value} is not allowed: choose pairs among "
                                 f"{', '.join(pair_files())} (comma-separated)")
        else:
            rest.append(item)
    return pairs, rest, hydra


def select(overrides: list[str]) -> Selection:
    """The teachers the pairs of `overrides` (pair=a,b; default `default_pairs`) need."""
    pairs, rest, hydra = split_overrides(overrides)
    if pairs is None:
        pairs = default_pairs(compose_all(None, rest)[0])
    cfgs = compose_all(pairs, rest)
    teachers: dict[str, Teacher] = {}
    for cfg in cfgs:
        path = str(cfg.teacher.checkpoint)
        t = teachers.setdefault(path, Teacher(str(cfg.pair.teacher), Path(path), [], cfg))
        if t.arch != str(cfg.pair.teacher):
            raise UsageError(f"teacher.checkpoint={path} would be the teacher of {t.arch} and "
                             f"{cfg.pair.teacher}: choose pairs with one teacher architecture")
        t.pairs.append(str(cfg.pair.name))
    return Selection(cfgs[0].dataset, Path(str(cfgs[0].paths.teachers)),
                     list(teachers.values()), rest, hydra)
