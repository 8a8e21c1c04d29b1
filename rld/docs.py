"""`python -m rld.docs [--out FILE]`: the configuration reference, generated from the code.

The page lists every key a run's config can hold, with its type, default and what it does:

* the schema of `rld/config.py` (`TrainConfig` and the dataclasses under it): a key's
  description is its attribute docstring, else its trailing `#` comment, else the `#`
  comment lines right above it;
* each registered data set's own keys (`register_dataset(..., settings=...)`);
* each registered distiller's settings (`register_distiller`: the `Setting` help and check
  of each, the weights every distiller with a teacher has, the registration's defaults);
* the keys of the Optuna presets (`conf/hparams/*.yaml`) and of the launchers
  (`conf/hydra/launcher/*.yaml`), described by their YAML comments;
* the config groups under `conf/`, the pairs, and the registered models.

`mkdocs build` writes it as `reference/configuration.md` (the `gen-files` plugin runs
`docs/gen_reference.py`); `undocumented()` names the keys without a description, and the
test suite fails while there is one.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONF = Path(__file__).resolve().parent.parent / "conf"


@dataclass(frozen=True)
class Key:
    """One documented key: its dotted name, type, default and description."""

    key: str
    type: str
    default: str
    help: str


# ------------------------------------------------------------------ descriptions from source
def _comments(source: str) -> dict[int, str]:
    """`{line number: comment text}` of every `#` comment in `source` (1-based lines)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def field_docs(cls: type) -> dict[str, str]:
    """The description of each field of dataclass `cls`, from its source: the attribute
    docstring, else the trailing comment of its line(s), else the comment block above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = _comments(source)
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = ""
        after = body[i + 1] if i + 1 < len(body) else None
        if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            text = inspect.cleandoc(after.value.value)
        if not text:
            trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1)
                        if n in comments and not lines[n - 1].lstrip().startswith("#")]
            text = " ".join(trailing)
            text = re.sub(r"type:\s*ignore\[[^\]]*\]", "", text).strip().lstrip("#").strip()
        if not text:
            above, n = [], node.lineno - 1
            while n >= 1 and lines[n - 1].lstrip().startswith("#"):
                above.insert(0, comments[n])
                n -= 1
            text = " ".join(above)
        docs[node.target.id] = " ".join(text.split())
    return docs


def yaml_docs(path: Path, block: str | None = None) -> dict[str, str]:
    """`{dotted key: description}` of every key of a YAML file (or of the keys under the
    top-level `block:`, named relative to it), from the trailing comment of the key's line,
    else the comment lines right above it.  Only as much YAML as the files under `conf/`
    use: block mappings indented by spaces, one key per line."""
    docs: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    above: list[str] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            above = []
            continue
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = re.match(r"(\s*)([A-Za-z_][\w]*):(.*)$", line)
        if m is None:  # a list item or a continued value
            above = []
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        trailing = rest.split(" #", 1)[1].strip() if " #" in rest else ""
        if rest.strip().startswith("#"):
            trailing = rest.strip().lstrip("#").strip()
        docs[dotted] = " ".join((trailing or " ".join(above)).split())
        stack.append((indent, key))
        above = []
    if block is None:
        return docs
    return {k.removeprefix(block + "."): v for k, v in docs.items() if k.startswith(block + ".")}


def yaml_values(path: Path, block: str | None = None) -> dict[str, Any]:
    """`{dotted key: value}` of the leaves of a YAML file (or of its `block:`), as OmegaConf
    reads them (unresolved); a mapping is listed before its keys."""
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.load(path)
    if block is not None:
        node = node.get(block)
    out: dict[str, Any] = {}

    def walk(n: Any, prefix: str) -> None:
        for k in n.keys():
            child = n._get_node(k)
            if isinstance(child, DictConfig) and len(child) and not child._is_interpolation():
                out[f"{prefix}{k}"] = OmegaConf.to_container(child)  # the mapping, then its keys
                walk(child, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = child._value() if not isinstance(child, DictConfig) \
                    else OmegaConf.to_container(child)

    if node is not None:
        walk(node, "")
    return out


# ------------------------------------------------------------------ keys
def _type_name(t: Any) -> str:
    if typing.get_origin(t) is typing.Annotated:
        t = typing.get_args(t)[0]
    args = typing.get_args(t)
    if type(None) in args and len(args) == 2:
        return _type_name(next(a for a in args if a is not type(None))) + " | None"
    if isinstance(t, str):
        return t.replace("typing.", "")
    name = getattr(t, "__name__", None)
    text = str(t).replace("typing.", "") if name is None or "[" in str(t) else name
    return text.replace("NoneType", "None")


def _default_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    return str(value)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def dataclass_keys(cls: type, prefix: str = "") -> list[Key]:
    """Every key of a schema dataclass, nested dataclasses flattened (`trainer.device`)."""
    docs = field_docs(cls)
    keys = []
    for f in dataclasses.fields(cls):
        value = _field_default(f)
        if dataclasses.is_dataclass(value):
            keys += dataclass_keys(type(value), f"{prefix}{f.name}.")
            continue
        keys.append(Key(prefix + f.name, _type_name(f.type), _default_text(value),
                        docs.get(f.name, "")))
    return keys


def schema_keys() -> list[Key]:
    """The keys of `rld.config.TrainConfig` (the `distiller` node excepted: see
    `distiller_keys`)."""
    from rld.config import TrainConfig

    return [k for k in dataclass_keys(TrainConfig) if k.key != "distiller"]


def dataset_keys() -> dict[str, list[Key]]:
    """`{data set: its own keys}` for each registered data set with a settings schema."""
    from rld.config import DatasetConfig
    from rld.data import DATASETS

    common = {f.name for f in dataclasses.fields(DatasetConfig)}
    out = {}
    for name, spec in DATASETS.items():
        if spec.settings is None:
            continue
        own = [k for k in dataclass_keys(spec.settings, "dataset.")
               if k.key.removeprefix("dataset.") not in common]
        out[name] = own
    return out


def distiller_keys() -> dict[str, list[Key]]:
    """`{distiller: the keys of distiller.*}` for every registered distiller."""
    from rld.distillers import DISTILLERS
    from rld.distillers.base import describe

    out = {}
    for name, spec in DISTILLERS.items():
        keys = [Key("distiller.name", "str", name, "the registered distiller")]
        for f in spec.fields():
            s = describe(f)
            help_ = s.help + (f" ({s.check.allowed})" if s.check is not None else "")
            default = spec.defaults.get(f.name, f.default)
            keys.append(Key(f"distiller.{f.name}", _type_name(f.type), _default_text(default),
                            help_))
        out[name] = keys
    return out


def _yaml_type(value: Any) -> str:
    """The type of a YAML value; none for null or an interpolation (it follows its key)."""
    if value is None or (isinstance(value, str) and value.startswith("${")):
        return ""
    return type(value).__name__


def _yaml_keys(path: Path, block: str | None, prefix: str) -> list[Key]:
    docs, values = yaml_docs(path, block), yaml_values(path, block)
    return [Key(f"{prefix}{k}", _yaml_type(v), _default_text(v), docs.get(k, ""))
            for k, v in values.items()]


def hparams_keys() -> dict[str, list[Key]]:
    """`{preset: its hparams.* keys}` of the Optuna presets `conf/hparams/*.yaml`: its own,
    then those of `conf/hparams/base/study.yaml` that every preset includes, then the
    pruners' settings (`rld.pruning.PruningSettings`, hparams.pruning.*)."""
    from rld.pruning import KEY, PruningSettings

    shared = _yaml_keys(CONF / "hparams" / "base" / "study.yaml", "hparams", "hparams.")
    shared += dataclass_keys(PruningSettings, f"{KEY}.")
    return {path.stem: _yaml_keys(path, "hparams", "hparams.") + shared
            for path in sorted((CONF / "hparams").glob("*.yaml"))}


def launcher_keys() -> dict[str, list[Key]]:
    """`{launcher: its hydra.launcher.* keys}` of `conf/hydra/launcher/*.yaml`."""
    return {path.stem: [k for k in _yaml_keys(path, None, "hydra.launcher.")
                        if k.key != "hydra.launcher._target_"]
            for path in sorted((CONF / "hydra" / "launcher").glob("*.yaml"))}


def undocumented() -> list[str]:
    """The keys the reference would list without a description (the test suite requires
    none)."""
    groups = [schema_keys()]
    groups += dataset_keys().values()
    groups += distiller_keys().values()
    groups += hparams_keys().values()
    groups += launcher_keys().values()
    return sorted({k.key for keys in groups for k in keys if not k.help.strip()})


# ------------------------------------------------------------------ the page
def _cell(text: str) -> str:
    """`text` for a Markdown table cell: pipes escaped, angle brackets outside code spans
    written as entities (else Markdown takes `<class>` for HTML)."""
    parts = text.replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):  # outside code spans (Markdown keeps pipes inside them)
        parts[i] = parts[i].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _table(keys: list[Key], strip: str = "") -> list[str]:
    rows = ["| key | type | default | what it does |", "| --- | --- | --- | --- |"]
    for k in keys:
        default = f"`{_cell(k.default)}`" if k.default else ""
        rows.append(f"| `{k.key}` | {_cell(k.type)} | {default} | {_cell(k.help)} |")
    return rows + [""]


