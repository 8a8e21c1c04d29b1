"""Registries and plugins: the models, data sets and distillers rld knows, by name.

Each concept has one registry (`rld.models.MODELS`, `rld.data.DATASETS`,
`rld.distillers.DISTILLERS`), filled by the package's own modules and by plugins through the
public decorators `rld.register_model`, `rld.register_dataset` and `rld.register_distiller`.
A plugin is a Python module of the user's own package, imported

* when named in the config's top-level `plugins` list (`plugins=[myext]` on the command
  line: imported before Hydra composes the config, so its config schemas exist; and again,
  idempotently, wherever a config is validated: workers of a launcher, Slurm jobs);
* automatically, when an installed distribution declares it in the entry-point group
  `rld.plugins` (`[project.entry-points."rld.plugins"] myext = "myext"`; an entry point may
  also name a callable, which is called once).

A name looked up and not found is a `ConfigError` naming the key and the registered names.
This module imports nothing heavy: the registries load their built-in entries (and the
entry points) on first use.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

from rld.errors import ConfigError

log = logging.getLogger("rld")

ENTRY_POINT_GROUP = "rld.plugins"
E = TypeVar("E")

_loaded_plugins: set[str] = set()
_entry_points_loaded = False


def closest(name: str, names: Iterable[str], n: int = 3) -> list[str]:
    """The registered or allowed `names` closest to a misspelt `name`."""
    return difflib.get_close_matches(str(name), list(names), n=n, cutoff=0.6)


def unknown_name(key: str, name: Any, names: Iterable[str], what: str = "") -> ConfigError:
    """The one-line error for a name that is not among `names`: the closest ones first."""
    names = sorted(names)
    near = closest(str(name), names)
    hint = f" (did you mean {', '.join(near)}?)" if near else ""
    return ConfigError(f"{key}={name!r} is not {what or 'registered'}{hint}; "
                       f"use one of {', '.join(names)}")


class Registry(Generic[E]):
    """Entries by name.  `builtins`: the modules whose import registers the package's own
    entries (imported, with the plugins' entry points, before the first lookup); `error`:
    the exception type of an unknown name."""

    def __init__(self, kind: str, key: str, builtins: str | tuple[str, ...],
                 error: type[ValueError] = ConfigError):
        self.kind, self.key, self.error = kind, key, error
        self.builtins = (builtins,) if isinstance(builtins, str) else tuple(builtins)
        self._entries: dict[str, E] = {}
        self._ready = False

    def add(self, name: str, entry: E) -> E:
        """Register `entry` as `name`; a second, different entry of one name is refused."""
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", str(name)):
            raise ValueError(f"{self.kind} name {name!r}: use letters, digits, _ and -")
        old = self._entries.get(name)
        if old is not None and _origin(old) != _origin(entry):  # the same code again: fine
            raise ValueError(f"a {self.kind} named {name!r} is registered already "
                             f"({_origin(old)}); choose another name")
        self._entries[name] = entry
        return entry

    def _load(self) -> None:
        if not self._ready:
            self._ready = True
            for module in self.builtins:
                importlib.import_module(module)
            load_entry_points()

    def get(self, name: str) -> E:
        self._load()
        if name not in self._entries:
            error = unknown_name(self.key, name, self._entries, f"a registered {self.kind}")
            raise self.error(str(error))
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self)

    def items(self) -> list[tuple[str, E]]:
        self._load()
        return list(self._entries.items())


def _origin(entry: Any) -> str:
    """Where an entry's code is defined (its `origin` attribute, else its own)."""
    fn = getattr(entry, "origin", entry)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


def load_plugins(modules: Iterable[str] | None) -> None:
    """Import the plugin modules named (once each); a module that does not import is a
    ConfigError naming it."""
    for name in modules or ():
        name = str(name)
        if name in _loaded_plugins:
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                raise ConfigError(f"plugins: module {name!r} not found; install its package "
                                  "or put it on PYTHONPATH") from None
            raise
        _loaded_plugins.add(name)
        log.debug("plugin %s loaded", name)


def load_entry_points() -> None:
    """Import (or call) every entry point of the group `rld.plugins`, once per process."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if callable(obj) and not isinstance(obj, type(importlib)):
            obj()
        _loaded_plugins.add(ep.value.split(":")[0])


def plugins_from_argv(argv: Iterable[str]) -> list[str]:
    """The modules of a `plugins=[a,b]` (or `+plugins=...`, `plugins=a`) command-line
    override, read before Hydra parses the command line."""
    out: list[str] = []
    for arg in argv:
        key, sep, value = str(arg).lstrip("+").partition("=")
        if sep and key == "plugins":
            out += [v.strip(" '\"") for v in value.strip("[]").split(",") if v.strip(" '\"")]
    return out
