"""tlkit.export: every format is written, reloads, matches the Keras model; failures leave nothing.

Also the format registry (a toy format registered through the public API is exported,
reloaded and parity-checked) and the clean-up of temporaries left by interrupted exports.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import tlkit.backbones as backbones
from tests.conftest import TINY_SIZE, tiny_spec, write_image_folder
from tlkit.artifacts import TFLitePredictor, labels_beside, load_exported_predictor
from tlkit.backbones.spec import AudioFrontend, BackboneSpec
from tlkit.cli import main
from tlkit.config import config_from_dict
from tlkit.errors import ConfigError, ExportError
from tlkit.export import (
    ExportContext,
    ExportFormat,
    ExportReport,
    ExportSource,
    export_run,
    get_format,
    list_formats,
    parity,
    quantize,
    register_format,
    tflite,
    unregister_format,
)
from tlkit.export.model_card import MODEL_CARD_FILE
from tlkit.run import load_run_model, train

FORMATS = [fmt.name for fmt in list_formats()]  # the built-in formats, in build order

SCHEDULE = {
    "stages": [
        {"name": "head", "epochs": 3, "learning_rate": 0.01},
        {"name": "top", "epochs": 1, "unfreeze": 1, "learning_rate": 0.001},
    ]
}


def _train_run(root: Path, name: str, backbone: dict[str, object], head: dict[str, object] | None = None) -> Path:
    cfg = config_from_dict({
        "name": name,
        "output_dir": str(root / name),
        "data": {"path": str(root / "images"), "batch_size": 16},
        "backbone": backbone,
        "head": head or {},
        "schedule": SCHEDULE,
        "training": {"verbose": 0},
    })
    return train(cfg).run_dir


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    write_image_folder(root / "images", n_per_class=20)  # 60 images: 18 held out for parity
    return root


@pytest.fixture(scope="module")
def run_dir(workspace: Path) -> Path:
    """A trained tiny run whose head weights dominate its size (so int8 shrinks it ~4x)."""
    spec = backbones.register(tiny_spec(), overwrite=True)
    try:
        yield _train_run(workspace, "tiny", {"name": "tiny_test"}, {"hidden_units": [256, 256]})
    finally:
        backbones.unregister(spec.name)


@pytest.fixture(scope="module")
def exported(run_dir: Path, workspace: Path) -> ExportReport:
    return export_run(run_dir, out=workspace / "models" / "tiny", parity_samples=50, calibration_samples=40)


def _images(run_dir: Path, split: str = "test") -> list[str]:
    raw = json.loads((run_dir / "splits.json").read_text(encoding="utf-8"))
    return [row["path"] for row in raw[split]]


def _listing(base: Path) -> list[str]:
    return sorted(p.name for p in base.iterdir())


def test_every_format_is_written_reloads_and_passes_parity(exported: ExportReport, run_dir: Path) -> None:
    out = Path(exported.out_dir)
    assert out.name == "1" and exported.version == 1
    assert [r.format for r in exported.results] == list(FORMATS)
    assert exported.skipped == {}
    print("\n" + exported.table())
    for result in exported.results:
        assert result.passed, result
        assert result.samples == 18 and exported.parity_split == "val+test"
        assert result.top1_agreement >= result.min_agreement
        assert (out / result.path).exists() and result.size_bytes > 0
        assert result.latency_ms > 0
    assert exported.result("savedmodel").max_abs_diff < 1e-5
    assert exported.result("keras").max_abs_diff < 1e-5
    assert exported.result("tflite-fp32").max_abs_diff < 1e-4
    assert exported.result("tflite-fp16").max_abs_diff < 1e-2
    assert exported.calibration_samples == 40
    # No temporary directory is left beside the version.
    assert _listing(out.parent) == ["1"]

    meta = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    assert meta["labels"] == ["blue", "green", "red"]
    assert (out / "labels.txt").read_text(encoding="utf-8").split() == meta["labels"]
    assert set(meta["artifacts"]) == set(FORMATS)
    assert meta["artifacts"]["savedmodel"]["input"] == {
        "name": "image", "dtype": "uint8", "shape": [None, None, None, None], "range": [0, 255],
        "channels": [1, 2, 3, 4],
        "layout": "channels last: grey, grey+alpha, RGB or RGBA (alpha dropped, grey repeated), any height and "
                  "width (resized inside the model)",
    }
    assert meta["artifacts"]["keras"]["input"]["shape"] == [None, None, None, 3]
    assert meta["artifacts"]["tflite-int8"]["input"]["shape"] == [1, TINY_SIZE, TINY_SIZE, 3]
    assert meta["artifacts"]["tflite-fp32"]["parity"]["top1_agreement"] >= 0.99
    # Quantized formats are bias-corrected on the calibration examples; the float ones are not.
    for fmt in ("tflite-dynamic", "tflite-int8"):
        assert meta["artifacts"][fmt]["bias_correction"]["examples"] == 40
        assert meta["artifacts"][fmt]["bias_correction"]["layers"] >= 1
        assert "bias correction:" in exported.result(fmt).notes
    assert "bias_correction" not in meta["artifacts"]["tflite-fp32"]
    assert {"tensorflow", "keras", "tlkit"} <= set(meta["versions"])
    assert meta["source_run"]["path"] == str(run_dir.resolve()) and meta["created"]
    saved = json.loads((out / "export_report.json").read_text(encoding="utf-8"))
    assert saved["version"] == 1 and len(saved["results"]) == len(FORMATS)

    # Each artifact reloads through the public loader and reproduces the Keras model.
    model, labels = load_run_model(run_dir)
    image = tf.io.decode_image(tf.io.read_file(_images(run_dir)[0]), channels=3).numpy().astype(np.float32)
    expected = model(image[None], training=False).numpy()[0]
    for result in exported.results:
        target = out if result.format == "savedmodel" else out / result.path
        predictor = load_exported_predictor(target)
        assert predictor is not None and predictor.labels == labels
        got = predictor.predict_one(image)
        assert got.shape == (3,)
        tolerance = 0.05 if result.format in ("tflite-dynamic", "tflite-int8") else 1e-3
        np.testing.assert_allclose(got, expected, atol=tolerance)


def _rounded_like_the_converter(kernel: np.ndarray, keep: int) -> np.ndarray:
    """Symmetric per-output-channel int8 rounding, as TFLite does to weights."""
    axes = tuple(range(kernel.ndim - keep))
    scale = np.abs(kernel).max(axis=axes, keepdims=True) / 127.0
    return np.round(kernel / scale) * scale


def test_bias_correction_cancels_the_mean_error_of_int8_weights() -> None:
    """Conv->BN, depthwise->BN and Dense, in a nested model: rounded weights + correction keep the float mean."""
    rng = np.random.default_rng(0)
    inputs = keras.Input((6, 6, 3))
    conv = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")
    dw = keras.layers.DepthwiseConv2D(3, use_bias=False, name="dw")
    dense = keras.layers.Dense(5, name="dense")
    bn1 = keras.layers.BatchNormalization(name="bn1")
    bn2 = keras.layers.BatchNormalization(name="bn2")
    branches = [bn1(conv(inputs)), bn2(dw(inputs)), dense(keras.layers.Flatten()(inputs))]
    inner = keras.Model(inputs, branches, name="inner")
    outer_in = keras.Input((6, 6, 3))
    model = keras.Model(outer_in, inner(outer_in * 1.0), name="outer")
    for layer in (conv, dw, dense):
        layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype(np.float32))
    bn1.moving_variance.assign(np.full(4, 0.3, np.float32))
    examples = [rng.uniform(0.5, 1.5, size=(6, 6, 3)).astype(np.float32) for _ in range(20)]
    x = np.stack(examples)

    def means() -> list[np.ndarray]:
        return [np.asarray(y).reshape(-1, np.asarray(y).shape[-1]).mean(0) for y in model(x, training=False)]

    floats = means()
    before = [w.numpy() for w in model.weights]
    kernels = {layer.name: layer.kernel.numpy() for layer in (conv, dw, dense)}
    with quantize.bias_corrected(model, examples, 0) as count:
        assert count == 3
        conv.kernel.assign(_rounded_like_the_converter(kernels["conv"], 1))
        dw.kernel.assign(_rounded_like_the_converter(kernels["dw"], 2))
        dense.kernel.assign(_rounded_like_the_converter(kernels["dense"], 1))
        corrected = means()
        for layer in (conv, dw, dense):
            layer.kernel.assign(kernels[layer.name])
    for layer in (conv, dw, dense):
        layer.kernel.assign(_rounded_like_the_converter(kernels[layer.name], 2 if layer is dw else 1))
    uncorrected = means()
    for w, value in zip(model.weights, before):
        w.assign(value)
    for want, got, raw in zip(floats, corrected, uncorrected):
        assert np.abs(raw - want).max() > 1e-3  # the rounding does shift the mean ...
        np.testing.assert_allclose(got, want, atol=2e-5)  # ... and the correction takes the shift out
    # Only the BN means and the Dense bias moved inside the block, and they are back afterwards.
    with quantize.bias_corrected(model, examples, 0):
        moved = {w.path for w, b in zip(model.weights, before) if not np.array_equal(w.numpy(), b)}
    assert moved == {bn1.moving_mean.path, bn2.moving_mean.path, dense.bias.path}
    assert all(np.array_equal(w.numpy(), b) for w, b in zip(model.weights, before))
    # The dynamic-range converter leaves small tensors in float: so does the correction.
    assert quantize.bias_corrections(model, examples, 1024) == []


def test_disagreement_note_gives_the_keras_margins() -> None:
    want = np.array([[0.9, 0.1], [0.52, 0.48], [0.3, 0.7], [0.45, 0.55]], np.float32)
    have = np.array([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]], np.float32)
    note = parity.disagreement_note(want, have)
    assert note.startswith("2 disagreement(s)") and "by 0.040, 0.100" in note and "median lead" in note
    assert parity.disagreement_note(want, want) == ""


def test_bias_correction_can_be_turned_off(run_dir: Path, workspace: Path) -> None:
    report = export_run(run_dir, ["tflite-dynamic"], out=workspace / "models" / "plain", parity_samples=5,
                        calibration_samples=8, bias_correction=False)
    meta = json.loads((Path(report.out_dir) / "metadata.json").read_text(encoding="utf-8"))
    assert meta["artifacts"]["tflite-dynamic"]["bias_correction"] == "off"
    assert report.calibration_samples == 0  # nothing needed calibration examples


def test_a_failing_bias_correction_converts_uncorrected(
    run_dir: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("unexpected layer graph")

    monkeypatch.setattr(tflite, "bias_corrections", broken)
    report = export_run(run_dir, ["tflite-dynamic"], out=workspace / "models" / "uncorrected", parity_samples=5,
                        calibration_samples=8)
    assert report.passed
    meta = json.loads((Path(report.out_dir) / "metadata.json").read_text(encoding="utf-8"))
    assert meta["artifacts"]["tflite-dynamic"]["bias_correction"] == "not applied (RuntimeError: unexpected layer graph)"
    assert "bias correction not applied" in report.result("tflite-dynamic").notes


def test_int8_is_at_most_a_third_of_fp32(exported: ExportReport) -> None:
    fp32 = exported.result("tflite-fp32").size_bytes
    int8 = exported.result("tflite-int8").size_bytes
    assert int8 <= 0.35 * fp32, (int8, fp32)


def test_savedmodel_signature_takes_any_size_uint8_and_returns_label_names(
    exported: ExportReport, run_dir: Path
) -> None:
    loaded = tf.saved_model.load(exported.out_dir)
    serve = loaded.signatures["serving_default"]
    images = np.random.default_rng(1).integers(0, 256, size=(2, 57, 45, 3), dtype=np.uint8)
    assert (57, 45) != (TINY_SIZE, TINY_SIZE)
    outputs = serve(image=tf.constant(images))
    assert set(outputs) == {"probabilities", "labels", "scores"}
    probabilities = outputs["probabilities"].numpy()
    labels = outputs["labels"].numpy()
    scores = outputs["scores"].numpy()
    assert probabilities.shape == (2, 3) and labels.shape == (2, 3) and labels.dtype == object
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    names = ["blue", "green", "red"]
    for row in range(2):
        order = np.argsort(-probabilities[row])
        assert [v.decode() for v in labels[row]] == [names[i] for i in order]
        np.testing.assert_allclose(scores[row], probabilities[row][order], atol=1e-6)
    model, _ = load_run_model(run_dir)
    np.testing.assert_allclose(probabilities, model(images.astype(np.float32), training=False).numpy(), atol=1e-5)


def test_savedmodel_takes_grey_and_rgba_images_as_tlkit_predict_does(
    exported: ExportReport, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1 and 4 channels are made RGB inside the serving function, as `tlkit predict` decodes files."""
    from PIL import Image

    from tlkit.predict import load_image

    rng = np.random.default_rng(3)
    grey = tmp_path / "grey.png"
    Image.fromarray(rng.integers(0, 256, (30, 26), dtype=np.uint8), mode="L").save(grey)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(rng.integers(0, 256, (30, 26, 4), dtype=np.uint8), mode="RGBA").save(rgba)
    serve = tf.saved_model.load(exported.out_dir).signatures["serving_default"]
    model, _ = load_run_model(run_dir)
    for path, channels in ((grey, 1), (rgba, 4)):
        raw = tf.io.decode_png(tf.io.read_file(str(path)), channels=0).numpy()
        assert raw.shape == (30, 26, channels)
        want = model(load_image(path)[None], training=False).numpy()  # what `tlkit predict` feeds the model
        np.testing.assert_allclose(serve(image=tf.constant(raw[None]))["probabilities"].numpy(), want, atol=1e-5)
        np.testing.assert_allclose(load_exported_predictor(exported.out_dir).predict_one(raw), want[0], atol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="1 \\(grey\\), 2 .* or 4 \\(RGBA\\) channels"):
        serve(image=tf.zeros((1, 8, 8, 5), tf.uint8))
    capsys.readouterr()
    assert main(["predict", exported.out_dir, str(grey), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["error"] is None


def test_a_failed_format_is_left_out_and_the_rest_written(
    run_dir: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One conversion error and one parity miss: both named in one line each, exit 1, the rest kept."""
    base = workspace / "models" / "partial"
    original_convert, original_predict = tflite._convert, TFLitePredictor.predict_one

    def convert(source: ExportSource, options: tflite.TFLiteOptions, *rest: object) -> bytes:
        if options.float16:
            raise ExportError("TFLite conversion failed: ConverterError: 'tfl.toy' op is neither a custom op nor a "
                              "flex op\n<unknown>:0: note: see current operation: ...")
        return original_convert(source, options, *rest)

    monkeypatch.setattr(tflite, "_convert", convert)
    monkeypatch.setattr(TFLitePredictor, "predict_one", lambda self, x: np.roll(original_predict(self, x), 1))
    formats = "savedmodel,tflite-fp32,tflite-fp16"
    capsys.readouterr()
    assert main(["export", str(run_dir), "--formats", formats, "--out", str(base), "--parity-samples", "6"]) == 1
    captured = capsys.readouterr()
    lines = [line.strip() for line in captured.err.splitlines()]
    assert "tlkit: 2 format(s) failed" in lines[0]
    assert lines[1].startswith("tflite-fp32: top-1 agreement 0.000") and len(lines) == 3
    assert lines[2] == "tflite-fp16: TFLite conversion failed: ConverterError: 'tfl.toy' op is neither a custom op " \
                       "nor a flex op"
    assert "wrote" in captured.out and "FAILED" in captured.out and "failed tflite-fp16:" in captured.out
    out = base / "1"
    assert _listing(base) == ["1"]
    names = {p.name for p in out.iterdir()}
    assert {"saved_model.pb", "variables", "labels.txt", "metadata.json"} <= names
    assert not any(name.endswith(".tflite") or name.startswith(".") for name in names), names
    meta = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    assert set(meta["artifacts"]) == {"savedmodel"} and set(meta["failed"]) == {"tflite-fp32", "tflite-fp16"}
    assert load_exported_predictor(out) is not None
    # --strict: all or nothing; the Python API says the same through the report.
    assert main(["export", str(run_dir), "--formats", formats, "--out", str(base), "--strict"]) == 2
    assert "--strict: every format must pass" in capsys.readouterr().err and _listing(base) == ["1"]
    report = export_run(run_dir, formats, out=base, parity_samples=6)
    assert not report.passed and set(report.failed) == {"tflite-fp32", "tflite-fp16"}
    assert [r.format for r in report.results] == ["savedmodel", "tflite-fp32"] and _listing(base) == ["1", "2"]


def test_keras_artifact_loads_in_safe_mode(exported: ExportReport, run_dir: Path) -> None:
    import tlkit.layers  # noqa: F401

    path = Path(exported.out_dir) / exported.result("keras").path
    model = keras.saving.load_model(path, safe_mode=True)
    reference, _ = load_run_model(run_dir)
    x = np.random.default_rng(2).uniform(0, 255, size=(1, 40, 40, 3)).astype(np.float32)
    np.testing.assert_allclose(model(x, training=False), reference(x, training=False), atol=1e-6)


def test_broken_export_fails_clearly_and_leaves_no_version(run_dir: Path, workspace: Path) -> None:
    base = workspace / "models" / "broken"
    wrong = [np.zeros((20, 20, 3), np.float32)] * 4  # the model's fixed size is 32x32
    with pytest.raises(ExportError, match=r"representative example 0 has shape \(20, 20, 3\).*\(32, 32, 3\)"):
        export_run(run_dir, ["savedmodel", "tflite-int8"], out=base, representative_data=wrong)
    assert not base.exists()  # neither a version nor the temporary directory, nor an empty model folder


def test_parity_failure_fails_and_leaves_no_version(
    exported: ExportReport, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = Path(exported.out_dir).parent  # already holds version 1
    before = _listing(base)
    original = TFLitePredictor.predict_one
    # A converter bug in miniature: the exported model answers with its classes rotated.
    monkeypatch.setattr(TFLitePredictor, "predict_one", lambda self, x: np.roll(original(self, x), 1))
    with pytest.raises(ExportError, match="tflite-fp32: top-1 agreement 0.000 .* below 0.990") as info:
        export_run(run_dir, ["tflite-fp32"], out=base)
    assert "FAILED" in str(info.value)
    assert _listing(base) == before


def test_existing_version_is_never_overwritten(exported: ExportReport, run_dir: Path) -> None:
    first = Path(exported.out_dir)
    before = (first / "metadata.json").read_bytes()
    report = export_run(run_dir, ["tflite-fp32"], out=first.parent, parity_samples=5)
    assert report.version == 2 and Path(report.out_dir) == first.parent / "2"
    assert (first / "metadata.json").read_bytes() == before
    assert sorted(p.name for p in (first.parent / "2").iterdir()) == sorted([
        "export_report.json", "labels.txt", "metadata.json", "model_fp32.tflite", MODEL_CARD_FILE
    ])
    assert _listing(first.parent) == ["1", "2"]


def test_cli_predict_on_exported_savedmodel_and_tflite(
    exported: ExportReport, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _images(run_dir)[:2]
    out = Path(exported.out_dir)
    for target in (out, out / "model_fp32.tflite", out / "model_int8.tflite"):
        assert main(["predict", str(target), *files, "--json"]) == 0
        results = json.loads(capsys.readouterr().out)
        assert [r["file"] for r in results] == files
        for r in results:
            assert {label for label, _ in r["top"]} == {"blue", "green", "red"}
    assert main(["predict", str(out), files[0]]) == 0
    assert "top 1" in capsys.readouterr().out


def test_cli_export_default_location_and_errors(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run_dir), "--formats", "tflite-dynamic", "--parity-samples", "6",
                 "--min-agreement", "tflite-dynamic=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "tflite-dynamic" in printed and "max |dp|" in printed and "wrote" in printed
    assert (tmp_path / "saved_models" / "tiny" / "1" / "model_dynamic.tflite").is_file()
    assert main(["export", str(run_dir), "--formats", "coreml"]) == 2
    assert "unknown export format" in capsys.readouterr().err
    assert _listing(tmp_path / "saved_models" / "tiny") == ["1"]


def test_argument_errors(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="between 0 and 1"):
        export_run(run_dir, ["savedmodel"], out=tmp_path, min_agreement=1.5)
    with pytest.raises(ConfigError, match="unknown format"):
        export_run(run_dir, ["savedmodel"], out=tmp_path, min_agreement={"tflite": 0.5})
    with pytest.raises(ConfigError, match="not a finished tlkit run"):
        export_run(tmp_path, out=tmp_path / "x")
    assert load_exported_predictor(tmp_path) is None


def test_savedmodel_backbone_skips_keras_format(workspace: Path) -> None:
    """A TFSMLayer backbone cannot load in safe mode: .keras is skipped with a reason, the rest exports."""
    from tests.conftest import tiny_cnn

    backbone_dir = workspace / "tiny_savedmodel"
    tiny_cnn().export(str(backbone_dir), verbose=False)
    run = _train_run(workspace, "tiny_sm", {"name": str(backbone_dir), "image_size": TINY_SIZE})
    report = export_run(run, ["savedmodel", "keras", "tflite-fp32"], out=workspace / "models" / "tiny_sm",
                        parity_samples=6)
    assert [r.format for r in report.results] == ["savedmodel", "tflite-fp32"]
    assert "safe_mode=True" in report.skipped["keras"]
    assert all(r.passed for r in report.results)
    assert "skipped keras" in report.table()


def _tiny_audio_backbone(weights: str | None = None) -> keras.Model:
    inputs = keras.Input((None, 16))
    x = keras.layers.Conv1D(8, 3, activation="relu", name="block1_conv",
                            kernel_initializer=keras.initializers.GlorotUniform(seed=3))(inputs)
    return keras.Model(inputs, x, name="tiny_audio")


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def test_audio_model_exports_with_waveform_signature(tmp_path: Path) -> None:
    """An audio run (built by hand: `tlkit train` reads images only) exports with a waveform input."""
    from tlkit.model import build_classifier

    rate = 8000
    spec = BackboneSpec(
        name="tiny_audio_test", modality="audio", source="builder", location="tests", input_shape=(rate,),
        preprocessing=AudioFrontend(kind="log_mel", sample_rate=rate, n_fft=256, hop_length=128, n_mels=16),
        feature_dim=8, output="sequence", sample_rate=rate, builder=_tiny_audio_backbone,
    )
    run = tmp_path / "audio_run"
    run.mkdir()
    build_classifier(spec, 2, weights=None).save(run / "model.keras")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        label = ("high", "low")[i % 2]
        t = np.arange(rate + 400 * i) / rate
        tone = 0.3 * np.sin(2 * np.pi * (2000 if label == "high" else 300) * t) + 0.01 * rng.normal(size=t.shape)
        _write_wav(run / f"{i}.wav", tone, rate)
        rows.append({"path": str(run / f"{i}.wav"), "labels": [label], "group": None})
    (run / "labels.json").write_text(json.dumps(["high", "low"]), encoding="utf-8")
    (run / "splits.json").write_text(json.dumps(
        {"class_names": ["high", "low"], "train": rows[:4], "val": rows[4:6], "test": rows[6:]}
    ), encoding="utf-8")
    (run / "config.json").write_text(json.dumps(
        {"name": "audio", "data": {"path": str(run), "clip_seconds": 1.0}, "backbone": {"name": spec.name}}
    ), encoding="utf-8")
    (run / "run.json").write_text(json.dumps({"status": "complete", "backbone": spec.name}), encoding="utf-8")

    report = export_run(run, ["savedmodel", "tflite-fp32", "tflite-int8"], out=tmp_path / "models")
    assert all(r.passed for r in report.results) and len(report.results) == 3
    meta = json.loads((Path(report.out_dir) / "metadata.json").read_text(encoding="utf-8"))
    assert meta["artifacts"]["savedmodel"]["input"]["name"] == "waveform"
    assert meta["artifacts"]["savedmodel"]["input"]["sample_rate"] == rate
    assert meta["artifacts"]["tflite-fp32"]["input"]["shape"] == [1, rate]
    serve = tf.saved_model.load(report.out_dir).signatures["serving_default"]
    outputs = serve(waveform=tf.zeros((3, 5000), tf.float32))
    assert outputs["probabilities"].shape == (3, 2) and outputs["labels"].shape == (3, 2)
    assert {v.decode() for v in outputs["labels"].numpy().ravel()} == {"high", "low"}


# --------------------------------------------------------------------------- the format registry


@dataclass
class _NpzPredictor:
    """The toy format's reloaded artifact: a fresh copy of the architecture with the file's weights."""

    labels: list[str]
    model: keras.Model

    def predict_one(self, example: np.ndarray) -> np.ndarray:
        return np.asarray(self.model(np.asarray(example, np.float32)[None], training=False))[0]


def _write_npz(fmt: ExportFormat, source: ExportSource, directory: Path, context: ExportContext) -> dict[str, object]:
    np.savez(directory / fmt.file, *[w.numpy() for w in source.model.weights])
    return {"input": source.raw_input_spec("float32"), "quantization": fmt.quantization}


def _reload_npz(fmt: ExportFormat, path: Path, source: ExportSource) -> _NpzPredictor:
    model = keras.models.clone_model(source.model)  # freshly initialised: every weight must come from the file
    with np.load(path) as data:
        model.set_weights([data[f"arr_{i}"] for i in range(len(data.files))])
    return _NpzPredictor(labels_beside(path), model)


def test_a_format_registered_through_the_public_registry_is_written_reloaded_and_checked(
    run_dir: Path, workspace: Path
) -> None:
    npz = ExportFormat(name="weights-npz", file="weights.npz", min_agreement=0.99,
                       quantization="none (float32 weights)", write=_write_npz, reload=_reload_npz)
    never = ExportFormat(name="never", file="never.bin", min_agreement=0.5, quantization="", write=_write_npz,
                         reload=_reload_npz, applies_to=lambda source: False, not_applicable="toy: never applies")
    assert register_format(npz) is npz and get_format("weights-npz") is npz
    register_format(never)
    try:
        assert [f.name for f in list_formats()][-2:] == ["weights-npz", "never"]
        with pytest.raises(ConfigError, match="already registered"):
            register_format(npz)
        report = export_run(run_dir, ["never", "weights-npz"], out=workspace / "models" / "npz", parity_samples=6)
        assert report.skipped == {"never": "toy: never applies"}
        result = report.result("weights-npz")
        assert result.passed and result.samples == 6 and result.max_abs_diff < 1e-5
        out = Path(report.out_dir)
        assert result.path == "weights.npz" and result.size_bytes == (out / "weights.npz").stat().st_size
        meta = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
        entry = meta["artifacts"]["weights-npz"]
        assert entry["path"] == "weights.npz" and entry["quantization"] == "none (float32 weights)"
        assert entry["parity"]["top1_agreement"] == 1.0 and entry["parity"]["min_agreement"] == 0.99
        assert set(meta["artifacts"]) == {"weights-npz"}
    finally:
        unregister_format("weights-npz")
        unregister_format("never")
    assert [f.name for f in list_formats()] == FORMATS
    with pytest.raises(ConfigError, match="unknown export format 'weights-npz'"):
        get_format("weights-npz")


def test_stale_temporaries_of_interrupted_exports_are_removed(run_dir: Path, workspace: Path) -> None:
    base = workspace / "models" / "stale"
    base.mkdir(parents=True)
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    host, me, gone = socket.gethostname(), os.getpid(), finished.pid
    stale = [
        f".tmp-export-{host}-{gone}-deadbeef",  # its process has exited
        f".tmp-export-{gone}-cafecafe",  # the same, named before the host was recorded
        f".tmp-export-{host}-{me}-0ld0ld00",  # a live PID (reused) but untouched for two hours
    ]
    kept = [
        f".tmp-export-{host}-{me}-11ve11ve",  # a running export
        f".tmp-export-other-host-{gone}-0e0e0e0e",  # another machine's (a shared disk), recent
    ]
    for name in stale + kept:
        (base / name).mkdir()
        (base / name / "labels.txt").write_text("a\n", encoding="utf-8")
    two_hours_ago = time.time() - 7200
    for path in (base / stale[2] / "labels.txt", base / stale[2]):
        os.utime(path, (two_hours_ago, two_hours_ago))
    report = export_run(run_dir, ["tflite-fp32"], out=base, parity_samples=5)
    assert _listing(base) == sorted(["1", *kept])
    note = next(n for n in report.notes if "interrupted exports" in n)
    assert note.startswith("removed 3 temporary folder(s)") and all(name in note for name in stale)
    meta = json.loads((Path(report.out_dir) / "metadata.json").read_text(encoding="utf-8"))
    assert note in meta["notes"] and f"note: {note}" in report.table()
    # Nothing stale left: the next export removes nothing and says nothing about it.
    again = export_run(run_dir, ["tflite-fp32"], out=base, parity_samples=5)
    assert not any("interrupted exports" in n for n in again.notes)
    assert _listing(base) == sorted(["1", "2", *kept])
