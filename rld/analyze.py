"""Analyses of trained models; for now the supplement's Figure 1 (class correlation).

``python -m rld.analyze correlation --checkpoint PATH [--arch NAME] [--family cifar]
[--dataset cifar100|digits|synthetic] [--data-root DIR] [--classes a,b,c] [--image-index K]
[--top-k K] [--out DIR]`` (default DIR: ``analysis/`` beside the checkpoint)

For each chosen class, the model's softmax averaged over the test images of that class and
its top-k classes (panels a, b, ...); then, for one test image of the last chosen class, its
own top-k (last panel), with the classes marked that are in the top-k of one of the other
chosen classes but not in the top-k of the last one: the "class correlation" a single
sample carries beyond its own class.  Writes ``<out>/correlation_<dataset>_<arch>.png`` and
``.csv`` (one row per bar: panel, subject, rank, class_index, class_name, prob, marked).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path

from rld.cli import ArgumentParser, check_writable, natural, positive

DEFAULT_CLASSES = {
    "cifar100": ["leopard", "television", "dinosaur"],
    "digits": ["3", "5", "8"],
}
CSV_COLUMNS = ["panel", "subject", "rank", "class_index", "class_name", "prob", "marked"]
_HERE = Path(__file__).resolve().parent
CONF_DIR = _HERE.parent / "conf"  # the source tree's config groups


class UsageError(Exception):
    """A problem of the command line or its inputs: reported in one line, exit code 2."""


@dataclass
class Panel:
    label: str  # "a", "b", ...
    subject: str  # what the bars are the softmax of
    indices: list[int]  # top-k class indices, most probable first
    probs: list[float]
    marked: list[bool]


# --------------------------------------------------------------------------------------
# data and model
# --------------------------------------------------------------------------------------


def dataset_config(name: str, data_root: str | None = None, overrides: list[str] | None = None):
    """The ``dataset`` node that ``python -m rld.train dataset=<name>`` would use.

    Built with OmegaConf from the typed schema (rld.config) and ``conf/dataset/<name>.yaml``
    (no Hydra composition: quicker, and independent of the Hydra plugins installed);
    ``overrides`` are ``dataset.KEY=VALUE`` / ``paths.KEY=VALUE`` dotlist entries.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from rld.config import DatasetConfig, PathsConfig

    preset = CONF_DIR / "dataset" / f"{name}.yaml"
    try:
        dataset = OmegaConf.structured(DatasetConfig)
        if preset.is_file():
            values = OmegaConf.load(preset)
            values.pop("defaults", None)  # a Hydra defaults list, if the preset has one
            dataset = OmegaConf.merge(dataset, values)
        else:
            dataset.name = name
        cfg = OmegaConf.create({"paths": OmegaConf.structured(PathsConfig), "dataset": dataset})
        dots = list(overrides or [])
        if data_root is not None:
            dots.append(f"dataset.root={data_root}")
        if dots:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dots))
        OmegaConf.resolve(cfg)
    except (OmegaConfBaseException, ValueError) as exc:
        raise UsageError(f"bad data set settings: {str(exc).splitlines()[0]}") from None
    return cfg.dataset


def _peek_arch(path: Path) -> str | None:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # load_checkpoint reports the problem
    arch = obj.get("arch") if isinstance(obj, dict) else None
    return arch if isinstance(arch, str) else None


