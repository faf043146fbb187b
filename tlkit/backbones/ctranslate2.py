"""Reads CTranslate2's ``model.bin`` with numpy alone (the ``ctranslate2`` package is not needed).

Layout (little-endian), as written by ``ctranslate2.specs.ModelSpec``:

- ``uint32`` binary version (1..6 understood),
- version >= 2: the spec name as a string and a ``uint32`` spec revision,
- ``uint32`` variable count, then per variable:
  name (string), ``uint8`` rank, ``rank x uint32`` dims,
  version >= 4: ``uint8`` dtype id into ``[float32, int8, int16, int32, float16, bfloat16]``
  and ``uint32`` byte count; older: ``uint8`` item size and ``uint32`` element count;
  then the raw bytes,
- version >= 3: ``uint32`` alias count, then per alias two strings (alias, target).

A string is a ``uint16`` length that counts a trailing NUL, then the UTF-8 bytes and the NUL.
Nothing is unpickled or executed: the format is plain data.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlkit.errors import WeightsUnavailableError

__all__ = ["CTranslate2Model", "load_ctranslate2_model", "load_ctranslate2_variables", "CT2_DTYPES"]

#: dtype id -> numpy dtype. bfloat16 (id 5) is read as uint16 and widened to float32.
CT2_DTYPES: tuple[np.dtype, ...] = (
    np.dtype("<f4"),
    np.dtype("i1"),
    np.dtype("<i2"),
    np.dtype("<i4"),
    np.dtype("<f2"),
    np.dtype("<u2"),
)
_BFLOAT16_ID = 5
# Binary versions < 4 store an item size instead of a dtype id.
_ITEM_SIZE_DTYPES: dict[int, np.dtype] = {4: np.dtype("<f4"), 2: np.dtype("<i2"), 1: np.dtype("i1")}
MAX_BINARY_VERSION = 6


@dataclass
class CTranslate2Model:
    """The parsed content of a ``model.bin``.

    Attributes:
        binary_version: the file's format version.
        spec_name: e.g. ``"WhisperSpec"`` (empty for version 1 files).
        revision: the spec revision.
        variables: ``{name: array}`` as stored (float16 stays float16; bfloat16 is
            widened to float32 because numpy has no bfloat16).
        aliases: ``{alias: target variable name}``.
    """

    binary_version: int
    spec_name: str
    revision: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


class _Reader:
    def __init__(self, data: bytes, source: str) -> None:
        self.data = data
        self.pos = 0
        self.source = source

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise WeightsUnavailableError(
                f"CTranslate2 model {self.source!r} is truncated or corrupt (wanted {n} bytes at offset "
                f"{self.pos} of {len(self.data)}); reinstall the package that ships it"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        length = self.unpack("H")
        raw = self.take(length)
        return raw.rstrip(b"\x00").decode("utf-8")


def load_ctranslate2_model(path: str | os.PathLike[str]) -> CTranslate2Model:
    """Parses a CTranslate2 ``model.bin`` (or the directory holding it).

    Returns:
        A :class:`CTranslate2Model`; arrays are read-only-safe copies with the stored shapes.

    Raises:
        WeightsUnavailableError: the file is missing, truncated, of an unknown binary
            version or uses an unknown dtype id.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    source = str(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"CTranslate2 model file {source!r} does not exist; check the path")
    reader = _Reader(path.read_bytes(), source)
    version = reader.unpack("I")
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise WeightsUnavailableError(
            f"CTranslate2 model {source!r} has binary version {version}; this reader understands "
            f"1..{MAX_BINARY_VERSION} (is it a model.bin at all?)"
        )
    spec_name, revision = "", 1
    if version >= 2:
        spec_name = reader.string()
        revision = reader.unpack("I")
    model = CTranslate2Model(version, spec_name, revision)
    for _ in range(reader.unpack("I")):
        name = reader.string()
        rank = reader.unpack("B")
        shape = tuple(reader.unpack("I") for _ in range(rank))
        if version >= 4:
            dtype_id = reader.unpack("B")
            if dtype_id >= len(CT2_DTYPES):
                raise WeightsUnavailableError(
                    f"CTranslate2 model {source!r}: variable {name!r} has unknown dtype id {dtype_id}"
                )
            dtype = CT2_DTYPES[dtype_id]
            num_bytes = reader.unpack("I")
        else:
            item_size = reader.unpack("B")
            if item_size not in _ITEM_SIZE_DTYPES:
                raise WeightsUnavailableError(
                    f"CTranslate2 model {source!r}: variable {name!r} has unknown item size {item_size}"
                )
            dtype_id = -1
            dtype = _ITEM_SIZE_DTYPES[item_size]
            num_bytes = reader.unpack("I") * item_size
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if num_bytes != count * dtype.itemsize:
            raise WeightsUnavailableError(
                f"CTranslate2 model {source!r}: variable {name!r} has shape {shape} of {dtype} but "
                f"{num_bytes} bytes"
            )
        array = np.frombuffer(reader.take(num_bytes), dtype=dtype).reshape(shape).copy()
        if dtype_id == _BFLOAT16_ID:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        model.variables[name] = array
    if version >= 3:
        for _ in range(reader.unpack("I")):
            alias = reader.string()
            model.aliases[alias] = reader.string()
    return model


def load_ctranslate2_variables(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads every variable of a CTranslate2 ``model.bin``, aliases resolved.

    Args:
        path: the ``model.bin`` file or its directory.

    Returns:
        ``{name: array}`` with the stored shapes. Dtypes are kept as stored
        (float16 stays float16: upcast with ``.astype(np.float32)`` where needed;
        the converters do that when they assign Keras weights), except bfloat16,
        which becomes float32. Each alias appears as its own key holding the same
        array object as its target.

    Raises:
        WeightsUnavailableError: unreadable file, or an alias naming a missing variable.
    """
    model = load_ctranslate2_model(path)
    out = dict(model.variables)
    for alias, target in model.aliases.items():
        seen = {alias}
        while target in model.aliases and target not in out:  # alias of an alias
            if target in seen:
                raise WeightsUnavailableError(f"CTranslate2 model {str(path)!r}: alias cycle through {target!r}")
            seen.add(target)
            target = model.aliases[target]
        if target not in out:
            raise WeightsUnavailableError(
                f"CTranslate2 model {str(path)!r}: alias {alias!r} names missing variable {target!r}"
            )
        out[alias] = out[target]
    return out
