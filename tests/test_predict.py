"""tlkit.predict and `tlkit predict`: one row per file, bad files are error rows, batches match one-by-one.

Models here are tiny Keras models saved as ``keras_model.keras`` with ``labels.txt`` /
``metadata.json`` beside them (what ``tlkit predict`` accepts besides run directories), so
no training is needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import keras
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tlkit.cli import main
from tlkit.data.audio import check_audio, fixed_crops
from tlkit.data.images import Example
from tlkit.errors import DataError
from tlkit.predict import (
    FilePrediction,
    KerasPredictor,
    audio_input,
    file_inputs,
    load_image,
    load_predictor,
    predict_file,
    predict_files,
)

RATE = 8000
IMAGE_LABELS = ["blue", "green", "red"]


def _image_model() -> keras.Model:
    """(B, H, W, 3) pixels 0..255 of any size -> (B, 3) probabilities."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def _audio_model() -> keras.Model:
    """(B, samples) waveform of any length -> (B, 2) probabilities (a NaN sample makes them NaN)."""
    inputs = keras.Input((None,))
    x = keras.layers.Reshape((-1, 1))(inputs)
    x = keras.layers.Conv1D(4, 9, strides=4, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))


@pytest.fixture(scope="module")
def image_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("image_model")
    keras.utils.set_random_seed(0)
    _image_model().save(folder / "keras_model.keras")
    (folder / "labels.txt").write_text("\n".join(IMAGE_LABELS) + "\n", encoding="utf-8")
    return folder / "keras_model.keras"


@pytest.fixture(scope="module")
def audio_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("audio_model")
    keras.utils.set_random_seed(0)
    _audio_model().save(folder / "keras_model.keras")
    metadata = {"labels": ["noise", "tone"], "modality": "audio", "sample_rate": RATE}
    (folder / "metadata.json").write_text(json.dumps(metadata), encoding="utf-8")
    return folder / "keras_model.keras"


