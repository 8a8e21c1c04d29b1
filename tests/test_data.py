"""rld.data: on-device augmentation vs torchvision, loader order/determinism, the four data sets."""

from __future__ import annotations

import csv
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from rld.config import CIFAR_MEAN, CIFAR_STD, DatasetConfig
from rld.data import DataError, DeviceLoader, build_loaders, crop_flip, load_dataset
from rld.data.augment import draw_crop_flip, norm_constants, normalize_uint8
from rld.data.sources import digits_split

MEAN, STD = list(CIFAR_MEAN), list(CIFAR_STD)


def _images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def _torchvision_reference(img_chw: torch.Tensor, oy: int, ox: int, flip: bool, pad: int):
    """torchvision on a PIL image: pad (zeros), crop at (oy, ox), flip, ToTensor, Normalize."""
    h, w = img_chw.shape[1:]
    pil = Image.fromarray(img_chw.permute(1, 2, 0).numpy())
    out = TF.crop(TF.pad(pil, pad, fill=0), oy, ox, h, w)
    if flip:
        out = TF.hflip(out)
    as_uint8 = torch.from_numpy(np.array(out)).permute(2, 0, 1)
    normed = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])(out)
    return as_uint8, normed


# --------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("pad,h,w", [(4, 32, 32), (2, 12, 20), (0, 8, 8)])
def test_crop_flip_equals_torchvision(pad: int, h: int, w: int) -> None:
    n = 12
    images = _images(n, h, w)
    g = torch.Generator().manual_seed(1)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
    # the extreme windows and both flip states are always covered
    corners = torch.tensor([[0, 0], [2 * pad, 2 * pad], [0, 2 * pad], [2 * pad, 0]])
    offsets[:4] = corners
    offsets[4:8] = corners
    flips = torch.tensor([False, False, False, False, True, True, True, True] + [True, False] * 2)
    got = crop_flip(images, offsets, flips, pad)
    mean, std = norm_constants(MEAN, STD, "cpu")
    got_norm = normalize_uint8(got, mean, std)
    assert got.dtype == torch.uint8 and got.shape == images.shape
    for b in range(n):
        ref_u8, ref_norm = _torchvision_reference(
            images[b], int(offsets[b, 0]), int(offsets[b, 1]), bool(flips[b]), pad
        )
        assert torch.equal(got[b], ref_u8), b
        assert torch.equal(got_norm[b], ref_norm), b  # bitwise: same arithmetic


def test_random_crop_flip_parameters_are_uniform() -> None:
    n, pad = 90_000, 4
    offsets, flips = draw_crop_flip(n, pad, torch.Generator().manual_seed(0))
    assert offsets.min() == 0 and offsets.max() == 2 * pad
    for axis in range(2):
        counts = torch.bincount(offsets[:, axis], minlength=2 * pad + 1).double()
        assert counts.numel() == 2 * pad + 1
        assert ((counts / (n / (2 * pad + 1)) - 1).abs() < 0.06).all(), counts
    # the two axes are drawn independently: all 81 pairs occur about equally often
    pairs = torch.bincount(offsets[:, 0] * (2 * pad + 1) + offsets[:, 1]).double()
    assert pairs.numel() == (2 * pad + 1) ** 2
    assert ((pairs / (n / pairs.numel()) - 1).abs() < 0.2).all()
    assert abs(flips.double().mean().item() - 0.5) < 0.01


# --------------------------------------------------------------------------- DeviceLoader


def _loader(n: int = 1000, batch: int = 64, seed: int = 0, **kw) -> DeviceLoader:
    images = _images(n, seed=7)
    labels = torch.arange(n)  # the label identifies the sample
    kw.setdefault("train", True)
    return DeviceLoader(images, labels, batch, mean=MEAN, std=STD, device="cpu", seed=seed, **kw)


def test_train_loader_covers_every_sample_once_per_epoch() -> None:
    loader = _loader()
    assert len(loader) == math.ceil(1000 / 64) == 16
    for epoch in (1, 2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 16
        assert [len(y) for _, y in batches] == [64] * 15 + [40]
        ys = torch.cat([y for _, y in batches])
        assert torch.equal(ys.sort().values, torch.arange(1000))
        x, y = batches[0]
        assert x.dtype == torch.float32 and x.shape == (64, 3, 32, 32)
        assert y.dtype == torch.int64


def test_drop_last() -> None:
    loader = _loader(drop_last=True)
    assert len(loader) == 1000 // 64 == 15
    ys = torch.cat([y for _, y in loader])
    assert ys.numel() == 960 and ys.unique().numel() == 960
    exact = _loader(n=128, drop_last=True)
    assert len(exact) == 2 and sum(len(y) for _, y in exact) == 128


def _epoch(loader: DeviceLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b)
    )


