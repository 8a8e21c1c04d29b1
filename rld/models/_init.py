"""Weight initialisation shared by the zoo models (only matters when training from scratch)."""

from torch import nn


def he_init(model: nn.Module, linear_std: float | None = None) -> None:
    """Conv: He normal over fan-out (``N(0, 2 / (k*k*out))``); BN: weight 1, bias 0.

    ``linear_std``: when given, linear weights ~ ``N(0, linear_std)`` and biases 0 (VGG,
    MobileNetV2 of the CRD zoo); otherwise PyTorch's default linear init is kept.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
