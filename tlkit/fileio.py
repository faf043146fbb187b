"""Atomic file writes and JSON reads shared by every writer (bottom of the import graph).

Every file tlkit writes goes through a temporary name in the same folder and is renamed
into place, so a kill or a full disk never leaves a half-written file where a good one is
expected. Nothing here imports TensorFlow or another tlkit module except ``errors``.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tlkit.errors import TlkitError


class DiskFullError(TlkitError, OSError):
    """The disk filled up while tlkit was writing; the previous good file is kept."""


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` through a temporary file in the same folder, then renames it.

    Raises:
        DiskFullError: the disk is full (``ENOSPC``); ``path`` keeps its previous content.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        _discard(tmp)
        if _is_disk_full(exc):
            raise DiskFullError(
                f"no space left on the device while writing {str(target)!r}; the previous version (if any) is kept. "
                "Free some space and run the same command again"
            ) from exc
        raise
    except BaseException:
        _discard(tmp)
        raise
    return target


def atomic_save(path: str | Path, save: Callable[[Path], object]) -> Path:
    """Runs ``save(tmp)`` on a temporary path beside ``path`` (same suffixes, as Keras requires
    ``.keras`` / ``.weights.h5``), then renames it into place; nothing half-written survives.

    Raises:
        DiskFullError: the disk filled up; ``path`` keeps its previous content.
    """
    target = Path(path)
    suffix = "".join(target.suffixes) if target.name.endswith(".weights.h5") else target.suffix
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    tmp = target.with_name(f".{stem}.partial-{os.getpid()}{suffix}")
    try:
        save(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        _discard(str(tmp))
        if _is_disk_full(exc):
            raise DiskFullError(
                f"no space left on the device while writing {str(target)!r}; the previous version (if any) is "
                "kept. Free some space and run the same command again"
            ) from exc
        raise
    return target


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value: Any, indent: int | None = 1) -> Path:
    """``value`` as JSON at ``path``, atomically (strict JSON: NaN/Inf are refused)."""
    return atomic_write_text(path, json.dumps(value, indent=indent, allow_nan=False))


def read_json(path: str | Path, default: Any = None) -> Any:
    """The JSON value in ``path``; ``default`` when the file does not exist (when given)."""
    file = Path(path)
    if default is not None and not file.is_file():
        return default
    return json.loads(file.read_text(encoding="utf-8"))


def versions() -> dict[str, str]:
    """Versions of tlkit and its stack, for run.json and export metadata."""
    import keras
    import numpy
    import tensorflow as tf

    from tlkit import __version__

    return {"tlkit": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, also when a library (h5py, Keras) re-raised it as another error type."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass
