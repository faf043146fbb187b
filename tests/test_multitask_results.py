"""Multi-task results (issue #19): every export, ``tlkit evaluate`` and ``tlkit predict`` per task.

Two runs: a hand-built one (an untrained two-head functional model written through RunDir, so
its probabilities are far from 0/1 and parity means something; its tasks ``zeta`` and ``alpha``
are declared out of alphabetical order, which Keras's sorted outputs must not mix up; some test
rows lack ``alpha``'s label), the session fixture ``multitask_run`` that ``tlkit train``
fine-tuned (tasks ``colour`` and multi-label ``tags``), and a hand-built two-task audio run
(clips of any length scored window by window in every artifact).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.audio_fixtures import write_audio
from tests.conftest import colour_images, multitask_config
from tlkit.artifacts import LABELS_FILE, METADATA_FILE, load_exported_predictor
from tlkit.cli import main
from tlkit.config import config_from_dict
from tlkit.data.images import Example, Splits
from tlkit.data.listing import TaskColumn
from tlkit.errors import ConfigError
from tlkit.evaluation import compute_metrics, evaluate_run
from tlkit.export import ExportFormat, export_run, register_format, unregister_format
from tlkit.export.model_card import MODEL_CARD_FILE
from tlkit.export.multitask import match_outputs, task_parity
from tlkit.predict import KerasPredictor, load_predictor, predict_files
from tlkit.rundir import RunDir
from tlkit.task_outputs import TaskLayout

ZETA = ["red", "green", "blue"]  # the dominant colour channel
ALPHA = ["dark", "bright"]  # the mean pixel value
SIZE = 24


def _handmade_model() -> keras.Model:
    """Raw pixels (any size) -> resize -> rescale -> conv -> pooling -> heads ``zeta`` and ``alpha``.

    Declared zeta first; Keras sorts dict outputs, so ``model.output_names`` is ``[alpha, zeta]``.
    The large weights make the probabilities spread out (an untrained model would sit at 1/C).
    """
    init = keras.initializers.RandomNormal(stddev=1.5, seed=3)
    inputs = keras.Input((None, None, 3), name="image")
    x = keras.layers.Resizing(SIZE, SIZE, name="resize")(inputs)
    x = keras.layers.Rescaling(1 / 255.0, name="preprocess")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", kernel_initializer=init, name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = {}
    for task, classes in (("zeta", ZETA), ("alpha", ALPHA)):
        logits = keras.layers.Dense(len(classes), kernel_initializer=init, name=f"{task}_logits")(x)
        outputs[task] = keras.layers.Activation("softmax", dtype="float32", name=task)(logits)
    return keras.Model(inputs, outputs, name="handmade")


@pytest.fixture(scope="module")
def handmade_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished multi-task run directory written by hand through RunDir's writers.

    Images of different sizes; ``alpha`` is missing on every third row (never on the first).
    """
    root = tmp_path_factory.mktemp("handmade")
    data = root / "data"
    data.mkdir()
    images, colours = colour_images(n_per_class=8, size=40, seed=5)
    examples = []
    lines = ["path,task:zeta,task:alpha"]
    for i, (img, colour) in enumerate(zip(images, colours)):
        size = (40 + 4 * (i % 3), 40)  # several sizes: the SavedModel resizes inside
        path = data / f"{i:03d}.png"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).resize(size).save(path)
        zeta = ZETA[int(colour)]
        alpha = () if i % 3 == 2 else (ALPHA[int(img.mean() > 95)],)
        examples.append(Example(str(path), (zeta,), None, (("zeta", (zeta,)), ("alpha", alpha))))
        lines.append(f"{path.name},{zeta},{alpha[0] if alpha else ''}")
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    run = RunDir(root / "run")
    run.ensure_writable()
    raw = multitask_config(root, data / "labels.csv", name="handmade")
    raw["tasks"] = {"zeta": {"column": "task:zeta"}, "alpha": {"column": "task:alpha"}}
    run.write_config(config_from_dict(raw))
    tasks = (TaskColumn("zeta", "task:zeta", classes=tuple(ZETA)), TaskColumn("alpha", "task:alpha", classes=tuple(ALPHA)))
    run.write_data(Splits([], examples[:8], examples[8:14], examples[14:], tasks=tasks))
    _handmade_model().save(run.file(RunDir.MODEL))
    run.write_status({"status": "complete", "backbone": "handmade", "modality": "image", "image_size": [SIZE, SIZE],
                      "tasks": [{"name": "zeta", "multi_label": False}, {"name": "alpha", "multi_label": False}]})
    return run.path


@pytest.fixture(scope="module")
def handmade_export(handmade_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    out = tmp_path_factory.mktemp("handmade_export")
    report = export_run(handmade_run, formats="savedmodel,keras,tflite-fp32,tflite-fp16,onnx", out=out,
                        parity_samples=16)
    return report, Path(report.out_dir)


def _held_out(run_dir: Path) -> list[Example]:
    run = RunDir(run_dir)
    return run.split("val") + run.split("test")


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.uint8)


def test_layout_splits_and_joins_in_task_order_not_keras_order(handmade_run: Path) -> None:
    run = RunDir(handmade_run)
    model = run.load_model(compile=False)
    assert model.output_names == ["alpha", "zeta"]  # Keras sorts; the run's order is zeta, alpha
    predictor = load_predictor(handmade_run)
    assert isinstance(predictor, KerasPredictor) and predictor.tasks is not None
    assert predictor.tasks.names == ["zeta", "alpha"]
    assert predictor.labels == [f"zeta:{c}" for c in ZETA] + [f"alpha:{c}" for c in ALPHA]
    x = _pixels(_held_out(handmade_run)[0].path).astype(np.float32)
    want = model(x[None], training=False)
    parts = predictor.tasks.split(predictor.predict_one(x))
    for task in ("zeta", "alpha"):
        np.testing.assert_allclose(parts[task], np.asarray(want[task])[0], atol=1e-6)
    layout = TaskLayout.from_metadata({"tasks": predictor.tasks.to_metadata()})
    assert layout == predictor.tasks


def test_savedmodel_has_outputs_per_task_and_matches_keras_without_tlkit(
    handmade_export: tuple[object, Path], handmade_run: Path, tmp_path: Path
) -> None:
    report, version = handmade_export
    assert report.result("savedmodel").passed  # type: ignore[attr-defined]
    model = RunDir(handmade_run).load_model(compile=False)
    examples = _held_out(handmade_run)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, *[_pixels(e.path) for e in examples])
    outputs = tmp_path / "outputs.npz"
    script = f"""
import sys, numpy as np, tensorflow as tf
loaded = tf.saved_model.load({str(version)!r})
fn = loaded.signatures["serving_default"]
names = sorted(fn.structured_outputs)
got = {{}}
with np.load({str(inputs)!r}) as data:
    for i, key in enumerate(sorted(data.files, key=lambda k: int(k.split("_")[1]))):
        out = fn(image=tf.constant(data[key][None]))
        for name in names:
            value = out[name].numpy()
            got[f"{{i}}/{{name}}"] = value.astype("S") if value.dtype.kind == "O" else value  # label strings
np.savez({str(outputs)!r}, **got)
assert not any(name == "tlkit" or name.startswith("tlkit.") for name in sys.modules), "tlkit was imported"
print(",".join(names))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    names = done.stdout.strip().splitlines()[-1].split(",")
    assert sorted(names) == sorted(f"{t}_{kind}" for t in ("zeta", "alpha") for kind in ("probabilities", "labels",
                                                                                            "scores"))
    got = np.load(outputs)
    for i, example in enumerate(examples):
        want = model(_pixels(example.path).astype(np.float32)[None], training=False)
        for task, classes in (("zeta", ZETA), ("alpha", ALPHA)):
            expected = np.asarray(want[task])[0]
            probabilities = got[f"{i}/{task}_probabilities"][0]
            assert probabilities.shape == (len(classes),)
            np.testing.assert_allclose(probabilities, expected, atol=1e-5)
            assert probabilities.argmax() == expected.argmax()
            assert got[f"{i}/{task}_labels"][0][0].decode() == classes[int(expected.argmax())]
            np.testing.assert_allclose(got[f"{i}/{task}_scores"][0][0], expected.max(), atol=1e-5)


def test_tflite_outputs_are_read_by_name_per_task_and_agree(handmade_export: tuple[object, Path],
                                                            handmade_run: Path) -> None:
    report, version = handmade_export
    meta = json.loads((version / METADATA_FILE).read_text())
    entry = meta["artifacts"]["tflite-fp32"]
    assert {t: o["name"] for t, o in entry["outputs"].items()} == {"zeta": "zeta_probabilities",
                                                                   "alpha": "alpha_probabilities"}
    assert entry["outputs"]["zeta"]["shape"] == [1, 3] and entry["outputs"]["alpha"]["shape"] == [1, 2]
    model = RunDir(handmade_run).load_model(compile=False)
    for file in ("model_fp32.tflite", "model_fp16.tflite"):
        predictor = load_exported_predictor(version / file)
        assert predictor is not None and predictor.tasks is not None
        for example in _held_out(handmade_run):
            x = predictor.prepare(_pixels(example.path).astype(np.float32))
            want = model(np.asarray(x, np.float32)[None], training=False)
            got = predictor.tasks.split(predictor.predict_one(x))
            for task in ("zeta", "alpha"):
                expected = np.asarray(want[task])[0]
                assert got[task].argmax() == expected.argmax(), (file, task)
                np.testing.assert_allclose(got[task], expected, atol=1e-5 if "fp32" in file else 1e-2)
    for fmt in ("tflite-fp32", "tflite-fp16"):
        result = report.result(fmt)  # type: ignore[attr-defined]
        assert result.passed and set(result.tasks) == {"zeta", "alpha"}
        assert all(v["top1_agreement"] == 1.0 for v in result.tasks.values())


def test_metadata_and_labels_list_every_task(handmade_export: tuple[object, Path], handmade_run: Path,
                                            tmp_path: Path) -> None:
    report, version = handmade_export
    meta = json.loads((version / METADATA_FILE).read_text())
    assert meta["tasks"] == {"zeta": {"labels": ZETA, "multi_label": False},
                             "alpha": {"labels": ALPHA, "multi_label": False}}
    assert list(meta["tasks"]) == ["zeta", "alpha"]
    assert (version / LABELS_FILE).read_text().splitlines() == [f"zeta:{c}" for c in ZETA] + [f"alpha:{c}" for c in ALPHA]
    for name in ("savedmodel", "keras", "tflite-fp32"):
        assert set(meta["artifacts"][name]["parity"]["tasks"]) == {"zeta", "alpha"}, name
    saved = json.loads((version / "export_report.json").read_text())
    assert all(set(r["tasks"]) == {"zeta", "alpha"} for r in saved["results"])
    if "onnx" in meta["artifacts"]:  # the optional extra is installed: one graph output per task
        assert set(meta["artifacts"]["onnx"]["outputs"]) == {"zeta", "alpha"}
        assert report.result("onnx").passed  # type: ignore[attr-defined]
        alone = tmp_path / "model.onnx"  # copied without metadata.json: the file names its tasks itself
        alone.write_bytes((version / "model.onnx").read_bytes())
        copied, beside = load_exported_predictor(alone), load_exported_predictor(version / "model.onnx")
        assert copied is not None and copied.tasks == beside.tasks and copied.tasks.names == ["zeta", "alpha"]
        x = _pixels(_held_out(handmade_run)[0].path).astype(np.float32)
        np.testing.assert_allclose(copied.predict_one(x), beside.predict_one(x), atol=1e-6)
    card = (version / MODEL_CARD_FILE).read_text()
    assert "| `zeta` | 0 | red |" in card and "| `alpha` | 1 | bright |" in card
    assert "alpha:(missing)" in card  # rows without alpha's label are counted as such


@pytest.fixture
def swapped_format() -> str:
    """A format whose reloaded predictor reverses task ``alpha``'s probabilities (zeta stays right)."""

    def write(fmt: ExportFormat, source: object, directory: Path, context: object) -> dict[str, object]:
        (directory / fmt.file).write_text("reuses the Keras model")
        return {}

    def reload(fmt: ExportFormat, path: Path, source: object) -> object:
        inner = KerasPredictor(source.model, source.labels, tasks=source.tasks)  # type: ignore[attr-defined]
        layout = source.tasks  # type: ignore[attr-defined]

        class Swapped:
            labels = inner.labels

            def predict_one(self, example: np.ndarray) -> np.ndarray:
                parts = layout.split(inner.predict_one(example))
                parts["alpha"] = parts["alpha"][::-1]
                return layout.join(parts)

        return Swapped()

    register_format(ExportFormat(name="swapped-alpha", file="swapped.txt", min_agreement=0.9, quantization="",
                                 write=write, reload=reload))
    yield "swapped-alpha"
    unregister_format("swapped-alpha")


def test_parity_fails_when_one_task_disagrees(handmade_run: Path, tmp_path: Path, swapped_format: str) -> None:
    report = export_run(handmade_run, formats=f"savedmodel,{swapped_format}", out=tmp_path, parity_samples=16)
    assert swapped_format in report.failed and "savedmodel" not in report.failed
    result = report.result(swapped_format)
    assert result.tasks["zeta"]["top1_agreement"] == 1.0
    assert result.tasks["alpha"]["top1_agreement"] < 0.9
    assert result.top1_agreement == result.tasks["alpha"]["top1_agreement"] and not result.passed


