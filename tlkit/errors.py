"""tlkit's exceptions.

Every error a user can cause is a :class:`TlkitError` whose message names the
offending value (a path, a backbone name, a handle) and says how to fix it.
"""

from __future__ import annotations


class TlkitError(Exception):
    """Base class of every error tlkit raises on purpose."""


class ConfigError(TlkitError):
    """A config file or argument is missing, malformed or contradictory."""


class BackboneNotFoundError(TlkitError):
    """A backbone name, handle or path that tlkit cannot resolve."""


class WeightsUnavailableError(TlkitError):
    """Pretrained weights cannot be obtained (offline, missing cache, missing package)."""


class IntegrityError(TlkitError):
    """A weights source or cache entry does not match its recorded sha256."""


class UnsafeCheckpointError(TlkitError):
    """A checkpoint tried to load a Python global outside the allowed set."""


class DataError(TlkitError):
    """A dataset problem: bad path, empty class folder, a single class, no readable file."""


class ExportError(TlkitError):
    """An export failed or did not reproduce the Keras model's outputs."""
