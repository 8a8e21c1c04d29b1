"""Sharding among data-parallel ranks and sample indices, for every loader of rld.data.

The property that makes a W-rank run equal a 1-rank run of the same global batch: at every
step, the ranks' batches concatenated in rank order are, exactly, the 1-rank batch.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rld.config import CIFAR_MEAN, CIFAR_STD, DatasetConfig
from rld.data import BatchPlan, DataError, DeviceLoader, build_loaders
from rld.data.augment import norm_constants, normalize_uint8
from rld.data.sharding import shard_bounds

MEAN, STD = list(CIFAR_MEAN), list(CIFAR_STD)


# --------------------------------------------------------------------------- BatchPlan


def test_shard_bounds_split_evenly_and_cover() -> None:
    for size in range(0, 13):
        for world in (1, 2, 3, 4, 5):
            bounds = [shard_bounds(size, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1
    assert [shard_bounds(12, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]


@pytest.mark.parametrize("drop_last", [False, True])
def test_batch_plan_ranks_tile_the_global_batches(drop_last: bool) -> None:
    n, b, w = 50, 12, 4
    plans = [BatchPlan(n, b, rank=r, world_size=w, drop_last=drop_last) for r in range(w)]
    steps = n // b if drop_last else -(-n // b)
    assert {len(p) for p in plans} == {steps}
    assert all(p.local_batch_size == 3 for p in plans)
    for step in range(steps):
        ranges = [p.local_ranges[step] for p in plans]
        assert ranges[0][0] == step * b and ranges[-1][1] == min((step + 1) * b, n)
        assert all(a[1] == c[0] for a, c in zip(ranges, ranges[1:]))
    seen = sum(p.rank_samples for p in plans)
    assert seen == (48 if drop_last else 50)
    if not drop_last:  # last global batch: 2 samples over 4 ranks
        assert [p.local_sizes[-1] for p in plans] == [0, 1, 0, 1]
        assert plans[0].global_size(steps - 1) == 2


def test_batch_plan_errors_name_the_key() -> None:
    with pytest.raises(DataError, match=r"trainer\.batch_size=10 .* 4 ranks"):
        BatchPlan(100, 10, rank=0, world_size=4)
    BatchPlan(100, 10, rank=3, world_size=4, train=False)  # evaluation: any batch
    with pytest.raises(DataError, match="rank=2, world_size=2"):
        BatchPlan(100, 10, rank=2, world_size=2)
    with pytest.raises(DataError, match="world_size=0"):
        BatchPlan(100, 10, rank=0, world_size=0)


# --------------------------------------------------------------------------- DeviceLoader


def _images(n: int, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)


def _device_loader(n: int, batch: int, rank: int = 0, world: int = 1, **kw) -> DeviceLoader:
    kw.setdefault("train", True)
    labels = torch.arange(n) * 3 % 17  # not the row: index and label differ
    return DeviceLoader(
        _images(n), labels, batch, mean=MEAN, std=STD, device="cpu", seed=4,
        rank=rank, world_size=world, with_index=True, **kw,
    )  # fmt: skip


def _epoch(loader, epoch: int = 2) -> list[tuple[torch.Tensor, ...]]:
    loader.set_epoch(epoch)
    return list(loader)


def _assert_ranks_make_the_global_batches(ranks: list[list], single: list) -> None:
    assert {len(r) for r in ranks} == {len(single)}
    for step, whole in enumerate(single):
        for part in range(len(whole)):  # x, y, index
            got = torch.cat([r[step][part] for r in ranks])
            assert torch.equal(got, whole[part]), (step, part)


@pytest.mark.parametrize(
    "train,drop_last,world",
    [(True, False, 2), (True, True, 2), (True, False, 4), (False, False, 3)],
)
def test_device_loader_ranks_concatenate_to_the_one_rank_batches(
    train: bool, drop_last: bool, world: int
) -> None:
    n, b = 203, 24
    kw = dict(train=train, drop_last=drop_last, chunk_images=50)  # chunking across steps too
    single = _epoch(_device_loader(n, b, **kw))
    ranks = [_epoch(_device_loader(n, b, r, world, **kw)) for r in range(world)]
    _assert_ranks_make_the_global_batches(ranks, single)
    if train:
        assert all(len(x) == b // world for x, _, _ in ranks[0][:-1])
    rows = torch.cat([i for r in ranks for _, _, i in r])
    expected = (n // b) * b if drop_last else n
    assert rows.numel() == expected and rows.unique().numel() == expected  # each once


def test_device_loader_indivisible_batch_names_the_key() -> None:
    with pytest.raises(DataError, match=r"trainer\.batch_size=10"):
        _device_loader(50, 10, rank=0, world=3)
    test = _device_loader(50, 10, rank=2, world=3, train=False)  # evaluation: fine
    assert len(test) == 5 and test.plan.rank_samples == sum(len(y) for _, y, _ in test)


def test_device_loader_with_index_gives_the_rows() -> None:
    n = 90
    images = _images(n)
    labels = torch.arange(n) * 3 % 17
    for train in (True, False):
        loader = _device_loader(n, 16, rank=1, world=2, train=train)
        mean, std = norm_constants(MEAN, STD, "cpu")
        for x, y, index in _epoch(loader, 3):
            assert index.dtype == torch.int64 and index.device == x.device
            assert torch.equal(labels[index], y)
            if not train:
                assert torch.equal(x, normalize_uint8(images[index], mean, std))
    plain = DeviceLoader(images, labels, 16, train=True, mean=MEAN, std=STD, device="cpu", seed=0)
    assert all(len(batch) == 2 for batch in plain)  # (x, y) stays the default


def test_device_loader_empty_share_of_the_last_batch() -> None:
    # 10 samples, global batch 4, 4 ranks: the last global batch (2 samples) leaves two ranks
    # without a sample; every rank still runs 3 steps
    loaders = [_device_loader(10, 4, r, 4) for r in range(4)]
    assert {len(loader) for loader in loaders} == {3}
    last = [_epoch(loader)[-1] for loader in loaders]
    assert [len(y) for _, y, _ in last] == [0, 1, 0, 1]
    assert last[0][0].shape == (0, 3, 8, 8)


def test_build_loaders_threads_rank_and_checks_early() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(
        DatasetConfig(name="synthetic", num_classes=5, train_size=100, test_size=50)
    )
    loaders = build_loaders(cfg, 32, "cpu", seed=0, rank=1, world_size=2, with_index=True)
    assert len(loaders.train) == 4 and loaders.train.plan.local_batch_size == 16
    assert loaders.num_train == 100 and loaders.train.plan.rank_samples == 50
    x, y, index = next(iter(loaders.test))
    assert x.shape[0] == 16 and torch.equal(index, torch.arange(16, 32))
    with pytest.raises(DataError, match=r"trainer\.batch_size=32 .* 3 ranks"):
        build_loaders(cfg, 32, "cpu", seed=0, rank=0, world_size=3)


# --------------------------------------------------------------------------- ImageNet folders


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    from rld.bench.imagenet_data import make_jpeg_tree

    root = tmp_path_factory.mktemp("imagenet")
    make_jpeg_tree(root, 22, seed=1)  # 10 classes; 22 train, 10 val images
    return root


def _cfg(root: Path) -> SimpleNamespace:
    return SimpleNamespace(
        name="imagenet", root=str(root), num_classes=10, image_size=64,
        mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], workers=0,
    )  # fmt: skip


@pytest.mark.parametrize("decoder", ["pil", "device"])
def test_imagenet_ranks_concatenate_to_the_one_rank_batches(tree: Path, decoder: str) -> None:
    def epochs(rank: int, world: int) -> tuple[list, list]:
        loaders = build_loaders(
            _cfg(tree), 8, "cpu", seed=3, rank=rank, world_size=world, with_index=True,
            decoder=decoder,
        )  # fmt: skip
        return _epoch(loaders.train, 2), _epoch(loaders.test, 2)

    single_train, single_test = epochs(0, 1)
    ranks = [epochs(r, 2) for r in range(2)]
    _assert_ranks_make_the_global_batches([r[0] for r in ranks], single_train)
    _assert_ranks_make_the_global_batches([r[1] for r in ranks], single_test)
    assert [len(y) for _, y, _ in ranks[1][0]] == [4, 4, 3]  # 22 = 8 + 8 + 6
    for split, batches in (("train", ranks[1][0]), ("val", ranks[0][1])):
        labels = torch.tensor([label for _, label in _folder(tree / split).samples])
        for _, y, index in batches:
            assert torch.equal(labels[index], y)
    loaders = build_loaders(_cfg(tree), 8, "cpu", seed=3, rank=1, world_size=2, decoder=decoder)
    assert torch.equal(loaders.train.labels, torch.tensor(_folder(tree / "train").targets))
    assert loaders.train.labels.shape == (22,)  # every row of the split, on every rank


def _folder(path: Path):
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(path))


def test_imagenet_indivisible_batch_and_empty_shares(tree: Path) -> None:
    with pytest.raises(DataError, match=r"trainer\.batch_size=9"):
        build_loaders(_cfg(tree), 9, "cpu", seed=0, world_size=2, decoder="pil")
    # 10 val images, batch 4, 4 ranks: the last batch of 2 leaves ranks 0 and 2 empty
    for decoder in ("pil", "device"):
        tests = [
            build_loaders(_cfg(tree), 4, "cpu", seed=0, rank=r, world_size=4, decoder=decoder).test
            for r in range(4)
        ]
        assert {len(t) for t in tests} == {3}
        last = [list(t)[-1] for t in tests]
        assert [len(y) for _, y in last] == [0, 1, 0, 1], decoder
        assert last[0][0].shape == (0, 3, 64, 64) and last[0][0].dtype == torch.float32