def test_match_outputs_by_name_then_by_value() -> None:
    want = {"a": np.array([[0.9, 0.1]]), "b": np.array([[0.2, 0.8]]), "c": np.array([[0.1, 0.2, 0.7]])}
    got = {"out_0": np.array([[0.21, 0.79]]), "out_1": np.array([[0.88, 0.12]]), "c_probabilities": want["c"]}
    assert match_outputs(got, want) == {"a": "out_1", "b": "out_0", "c": "c_probabilities"}
    layout = TaskLayout.from_labels({"a": ["x", "y"], "b": ["u", "v"]})
    parity = task_parity(np.array([[0.9, 0.1, 0.2, 0.8]]), np.array([[0.8, 0.2, 0.7, 0.3]]), layout)
    assert parity["a"]["top1_agreement"] == 1.0 and parity["b"]["top1_agreement"] == 0.0


def test_evaluate_scores_each_task_on_its_labelled_test_rows_only(handmade_run: Path, tmp_path: Path) -> None:
    report = evaluate_run(handmade_run, out=tmp_path / "eval", gradcam=0)
    test = RunDir(handmade_run).split("test")
    missing = [e for e in test if not e.task_labels("alpha")]
    assert missing and len(missing) < len(test)  # the fixture leaves some test rows without alpha
    metrics = json.loads(report.metrics_json.read_text())
    assert list(metrics["tasks"]) == ["zeta", "alpha"]
    assert metrics["tasks"]["zeta"]["count"] == len(test)
    assert metrics["tasks"]["alpha"]["count"] == len(test) - len(missing)
    assert metrics["tasks"]["alpha"]["data"]["missing"] == len(missing)
    # The same numbers from the labelled rows alone (the model's own predictions).
    model = RunDir(handmade_run).load_model(compile=False)
    labelled = [e for e in test if e.task_labels("alpha")]
    probs = np.concatenate([np.asarray(model(_pixels(e.path).astype(np.float32)[None])["alpha"]) for e in labelled])
    truth = np.asarray([ALPHA.index(e.task_labels("alpha")[0]) for e in labelled])
    expected = compute_metrics(truth, probs, ALPHA)
    got = metrics["tasks"]["alpha"]
    assert got["accuracy"] == pytest.approx(expected["accuracy"])
    assert got["confusion_matrix"] == expected["confusion_matrix"]
    assert sum(v["support"] for v in got["per_class"].values()) == len(labelled)
    text = report.report.read_text()
    assert "## Task `zeta`" in text and "## Task `alpha`" in text
    assert f"{len(missing)} without a label for this task, not scored" in text
    assert (tmp_path / "eval" / "evaluation" / "alpha_confusion_matrix.png").is_file()
    assert report.misclassified_csv.read_text().splitlines()[0].startswith("task,path,")
    assert "alpha" in report.summary() and "zeta" in report.summary()


def test_evaluate_refuses_calibrate_on_a_multitask_run(handmade_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="calibrate"):
        evaluate_run(handmade_run, out=tmp_path / "eval", calibrate=True)


