"""Where tlkit keeps downloaded and converted weights.

``TLKIT_CACHE`` wins; otherwise ``$KERAS_HOME/tlkit`` (``~/.keras/tlkit`` when
``KERAS_HOME`` is unset). TF-Hub keeps its own cache in ``TFHUB_CACHE_DIR``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def keras_home() -> Path:
    """``$KERAS_HOME`` or ``~/.keras`` (Keras's own rule)."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras").expanduser()


def cache_dir() -> Path:
    """tlkit's cache directory (created on demand by writers, not here)."""
    explicit = os.environ.get("TLKIT_CACHE")
    return Path(explicit).expanduser() if explicit else keras_home() / "tlkit"


def tfhub_cache_dir() -> Path:
    """TF-Hub's cache: ``$TFHUB_CACHE_DIR`` or ``<tmp>/tfhub_modules`` (tensorflow_hub's default)."""
    explicit = os.environ.get("TFHUB_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    import tempfile

    return Path(tempfile.gettempdir()) / "tfhub_modules"


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
