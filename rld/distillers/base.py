"""What a distiller is, its settings, and the registry that declares each one once.

    total = ce_weight * CE(z_s, y) + min(epoch / warmup, 1) * kd_weight * L(student, teacher, y)

with 1-based epochs (warmup 0 means no warm-up).  A distiller is an `nn.Module`: the engine
trains its parameters with the student's (same optimiser), saves its state in the run's
checkpoint (not in `student.pt`) and counts them as the method's extra parameters.  The
engine only sees `terms()`, a dict of named scalar tensors whose sum is the training loss,
and what the distiller needs: a teacher (`needs_teacher`), the models' intermediate features
instead of their logits alone (`needs_features`), the batch's sample indices
(`needs_index`), the teacher in training mode (`teacher_train`).

A distiller is declared once, with `register_distiller` (exported as
`rld.register_distiller`), on either

* a loss function `loss(logits_student, logits_teacher, target, *, setting=default, ...)`:
  its keyword-only parameters are its settings (typed by their annotations, documented with
  `Setting` inside `typing.Annotated`); a logit distiller without modules, so it packs; or
* a `Distiller` subclass with modules of its own: its `Settings` dataclass (fields made with
  `setting()`), a classmethod `build(settings, **context)` and optionally a classmethod
  `pair_problem(settings, s_shapes, t_shapes, teacher)` (why a pair cannot take it).

Every distiller's settings add `warmup`, `ce_weight` and `kd_weight` (`DistillationWeights`;
none for a distiller without a teacher).  The registration also says which settings name a
grid point (`point`), its table label and whether its column shows without runs (`table`),
and config defaults that differ from the Python ones (`defaults`, e.g. the recipe's warm-up).
Its Hydra schema (`config_schema`) types `distiller.*` when `distiller=<name>` is chosen,
each setting defaulting to `pair.loss_defaults.<name>.<setting>` when the pair gives one.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Annotated, Any, NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from rld.errors import ConfigError
from rld.registry import Registry


# --------------------------------------------------------------------------- settings
class Check(NamedTuple):
    """A test of a setting's value and what it allows, for the one-line error."""

    ok: Callable[[Any], bool]
    allowed: str


POSITIVE = Check(lambda v: v > 0, "must be > 0")
NON_NEGATIVE = Check(lambda v: v >= 0, "must be >= 0")
AT_LEAST_ONE = Check(lambda v: v >= 1, "must be >= 1")
UNIT_INTERVAL = Check(lambda v: 0 <= v < 1, "must be in [0, 1)")


@dataclass(frozen=True)
class Setting:
    """A setting's documentation and the check of its values (None: any of its type)."""

    help: str
    check: Check | None = None


def setting(default: Any, help: str, check: Check | None = None) -> Any:
    """A field of a `Settings` dataclass with its documentation and check."""
    return field(default=default, metadata={"setting": Setting(help, check)})


def describe(f: dataclasses.Field) -> Setting:
    return f.metadata.get("setting") or Setting("")


@dataclass
class NoSettings:
    """A distiller without settings (vanilla)."""


@dataclass
class DistillationWeights:
    """The weights every distiller with a teacher has."""

    warmup: int = setting(0, "epochs of linear warm-up of the distillation term (0: none)",
                          NON_NEGATIVE)
    ce_weight: float = setting(1.0, "weight of the cross-entropy term", NON_NEGATIVE)
    kd_weight: float = setting(1.0, "weight of the distillation term", NON_NEGATIVE)


STANDARDIZE = Setting("logit standardisation of both logits first (Sun et al., CVPR 2024)")


# --------------------------------------------------------------------------- distillers
class Distiller(nn.Module):
    """Cross-entropy plus a distillation term with linear warm-up; subclasses define
    `distill` (the term before its weights) and may hold modules."""

    needs_teacher = True
    needs_features = False  # terms() gets the models' `Features`, not their logits
    needs_index = False  # terms() gets the batch's sample indices
    # the teacher runs in training mode while the student trains (batch-norm on batch
    # statistics, its running statistics updated and saved with the run's checkpoints)
    teacher_train = False
    # why it cannot train as one run over several processes (None: it can; rld.validate)
    single_process: str | None = None
    # it may share a pack (`rld.packing`): no modules, no random draws while training
    packable = False
    Settings: type = DistillationWeights

    def __init__(self, name: str, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 warmup: int = 0):
        super().__init__()
        self.name = name
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.warmup = warmup

    def ramp(self, epoch: int) -> float:
        """Warm-up factor min(epoch / warmup, 1) for the 1-based epoch."""
        return 1.0 if self.warmup <= 0 else min(epoch / self.warmup, 1.0)

    def distill(self, student: Any, teacher: Any, target: Tensor,
                index: Tensor | None = None) -> Tensor:
        """The distillation loss L before its weights."""
        raise NotImplementedError(f"{type(self).__name__} must define distill()")

    def terms(self, student: Any, teacher: Any, target: Tensor, epoch: int,
              index: Tensor | None = None) -> dict[str, Tensor]:
        """Named loss terms of a batch; `student`/`teacher` are logits, or `Features` when
        `needs_features` (then `.logits` holds the logits)."""
        logits = student.logits if self.needs_features else student
        out = {"ce": self.ce_weight * F.cross_entropy(logits.float(), target)}
        if self.needs_teacher:
            distill = self.distill(student, teacher, target, index)
            out[self.name] = self.ramp(epoch) * self.kd_weight * distill
        return out

    def extra_parameters(self) -> int:
        """Numbers the method adds to the student, counted as the reference releases count
        them: trainable parameters and buffers (running statistics, memories)."""
        return (sum(p.numel() for p in self.parameters())
                + sum(b.numel() for b in self.buffers()))

    @classmethod
    def build(cls, settings: Any, **context: Any) -> Distiller:
        raise NotImplementedError(f"{cls.__name__} must define build()")

    @classmethod
    def pair_problem(cls, settings: Any, s_shapes: dict, t_shapes: dict,
                     teacher: nn.Module) -> str | None:
        """Why this distiller cannot run on a pair whose models' `feature_shapes` are these
        (None: it can)."""
        return None


class LossDistiller(Distiller):
    """A logit distiller: `loss_fn(logits_student, logits_teacher, target)` (its settings
    bound), no modules."""

    def __init__(self, name: str, loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
                 **weights: Any):
        super().__init__(name, **weights)
        self.loss_fn = loss_fn

    def distill(self, student, teacher, target, index=None) -> Tensor:
        return self.loss_fn(student, teacher, target)


class Vanilla(Distiller):
    """Cross-entropy alone: a teacher (role=teacher) or the student-alone baseline."""

    needs_teacher = False
    packable = True
    Settings = NoSettings

    @classmethod
    def build(cls, settings: Any, **context: Any) -> Vanilla:
        return cls("vanilla")


# --------------------------------------------------------------------------- the registry
@dataclass(frozen=True, eq=False)
class DistillerSpec:
    """A registered distiller: everything rld needs to know of it, in one place."""

    name: str
    settings: type  # a dataclass: its settings with their Python defaults
    build: Callable[..., Distiller]  # build(settings instance, **context)
    cls: type  # its Distiller class (what it needs: teacher, features, index, ...)
    point: tuple[str, ...] = ()  # settings that name its grid point (a run directory)
    packable: bool = False  # may share a pack (no modules of its own)
    label: str = ""  # its column in the tables
    table: bool = False  # a table column even without runs
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    doc: str = ""
    origin: Any = None  # the declaring function or class

    @property
    def needs_teacher(self) -> bool:
        return bool(self.cls.needs_teacher)

    @property
    def single_process(self) -> str | None:
        return self.cls.single_process

    def fields(self) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(self.settings)

    def setting_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields())

    def config_default(self, f: dataclasses.Field) -> Any:
        """The default of setting `f` in the config: the pair's `loss_defaults.<name>.<key>`
        when it has one, else the registration's default, else the Python one."""
        value = self.defaults.get(f.name, f.default)
        return f"${{oc.select:pair.loss_defaults.{self.name}.{f.name},{_literal(value)}}}"

    def config_schema(self) -> type:
        """The Hydra schema of `distiller.*` for this distiller (ConfigStore
        `distiller_schema/<name>`): `name` and every setting, typed, with its config
        default."""
        items = [("name", str, field(default=self.name))]
        items += [(f.name, _plain_type(f.type), field(default=self.config_default(f)))
                  for f in self.fields()]
        return dataclasses.make_dataclass(f"{_camel(self.name)}DistillerConfig", items)

    def settings_of(self, node: Any) -> Any:
        """The typed settings (an instance of `settings`) of a distiller config node (a
        DictConfig, mapping or namespace with a value per setting; missing ones take the
        Python default)."""
        values = _as_dict(node)
        given = {}
        for f in self.fields():
            if f.name in values:
                given[f.name] = _convert(values[f.name], _plain_type(f.type), f.name)
        return self.settings(**given)

    def problem(self, settings: Any) -> str | None:
        """The first setting whose value its check refuses, as a one-line message."""
        for f in self.fields():
            check = describe(f).check
            value = getattr(settings, f.name)
            if check is not None and value is not None and not check.ok(value):
                return f"distiller.{f.name}={value!r} is not allowed: {check.allowed}"
        return None


DISTILLERS: Registry[DistillerSpec] = Registry("distiller", "distiller", "rld.distillers")


def setting_keys() -> tuple[str, ...]:
    """Every setting of every registered distiller, once, in the order of registration
    (the columns of `runs.csv`; the keys a record holds beside its own fields)."""
    return tuple(dict.fromkeys(k for _, spec in DISTILLERS.items()
                               for k in spec.setting_names()))


def followed_settings() -> dict[str, str]:
    """Settings whose config default follows another setting (`scd_tau: ${distiller.tau}`),
    by the setting they follow: at that value a run did not set them."""
    out = {}
    for _, spec in DISTILLERS.items():
        for key, value in spec.defaults.items():
            m = re.fullmatch(r"\$\{distiller\.(\w+)\}", str(value))
            if m:
                out[key] = m.group(1)
    return out


def _literal(value: Any) -> str:
    """`value` as the default of an `oc.select` interpolation."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not value.startswith("${"):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return repr(value) if isinstance(value, float) else str(value)


def _plain_type(t: Any) -> Any:
    """A type OmegaConf takes: without `Annotated`, `X | None` as `Optional[X]`."""
    if typing.get_origin(t) is Annotated:
        t = typing.get_args(t)[0]
    args = typing.get_args(t)
    if type(None) in args and len(args) == 2:
        return typing.Optional[next(a for a in args if a is not type(None))]  # noqa: UP045 - OmegaConf reads Optional
    return t


def _convert(value: Any, t: Any, key: str) -> Any:
    """`value` as a setting of type `t` (bool, int, float, str or Optional of one); a value
    that is not one is a ConfigError naming `distiller.<key>`."""
    args = typing.get_args(t)
    if type(None) in args:
        if value is None:
            return None
        t = next(a for a in args if a is not type(None))
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, int | float) and not isinstance(value, bool),
          str: isinstance(value, str)}.get(t, True)
    if not ok:
        name = getattr(t, "__name__", str(t))
        raise ConfigError(f"distiller.{key}={value!r} is not allowed: a {name}")
    return t(value) if t in (int, float) else value


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("-", "_").split("_"))


def _as_dict(node: Any) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, Mapping):
        return dict(node)
    return dict(vars(node))


def _loss_settings(name: str, loss: Callable) -> type:
    """A settings dataclass from a loss function's keyword-only parameters."""
    hints = typing.get_type_hints(loss, include_extras=True)
    items = []
    for p in inspect.signature(loss).parameters.values():
        if p.kind != p.KEYWORD_ONLY:
            continue
        if p.default is p.empty:
            raise ValueError(f"distiller {name!r}: setting {p.name!r} needs a default")
        hint = hints.get(p.name, type(p.default))
        meta = next((m for m in typing.get_args(hint)[1:] if isinstance(m, Setting)),
                    Setting("")) if typing.get_origin(hint) is Annotated else Setting("")
        items.append((p.name, hint, field(default=p.default, metadata={"setting": meta})))
    return dataclasses.make_dataclass(f"{_camel(name)}Settings", items,
                                      bases=(DistillationWeights,))


def _weights(settings: Any) -> dict[str, Any]:
    return {"ce_weight": float(settings.ce_weight), "kd_weight": float(settings.kd_weight),
            "warmup": int(settings.warmup)}


