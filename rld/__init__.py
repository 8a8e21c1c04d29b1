"""rld: Refined Logit Distillation (Sun et al., 2024) and its baselines, with Hydra sweeps."""

__version__ = "0.1.0"