def _png(path: Path, size: tuple[int, int], seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _wav(path: Path, samples: np.ndarray) -> Path:
    sf.write(str(path), np.asarray(samples, np.float32), RATE, subtype="FLOAT")
    return path


def _strict_json(text: str) -> object:
    """``json.loads`` that refuses NaN / Infinity (what other JSON parsers do)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def _tone(seconds: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return 0.3 * np.sin(2 * np.pi * 440 * t)


def test_nan_and_inf_audio_are_error_rows_and_json_is_strict(
    audio_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _wav(tmp_path / "good.wav", _tone())
    broken = _tone()
    broken[100] = np.nan
    nan = _wav(tmp_path / "nan.wav", broken)
    broken[100] = np.inf
    inf = _wav(tmp_path / "inf.wav", broken)
    assert np.isnan(sf.read(str(nan))[0]).any()  # the file really holds a NaN sample

    # Training skips the same file for the same reason.
    _, _, bad = check_audio([Example(str(nan), ("tone",))], RATE)
    assert bad and "NaN" in bad[0][1]

    capsys.readouterr()
    assert main(["predict", str(audio_model), str(good), str(nan), str(inf), "--json"]) == 1
    captured = capsys.readouterr()
    rows = _strict_json(captured.out)
    assert [r["file"] for r in rows] == [str(good), str(nan), str(inf)]
    assert rows[0]["error"] is None and rows[0]["top"][0][0] in ("noise", "tone")
    assert sum(p for _, p in rows[0]["top"]) == pytest.approx(1.0, abs=1e-5)
    for row in rows[1:]:
        assert row["top"] is None and "NaN or infinite samples" in row["error"]
    assert "2 of 3 file(s)" in captured.err

    # The table says the same, and a run of good files only exits 0.
    assert main(["predict", str(audio_model), str(nan), str(good)]) == 1
    table = capsys.readouterr().out
    assert "error: audio file" in table and not re.search(r"(noise|tone) (nan|inf)", table)
    assert main(["predict", str(audio_model), str(good)]) == 0


def test_a_model_that_returns_nan_gives_error_rows_never_numbers(tmp_path: Path) -> None:
    images = []
    for value in (10, 11, 12):  # solid images: the mean pixel is the value
        Image.new("RGB", (8, 8), (value,) * 3).save(tmp_path / f"{value}.png")
        images.append(tmp_path / f"{value}.png")

    class Broken:
        """Returns NaN for images whose mean pixel is odd (one-by-one predictor)."""

        def __init__(self) -> None:
            self.labels = ["a", "b"]

        def predict_one(self, example: np.ndarray) -> np.ndarray:
            return np.array([np.nan, 0.5]) if int(example.mean()) % 2 else np.array([0.25, 0.75])

    class BrokenBatch(Broken):
        def predict_batch(self, batch: np.ndarray) -> np.ndarray:
            return np.stack([self.predict_one(x) for x in batch])

    means = [int(load_image(f).mean()) % 2 for f in images]
    assert means == [0, 1, 0]
    for predictor in (Broken(), BrokenBatch()):
        results = predict_files(predictor, images)
        for result, odd in zip(results, means):
            if odd:
                assert result.probabilities is None and "NaN or infinite probabilities" in result.error
            else:
                np.testing.assert_allclose(result.probabilities, [0.25, 0.75])
        with pytest.raises(DataError, match="NaN or infinite"):
            predict_file(predictor, images[means.index(1)])


def test_one_unreadable_file_keeps_the_others(
    image_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = [_png(tmp_path / "a.png", (20, 20), 1), _png(tmp_path / "b.png", (20, 20), 2)]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    missing = tmp_path / "missing.jpg"
    audio = _wav(tmp_path / "clip.wav", _tone())
    files = [good[0], corrupt, missing, audio, good[1]]

    capsys.readouterr()
    assert main(["predict", str(image_model), *map(str, files), "--json"]) == 1
    rows = {r["file"]: r for r in _strict_json(capsys.readouterr().out)}
    assert list(rows) == [str(f) for f in files]
    for file in good:
        assert rows[str(file)]["error"] is None and len(rows[str(file)]["top"]) == 3
    assert "cannot read image" in rows[str(corrupt)]["error"]
    assert "cannot read image" in rows[str(missing)]["error"]
    assert "audio file, but the model takes images" in rows[str(audio)]["error"]

    # Table output: every file has a row, failures say why.
    assert main(["predict", str(image_model), *map(str, files), "--top-k", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(files)
    assert sum("error:" in line for line in lines) == 3


def test_batched_predictions_equal_one_by_one(image_model: Path, tmp_path: Path) -> None:
    """Same-size files go through the compiled function together; results equal eager per-file calls."""
    files = [_png(tmp_path / f"s{i}.png", (24, 24), i) for i in range(5)]
    files += [_png(tmp_path / f"l{i}.png", (30, 40), 10 + i) for i in range(3)]
    keras_model = keras.saving.load_model(image_model, compile=False)
    for predictor in (KerasPredictor(keras_model, IMAGE_LABELS), load_predictor(image_model)):
        calls: list[int] = []
        original = predictor.predict_batch

        def counted(batch: np.ndarray, original=original, calls=calls) -> np.ndarray:
            calls.append(len(batch))
            return original(batch)

        predictor.predict_batch = counted  # type: ignore[method-assign]
        results = predict_files(predictor, files, batch_size=4)
        assert all(isinstance(r, FilePrediction) and r.ok for r in results)
        assert sorted(calls) == [1, 3, 4]  # per chunk of 4 files: same-size groups, not one call per file
        expected = [predictor.predict_one(load_image(f)) for f in files]
        np.testing.assert_allclose([r.probabilities for r in results], expected, rtol=1e-5, atol=1e-6)


def test_audio_crops_are_batched_and_averaged(audio_model: Path, tmp_path: Path) -> None:
    keras_model = keras.saving.load_model(audio_model, compile=False)
    predictor = KerasPredictor(keras_model, ["noise", "tone"], sample_rate=RATE, clip_seconds=0.1, crops=3)
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, RATE // 2)
    files = [_wav(tmp_path / "tone.wav", _tone()), _wav(tmp_path / "noise.wav", noise),
             _wav(tmp_path / "short.wav", _tone(0.05))]  # shorter than a crop: zero-padded
    results = predict_files(predictor, files)
    contract = audio_input(predictor)
    for file, result in zip(files, results):
        crops = file_inputs(file, contract)  # the crops the model scores (at least the run's 3)
        assert crops.shape[0] >= 3 and crops.shape[1] == int(0.1 * RATE)
        np.testing.assert_array_equal(crops[:1], fixed_crops(sf.read(str(file), dtype="float32")[0], 800,
                                                             len(crops))[:1])
        expected = np.mean([predictor.predict_one(c) for c in crops], axis=0)
        np.testing.assert_allclose(result.probabilities, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(predict_file(predictor, file), result.probabilities, atol=1e-7)
    assert not np.allclose(results[0].probabilities, results[1].probabilities)
