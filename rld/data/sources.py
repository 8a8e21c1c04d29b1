"""The CIFAR-sized data sets, loaded whole into uint8 CPU tensors.

* ``cifar100``: the python archive of CIFAR-100 (``cifar-100-python/{train,test,meta}``
  pickles) under ``cfg.root``, read directly (same layout and keys as torchvision's
  ``CIFAR100``; no md5 check of the extracted files, only of a download).
* ``synthetic``: generated in memory from ``cfg.data_seed``: every class is a fixed random
  low-frequency colour pattern, seen in 16 variants (shift, contrast, colour cast); every image
  is a random variant of its class plus two random pixel-noise fields (drawn from fixed banks,
  so that 50,000 images take well under a second).  Learnable within an epoch or two by a
  small CNN, but not by a linear read-out of the pixels alone to 100 %.
* ``digits``: scikit-learn's 8x8 hand-written digits (1797 images shipped with the package),
  upscaled bilinearly to ``cfg.image_size``, grey replicated to 3 channels, split 80/20
  stratified with a fixed seed (`digits_split`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rld.data.augment import mix_seed
from rld.errors import DataError
from rld.registry import Registry

CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_FILES = ("train", "test", "meta")


@dataclass
class DataSet:
    """A CIFAR-sized data set held in memory: uint8 ``[N, 3, H, W]`` images, int64 labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...] = ()  # set by `load_dataset` from the config
    std: tuple[float, ...] = ()

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])


# --------------------------------------------------------------------------- the registry
@dataclass(frozen=True, eq=False)
class DatasetSpec:
    """A registered data set: in memory (`load(cfg) -> DataSet`, batches served on the
    device by `DeviceLoader`) or with loaders of its own (`loaders(cfg, batch_size,
    test_batch_size, **shard) -> (train, test, class names)`, as `rld.data.build_loaders`
    documents); `settings`: a `rld.config.DatasetConfig` subclass adding its own keys
    (None: the common schema)."""

    name: str
    load: Callable[[Any], DataSet] | None = None
    loaders: Callable[..., tuple[Any, Any, list[str]]] | None = None
    settings: type | None = None

    @property
    def origin(self) -> Any:
        return self.load or self.loaders


DATASETS: Registry[DatasetSpec] = Registry(
    "data set", "dataset", ("rld.data.sources", "rld.data.imagenet"), error=DataError)


def register_dataset(name: str, *, loaders: bool = False, settings: type | None = None):
    """Declare data set `name` (`dataset=<name>`; exported as `rld.register_dataset`) on a
    function: `load(cfg) -> DataSet` (uint8 images held in memory, the CIFAR-sized path), or
    with `loaders=True` a function that builds its own train/test loaders.  `settings`: its
    config schema, a subclass of `rld.config.DatasetConfig` (for keys of its own)."""
    def decorate(fn: Callable) -> Callable:
        DATASETS.add(name, DatasetSpec(name, None if loaders else fn, fn if loaders else None,
                                       settings))
        return fn
    return decorate


def load_dataset(cfg: Any) -> DataSet:
    """Load the in-memory data set that `cfg` (a DatasetConfig or DictConfig) names."""
    name = str(cfg.name)
    spec = DATASETS.get(name)
    if spec.load is None:
        raise DataError(f"{name} is not held in memory; use rld.data.build_loaders for it")
    mean = tuple(float(v) for v in cfg.mean)
    std = tuple(float(v) for v in cfg.std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DataError(f"dataset.mean/std must be 3 numbers (std > 0), got {mean} / {std}")
    ds = spec.load(cfg)
    ds.mean, ds.std = mean, std
    want = int(cfg.num_classes)
    if want != ds.num_classes:
        raise DataError(f"dataset.num_classes={want} but {name} has {ds.num_classes} classes")
    return ds


# ----------------------------------------------------------------------------- CIFAR-100


def _str_keys(d: dict) -> dict:
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _as_str(v: Any) -> str:
    return v.decode("latin1") if isinstance(v, bytes) else str(v)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except Exception as e:  # truncated or not a pickle
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR pickle (a dict), got {type(obj).__name__}")
    return _str_keys(obj)


def _cifar_split(path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    entry = _read_pickle(path)
    for key in ("data", "fine_labels"):
        if key not in entry:
            raise DataError(f"{path} lacks the key {key!r} of the CIFAR-100 format")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry["fine_labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: data must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}")
    images = torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)))
    return images, torch.from_numpy(labels)


