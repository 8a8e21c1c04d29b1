"""The documentation cannot drift: the generated configuration reference covers every key,
and every example of README.md and docs/ composes, parses or runs (tests/docs_examples.py
states the marker convention)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

import pytest
from docs_examples import (
    DOCS,
    REPO,
    blocks,
    commands,
    examples,
    rld_module,
    split_env,
)
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rld import docs as rld_docs
from rld.config import register_configs
from rld.distillers import DISTILLERS

register_configs()


# ------------------------------------------------------------------ the generated reference
@pytest.fixture(scope="module")
def reference() -> str:
    return rld_docs.reference_markdown()


def _documented(page: str) -> dict[str, str]:
    """`{key: description}` of the table rows of the page (the last row of a key wins)."""
    rows = {}
    for line in page.splitlines():
        if line.startswith("| `"):
            cells = re.split(r"(?<!\\)\|", line)
            rows[cells[1].strip().strip("`")] = cells[-2].strip()
    return rows


def _leaves(node, prefix=""):
    """The dotted keys of a composed config (dict values that are free-form stop there)."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in ("pair.lr", "pair.loss_defaults"):
            yield from _leaves(value, path + ".")
        else:
            yield path


def test_every_key_has_a_description():
    assert rld_docs.undocumented() == []


def test_reference_lists_every_key_of_every_composed_config(reference):
    """Compose each data set with each registered distiller and each Optuna preset: every
    key of the result is a row of the page, with a description."""
    rows = _documented(reference)
    missing = set()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cases = [[f"dataset={d}", f"distiller={name}"]
                 for d in ("cifar100", "imagenet", "digits", "synthetic")
                 for name, _ in DISTILLERS.items()]
        cases += [["hparams=grid"], ["hparams=tpe"]]
        for overrides in cases:
            cfg = OmegaConf.to_container(compose("train", overrides=overrides))
            for key in _leaves(cfg):
                if key != "hparams" and not rows.get(key, "").strip():
                    missing.add(key)
    assert not missing, f"keys absent from the reference: {sorted(missing)}"


def test_reference_has_every_distiller_setting_and_its_help(reference):
    from rld.distillers.base import describe

    for name, spec in DISTILLERS.items():
        section = reference.split(f"### `distiller={name}`", 1)[1].split("\n### ", 1)[0]
        for f in spec.fields():
            row = next((r for r in section.splitlines() if r.startswith(f"| `distiller.{f.name}`")),
                       None)
            assert row is not None, f"{name}: distiller.{f.name} missing"
            assert describe(f).help.split("(")[0].strip() in row


def test_reference_follows_a_new_key_and_a_new_distiller(monkeypatch):
    """A key or distiller added to the code shows on the page without editing it."""
    import dataclasses

    from rld.config import TrainerConfig

    @dataclasses.dataclass
    class Wider(TrainerConfig):
        new_knob: int = 3  # a knob added by a later change

    monkeypatch.setattr(rld_docs, "schema_keys", lambda: rld_docs.dataclass_keys(Wider,
                                                                                 "trainer."))
    page = rld_docs.reference_markdown()
    assert "| `trainer.new_knob` | int | `3` | a knob added by a later change |" in page

    @dataclasses.dataclass
    class Bare(TrainerConfig):
        undocumented_knob: int = 1

    monkeypatch.setattr(rld_docs, "schema_keys", lambda: rld_docs.dataclass_keys(Bare,
                                                                                 "trainer."))
    assert "trainer.undocumented_knob" in rld_docs.undocumented()


def test_cli_writes_the_page_and_checks(tmp_path):
    out = tmp_path / "configuration.md"
    assert rld_docs.main(["--out", str(out)]) == 0
    assert out.read_text().startswith("# Configuration reference")
    assert rld_docs.main(["--check"]) == 0


def test_yaml_docs_reads_trailing_and_leading_comments(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("# head\nblock:\n  a: 1  # trailing\n  # above b\n  b: 2\n  c: 3\n"
                 "  d:  # a mapping\n    e: x  # nested\nz: 0\n")
    assert rld_docs.yaml_docs(f, "block") == {"a": "trailing", "b": "above b", "c": "",
                                              "d": "a mapping", "d.e": "nested"}
    assert rld_docs.yaml_docs(f)["z"] == ""
    assert rld_docs.yaml_values(f, "block") == {"a": 1, "b": 2, "c": 3, "d": {"e": "x"},
                                                "d.e": "x"}


# ------------------------------------------------------------------ the examples
def test_every_page_of_the_nav_exists_and_every_docs_page_is_in_the_nav():
    nav = re.findall(r":\s*([\w/-]+\.md)\s*$", (REPO / "mkdocs.yml").read_text(), re.M)
    pages = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}
    generated = {"reference/configuration.md"}
    assert set(nav) - generated == pages


def test_markers_are_well_formed_and_examples_are_found():
    found = examples()
    assert len(found) > 20
    assert any(b.needs for b in found) and any(not b.needs for b in found)
    for path in DOCS:  # every marker sits right before a fence
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.lstrip().startswith("<!-- docs:"):
                nxt = next((x for x in lines[i + 1:] if x.strip()), "")
                assert nxt.lstrip().startswith("```"), f"{path}:{i + 1}: marker without a block"


def _checks():
    """(where, env, module, args) of every rld command of every bash example, and the
    other commands (where, words)."""
    rld_cmds, others = [], []
    for b in examples():
        if b.language not in ("bash", "sh", "shell"):
            continue
        for words in commands(b.code):
            env, rest = split_env(words)
            found = rld_module(rest)
            if found:
                rld_cmds.append((b.where, env, *found))
            elif rest:
                others.append((b.where, rest))
    return rld_cmds, others


def test_every_train_command_of_the_docs_composes():
    """Each `python -m rld.train ...` (and each `rld.teachers` command's overrides) of every
    example, marked or not, composes: a misspelt key, group or option fails here."""
    from rld.teachers.__main__ import build_parser as teachers_parser
    from rld.teachers.__main__ import with_dataset

    rld_cmds, _ = _checks()
    cases, where = [], []
    for place, env, module, args in rld_cmds:
        if module == "rld.train":
            cases.append((env, args))
        elif module == "rld.teachers":
            parsed, rest = teachers_parser().parse_known_args(args)
            cases.append((env, with_dataset(parsed.dataset, rest)))
        else:
            continue
        where.append(f"{place}: {module} {' '.join(args)}")
    assert len(cases) > 30
    # the checker itself: a misspelt key and a missing launcher must fail
    sentinels = [({}, ["-m", "trainer.epoch=2"]), ({}, ["hydra/launcher=slurmm"])]
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "docs_examples.py")],
                          input=json.dumps(cases + sentinels), capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert "trainer.epoch" in results[-2] and "slurmm" in results[-1]
    errors = [f"{w}\n    {e}" for w, e in zip(where, results[:len(cases)]) if e]
    assert not errors, "\n".join(errors)


def test_every_other_rld_command_parses():
    from rld.analyze import build_parser as analyze_parser
    from rld.bench import SUBCOMMANDS
    from rld.teachers.__main__ import build_parser as teachers_parser

    rld_cmds, _ = _checks()
    seen = set()
    for place, _env, module, args in rld_cmds:
        seen.add(module)
        if module == "rld.analyze":
            analyze_parser().parse_args(args)
        elif module == "rld.teachers":
            teachers_parser().parse_known_args(args)
        elif module == "rld.bench":
            assert args and args[0] in SUBCOMMANDS, f"{place}: rld.bench {args}"
        elif module == "rld.table":
            flags = {a.split("=")[0] for a in args if a.startswith("-")}
            assert flags <= {"--out", "--metric"}, f"{place}: {args}"
        else:
            import importlib.util

            assert importlib.util.find_spec(module) is not None, f"{place}: no module {module}"
    assert {"rld.train", "rld.teachers", "rld.table", "rld.bench", "rld.analyze"} <= seen


def test_every_make_target_script_and_extra_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())
                 ["project"]["optional-dependencies"])
    _, others = _checks()
    for place, words in others:
        program = words[0]
        if program == "make":
            named = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
            assert named, f"{place}: make without a target"
            assert set(named) <= targets, f"{place}: no make target {named}"
        elif program == "bash":
            assert (REPO / words[1]).is_file(), f"{place}: no script {words[1]}"
        elif program == "pip":
            for w in words:
                m = re.search(r"\.\[([\w,]+)\]", w)
                if m:
                    assert set(m.group(1).split(",")) <= extras, f"{place}: extra {w}"
                if w.startswith(("examples/", "./")):
                    assert (REPO / w).exists(), f"{place}: {w}"
        elif program in ("python", "python3"):
            assert words[1:2] != ["-m"] or words[2] in ("pytest", "pip"), f"{place}: {words}"
        else:
            from docs_examples import OTHER_PROGRAMS

            assert program in OTHER_PROGRAMS, (
                f"{place}: `{' '.join(words)}` is neither checked nor marked; add a check in "
                "tests/docs_examples.py or to OTHER_PROGRAMS")


def test_unmarked_python_examples_run(tmp_path):
    ran = 0
    for b in examples():
        if b.language not in ("python", "py") or b.needs or b.included:
            continue
        proc = subprocess.run([sys.executable, "-c", b.code], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{b.where}:\n{proc.stderr[-2000:]}"
        ran += 1
    assert ran >= 1


def test_blocks_reads_markers(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n\n<!-- docs: needs gpu, cluster -->\n```bash\nmake demo\n```\n\n"
                    "```python\nprint(1)\n```\n")
    found = blocks(page)
    assert [(b.language, sorted(b.needs), b.code) for b in found] == [
        ("bash", ["cluster", "gpu"], "make demo"), ("python", [], "print(1)")]
    page.write_text("<!-- docs: needs gpus -->\n```bash\nx\n```\n")
    with pytest.raises(ValueError, match="unknown needs"):
        blocks(page)
