"""Audio multi-task runs (tlkit.multitask with tlkit.data.audio): a manifest of clips with two label
columns trains one encoder with a head per task, on random crops, speakers kept whole, every clip
scored as the mean over its evaluation crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tlkit.backbones as backbones
import tlkit.multitask.train as multitask_train
from tests.audio_fixtures import (
    tiny_wave_encoder,
    tiny_wave_spec,
    write_multitask_speaker_dataset,
)
from tlkit.config import config_from_dict
from tlkit.data.audio import load_audio, load_audio_splits, predict_clips
from tlkit.data.listing import TaskColumn
from tlkit.errors import ConfigError, DataError
from tlkit.evaluation import evaluate_run
from tlkit.multitask.data import task_targets
from tlkit.multitask.manifest import resolve_tasks, task_columns
from tlkit.run import make_strategy, train
from tlkit.rundir import RunDir
from tlkit.task_outputs import TaskLayout

RATE = 8000
TASKS = (TaskColumn("band", "task:band"), TaskColumn("voice", "task:voice"))


def audio_config(tmp: Path, manifest: Path, backbone: str, **overrides: object) -> dict:
    raw: dict = {
        "name": "audio_multitask", "output_dir": str(tmp / "run"), "seed": 0,
        "data": {"manifest": str(manifest), "batch_size": 8, "val_fraction": 0.25, "test_fraction": 0.25,
                 "clip_seconds": 0.5, "eval_crops": 2},
        "backbone": {"name": backbone}, "augmentation": {"enabled": False},
        "schedule": {"stages": [{"name": "head", "epochs": 1},
                                {"name": "top", "epochs": 2, "unfreeze": 1, "learning_rate": 0.003}]},
        "training": {"verbose": 0},
    }
    raw.update(overrides)
    return raw


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A finished two-task audio run (``band``: low/high, ``voice``: a/b; some clips lack one label),
    the keyword arguments of every FeatureCache.build call it made, and per calibration call the
    layer it folds into and the number of rows it was fitted on."""
    tmp = tmp_path_factory.mktemp("audio_multitask")
    manifest = write_multitask_speaker_dataset(tmp / "data", speakers_per_class=4, clips_per_speaker=3,
                                               sample_rate=RATE)
    spec = backbones.register(tiny_wave_spec("tiny_audio_multitask", sample_rate=RATE), overwrite=True)
    calls: list[dict] = []
    build, calibrate = multitask_train.FeatureCache.build, multitask_train.calibrate_model

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(dict(kwargs))
        return build(*args, **kwargs)

    def calibrate_spy(model: object, targets: np.ndarray, probabilities: np.ndarray, **kwargs: object) -> object:
        calls.append({"layer_name": kwargs["layer_name"], "rows": len(targets), "probability_rows": len(probabilities)})
        return calibrate(model, targets, probabilities, **kwargs)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(multitask_train.FeatureCache, "build", spy)
            patch.setattr(multitask_train, "calibrate_model", calibrate_spy)
            result = train(config_from_dict(audio_config(tmp, manifest, spec.name)))
    finally:
        backbones.unregister(spec.name)
    return result.run_dir, calls


def test_audio_manifest_tasks_are_read_with_speakers_kept_whole(tmp_path: Path) -> None:
    manifest = write_multitask_speaker_dataset(tmp_path / "data", clips_per_speaker=3, sample_rate=RATE)
    splits = load_audio_splits(manifest=manifest, sample_rate=RATE, val_fraction=0.25, test_fraction=0.25,
                               tasks=TASKS)
    assert splits.class_names == [] and [(t.name, t.classes) for t in splits.tasks] == [
        ("band", ("high", "low")), ("voice", ("a", "b"))]
    examples = splits.train + splits.val + splits.test
    assert len(examples) == 24 and set(splits.waveforms) == {e.path for e in examples}
    assert any(e.task_labels("voice") == () for e in examples) and any(e.task_labels("band") == () for e in examples)
    speakers = [{e.group for e in part} for part in (splits.train, splits.val, splits.test)]
    assert all(speakers) and not (speakers[0] & speakers[1] or speakers[0] & speakers[2] or speakers[1] & speakers[2])
    with pytest.raises(ConfigError, match="manifest"):
        load_audio_splits(tmp_path / "data", sample_rate=RATE, tasks=TASKS)
    lines = manifest.read_text().splitlines()
    first = lines[1].split(",")
    (tmp_path / "data" / "bad.csv").write_text("\n".join([lines[0], f"{first[0]},,,{first[3]}", *lines[2:]]) + "\n")
    with pytest.raises(DataError, match="line 2: no label for any task"):
        load_audio_splits(manifest=tmp_path / "data" / "bad.csv", sample_rate=RATE, tasks=TASKS)


