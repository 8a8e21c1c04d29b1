"""rld: Refined Logit Distillation (Sun et al., 2024) and its baselines, with Hydra sweeps.

A user's own package extends rld with the public decorators (`rld.registry` explains
plugins):

    import rld

    @rld.register_model("mynet", family="cifar")
    def mynet(num_classes): ...

    @rld.register_dataset("mydata")
    def load_mydata(cfg) -> rld.data.DataSet: ...

    @rld.register_distiller("mykd", point=("tau",))
    def mykd(logits_student, logits_teacher, target, *, tau: float = 4.0): ...
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# the decorators, imported on first use (`import rld` stays light)
_PUBLIC = {"register_model": "rld.models", "register_dataset": "rld.data.sources",
           "register_distiller": "rld.distillers"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'rld' has no attribute {name!r}")
    return getattr(import_module(_PUBLIC[name]), name)
