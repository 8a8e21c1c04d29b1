"""Structured configs: every key of `conf/train.yaml` is typed and documented here, except
the chosen distiller's settings, which its registration types (`rld.distillers`).

The YAML files under `conf/` pick values; these dataclasses, registered in Hydra's
ConfigStore, fix which keys exist and their types, so a misspelt or ill-typed override
fails at composition time.  Value checks that types cannot express (tau > 0, ...) live in
`rld.validate` and in each distiller's settings.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

CIFAR_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR_STD = (0.2675, 0.2565, 0.2761)


@dataclass
class DatasetConfig:
    """A data set and its training recipe (supplement C.1/C.2)."""

    name: str = "cifar100"  # a registered data set: cifar100 | imagenet | synthetic | digits | ...
    family: str = "cifar"  # model family: cifar (32x32 inputs) | imagenet (224x224)
    root: str = "${paths.data}/cifar100"  # where the files are (cifar100, imagenet)
    download: bool = False  # cifar100: download into `root` when missing
    num_classes: int = 100  # classes of the data set (checked against the loaded data)
    image_size: int = 32  # side of the (square) input images, in pixels
    mean: list[float] = field(default_factory=lambda: list(CIFAR_MEAN))  # per-channel mean
    std: list[float] = field(default_factory=lambda: list(CIFAR_STD))  # per-channel std (> 0)
    workers: int = 8  # DataLoader workers (imagenet only; CIFAR-sized sets live on the device)
    # imagenet input path: auto (device on CUDA, pil on the CPU) | pil (DataLoader workers
    # decode and augment) | device (workers read bytes; decode (nvjpeg) + crop on the device)
    decoder: str = "auto"
    # synthetic only: sizes and the seed of the generated images
    train_size: int = 5000  # synthetic: training images
    test_size: int = 1000  # synthetic: test images
    data_seed: int = 0  # synthetic: seed of the generated images and classes
    # recipe: defaults of trainer/optim keys
    epochs: int = 240  # recipe: training epochs (trainer.epochs follows it)
    batch_size: int = 64  # recipe: global batch size (trainer.batch_size follows it)
    lr: float = 0.05  # recipe: initial learning rate (the pair files set pair.lr by role)
    weight_decay: float = 5e-4  # recipe: SGD weight decay (optim.weight_decay follows it)
    # recipe: epochs after which the learning rate is multiplied by optim.gamma
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    # file name of a teacher checkpoint inside `<paths.teachers>/<name>/<arch>_vanilla/`
    teacher_file: str = "ckpt_epoch_240.pth"
    # where `python -m rld.teachers fetch` gets this set's published teachers: the URL of an
    # archive of `[<folder>/]<arch>_vanilla/<teacher_file>` (cifar100: mdistiller's
    # cifar_teachers.tar), `torchvision` (each teacher from torchvision's weight file) or ""
    # (none published: `fetch --from URL|PATH`, or `rld.teachers train`)
    teacher_source: str = ""
    # the paper's beta x tau search grid for this data set (sweep/ and hparams/ presets)
    grid_beta: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0, 16.0])
    grid_tau: list[float] = field(default_factory=lambda: [2.0, 3.0, 4.0, 5.0])  # its taus


@dataclass
class PairConfig:
    """A teacher -> student pair and its per-pair defaults from the official releases."""

    name: str = "resnet32x4_resnet8x4"  # the pair's name (<teacher>_<student>, lower case)
    teacher: str = "resnet32x4"  # the teacher's architecture (a registered model)
    student: str = "resnet8x4"  # the student's architecture (a registered model)
    # initial learning rate by role: the recipe uses 0.01 for ShuffleNet/MobileNet students
    lr: dict[str, float] = field(default_factory=lambda: {"student": 0.05, "teacher": 0.05})
    # per-distiller setting defaults for this pair, e.g. {dkd: {beta: 2.0}} (every setting of
    # a registered distiller defaults to `loss_defaults.<distiller>.<setting>` when given)
    loss_defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherConfig:
    # the published layout under one folder per data set (`rld.teachers` fetches and trains
    # teachers exactly there; `teachers/<dataset>/MANIFEST.json` records fetched files)
    checkpoint: str = (
        "${paths.teachers}/${dataset.name}/${pair.teacher}_vanilla/${dataset.teacher_file}"
    )
    # distil from a teacher whose verification failed (`python -m rld.teachers verify`:
    # top-1 off its expected accuracy); an unverified teacher only logs a warning
    allow_unverified: bool = False


@dataclass
class TrainerConfig:
    epochs: int = "${dataset.epochs}"  # type: ignore[assignment]  # epochs of the run
    # global batch size (split over the ranks of a data-parallel run)
    batch_size: int = "${dataset.batch_size}"  # type: ignore[assignment]
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on capable CUDA, else fp32) | bf16 | fp16 | fp32
    channels_last: bool = True  # on CUDA only
    compile: bool = False  # torch.compile student, teacher and distillation loss
    # with compile: default | reduce-overhead (CUDA graphs) | max-autotune (CUDA graphs)
    # | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    drop_last: bool = False  # drop the last partial training batch
    progress: str = "auto"  # auto (bar on a terminal, else a line per epoch) | bar | line | none
    resume: bool = True  # continue from checkpoints/last.pt of the run directory
    deterministic: bool = True  # deterministic algorithms where the device offers them
    log_every_s: float = 0.5  # progress bar refresh interval
    tensorboard: bool = True  # TensorBoard event files in the run directory (tb/)
    # data-parallel runs (torchrun, or Slurm with several tasks): batch-norm statistics over
    # the global batch (SyncBatchNorm) instead of per rank (the reference releases' way)
    sync_bn: bool = False
    # data-parallel runs: seconds a collective waits for the other ranks before the job
    # ends (a dead or hung rank stops the job instead of stalling it)
    dist_timeout_s: float = 600.0


@dataclass
class OptimConfig:
    lr: float = "${pair.lr.${role}}"  # type: ignore[assignment]  # initial learning rate (SGD)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = "${dataset.weight_decay}"  # type: ignore[assignment]  # SGD decay
    # epochs after which the learning rate is multiplied by gamma (MultiStepLR)
    milestones: list[int] = "${dataset.milestones}"  # type: ignore[assignment]
    gamma: float = 0.1  # learning-rate factor at each milestone


@dataclass
class PathsConfig:
    root: str = "."  # the folder the other paths default to be under
    data: str = "${paths.root}/data"  # data sets (data/cifar100, ...)
    teachers: str = "${paths.root}/teachers"  # every data set's teachers, one folder each
    sweeps: str = "${paths.root}/sweeps"  # run directories: <sweeps>/<tag>/...


@dataclass
class TrainConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    pair: PairConfig = field(default_factory=PairConfig)
    # the chosen distiller's settings: typed by its registered schema
    # (`rld.distillers.DistillerSpec.config_schema`, ConfigStore `distiller_schema/<name>`)
    distiller: Any = None
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    role: str = "student"  # student: distil (or train alone with vanilla) | teacher
    seed: int = 0  # seed of the run: initialisation, data order, augmentation
    tag: str = "main"  # top folder of the run directories under paths.sweeps
    objective: str = "top1_best"  # metric returned to sweepers: top1_best | top1 | top5
    # settings of the Optuna presets (conf/hparams/): storage, study name, budget, ...
    hparams: dict[str, Any] = field(default_factory=dict)
    # modules of the user's own packages that register models, data sets or distillers
    # (`rld.register_*`), imported before the config is validated: plugins=[myext]
    plugins: list[str] = field(default_factory=list)


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore: `train_schema` (used by
    conf/train.yaml), `pruning_schema` (hparams.pruning of conf/hparams/base/study.yaml),
    `distiller_schema/<name>` of every registered distiller and
    `dataset_schema/<name>` of every data set with keys of its own (conf/train.yaml picks
    the chosen one's); and the resolvers.  Called again after plugins are loaded."""
    from rld.data import DATASETS
    from rld.distillers import DISTILLERS
    from rld.pruning import PruningSettings

    _store(None, "train_schema", TrainConfig, lambda: TrainConfig)
    _store(None, "pruning_schema", PruningSettings, lambda: PruningSettings)
    for name, spec in DISTILLERS.items():
        _store("distiller_schema", name, spec, spec.config_schema)
    for name, spec in DATASETS.items():
        if spec.settings is not None:
            _store("dataset_schema", name, spec.settings, lambda s=spec: s.settings)
    register_resolvers()


# what this process put in Hydra's ConfigStore: {(group, name): the entry it came from}
_stored: dict[tuple[str | None, str], Any] = {}


def _store(group: str | None, name: str, source: Any, node: Callable[[], Any]) -> None:
    """Store `node()` as `group/name` in Hydra's ConfigStore once per process:
    `register_configs` runs again after the plugins are loaded, and a name stored again
    warns on Hydra 1.4 (a warning per schema on the stderr of every sweeper and run) and is
    refused by Hydra 1.5.  A name there already from another entry `source` (registered
    anew, or a store handed over by a launcher) is replaced, as Hydra 1.3 does silently."""
    store = ConfigStore.instance()
    there = store.repo
    for part in group.split("/") if group else ():
        there = there.get(part, {})
    present = f"{name}.yaml" in there
    if present and _stored.get((group, name)) is source:
        return
    replace = present and "replace" in inspect.signature(store.store).parameters
    store.store(group=group, name=name, node=node(), **({"replace": True} if replace else {}))
    _stored[(group, name)] = source


# Two key lists (an entry ending in "." or "/" is a prefix, any other entry an exact key):
# SWEEP_DEFINITION: keys that define a sweep's points (an Optuna grid's axes), not one run.
SWEEP_DEFINITION = ("dataset.grid_beta", "dataset.grid_tau")
# NOT_IN_FINGERPRINT: keys that say where or how a run executes, or which sweep it belongs
# to, not what it computes.  They are left out of the run's fingerprint
# (rld.reproduce.fingerprint), so changing them never refuses a resume or a recall, and out of
# its directory name.  The teacher is identified by the content of its checkpoint instead of
# by `teacher.checkpoint`.
NOT_IN_FINGERPRINT = ("paths.", "hydra.", "hydra/", "hparams", "hparams.", "teacher.", "tag",
                      "plugins", "plugins.", *SWEEP_DEFINITION,
                      "objective", "sweep", "trainer.device", "trainer.progress",
                      "trainer.resume", "trainer.log_every_s", "trainer.compile",
                      "trainer.compile_mode", "trainer.channels_last", "trainer.tensorboard",
                      "trainer.dist_timeout_s",
                      "dataset.root", "dataset.download", "dataset.workers", "dataset.decoder",
                      "dataset.teacher_source")
# SHOWN_BY_PATH: keys a run directory shows as folders (<dataset>/<pair>/<distiller>/...
# seed=N); with NOT_IN_FINGERPRINT and the distiller's point keys (shown resolved), they are
# left out of the extra overrides listed in its name.
SHOWN_BY_PATH = ("dataset", "pair", "distiller", "role", "seed")


def distiller_spec(cfg):
    """The registered distiller (`rld.distillers.DistillerSpec`) of a composed config."""
    from rld.distillers import DISTILLERS

    return DISTILLERS.get(str(cfg.distiller.name))


def distills(cfg) -> bool:
    """Whether the run of a composed config distils from a teacher (role=teacher runs are
    vanilla: `rld.validate`)."""
    return distiller_spec(cfg).needs_teacher


def trained_arch(cfg) -> str:
    """The architecture a run trains: the pair's teacher for role=teacher, else its student."""
    return str(cfg.pair.teacher if cfg.role == "teacher" else cfg.pair.student)


def key_in(key: str, entries: tuple[str, ...]) -> bool:
    """Whether `key` is one of `entries` or starts with one of its prefixes."""
    return any(key == e or (e[-1] in "./" and key.startswith(e)) for e in entries)


def point_value(value) -> str:
    """A setting's value in a run directory's name (`8`, `0.5`, `true`, `150_180`)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return f"{float(value):g}"
    return _shell_safe(str(value))


# A point directory's name: `key=value` items joined by NAME_SEPARATOR.  Names hold letters,
# digits and `._-=+` only (no `,`, brackets, quotes or spaces), so that a shell takes them
# without quoting; a list value's items are joined by `_` (`optim.milestones=150_180_210`).
NAME_SEPARATOR = "+"


def _shell_safe(text: str) -> str:
    text = re.sub(r"[\[\]'\"]", "", text).replace(",", "_")
    return re.sub(r"[^A-Za-z0-9._=-]", "_", text)


def run_name(role: str, distiller, overrides) -> str:
    """`<distiller>/<point>` of a run directory, e.g. `rld/beta=2+tau=3`.

    The point names the distiller's point keys (`DistillerSpec.point`, as resolved from the
    `distiller` node, so defaults show too) followed by every other command-line override
    that changes the result (`trainer.epochs=2`, `alpha=0.5`, ...), sorted; keys of
    NOT_IN_FINGERPRINT (placement, sweep definition) never enter it.
    """
    name = str(distiller["name"])
    if role == "teacher":
        head, keys = "teacher", ()
    else:
        from rld.distillers import DISTILLERS

        head = name
        keys = DISTILLERS.get(name).point if name in DISTILLERS else ()
    point = [f"{k}={point_value(distiller[k])}" for k in keys]
    hidden = SHOWN_BY_PATH + NOT_IN_FINGERPRINT + tuple(f"distiller.{k}" for k in keys)
    extras = []
    for item in overrides or ():
        key, _, value = str(item).lstrip("+~").partition("=")
        if key_in(key, hidden):
            continue
        extras.append(_shell_safe(f"{key.removeprefix('distiller.')}={value}"))
    return f"{head}/{NAME_SEPARATOR.join(point + sorted(extras)) or 'default'}"


def renamed_point(legacy: str) -> str | None:
    """The current name of a point directory named by the scheme of versions before names
    became shell-friendly (`beta=2,tau=4,dataset.grid_beta=[2,8]` → `beta=2+tau=4`); None
    for a name of the current scheme."""
    if not re.search(r"[,\[\]]", legacy):
        return None
    items = re.findall(r"([^,=]+)=(\[[^\]]*\]|[^,]*)", legacy)
    kept = [_shell_safe(f"{k}={v}") for k, v in items if not key_in(k, SWEEP_DEFINITION)]
    return NAME_SEPARATOR.join(kept) or "default"


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("rld_run_name"):
        OmegaConf.register_new_resolver("rld_run_name", run_name)