def test_audio_multitask_run_trains_in_two_stages_and_reloads(audio_run: tuple[Path, list[dict]]) -> None:
    run = RunDir(audio_run[0])
    history = run.history()
    assert [s["name"] for s in history["stages"]] == ["head", "top"]
    head, *top = history["epochs"]
    assert head["solver"] == "lbfgs" and {"band_loss", "voice_loss", "val_band_accuracy"} <= set(head)
    assert [r["epoch"] for r in top] == [2, 3]
    assert run.task_labels() == {"band": ["high", "low"], "voice": ["a", "b"]}
    status = run.status()
    assert (status["modality"], status["sample_rate"], status["eval_crops"]) == ("audio", RATE, 2)
    assert run.input_contract().clip_samples == RATE // 2
    splits = {name: run.split(name) for name in ("train", "val", "test")}
    tasks = {t["name"]: t for t in status["tasks"]}
    for name, task in tasks.items():  # every task has clips without its label: they are masked, not guessed
        assert task["labelled"] == {k: sum(1 for e in v if e.task_labels(name)) for k, v in splits.items()}
    assert tasks["voice"]["labelled"]["train"] < len(splits["train"])
    assert tasks["band"]["labelled"]["train"] < len(splits["train"])

    model = run.load_model()
    waves = np.random.default_rng(1).normal(0, 0.1, (3, RATE // 2)).astype(np.float32)
    predicted = model.predict(waves, verbose=0)
    assert set(predicted) == {"band", "voice"}
    assert predicted["band"].shape == (3, 2) and predicted["voice"].shape == (3, 2)
    np.testing.assert_allclose(predicted["voice"].sum(axis=1), 1.0, rtol=1e-5)
    scores = model.evaluate(waves, {"band": np.eye(2, dtype=np.float32)[[0, 1, 0]], "voice": -np.ones((3, 2), np.float32)},
                            verbose=0, return_dict=True)
    assert scores["voice_loss"] == 0.0 and scores["band_loss"] > 0  # reloads compiled, masked

    # Fine-tuning thawed the top group (block2_) only.
    start = {layer.name: layer.get_weights() for layer in tiny_wave_encoder("pretrained").layers if layer.weights}
    backbone = model.get_layer("backbone")
    for now, before in zip(backbone.get_layer("feat_conv").get_weights(), start["feat_conv"]):
        np.testing.assert_array_equal(now, before)
    assert not np.allclose(backbone.get_layer("block2_conv").get_weights()[0], start["block2_conv"][0])


def test_audio_multitask_run_caches_crop_passes_and_scores_whole_clips(audio_run: tuple[Path, list[dict]]) -> None:
    path, calls = audio_run
    run = RunDir(path)
    assert [c.get("train_passes") for c in calls if "layer_name" not in c] == [4]  # AUDIO_CACHED_CROPS crops
    status = run.status()
    tasks = {t["name"]: t for t in status["tasks"]}
    for name in ("band", "voice"):
        report = status["transfer"]["tasks"][name]
        assert report["baseline"]["name"].startswith("log-mel statistics")
        # The probes score whole clips (the mean over eval crops), one row per labelled clip.
        assert report["probe"]["params"]["train_count"] == tasks[name]["labelled"]["train"]
        assert report["rows"][-1]["test_accuracy"] is not None
    # One temperature per task, fitted on its labelled validation clips (whole clips, not crops).
    fitted = {c["layer_name"]: c for c in calls if "layer_name" in c}
    assert set(fitted) == {"band_logits", "voice_logits"}
    for name in ("band", "voice"):
        assert fitted[f"{name}_logits"]["rows"] == fitted[f"{name}_logits"]["probability_rows"] == (
            tasks[name]["labelled"]["val"])
    recorded = (run.calibration().get("tasks") or {}) if run.file(RunDir.CALIBRATION).is_file() else {}
    for name, record in recorded.items():  # tasks whose temperature lowered the validation log-loss
        assert record["folded_into_model"] and record["examples"] == tasks[name]["labelled"]["val"]

    # The test metrics are those of clips scored as the mean of 2 evenly spaced crops.
    model = run.load_model()
    test = run.split("test")
    labels = run.task_labels() or {}
    layout = TaskLayout.from_labels(labels)
    columns = tuple(TaskColumn(t, f"task:{t}", False, tuple(c)) for t, c in labels.items())
    probabilities = layout.split(predict_clips(lambda rows: layout.join(model.predict_on_batch(rows)),
                                               [load_audio(e.path, RATE) for e in test], RATE // 2, crops=2))
    targets = task_targets(test, columns)
    for name in labels:
        keep = targets[name][:, 0] >= 0
        want = float((probabilities[name][keep].argmax(1) == targets[name][keep].argmax(1)).mean())
        assert status["test_metrics"][f"{name}_accuracy"] == pytest.approx(want, abs=1e-6)


def test_tlkit_evaluate_scores_an_audio_multitask_run(audio_run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    run = RunDir(audio_run[0])
    tasks = {t["name"]: t for t in run.status()["tasks"]}
    metrics = evaluate_run(run.path, out=tmp_path / "eval", gradcam=0).metrics["tasks"]
    for name in ("band", "voice"):
        assert metrics[name]["count"] == tasks[name]["labelled"]["test"]
        assert metrics[name]["accuracy"] == pytest.approx(run.status()["test_metrics"][f"{name}_accuracy"], abs=1e-6)


def test_explicit_splits_must_hold_the_configs_tasks(tmp_path: Path) -> None:
    manifest = write_multitask_speaker_dataset(tmp_path / "data", speakers_per_class=2, clips_per_speaker=2,
                                               sample_rate=RATE)
    spec = backbones.register(tiny_wave_spec("tiny_audio_explicit", sample_rate=RATE), overwrite=True)
    try:
        cfg = resolve_tasks(config_from_dict(audio_config(tmp_path, manifest, spec.name, tasks={"voice": {}})))
        assert task_columns(cfg) == (TaskColumn("voice", "task:voice"),)
        splits = load_audio_splits(manifest=manifest, sample_rate=RATE, tasks=TASKS)
        with pytest.raises(ConfigError, match=r"the splits hold the tasks \['band', 'voice'\], the config \['voice'\]"):
            multitask_train.train_multitask(cfg, make_strategy("auto"), verbose=0, splits=splits)
    finally:
        backbones.unregister(spec.name)
