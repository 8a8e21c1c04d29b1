"""Benchmarks: ``python -m rld.bench {data,step,epoch,grid,sweep} [options]``.

Each subcommand is a module ``rld.bench.<name>`` with ``main(argv: list[str]) -> int``,
imported only when asked for.
"""

SUBCOMMANDS = {
    "data": "images/s of the input path: on-device CIFAR loader vs torchvision's DataLoader "
            "(--dataset imagenet: PIL workers vs decoding on the device)",
    "step": "time of one training step",
    "epoch": "time of one training epoch",
    "grid": "K grid points trained packed (one process, one teacher forward) against one "
            "after another",
    "sweep": "a 16-point grid sweep on a CPU-sized task without and with pruning: epochs, "
             "wall time, the best point of each",
}