def load_model(checkpoint: Path, arch: str | None, num_classes: int, family: str):
    from rld.models import CheckpointError, build_model, load_checkpoint

    if not checkpoint.is_file():
        raise UsageError(f"checkpoint not found: {checkpoint}")
    if arch is None:
        arch = _peek_arch(checkpoint)
        if arch is None:
            raise UsageError(f"{checkpoint}: no 'arch' recorded in the checkpoint; pass --arch")
    try:
        model = build_model(arch, num_classes, family=family)
        load_checkpoint(model, checkpoint)
    except (CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    return model.eval(), arch


def predict(model, images, mean, std, batch_size: int = 256, device: str = "cpu"):
    """Softmax probabilities ``[N, C]`` (float64, CPU) of uint8 images ``[N, 3, H, W]``."""
    import torch

    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    model = model.to(device)
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device).float().div_(255.0)
            logits = model((x - m) / s).float()
            out.append(torch.softmax(logits, dim=1).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


# --------------------------------------------------------------------------------------
# the analysis
# --------------------------------------------------------------------------------------


def resolve_classes(names: list[str], class_names: list[str], dataset: str) -> list[int]:
    index = {n: i for i, n in enumerate(class_names)}
    unknown = [n for n in names if n not in index]
    if unknown:
        shown = ", ".join(class_names)
        raise UsageError(
            f"unknown class{'es' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"for {dataset}; allowed: {shown}"
        )
    return [index[n] for n in names]


def correlation(
    probs, labels, classes: list[int], class_names: list[str], image_index: int, top_k: int
) -> tuple[list[Panel], int]:
    """The panels of the figure; also returns the test-set index of the chosen image."""
    import torch

    k = max(1, min(top_k, probs.shape[1]))
    panels: list[Panel] = []
    tops: list[set[int]] = []
    for i, c in enumerate(classes):
        sel = labels == c
        n = int(sel.sum())
        if n == 0:
            raise UsageError(f"class {class_names[c]!r} has no test images")
        mean = probs[sel].mean(dim=0)
        p, idx = torch.topk(mean, k)
        tops.append(set(idx.tolist()))
        panels.append(
            Panel(chr(ord("a") + i), f"mean softmax over the {n} test images of "
                  f"'{class_names[c]}'", idx.tolist(), p.tolist(), [False] * k)  # fmt: skip
        )
    last = classes[-1]
    members = torch.nonzero(labels == last).flatten()
    if not 0 <= image_index < len(members):
        raise UsageError(
            f"--image-index {image_index} out of range: '{class_names[last]}' has "
            f"{len(members)} test images"
        )
    img = int(members[image_index])
    p, idx = torch.topk(probs[img], k)
    others = set().union(*tops[:-1]) if len(tops) > 1 else set()
    special = others - tops[-1]
    pred = class_names[int(probs[img].argmax())]
    panels.append(
        Panel(chr(ord("a") + len(classes)),
              f"test image #{image_index} of '{class_names[last]}' (predicted '{pred}')",
              idx.tolist(), p.tolist(), [int(j) in special for j in idx.tolist()])  # fmt: skip
    )
    return panels, img


def panels_csv(panels: list[Panel], class_names: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for pan in panels:
        for r, (j, p, mk) in enumerate(zip(pan.indices, pan.probs, pan.marked, strict=True)):
            w.writerow([pan.label, pan.subject, r + 1, j, class_names[j], f"{p:.6f}", int(mk)])
    return buf.getvalue()


def panels_png(
    panels: list[Panel], class_names: list[str], title: str, path: Path, image=None
) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    n = len(panels)
    ncols = 2 if n > 1 else 1
    nrows = (n + ncols - 1) // ncols
    k = max(len(p.indices) for p in panels)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(6.0 * ncols, 0.9 + 0.32 * k * nrows + 0.9 * nrows), dpi=100,
        squeeze=False,
    )  # fmt: skip
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, pan in zip(axes.flat, panels, strict=False):
        y = list(range(len(pan.indices)))
        colors = ["#ff7f0e" if m else "#1f77b4" for m in pan.marked]
        ax.barh(y, pan.probs, color=colors)
        ax.set_yticks(y, [class_names[j] for j in pan.indices])
        ax.invert_yaxis()
        top = max(pan.probs) if pan.probs and max(pan.probs) > 0 else 1.0
        room = 1.75 if (image is not None and pan is panels[-1]) else 1.25  # inset on the right
        ax.set_xlim(0, top * room)
        ax.set_xticks([x for x in ax.get_xticks() if 0 <= x <= min(1.0, top * 1.25)])
        for yi, p in zip(y, pan.probs, strict=True):
            ax.text(p, yi, f" {p:.3f}", va="center", fontsize=8)
        ax.set_xlabel("softmax probability")
        ax.set_title(f"({pan.label}) {pan.subject}", fontsize=9)
        if any(pan.marked):
            from matplotlib.patches import Patch

            ax.legend(
                handles=[Patch(color="#ff7f0e", label="in another class's top-k, not in its own class's")],
                loc="upper right", fontsize=7,
            )  # fmt: skip
    if image is not None:
        ax = axes.flat[n - 1]
        inset = ax.inset_axes((0.74, 0.08, 0.24, 0.6))
        inset.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        inset.set_xticks([])
        inset.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def run_correlation(args: argparse.Namespace) -> list[Path]:
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():  # before importing torch or loading any data
        raise UsageError(f"checkpoint not found: {ckpt}")
    check_writable(args.out or ckpt.parent / "analysis", "--out")

    import torch

    from rld.data import load_dataset

    dcfg = dataset_config(args.dataset, args.data_root, args.override)
    try:
        ds = load_dataset(dcfg)
    except ValueError as exc:  # rld.data.DataError and friends
        raise UsageError(str(exc).splitlines()[0]) from None
    names = (
        [c.strip() for c in args.classes.split(",") if c.strip()]
        if args.classes
        else DEFAULT_CLASSES.get(args.dataset, ds.class_names[:3])
    )
    if not names:
        raise UsageError("--classes: no class given")
    classes = resolve_classes(names, ds.class_names, args.dataset)
    model, arch = load_model(ckpt, args.arch, ds.num_classes, args.family)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    probs = predict(model, ds.test_images, ds.mean, ds.std, device=device)
    panels, img = correlation(probs, ds.test_labels, classes, ds.class_names, args.image_index,
                              args.top_k)  # fmt: skip
    out = Path(args.out) if args.out else ckpt.parent / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"correlation_{args.dataset}_{arch}"
    csv_path, png_path = out / f"{stem}.csv", out / f"{stem}.png"
    csv_path.write_text(panels_csv(panels, ds.class_names), encoding="utf-8")
    title = f"Class correlation: {arch} on {args.dataset} ({ckpt.name})"
    panels_png(panels, ds.class_names, title, png_path, image=ds.test_images[img])
    for pan in panels:
        top = ", ".join(
            f"{ds.class_names[j]}{'*' if m else ''} {p:.3f}"
            for j, p, m in zip(pan.indices, pan.probs, pan.marked, strict=True)
        )
        print(f"({pan.label}) {pan.subject}: {top}")
    return [png_path, csv_path]


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="python -m rld.analyze", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "correlation",
        help="class correlation of a trained model (supplement Figure 1)",
        description="Mean softmax of chosen classes and of one image of the last class.",
    )
    c.add_argument("--checkpoint", required=True, help="student.pt / teacher checkpoint")
    c.add_argument("--arch", help="model name (default: the 'arch' stored in the checkpoint)")
    c.add_argument("--family", default="cifar", choices=["cifar", "imagenet"])
    c.add_argument("--dataset", default="cifar100", choices=["cifar100", "digits", "synthetic"])
    c.add_argument("--data-root", help="where the data set's files are (cifar100)")
    c.add_argument("--classes", help="comma-separated class names (default: leopard,television,"
                   "dinosaur for cifar100, 3,5,8 for digits)")  # fmt: skip
    c.add_argument("--image-index", type=natural, default=0,
                   help="which test image of the last class (default 0)")  # fmt: skip
    c.add_argument("--top-k", type=positive, default=10, help="bars per panel (default 10)")
    c.add_argument("--out", help="output directory (default: analysis/ beside the checkpoint)")
    c.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    c.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="data set setting, e.g. dataset.test_size=200 (repeatable)")  # fmt: skip
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.top_k < 1:
            raise UsageError("--top-k must be >= 1")
        written = run_correlation(args)
    except UsageError as exc:
        print(f"rld.analyze: error: {exc}", file=sys.stderr)
        return 2
    print("Wrote:")
    for p in written:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    from rld.cli import run

    sys.exit(run("rld.analyze", main))  # a user error (an unwritable --out, ...): one line, exit 2