def test_predict_cli_prints_one_column_set_per_task(handmade_run: Path, handmade_export: tuple[object, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _, version = handmade_export
    files = [e.path for e in _held_out(handmade_run)[:3]]
    model = RunDir(handmade_run).load_model(compile=False)
    for target in (handmade_run, version, version / "model_fp32.tflite"):
        assert main(["predict", str(target), *files, "--top-k", "2"]) == 0
        header = capsys.readouterr().out.splitlines()[0]
        assert "zeta top 1" in header and "zeta top 2" in header and "alpha top 1" in header
        assert main(["predict", str(target), *files, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        for row, file in zip(rows, files):
            want = model(_pixels(file).astype(np.float32)[None], training=False)
            assert set(row["tasks"]) == {"zeta", "alpha"} and "top" not in row
            assert row["tasks"]["zeta"][0][0] == ZETA[int(np.asarray(want["zeta"]).argmax())]
            assert row["tasks"]["alpha"][0][0] == ALPHA[int(np.asarray(want["alpha"]).argmax())]


def test_trained_multitask_run_evaluates_exports_and_predicts(multitask_run: Path, tmp_path: Path) -> None:
    """MT's fine-tuned run end to end: per-task evaluation (a multi-label task included), export, predict."""
    run = RunDir(multitask_run)
    test = run.split("test")
    report = evaluate_run(multitask_run, out=tmp_path / "eval", gradcam=0)
    metrics = report.metrics["tasks"]
    for task in ("colour", "tags"):
        assert metrics[task]["count"] == sum(1 for e in test if e.task_labels(task))
        assert metrics[task]["data"]["missing"] == sum(1 for e in test if not e.task_labels(task))
    assert metrics["tags"]["task"] == "multilabel" and metrics["colour"]["task"] == "multiclass"
    exported = export_run(multitask_run, formats="savedmodel,tflite-fp32", out=tmp_path / "export")
    assert exported.passed
    meta = json.loads((Path(exported.out_dir) / METADATA_FILE).read_text())
    assert meta["tasks"]["tags"]["multi_label"] is True
    assert meta["tasks"]["colour"]["labels"] == run.task_labels()["colour"]  # type: ignore[index]
    files = [e.path for e in test[:4]]
    reference = predict_files(load_predictor(multitask_run), files)
    for target in (Path(exported.out_dir), Path(exported.out_dir) / "model_fp32.tflite"):
        got = predict_files(load_predictor(target), files)
        for want, have in zip(reference, got):
            assert want.probabilities is not None and have.probabilities is not None
            np.testing.assert_allclose(have.probabilities, want.probabilities, atol=1e-5)


def test_audio_multitask_run_exports_evaluates_and_scores_whole_clips(tmp_path: Path) -> None:
    """A hand-built two-task audio run (``tlkit train`` takes images only for multi-task runs):
    the SavedModel cuts each clip into windows and returns every task's clip score; TFLite and
    the evaluation score clips the same way."""
    rate, clip_seconds = 8000, 0.25
    init = keras.initializers.RandomNormal(stddev=2.0, seed=4)
    inputs = keras.Input((None,), name="waveform")
    x = keras.layers.Reshape((-1, 1))(inputs)
    x = keras.layers.Conv1D(4, 16, strides=8, activation="relu", kernel_initializer=init, name="conv")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = {t: keras.layers.Activation("softmax", dtype="float32", name=t)(
        keras.layers.Dense(2, kernel_initializer=init, name=f"{t}_logits")(x)) for t in ("pitch", "level")}
    run = RunDir(tmp_path / "audio_run")
    run.path.mkdir()
    keras.Model(inputs, outputs).save(run.file(RunDir.MODEL))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        pitch, level = ("high", "low")[i % 2], ("quiet", "loud")[(i // 2) % 2]
        t = np.arange(int(rate * (0.3 + 0.07 * i))) / rate
        tone = (0.1 if level == "quiet" else 0.6) * np.sin(2 * np.pi * (2500 if pitch == "high" else 200) * t)
        write_audio(run.path / f"{i}.wav", tone + 0.01 * rng.normal(size=t.shape), rate)
        rows.append({"path": str(run.path / f"{i}.wav"), "labels": [pitch], "group": None,
                     "tasks": {"pitch": [pitch], "level": [] if i == 9 else [level]}})
    order = {"pitch": ["high", "low"], "level": ["loud", "quiet"]}
    (run.file(RunDir.LABELS)).write_text(json.dumps({"tasks": order}))
    run.file(RunDir.SPLITS).write_text(json.dumps({"tasks": order, "train": rows[:4], "val": rows[4:6],
                                                   "test": rows[6:]}))
    run.file(RunDir.CONFIG).write_text(json.dumps({"name": "audio_mt", "data": {"manifest": "x.csv"},
                                                   "backbone": {"name": "handmade"}}))
    run.write_status({"status": "complete", "backbone": "handmade", "modality": "audio", "sample_rate": rate,
                      "clip_seconds": clip_seconds, "eval_crops": 2})

    report = export_run(run.path, "savedmodel,tflite-fp32", out=tmp_path / "models")
    assert report.passed and all(set(r.tasks) == {"pitch", "level"} for r in report.results)
    serve = tf.saved_model.load(report.out_dir).signatures["serving_default"]
    clips = np.stack([np.asarray(0.5 * np.sin(np.arange(6000) / 3.0), np.float32)] * 2)  # 0.75 s: 3 windows
    got = serve(waveform=tf.constant(clips))
    assert got["pitch_probabilities"].shape == (2, 2) and got["level_labels"].shape == (2, 2)
    predictor = load_predictor(run.path)
    want = predictor.tasks.split(predict_files(predictor, [rows[7]["path"]])[0].probabilities)
    exported = load_exported_predictor(Path(report.out_dir) / "model_fp32.tflite")
    have = exported.tasks.split(predict_files(exported, [rows[7]["path"]], target=exported.path)[0].probabilities)
    for task in ("pitch", "level"):
        np.testing.assert_allclose(have[task], want[task], atol=1e-5)
    metrics = evaluate_run(run.path, out=tmp_path / "eval").metrics["tasks"]
    assert metrics["pitch"]["count"] == 4 and metrics["level"]["count"] == 3
