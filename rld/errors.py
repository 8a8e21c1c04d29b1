"""The exception types a user can cause, in one leaf module (no imports of the package).

Every one is a `ValueError` whose message is one line naming the key, file or path at fault
and what is allowed; the command-line tools print it alone (no traceback) and exit with 2.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input in the configuration (a key, a value, a name that is not registered)."""


class RunError(ValueError):
    """A run cannot start or go on (missing teacher, busy or mismatched run directory, ...)."""


class DataError(ValueError):
    """A data set is missing, malformed or asked for with inconsistent settings."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


class RecordError(ValueError):
    """A run's record (`metrics.json`) that cannot be read (truncated, not JSON, not an
    object)."""
