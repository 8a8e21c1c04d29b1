"""Benchmarks: ``python -m rld.bench {data,step,epoch} [options]``.

Each subcommand is a module ``rld.bench.<name>`` with ``main(argv: list[str]) -> int``,
imported only when asked for.
"""

SUBCOMMANDS = {
    "data": "images/s of the on-device CIFAR loader vs torchvision's DataLoader",
    "step": "time of one training step",
    "epoch": "time of one training epoch",
}
