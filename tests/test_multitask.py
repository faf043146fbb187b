"""Multi-task runs (tlkit.multitask): config and manifest with several label columns, masked losses,
the two-stage run (heads solved per task, then fine-tuning), reload, baselines, calibration, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import tlkit.finetune as finetune
from tests.conftest import multitask_config, tiny_cnn, write_multitask_manifest
from tlkit.config import config_from_dict, load_config
from tlkit.data.listing import TaskColumn
from tlkit.errors import ConfigError, DataError
from tlkit.model import HeadConfig
from tlkit.multitask.data import task_targets
from tlkit.multitask.losses import MaskedAccuracy, MaskedCrossentropy, task_losses
from tlkit.multitask.manifest import list_task_manifest, resolve_tasks
from tlkit.multitask.model import build_multitask_classifier
from tlkit.run import train
from tlkit.rundir import RunDir

TASKS = (TaskColumn("colour", "task:colour", False), TaskColumn("tags", "task:tags", True))


# --------------------------------------------------------------------------- config


def test_config_round_trip_keeps_tasks_sorted(tmp_path: Path) -> None:
    manifest = write_multitask_manifest(tmp_path / "data", n_per_class=2)
    cfg = config_from_dict(multitask_config(tmp_path, manifest))
    assert [t.name for t in cfg.tasks] == ["colour", "tags"]  # sorted, whatever the table's order
    assert cfg.tasks[1].multi_label and cfg.tasks[1].loss_weight == 0.5
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.tasks == cfg.tasks
    # A single-task config's dict has no "tasks" key (its config.json is unchanged).
    assert "tasks" not in config_from_dict({"data": {"path": str(tmp_path)}}).to_dict()
    toml = tmp_path / "run.toml"
    toml.write_text('[data]\nmanifest = "data/labels.csv"\n[tasks.tags]\nmulti_label = true\n'
                    '[tasks.colour]\ncolumn = "task:colour"\nloss_weight = 2\n')
    loaded = load_config(toml)
    assert [(t.name, t.column, t.multi_label, t.loss_weight) for t in loaded.tasks] == [
        ("colour", "task:colour", False, 2.0), ("tags", None, True, 1.0)]


@pytest.mark.parametrize(("tasks", "match"), [
    ({"1st": {}}, "'1st'"),
    ({"colour": {"colum": "x"}}, r"\[tasks.colour\] has unknown key"),
    ({"colour": {"loss_weight": -1.0}}, r"tasks.colour\] loss_weight"),
    ({"colour": {"multi_label": "yes"}}, r"tasks.colour\] multi_label"),
    ({"colour": "task:colour"}, r"\[tasks.colour\] must be a table"),
])
def test_bad_task_tables_name_the_key(tmp_path: Path, tasks: dict, match: str) -> None:
    manifest = write_multitask_manifest(tmp_path / "data", n_per_class=2)
    with pytest.raises(ConfigError, match=match):
        config_from_dict(multitask_config(tmp_path, manifest, tasks=tasks))


def test_tasks_need_a_manifest_and_existing_columns(tmp_path: Path) -> None:
    manifest = write_multitask_manifest(tmp_path / "data", n_per_class=2)
    raw = multitask_config(tmp_path, manifest)
    raw["data"] = {"path": str(tmp_path / "data")}
    with pytest.raises(ConfigError, match=r"\[tasks\] needs `\[data\] manifest`"):
        config_from_dict(raw)
    cfg = config_from_dict(multitask_config(tmp_path, manifest, tasks={"colour": {"column": "hue"}}))
    with pytest.raises(ConfigError, match=r"\[tasks.colour\] column 'hue' is not a column"):
        resolve_tasks(cfg)
    # Without a column, "task:<name>" is found in the header.
    cfg = config_from_dict(multitask_config(tmp_path, manifest, tasks={"colour": {}, "tags": {"multi_label": True}}))
    assert [t.column for t in resolve_tasks(cfg).tasks] == ["task:colour", "task:tags"]


def test_task_columns_make_a_manifest_multitask_without_a_tasks_table(tmp_path: Path) -> None:
    manifest = write_multitask_manifest(tmp_path / "data", n_per_class=2)
    raw = multitask_config(tmp_path, manifest)
    del raw["tasks"]
    cfg = resolve_tasks(config_from_dict(raw))
    assert [(t.name, t.column, t.multi_label) for t in cfg.tasks] == [
        ("colour", "task:colour", False), ("tags", "task:tags", True)]  # "|" in a cell: multi-label
    plain = tmp_path / "plain.csv"
    plain.write_text("path,label\na.png,x\n")
    assert resolve_tasks(config_from_dict({"data": {"manifest": str(plain)}})).tasks == ()


# --------------------------------------------------------------------------- manifest


def test_manifest_rows_carry_every_task_and_mask_missing_ones(tmp_path: Path) -> None:
    manifest = write_multitask_manifest(tmp_path / "data", n_per_class=4)
    examples = list_task_manifest(manifest, TASKS).examples
    assert len(examples) == 12
    by_name = {Path(e.path).name: e for e in examples}
    no_colour = by_name["004.png"]  # every 5th row lacks its colour
    assert no_colour.task_labels("colour") == () and no_colour.task_labels("tags")
    assert no_colour.labels == no_colour.task_labels("tags")  # labels: the first task that has any
    no_tags = by_name["003.png"]
    assert no_tags.task_labels("tags") == () and no_tags.labels == no_tags.task_labels("colour")
    assert any(len(e.task_labels("tags")) == 2 for e in examples)  # "cool|natural"
    targets = task_targets(examples, [TaskColumn(t.name, t.column, t.multi_label, c) for t, c in
                                      zip(TASKS, (("blue", "green", "red"), ("cool", "natural", "warm")))])
    index = examples.index(no_tags)
    assert (targets["tags"][index] == -1).all() and targets["colour"][index].sum() == 1


@pytest.mark.parametrize(("row", "match"), [
    ("b.png,,", "line 3: no label for any task"),
    ("b.png,red|green,warm", "task 'colour' is single-label"),
    ("a.png,green,cool", "same file with different labels"),
])
def test_bad_manifest_rows_are_data_errors(tmp_path: Path, row: str, match: str) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,task:colour,task:tags\na.png,red,warm\n{row}\nc.png,green,cool\n")
    with pytest.raises(DataError, match=match):
        list_task_manifest(manifest, TASKS)


def test_a_task_with_one_class_is_a_data_error(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,task:colour,task:tags\na.png,red,warm\nb.png,,cool\nc.png,red,\n")
    with pytest.raises(DataError, match="task 'colour'.*at least two"):
        list_task_manifest(manifest, TASKS)


# --------------------------------------------------------------------------- model and masking


def test_rows_without_a_task_label_give_that_head_exactly_zero_gradient(tiny_backbone: object) -> None:
    model = build_multitask_classifier("tiny_test", [("tags", 3, True), ("colour", 3, False)],
                                       head=HeadConfig(dropout=0.0))
    assert model.output_names == ["colour", "tags"]
    x = np.random.default_rng(0).uniform(0, 255, (4, 40, 40, 3)).astype(np.float32)
    y = {"colour": np.eye(3, dtype=np.float32)[[0, 1, 2, 0]], "tags": np.full((4, 3), -1.0, np.float32)}
    losses = task_losses([TaskColumn("colour", "c"), TaskColumn("tags", "t", True)], HeadConfig())
    with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = losses["colour"](y["colour"], out["colour"]) + losses["tags"](y["tags"], out["tags"])
    variables = [model.get_layer("tags_logits").kernel, model.get_layer("colour_logits").kernel]
    tags_grad, colour_grad = tape.gradient(loss, variables)
    assert np.count_nonzero(tags_grad.numpy()) == 0
    assert np.abs(colour_grad.numpy()).sum() > 0
    assert float(losses["tags"](y["tags"], out["tags"])) == 0.0


def test_masked_loss_is_the_mean_over_labelled_rows() -> None:
    probabilities = np.array([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]], np.float32)
    targets = np.array([[1, 0], [-1, -1], [0, 1]], np.float32)
    expected = -(np.log(0.7) + np.log(0.5)) / 2
    assert float(MaskedCrossentropy()(targets, probabilities)) == pytest.approx(expected, rel=1e-5)
    assert float(MaskedCrossentropy(weight=0.5)(targets, probabilities)) == pytest.approx(expected / 2, rel=1e-5)
    accuracy = MaskedAccuracy()
    accuracy.update_state(targets, np.array([[0.7, 0.3], [0.9, 0.1], [0.6, 0.4]], np.float32))
    assert float(accuracy.result()) == pytest.approx(0.5)  # 1 of the 2 labelled rows


# --------------------------------------------------------------------------- the run


def test_multitask_run_trains_in_two_stages_and_reloads(multitask_run: Path) -> None:
    run = RunDir(multitask_run)
    history = run.history()
    assert [s["name"] for s in history["stages"]] == ["head", "top"]
    head, *top = history["epochs"]
    assert head["solver"] == "lbfgs" and {"colour_loss", "tags_loss", "val_colour_accuracy"} <= set(head)
    assert [r["epoch"] for r in top] == [2, 3, 4]
    assert top[-1]["loss"] < top[0]["loss"]
    assert run.task_labels() == {"colour": ["blue", "green", "red"], "tags": ["cool", "natural", "warm"]}
    assert run.is_multitask
    with pytest.raises(ConfigError, match="task_labels"):
        run.labels()
    train_split = run.split("train")
    assert all([t for t, _ in e.tasks] == ["colour", "tags"] for e in train_split)
    assert any(e.task_labels("colour") == () for e in train_split)

    model = run.load_model()
    x = np.random.default_rng(1).uniform(0, 255, (3, 40, 40, 3)).astype(np.float32)
    predicted = model.predict(x, verbose=0)
    assert set(predicted) == {"colour", "tags"}
    assert predicted["colour"].shape == (3, 3) and predicted["tags"].shape == (3, 3)
    np.testing.assert_allclose(predicted["colour"].sum(axis=1), 1.0, rtol=1e-5)
    assert model.evaluate(x, {"colour": np.eye(3, dtype=np.float32), "tags": -np.ones((3, 3), np.float32)},
                          verbose=0, return_dict=True)["tags_loss"] == 0.0  # reloads compiled, masked

    # Fine-tuning thawed the top group only; BatchNorm stayed frozen.
    start = {layer.name: layer.get_weights() for layer in tiny_cnn("pretrained").layers if layer.weights}
    backbone = model.get_layer("backbone")
    for name in ("stem_conv", "block1_conv", "block2_bn"):
        for now, before in zip(backbone.get_layer(name).get_weights(), start[name]):
            np.testing.assert_array_equal(now, before, err_msg=name)
    assert not np.allclose(backbone.get_layer("block2_conv").get_weights()[0], start["block2_conv"][0])


def test_multitask_run_records_tasks_baselines_and_calibration(multitask_run: Path) -> None:
    run = RunDir(multitask_run)
    status = run.status()
    assert status["status"] == "complete"
    tasks = {t["name"]: t for t in status["tasks"]}
    assert tasks["tags"]["multi_label"] and not tasks["colour"]["multi_label"]
    splits = {name: run.split(name) for name in ("train", "val", "test")}
    for name, task in tasks.items():
        assert task["labelled"] == {k: sum(1 for e in v if e.task_labels(name)) for k, v in splits.items()}
        assert task["labelled"]["train"] < len(splits["train"])  # some rows lack each task
    assert {"colour_accuracy", "tags_accuracy", "loss"} <= set(status["test_metrics"])
    for name in ("colour", "tags"):
        report = status["transfer"]["tasks"][name]
        assert report["baseline"]["kind"] == "baseline" and report["probe"]["kind"] == "probe"
        assert report["probe"]["params"]["train_count"] == tasks[name]["labelled"]["train"]
        assert report["rows"][-1]["val_accuracy"] is not None
    calibration = run.calibration()
    assert set(calibration) == {"tasks"} and calibration["tasks"]
    for record in calibration["tasks"].values():
        assert record["folded_into_model"] and record["temperature"] > 0
    assert run.temperature() is None  # folded: nothing to apply on top


def test_interrupted_multitask_run_resumes_like_an_uninterrupted_one(
    tmp_path: Path, registered: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C after the second fine-tuning epoch; the same call resumes and ends where an
    uninterrupted run ends."""
    manifest = write_multitask_manifest(tmp_path / "data", n_per_class=6)
    raw = multitask_config(tmp_path, manifest)
    del raw["tasks"]  # found from the task:<name> columns
    recorder = finetune._HistoryRecorder
    record_epoch = recorder.on_epoch_end

    def stop_after_second(self: object, epoch: int, logs: dict | None = None) -> None:
        record_epoch(self, epoch, logs)  # type: ignore[arg-type]
        if epoch == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(recorder, "on_epoch_end", stop_after_second)
        with pytest.raises(KeyboardInterrupt):
            train(config_from_dict(raw))
    run = RunDir(tmp_path / "run")
    assert (run.checkpoints("head") / "done.json").is_file() and run.status()["status"] == "training"
    resumed = train(config_from_dict(raw))
    whole = train(config_from_dict({**raw, "output_dir": str(tmp_path / "whole")}))
    got, want = resumed.history.history, whole.history.history
    assert [(r["stage"], r["stage_epoch"], r["epoch"]) for r in got] == [
        (r["stage"], r["stage_epoch"], r["epoch"]) for r in want] == [("head", 1, 1), ("top", 1, 2), ("top", 2, 3),
                                                                      ("top", 3, 4)]
    np.testing.assert_allclose([r["lr"] for r in got[1:]], [r["lr"] for r in want[1:]], rtol=1e-6)
    x = np.random.default_rng(2).uniform(0, 255, (4, 40, 40, 3)).astype(np.float32)
    a, b = resumed.model.predict(x, verbose=0), whole.model.predict(x, verbose=0)
    for task in ("colour", "tags"):
        np.testing.assert_allclose(a[task], b[task], atol=1e-4)
    assert RunDir(tmp_path / "run").is_complete and RunDir(tmp_path / "run").load_model().output_names == [
        "colour", "tags"]


@pytest.mark.parametrize(("override", "match"), [
    ({"data": "class_weights"}, r"\[data\] class_weights"),
    ({"adaptation": {"method": "coral", "target": "elsewhere"}}, r"\[adaptation\]"),
])
def test_single_task_options_are_refused_for_multitask_runs(tmp_path: Path, override: dict, match: str) -> None:
    manifest = write_multitask_manifest(tmp_path / "data", n_per_class=2)
    raw = multitask_config(tmp_path, manifest)
    if override.get("data"):
        raw["data"]["class_weights"] = True
    else:
        raw.update(override)
    with pytest.raises(ConfigError, match=match):
        train(config_from_dict(raw))
    assert not (tmp_path / "run").exists()  # refused before the run directory is made
