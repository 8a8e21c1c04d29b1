"""The code examples of README.md and docs/*.md: extraction, markers, and the checks.

The convention (docs/development.md documents it for writers):

* A fenced block in `bash`, `sh` or `python` is an example; `text` (or no language) is
  output or a layout, never checked.
* An HTML comment on the line before the fence marks what an example needs beyond a CPU:
  `<!-- docs: needs gpu -->`, `needs cluster` (Slurm, several machines), `needs data`
  (CIFAR-100, ImageNet or published teachers on disk), `needs network`, `needs postgres`,
  or several (`<!-- docs: needs gpu, cluster -->`). Marked examples are not run.
* Whether marked or not, every command of a bash example is checked statically:
  `python -m rld.train ...` (also after `torchrun ...`) is composed by Hydra with its
  overrides (sweeps reduced to their first value), so a misspelt key, group or option
  fails; `python -m rld.<tool> ...` must name a module, and the tools with a parser
  (`rld.teachers`, `rld.analyze`, `rld.table`, `rld.bench`) must accept the arguments;
  `make <target>` must be a Makefile target; `bash <script>` must exist;
  `pip install -e ".[extra]"` must name an extra of pyproject.toml.
* An unmarked python example is executed (in a subprocess, from the repository root),
  except one that includes a file of the repository (`--8<-- "path"`): that file's own
  tests run it (the example package: tests/test_example.py).

Run as a script, it composes the `rld.train` commands it reads (JSON on stdin) and prints
a JSON list of `[command, error or null]`.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LANGUAGES = {"bash", "sh", "shell", "python", "py"}
NEEDS = {"gpu", "cluster", "data", "network", "postgres"}
MARKER = re.compile(r"<!--\s*docs:\s*needs\s+([a-z, ]+?)\s*-->")
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
# programs an example may run that the test does not check further
OTHER_PROGRAMS = {"tensorboard", "cd", "git", "export", "CUDA_VISIBLE_DEVICES", "optuna"}


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    needs: frozenset[str]

    @property
    def included(self) -> bool:
        """A block that includes a file of the repository (`--8<-- "path"`, pymdownx
        snippets): the file's own tests cover it."""
        return "--8<--" in self.code

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file with their language and markers."""
    out, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, language = m.group(1), m.group(2), m.group(3).lower()
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(prev)
        needs = frozenset(n.strip() for n in marker.group(1).split(",")) if marker else frozenset()
        unknown = needs - NEEDS
        if unknown:
            raise ValueError(f"{path}:{start + 1}: unknown needs {sorted(unknown)}")
        out.append(Block(path, start + 1, language, "\n".join(body), needs))
    return out


def examples() -> list[Block]:
    """Every example block of the README and the docs."""
    return [b for p in DOCS for b in blocks(p) if b.language in LANGUAGES]


def commands(code: str) -> list[list[str]]:
    """The commands of a bash example: continuation lines joined, comments dropped, each
    split into words (`VAR=value` prefixes kept)."""
    text = re.sub(r"\\\n", " ", code)
    out = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, _, value = words[0].partition("=")
        env[key] = value
        words = words[1:]
    return env, words


def rld_module(words: list[str]) -> tuple[str, list[str]] | None:
    """(`rld.X`, its arguments) for `python -m rld.X ...` or `torchrun ... -m rld.X ...`."""
    if words and words[0] in ("python", "python3", "torchrun") and "-m" in words:
        i = words.index("-m")
        if i + 1 < len(words) and words[i + 1].startswith("rld"):
            return words[i + 1], words[i + 2:]
    return None


def train_overrides(args: list[str]) -> list[str]:
    """The overrides of an `rld.train` command line, flags (`-m`, `--cfg job`) dropped and
    each sweep reduced to its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in args if a not in ("-m", "--multirun")]
    if "--cfg" in args:
        i = args.index("--cfg")
        del args[i:i + 2]
    parser = OverridesParser.create()
    out = []
    for o in parser.parse_overrides(args):
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()))
            out.append(f"{o.get_key_element()}={first}")
        else:
            out.append(o.input_line)
    return out


def compose_all(cases: list[tuple[dict, list[str]]]) -> list[str | None]:
    """Compose `rld.train`'s config for each (env, arguments); the error of each, or None."""
    from hydra import compose, initialize_config_dir

    from rld.config import register_configs
    from rld.registry import load_plugins, plugins_from_argv

    register_configs()
    results: list[str | None] = []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for env, args in cases:
            try:
                for entry in env.get("PYTHONPATH", "").split(":"):
                    if entry and str(REPO / entry) not in sys.path:
                        sys.path.insert(0, str(REPO / entry))
                overrides = train_overrides(args)
                plugins = plugins_from_argv(overrides)
                if plugins:
                    load_plugins(plugins)
                    register_configs()
                compose("train", overrides=overrides, return_hydra_config=True)
                results.append(None)
            except Exception as e:  # noqa: BLE001 - reported per command
                results.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return results


if __name__ == "__main__":
    cases = json.load(sys.stdin)
    print(json.dumps(compose_all([(env, args) for env, args in cases])))