def head_comment(path: Path) -> str:
    """The comment block at the top of a YAML file (its `@package` line left out)."""
    text = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        line = line.lstrip("#").strip()
        if not line.startswith("@package"):
            if not line:
                break
            text.append(line)
    return " ".join(text)


def _groups() -> list[str]:
    rows = ["| group | options |", "| --- | --- |"]
    for d in sorted(p for p in CONF.rglob("*") if p.is_dir()):
        options = sorted(p.stem for p in d.glob("*.yaml"))
        if options:
            rows.append(f"| `{d.relative_to(CONF).as_posix()}` | "
                        + ", ".join(f"`{o}`" for o in options) + " |")
    return rows + [""]


def _options(group: str) -> list[str]:
    """A table of a group's options with the head comment of each file."""
    rows = ["| option | what it is |", "| --- | --- |"]
    for path in sorted((CONF / group).glob("*.yaml")):
        rows.append(f"| `{group}={path.stem}` | {_cell(head_comment(path))} |")
    return rows + [""]


def _recipes() -> list[str]:
    from omegaconf import OmegaConf

    from rld.config import DatasetConfig

    keys = ("family", "num_classes", "image_size", "epochs", "batch_size", "lr",
            "weight_decay", "milestones")
    rows = ["| data set | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 1) + "|"]
    for path in sorted((CONF / "dataset").glob("*.yaml")):
        node = OmegaConf.merge(OmegaConf.structured(DatasetConfig), OmegaConf.load(path))
        rows.append(f"| `{path.stem}` | "
                    + " | ".join(_cell(str(node._get_node(k)._value())) for k in keys) + " |")
    return rows + [""]


def _pairs() -> list[str]:
    from omegaconf import OmegaConf

    rows = ["| pair | teacher | student | lr (student / teacher) | per-pair loss defaults |",
            "| --- | --- | --- | --- | --- |"]
    for path in sorted((CONF / "pair").glob("*.yaml")):
        p = OmegaConf.to_container(OmegaConf.load(path))
        lr = p.get("lr", {})
        loss = "; ".join(f"{d}: " + ", ".join(f"{k}={v}" for k, v in s.items())
                         for d, s in (p.get("loss_defaults") or {}).items())
        rows.append(f"| `{path.stem}` | {p['teacher']} | {p['student']} | "
                    f"{lr.get('student', '')} / {lr.get('teacher', '')} | {loss} |")
    return rows + [""]


def _models() -> list[str]:
    from rld.models import MODELS, model_names

    rows = ["| family | models |", "| --- | --- |"]
    for family in sorted(MODELS):
        rows.append(f"| `{family}` | " + ", ".join(f"`{m}`" for m in model_names(family))
                    + " |")
    return rows + [""]


def _distillers() -> list[str]:
    from rld.distillers import DISTILLERS

    lines = []
    for name, keys in distiller_keys().items():
        spec = DISTILLERS.get(name)
        what = spec.doc.strip().splitlines()[0] if spec.doc.strip() else ""
        lines.append(f"### `distiller={name}`")
        lines.append("")
        facts = [f"table column **{spec.label or name}**" if spec.label else "",
                 "distils from a teacher" if spec.needs_teacher else "no teacher",
                 f"grid point named by {', '.join(spec.point)}" if spec.point else "",
                 "packs with other logit distillers" if spec.packable else "runs unpacked",
                 f"one process only ({spec.single_process})" if spec.single_process else ""]
        if what:
            lines.append(what)
            lines.append("")
        lines.append("; ".join(f for f in facts if f) + ".")
        lines.append("")
        lines += _table(keys)
    return lines


def reference_markdown() -> str:
    """The configuration reference page (Markdown)."""
    from rld.data import DATASETS
    from rld.registry import load_entry_points

    load_entry_points()
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m rld.docs` from rld/config.py, conf/ and the registries;"
        " do not edit. -->",
        "",
        "This page is generated from the code at every documentation build: the schema "
        "dataclasses of `rld/config.py`, the registered data sets, models and distillers "
        "(plugins' ones included when they are installed), and the YAML files under "
        "`conf/`. Any key can be set on the command line (`python -m rld.train "
        "trainer.epochs=2`); a key that does not exist, or a value of the wrong type, is "
        "refused when the config is composed. Defaults written `${...}` are interpolations: "
        "they follow another key.",
        "",
        "## Config groups",
        "",
        "A group picks a YAML file under `conf/` (`dataset=digits`, `hydra/launcher=gpus`).",
        "",
        *_groups(),
        "## Run keys",
        "",
        "Every key of `rld.config.TrainConfig`. The data set file chosen by `dataset=` sets "
        "the `dataset.*` values (and through them the recipe: `trainer.epochs`, "
        "`trainer.batch_size`, `optim.*`); the pair file sets `pair.*`.",
        "",
        *_table(schema_keys()),
    ]
    ds = dataset_keys()
    out += ["## Data sets", "",
            "Registered: " + ", ".join(f"`{n}`" for n, _ in DATASETS.items()) + ". "
            "The files under `conf/dataset/`:", "", *_options("dataset"),
            "Their recipes (the values the `dataset.*` keys take):", "", *_recipes()]
    if ds:
        out += ["A data set registered with a settings schema adds keys of its own to "
                "`dataset.*`:", ""]
    else:
        out += ["No registered data set adds keys of its own (a plugin's data set may: "
                "`register_dataset(..., settings=...)`; its keys are listed here when it "
                "is installed).", ""]
    for name, keys in ds.items():
        out += [f"### `dataset={name}`", ""]
        out += _table(keys) if keys else ["No keys beyond the common ones.", ""]
    out += ["## Distillers", "",
            "`distiller=<name>` picks one; its settings are typed by its registration, and a "
            "key it does not have is refused with one line. Each setting defaults to the "
            "pair's `pair.loss_defaults.<distiller>.<setting>` when the pair file gives one "
            "(see [Pairs](#pairs)), else to the value below.", ""]
    out += _distillers()
    out += ["## Pairs", "", "`pair=<name>` (files under `conf/pair/`):", "", *_pairs()]
    out += ["## Models", "",
            "The registered architectures by family (a data set's `dataset.family` picks "
            "the family; `pair.teacher` and `pair.student` name one each):", "", *_models()]
    out += ["## Optuna presets (`hparams=`)", "",
            "`hparams=<preset>` turns the command into an Optuna study run by the rld "
            "sweeper; its keys live under `hparams.*`.", ""]
    out += ["The grid presets of the basic sweeper (`sweep=`):", "", *_options("sweep")]
    for name, keys in hparams_keys().items():
        out += [f"### `hparams={name}`", "", *_table(keys)]
    out += ["## Launchers (`hydra/launcher=`)", "",
            "`hydra/launcher=<name>` picks where the jobs of a multirun run; its keys live "
            "under `hydra.launcher.*`. The default, `basic`, is Hydra's own launcher (one "
            "job after another in this process).", ""]
    for name, keys in launcher_keys().items():
        out += [f"### `hydra/launcher={name}`", "", *_table(keys)]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rld.docs", description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the page to this file (default: stdout)")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 naming the keys without a description")
    args = ap.parse_args(argv)
    if args.check:
        missing = undocumented()
        if missing:
            print("undocumented keys: " + ", ".join(missing))
            return 1
        return 0
    text = reference_markdown()
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