def cifar100_missing(root: Path) -> list[Path]:
    base = root / CIFAR100_FOLDER
    return [base / f for f in CIFAR100_FILES if not (base / f).is_file()]


def download_cifar100(root: Path) -> None:
    """Fetch and extract torchvision's CIFAR-100 archive (md5-checked) into `root`."""
    from torchvision.datasets import CIFAR100
    from torchvision.datasets import utils as tv_utils

    try:
        root.mkdir(parents=True, exist_ok=True)
        tv_utils.download_and_extract_archive(
            CIFAR100.url, str(root), filename=CIFAR100.filename, md5=CIFAR100.tgz_md5
        )
    except Exception as e:
        raise DataError(f"could not download CIFAR-100 into {root}: {type(e).__name__}: {e}") from e


@register_dataset("cifar100")
def _load_cifar100(cfg: Any) -> DataSet:
    root = Path(str(cfg.root)).expanduser()
    if int(cfg.image_size) != 32:
        raise DataError(f"cifar100 images are 32x32, but dataset.image_size={cfg.image_size}")
    if cifar100_missing(root) and bool(cfg.download):
        download_cifar100(root)
    missing = cifar100_missing(root)
    if missing:
        rel = missing[0].relative_to(root)
        raise DataError(
            f"CIFAR-100 not found under {root} (expected {rel.as_posix()}); pass "
            f"dataset.download=true to fetch it or dataset.root=DIR"
        )
    base = root / CIFAR100_FOLDER
    meta = _read_pickle(base / "meta")
    if "fine_label_names" not in meta:
        raise DataError(f"{base / 'meta'} lacks the key 'fine_label_names'")
    names = [_as_str(v) for v in meta["fine_label_names"]]
    train_x, train_y = _cifar_split(base / "train", len(names))
    test_x, test_y = _cifar_split(base / "test", len(names))
    return DataSet(train_x, train_y, test_x, test_y, len(names), names)


# ----------------------------------------------------------------------------- synthetic

_SYN_GRID = 6  # class patterns: random 6x6 colour grids, upsampled (low frequency)
_SYN_SHIFT = 8  # variants shift their class pattern by up to this many pixels each way
_SYN_DISTRACT = (0.5, 0.9)  # distractor strength, relative to the class pattern
_SYN_VARIANTS = 16  # appearance variants per class (shift, contrast, colour cast)
_SYN_NOISE_FIELDS = 1024  # fields in each of the two noise banks
_SYN_NOISE_MAX = 40  # each noise bank is uniform in 0..40 (two of them: 0..80)
_SYN_BASE_MAX = 255 - 2 * _SYN_NOISE_MAX  # variants lie in 0..175, so sums never overflow