def test_same_seed_and_epoch_same_batches_resume_exact() -> None:
    run = _loader(n=300, seed=5)
    first = [_epoch(run, e) for e in (1, 2, 3)]
    resumed = _loader(n=300, seed=5)  # a fresh process resuming at epoch 3
    assert _same(_epoch(resumed, 3), first[2])
    assert _same(_epoch(resumed, 1), first[0])
    assert not torch.equal(first[0][0][1], first[1][0][1])  # epochs differ in order
    other_seed = _loader(n=300, seed=6)
    assert not torch.equal(_epoch(other_seed, 1)[0][1], first[0][0][1])


@pytest.mark.parametrize("train", [True, False])
def test_chunking_does_not_change_batches(train: bool) -> None:
    ref = _epoch(_loader(n=300, batch=32, train=train, chunk_images=32), 2)
    for chunk in (1, 100, 10_000):
        assert _same(_epoch(_loader(n=300, batch=32, train=train, chunk_images=chunk), 2), ref)


def test_loader_under_deterministic_algorithms() -> None:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert _same(_epoch(_loader(n=200), 3), _epoch(_loader(n=200), 3))
    finally:
        torch.use_deterministic_algorithms(before)


def test_loader_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    loader = _loader(n=200)
    list(loader)
    assert torch.equal(torch.get_rng_state(), state)


def test_train_batch_is_the_torchvision_pipeline() -> None:
    loader = _loader(n=100, batch=16)
    loader.set_epoch(4)
    perm, offsets, flips = loader.epoch_plan()
    x, y = next(iter(loader))
    assert torch.equal(y, perm[:16])  # labels are sample ids here
    for b in range(16):
        i = int(perm[b])
        _, ref = _torchvision_reference(
            loader.images[i], int(offsets[b, 0]), int(offsets[b, 1]), bool(flips[b]), 4
        )
        assert torch.allclose(x[b], ref, atol=1e-6, rtol=0)


def test_test_loader_fixed_order_no_augmentation() -> None:
    images = _images(130, seed=3)
    loader = DeviceLoader(
        images,
        torch.arange(130),
        64,
        train=False,
        mean=MEAN,
        std=STD,
        device="cpu",
        seed=0,
        drop_last=True,
    )
    assert len(loader) == 3  # drop_last applies to training only
    batches = _epoch(loader, 1)
    assert [len(y) for _, y in batches] == [64, 64, 2]
    assert _same(batches, _epoch(loader, 9))
    ref = T.Normalize(MEAN, STD)(images.float() / 255)
    assert torch.equal(torch.cat([x for x, _ in batches]), ref)
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(130))


def test_loader_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        DeviceLoader(
            torch.zeros(4, 3, 8, 8),
            torch.zeros(4),
            2,
            train=True,
            mean=MEAN,
            std=STD,
            device="cpu",
            seed=0,
        )  # float images
    with pytest.raises(ValueError):
        DeviceLoader(
            _images(4), torch.zeros(3), 2, train=True, mean=MEAN, std=STD, device="cpu", seed=0
        )


# --------------------------------------------------------------------------- CIFAR-100


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING), the format of the CIFAR archives."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


FINE = [f"fine{i}" for i in range(100)]
COARSE = [f"coarse{i}" for i in range(20)]


def _write_cifar100(root: Path, n_train: int = 40, n_test: int = 20, py2: bool = True) -> dict:
    """A CIFAR-100 python tree with the archive's files and keys, tiny; returns its arrays."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}

    def dump(obj, name):
        with open(base / name, "wb") as f:
            if py2:
                _Py2Pickler(f, protocol=2).dump(obj)
            else:
                pickle.dump(obj, f)

    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        arrays[split] = (data, fine)
        dump(
            {
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                b"batch_label": f"{split}ing batch 1 of 1".encode(),
                b"fine_labels": fine,
                b"coarse_labels": [f // 5 for f in fine],
                b"data": data,
            },
            split,
        )
    dump(
        {
            b"fine_label_names": [s.encode() for s in FINE],
            b"coarse_label_names": [s.encode() for s in COARSE],
        },
        "meta",
    )
    return arrays


def _cifar_cfg(root: Path, **kw) -> DatasetConfig:
    return DatasetConfig(name="cifar100", root=str(root), **kw)


@pytest.mark.parametrize("py2", [True, False])
def test_cifar100_loads_the_python_archive_layout(tmp_path: Path, py2: bool) -> None:
    arrays = _write_cifar100(tmp_path, py2=py2)
    ds = load_dataset(_cifar_cfg(tmp_path))
    assert ds.num_classes == 100 and ds.class_names == FINE
    assert ds.mean == CIFAR_MEAN and ds.std == CIFAR_STD
    for split, x, y in (
        ("train", ds.train_images, ds.train_labels),
        ("test", ds.test_images, ds.test_labels),
    ):
        data, fine = arrays[split]
        assert x.dtype == torch.uint8 and x.is_contiguous() and x.shape == (len(fine), 3, 32, 32)
        assert torch.equal(x.reshape(len(fine), -1), torch.from_numpy(data))
        assert y.dtype == torch.int64 and y.tolist() == fine


def test_cifar100_agrees_with_torchvision(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    _write_cifar100(tmp_path)
    # the tiny files cannot have the archive's md5 sums: skip torchvision's check, here only
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    ds = load_dataset(_cifar_cfg(tmp_path))
    for train, x, y in (
        (True, ds.train_images, ds.train_labels),
        (False, ds.test_images, ds.test_labels),
    ):
        ref = tv_cifar.CIFAR100(str(tmp_path), train=train)
        assert ref.classes == ds.class_names
        assert np.array_equal(ref.data, x.permute(0, 2, 3, 1).numpy())
        assert ref.targets == y.tolist()


def test_cifar100_missing_names_path_and_switch(tmp_path: Path) -> None:
    root = tmp_path / "nothing"
    with pytest.raises(DataError) as err:
        load_dataset(_cifar_cfg(root))
    msg = str(err.value)
    assert str(root) in msg and "cifar-100-python/train" in msg
    assert "dataset.download=true" in msg and "dataset.root" in msg
    assert isinstance(err.value, ValueError)


def test_cifar100_download_switch(tmp_path: Path, monkeypatch) -> None:
    from torchvision.datasets import utils as tv_utils

    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kw):
        calls.append((url, filename, md5))
        _write_cifar100(Path(download_root))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    ds = load_dataset(_cifar_cfg(tmp_path / "c", download=True))
    assert len(calls) == 1 and calls[0][0].endswith("cifar-100-python.tar.gz") and calls[0][2]
    assert ds.train_images.shape[0] == 40
    load_dataset(_cifar_cfg(tmp_path / "c", download=True))  # present: no second download
    assert len(calls) == 1

    def failing(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", failing)
    with pytest.raises(DataError, match="could not download"):
        load_dataset(_cifar_cfg(tmp_path / "d", download=True))


def test_cifar100_bad_files(tmp_path: Path) -> None:
    _write_cifar100(tmp_path)
    with pytest.raises(DataError, match="num_classes"):
        load_dataset(_cifar_cfg(tmp_path, num_classes=10))
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(_cifar_cfg(tmp_path))


# --------------------------------------------------------------------------- digits, synthetic


def test_digits() -> None:
    cfg = DatasetConfig(name="digits", num_classes=10)
    ds = load_dataset(cfg)
    assert ds.class_names == [str(i) for i in range(10)] and ds.num_classes == 10
    assert ds.train_images.shape == (1438, 3, 32, 32) and ds.test_images.shape == (359, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.is_contiguous()
    assert int(ds.train_images.max()) == 255 and int(ds.train_images.min()) == 0
    assert torch.equal(ds.train_images[:, 0], ds.train_images[:, 2])  # grey in 3 channels
    assert torch.bincount(ds.test_labels).min() >= 35  # stratified
    from sklearn.datasets import load_digits

    tr, te = digits_split(torch.from_numpy(load_digits().target))
    assert len(set(tr.tolist()) & set(te.tolist())) == 0
    assert len(tr) + len(te) == 1797
    again = load_dataset(cfg)
    assert torch.equal(again.train_images, ds.train_images)
    assert torch.equal(again.test_labels, ds.test_labels)


def _synthetic(seed: int = 0, **kw) -> DatasetConfig:
    kw = {"num_classes": 10, "train_size": 2000, "test_size": 500, **kw}
    return DatasetConfig(name="synthetic", data_seed=seed, **kw)


def test_synthetic_deterministic_and_seeded() -> None:
    a, b, c = (load_dataset(_synthetic(s)) for s in (0, 0, 1))
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.train_images, c.train_images)
    assert a.class_names == [f"class_{i:02d}" for i in range(10)]
    assert a.train_images.shape == (2000, 3, 32, 32) and a.test_images.shape == (500, 3, 32, 32)
    assert torch.bincount(a.train_labels).tolist() == [200] * 10
    small = load_dataset(_synthetic(num_classes=3, image_size=16, train_size=7, test_size=5))
    assert small.train_images.shape == (7, 3, 16, 16) and small.num_classes == 3


def test_synthetic_has_class_structure() -> None:
    ds = load_dataset(_synthetic(num_classes=20))
    xtr = ds.train_images.flatten(1).float()
    xte = ds.test_images.flatten(1).float()
    means = torch.stack([xtr[ds.train_labels == c].mean(0) for c in range(20)])
    acc = (torch.cdist(xte, means).argmin(1) == ds.test_labels).float().mean().item()
    assert acc > 0.3, acc  # chance: 0.05


def test_bad_dataset_settings() -> None:
    with pytest.raises(DataError, match="dataset='mnist' is not a registered data set"):
        load_dataset(DatasetConfig(name="mnist"))
    with pytest.raises(DataError, match="train_size"):
        load_dataset(_synthetic(train_size=0))
    with pytest.raises(DataError, match="num_classes"):
        load_dataset(DatasetConfig(name="digits", num_classes=100))


def test_build_loaders_cifar_sized() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(_synthetic(num_classes=5, train_size=100, test_size=50))
    loaders = build_loaders(cfg, 32, "cpu", seed=0)
    assert loaders.num_classes == 5 and loaders.class_names[0] == "class_00"
    assert len(loaders.train) == 4 and len(loaders.test) == 2
    assert loaders.num_train == 100 and loaders.num_test == 50
    loaders.train.set_epoch(2)
    x, y = next(iter(loaders.train))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    dropped = build_loaders(cfg, 32, "cpu", seed=0, drop_last=True)
    assert len(dropped.train) == 3 and len(dropped.test) == 2


# --------------------------------------------------------------------------- ImageNet


def _write_jpeg_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    sizes = [(300, 260), (180, 400), (256, 256), (500, 333)]
    for split, per_class in (("train", 3), ("val", 2)):
        for c in ("n01440764", "n01443537"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                w, h = sizes[(i + len(c)) % len(sizes)]
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"{c}_{i}.JPEG", quality=90)


def _imagenet_cfg(root: Path, workers: int = 0) -> DatasetConfig:
    return DatasetConfig(
        name="imagenet",
        family="imagenet",
        root=str(root),
        num_classes=2,
        image_size=224,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        workers=workers,
    )


def test_imagenet_folders(tmp_path: Path) -> None:
    _write_jpeg_tree(tmp_path)
    loaders = build_loaders(_imagenet_cfg(tmp_path), 4, "cpu", seed=0)
    assert loaders.class_names == ["n01440764", "n01443537"] and loaders.num_classes == 2
    assert len(loaders.train) == 2 and len(loaders.test) == 1
    loaders.train.set_epoch(1)
    batches = list(loaders.train)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 224, 224), (2, 3, 224, 224)]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == [0, 0, 0, 1, 1, 1]
    ((x, y),) = list(loaders.test)
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 1, 1] and y.dtype == torch.int64
    # order and augmentation are functions of (seed, epoch), with or without workers
    again = list(loaders.train)
    assert _same(batches, again)
    with_workers = build_loaders(_imagenet_cfg(tmp_path, workers=1), 4, "cpu", seed=0)
    for epoch in (1, 2):
        with_workers.train.set_epoch(epoch)
        loaders.train.set_epoch(epoch)
        assert _same(list(with_workers.train), list(loaders.train))
    assert not _same(list(loaders.train), batches)  # epoch 2 differs from epoch 1


def test_imagenet_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        build_loaders(_imagenet_cfg(tmp_path / "none"), 4, "cpu", seed=0)
    assert str(tmp_path / "none" / "train") in str(err.value)
    assert "dataset.root" in str(err.value)
    with pytest.raises(DataError, match="use rld.data.build_loaders"):
        load_dataset(_imagenet_cfg(tmp_path))


# --------------------------------------------------------------------------- bench CLI


def test_bench_dispatcher(monkeypatch, capsys) -> None:
    import rld.bench
    from rld.bench.__main__ import main

    assert main([]) == 2 and "usage" in capsys.readouterr().out
    assert main(["nope"]) == 2 and "'nope' is not a subcommand" in capsys.readouterr().err
    monkeypatch.setitem(rld.bench.SUBCOMMANDS, "absent", "not written yet")
    assert main(["absent"]) == 2
    assert "rld/bench/absent.py is missing" in capsys.readouterr().err


def test_bench_data_writes_csv(tmp_path: Path, capsys) -> None:
    from rld.bench.__main__ import main

    out = tmp_path / "sub" / "bench_data.csv"
    rc = main(["data", "--images", "256", "--workers", "0", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "images/s" in text and "start-up included" in text
    rows = list(csv.DictReader(out.open()))
    assert [r["loader"] for r in rows] == ["torchvision_dataloader", "device_loader"]
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind
