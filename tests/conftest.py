"""Shared fixtures (the helpers they use live in cli_helpers.py, importable by tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import SMALL, run_train


@pytest.fixture(scope="session")
def teacher_root(tmp_path_factory) -> Path:
    """A temp project root holding a trained `tiny` teacher for the synthetic set."""
    root = tmp_path_factory.mktemp("root")
    run_train(root, *SMALL, "distiller=vanilla", "role=teacher", "trainer.epochs=2")
    assert (root / "teachers/synthetic/resnet14_vanilla/teacher.pth").exists()
    return root