def register_distiller(name: str, *, label: str | None = None, point: tuple[str, ...] = (),
                       table: bool = False, defaults: Mapping[str, Any] | None = None):
    """Declare distiller `name` (`distiller=<name>`) on a loss function or a `Distiller`
    subclass (see the module's docstring); returns it unchanged.

    label: its table column (default: the name); point: the settings that name its grid
    point; table: a column even without runs; defaults: config defaults that differ from the
    Python ones (`{"warmup": 20}`, or an interpolation such as `"${distiller.tau}"`)."""
    def decorate(obj: Any) -> Any:
        if isinstance(obj, type) and issubclass(obj, Distiller):
            spec = DistillerSpec(name, obj.Settings, obj.build, obj, packable=obj.packable,
                                 doc=inspect.getdoc(obj) or "", origin=obj, **common)
        elif callable(obj):
            settings = _loss_settings(name, obj)
            own = [f.name for f in dataclasses.fields(settings)
                   if f.name not in {g.name for g in dataclasses.fields(DistillationWeights)}]

            def build(s: Any, **context: Any) -> Distiller:
                bound = partial(obj, **{k: getattr(s, k) for k in own})
                return LossDistiller(name, bound, **_weights(s))

            spec = DistillerSpec(name, settings, build, LossDistiller, packable=True,
                                 doc=inspect.getdoc(obj) or "", origin=obj, **common)
        else:
            raise TypeError(f"register_distiller({name!r}): a loss function or a Distiller "
                            f"subclass, not {type(obj).__name__}")
        unknown = [k for k in (*point, *(defaults or {})) if k not in spec.setting_names()]
        if unknown:
            raise ValueError(f"register_distiller({name!r}): {', '.join(unknown)} "
                             f"not among its settings {', '.join(spec.setting_names())}")
        DISTILLERS.add(name, spec)
        return obj

    common = dict(point=tuple(point), label=label or name, table=table,
                  defaults=MappingProxyType(dict(defaults or {})))
    return decorate


def pair_problem(spec: DistillerSpec, settings: Any, student: nn.Module,
                 teacher: nn.Module, image_size: int) -> tuple[str | None, dict]:
    """Why distiller `spec` cannot run on this pair (None: it can), and the models'
    `feature_shapes` (`s_shapes`, `t_shapes`: empty for a distiller on logits alone)."""
    if not spec.cls.needs_features:
        return None, {}
    from rld.models.features import feature_shapes

    for role, model in (("student", student), ("teacher", teacher)):
        if not callable(getattr(model, "forward_features", None)):
            return (f"the {role} ({type(model).__name__}) has no feature interface "
                    "(forward_features); choose a model of the zoo or a logit distiller"), {}
    shapes = {"s_shapes": feature_shapes(student, image_size),
              "t_shapes": feature_shapes(teacher, image_size)}
    return spec.cls.pair_problem(settings, **shapes, teacher=teacher), shapes


def check_pair(cfg: Any) -> None:
    """ConfigError (one line naming the pair and the distiller) when the distiller of a
    composed run config cannot run on its pair; builds both models on the meta device (no
    memory, no arithmetic), only for distillers on features."""
    spec = DISTILLERS.get(str(cfg.distiller.name))
    if not spec.cls.needs_features or cfg.role != "student":
        return
    import torch

    from rld.models import build_model

    ds = cfg.dataset
    with torch.device("meta"):
        student, teacher = (build_model(cfg.pair[r], ds.num_classes, ds.family)
                            for r in ("student", "teacher"))
    problem, _ = pair_problem(spec, spec.settings_of(cfg.distiller), student, teacher,
                              int(ds.image_size))
    if problem is not None:
        raise ConfigError(f"pair={cfg.pair.name} distiller={spec.name}: {problem}")


def build_distiller(cfg: Any, **context: Any) -> Distiller:
    """The distiller of a distiller config (`distiller.*`: its name and settings).

    `context` carries what distillers with modules need to size them: the student and
    teacher modules, the input size (`image_size`), the number of training samples
    (`num_train`) and, for CRD, their labels (`train_labels`); logit distillers ignore it.
    Distillers on features get the models' `s_shapes` and `t_shapes` besides."""
    spec = DISTILLERS.get(str(_as_dict(cfg)["name"]))
    settings = spec.settings_of(cfg)
    problem = spec.problem(settings)
    if problem is None and spec.cls.needs_features:
        student, teacher = context["student"], context["teacher"]
        problem, shapes = pair_problem(spec, settings, student, teacher,
                                       int(context["image_size"]))
        if problem is not None:
            problem = (f"distiller={spec.name} with {type(teacher).__name__} -> "
                       f"{type(student).__name__}: {problem}")
        context = {**context, **shapes}
    if problem is not None:
        raise ConfigError(problem)
    return spec.build(settings, **context)
