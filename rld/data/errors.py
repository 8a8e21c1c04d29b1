"""The one exception type of `rld.data` (kept free of heavy imports)."""

from __future__ import annotations


class DataError(ValueError):
    """A data set is missing, malformed or asked for with inconsistent settings."""
