"""Distillers and their losses: the `Distiller` modules the engine trains, the pure loss
functions (`rld.distillers.losses`, `rld.distillers.feature_losses`), and the registry
`DISTILLERS` in which every distiller is declared once (`register_distiller`, exported as
`rld.register_distiller`; see `rld.distillers.base`).

Built in: `vanilla` (no teacher), the logit distillers `kd`, `dkd`, `rld`
(`rld.distillers.logit`), and the feature distillers of the paper's Figure 2 `fitnet`,
`ofd`, `reviewkd`, `crd` (`rld.distillers.feature`).
"""

from rld.distillers.base import (
    AT_LEAST_ONE,
    DISTILLERS,
    NON_NEGATIVE,
    POSITIVE,
    UNIT_INTERVAL,
    Check,
    DistillationWeights,
    Distiller,
    DistillerSpec,
    LossDistiller,
    NoSettings,
    Setting,
    Vanilla,
    build_distiller,
    check_pair,
    followed_settings,
    register_distiller,
    setting,
    setting_keys,
)

# the built-in distillers register themselves on import (in the tables' column order)
from rld.distillers import logit, feature  # noqa: E402, F401, I001  isort: skip

__all__ = [
    "AT_LEAST_ONE", "DISTILLERS", "NON_NEGATIVE", "POSITIVE", "UNIT_INTERVAL", "Check",
    "DistillationWeights", "Distiller", "DistillerSpec", "LossDistiller", "NoSettings",
    "Setting", "Vanilla", "build_distiller", "check_pair", "followed_settings",
    "register_distiller", "setting", "setting_keys",
]
