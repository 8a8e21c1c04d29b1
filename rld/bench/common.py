"""What the benchmarks share: the device's name, synthetic CIFAR-sized images, and the
published PIL input pipeline they are compared against."""

from __future__ import annotations

import os
import platform
from types import SimpleNamespace
from typing import Any

from rld.config import CIFAR_MEAN, CIFAR_STD


def device_name(device: Any) -> str:
    """The GPU's name, or the CPU's model and core count."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} CPUs)"


# the columns every input-path benchmark writes (rld.bench.data, rld.bench.imagenet_data)
LOADER_FIELDS = ["device", "device_name", "images", "batch_size", "workers", "torch_threads",
                 "seconds", "images_per_s"]


def save_rows(out: str, rows: list[dict], fields: list[str] | None = None) -> None:
    """Write the benchmark's rows as a CSV (atomically) unless `out` is '', and say where."""
    if out:
        from pathlib import Path

        from rld.io import write_csv

        write_csv(Path(out), rows, fields)
        print(f"wrote {out}")


def sync(device: Any) -> None:
    """Wait for the device's queued work (timings end here)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_cifar(images: int, seed: int = 0, num_classes: int = 100):
    """`images` synthetic 32x32 training images (a `rld.data.DataSet`, CIFAR-100 statistics)."""
    from rld.data import load_dataset

    return load_dataset(SimpleNamespace(
        name="synthetic", root="", download=False, num_classes=num_classes, image_size=32,
        mean=CIFAR_MEAN, std=CIFAR_STD, train_size=images, test_size=1, data_seed=seed))


def distiller_config(name: str, **settings: Any) -> dict:
    """The config of distiller `name`: its registered defaults (`rld.distillers`; plain
    values, so scd_tau follows tau), no warm-up (a benchmark times a step at full weight),
    and `settings`."""
    from rld.distillers import DISTILLERS

    spec = DISTILLERS.get(name)
    defaults = {k: v for k, v in spec.defaults.items() if not str(v).startswith("${")}
    warmup = {"warmup": 0} if "warmup" in spec.setting_names() else {}
    return {"name": name, **defaults, **warmup, **settings}


def cifar_pil_transform(mean=CIFAR_MEAN, std=CIFAR_STD):
    """The published CIFAR training transforms: RandomCrop(32, 4) + flip + ToTensor +
    Normalize, on PIL images."""
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(mean, std)])


class PilImages:
    """A map-style data set of uint8 images as the published loaders see them: each item is
    an ``[N, C, H, W]`` row turned into a PIL image, then `transform`."""

    def __init__(self, images_nchw, labels, transform) -> None:
        self.images = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels.numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])