def _synthetic_banks(
    seed: int, num_classes: int, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 banks: class variants [K * V, 3, S, S] and two noise banks [M, 3, S, S].

    Variant v of class k is the class's low-frequency colour pattern, shifted, scaled by a
    random contrast, plus a fainter distractor (the pattern of another random class) and a
    random per-channel colour cast.
    """
    g = torch.Generator().manual_seed(mix_seed(seed, 0x9A77E2))
    k, v, s = num_classes, _SYN_VARIANTS, _SYN_SHIFT
    grid = torch.randn(k, 3, _SYN_GRID, _SYN_GRID, generator=g)
    full = size + 2 * s
    pat = torch.nn.functional.interpolate(
        grid, size=(full, full), mode="bicubic", align_corners=False
    )
    pat = pat - pat.mean(dim=(1, 2, 3), keepdim=True)
    pat = pat / pat.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    windows = pat.unfold(2, size, 1).unfold(3, size, 1)  # [K, 3, 2s+1, 2s+1, S, S]
    cls = torch.arange(k).repeat_interleave(v)
    shifts = torch.randint(0, 2 * s + 1, (k * v, 2), generator=g)
    contrast = torch.empty(k * v, 1, 1, 1).uniform_(18.0, 30.0, generator=g)
    other = (cls + torch.randint(1, k, (k * v,), generator=g)) % k
    other_shifts = torch.randint(0, 2 * s + 1, (k * v, 2), generator=g)
    faint = contrast * torch.empty(k * v, 1, 1, 1).uniform_(*_SYN_DISTRACT, generator=g)
    cast = torch.randn(k * v, 3, 1, 1, generator=g) * 8.0 + _SYN_BASE_MAX / 2
    variants = windows[cls, :, shifts[:, 0], shifts[:, 1]].mul_(contrast).add_(cast)
    variants += windows[other, :, other_shifts[:, 0], other_shifts[:, 1]].mul_(faint)
    variants = variants.round_().clamp_(0, _SYN_BASE_MAX).to(torch.uint8)
    shape = (_SYN_NOISE_FIELDS, 3, size, size)
    noise_a = torch.randint(0, _SYN_NOISE_MAX + 1, shape, generator=g, dtype=torch.uint8)
    noise_b = torch.randint(0, _SYN_NOISE_MAX + 1, shape, generator=g, dtype=torch.uint8)
    return variants, noise_a, noise_b


def _synthetic_split(
    banks: tuple[torch.Tensor, torch.Tensor, torch.Tensor], num_classes: int, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """n images: a random variant of a (balanced) random class plus two random noise fields."""
    variants, noise_a, noise_b = banks
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    which = labels * _SYN_VARIANTS + torch.randint(0, _SYN_VARIANTS, (n,), generator=g)
    a = torch.randint(0, noise_a.shape[0], (n,), generator=g)
    b = torch.randint(0, noise_b.shape[0], (n,), generator=g)
    images = variants.index_select(0, which)
    images += noise_a.index_select(0, a)  # uint8 sums stay within 0..255
    images += noise_b.index_select(0, b)
    return images, labels


@register_dataset("synthetic")
def _make_synthetic(cfg: Any) -> DataSet:
    k, size = int(cfg.num_classes), int(cfg.image_size)
    n_train, n_test, seed = int(cfg.train_size), int(cfg.test_size), int(cfg.data_seed)
    if k < 2:
        raise DataError(f"synthetic needs dataset.num_classes >= 2, got {k}")
    if size < 8:
        raise DataError(f"synthetic needs dataset.image_size >= 8, got {size}")
    if n_train < 1 or n_test < 1:
        raise DataError(
            f"synthetic needs dataset.train_size and dataset.test_size >= 1, got "
            f"{n_train} and {n_test}"
        )
    banks = _synthetic_banks(seed, k, size)
    train_x, train_y = _synthetic_split(banks, k, n_train, mix_seed(seed, 1))
    test_x, test_y = _synthetic_split(banks, k, n_test, mix_seed(seed, 2))
    names = [f"class_{i:02d}" for i in range(k)]
    return DataSet(train_x, train_y, test_x, test_y, k, names)


# ----------------------------------------------------------------------------- digits

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def digits_split(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed stratified split: per class, a seeded permutation, the first 20 % to test.

    Our own rather than scikit-learn's train_test_split, so that it cannot change with the
    scikit-learn version.  Returns sorted (train, test) indices.
    """
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        g = torch.Generator().manual_seed(mix_seed(DIGITS_SPLIT_SEED, c))
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = int(round(idx.numel() * DIGITS_TEST_FRACTION))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


@register_dataset("digits")
def _load_digits(cfg: Any) -> DataSet:
    import numpy as np
    from sklearn.datasets import load_digits

    size = int(cfg.image_size)
    if size < 8:
        raise DataError(f"digits needs dataset.image_size >= 8, got {size}")
    bunch = load_digits()
    images8 = np.asarray(bunch.images, dtype=np.float32)  # [1797, 8, 8], values 0..16
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    x = torch.from_numpy(images8)[:, None] * (255.0 / 16.0)
    if size != 8:
        x = torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False
        )
    x = x.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    tr, te = digits_split(y)
    names = [str(int(v)) for v in bunch.target_names]
    return DataSet(
        x[tr].contiguous(),
        y[tr].contiguous(),
        x[te].contiguous(),
        y[te].contiguous(),
        len(names),
        names,
    )
