"""Staged fine-tuning: loss falls, frozen weights are bit-identical, thawed groups move, runs resume."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import tlkit.backbones as backbones
from tlkit.errors import ConfigError
from tlkit.finetune import Schedule, Stage, fine_tune
from tlkit.model import HeadConfig, build_classifier
from tests.conftest import colour_images, tiny_cnn, tiny_spec


def _data(batch: int = 8) -> tf.data.Dataset:
    x, y = colour_images(16)
    return tf.data.Dataset.from_tensor_slices((x, keras.utils.to_categorical(y, 3))).batch(batch)


def _snapshot(layer: keras.layers.Layer) -> dict[str, np.ndarray]:
    return {v.path: np.array(v.numpy(), copy=True) for v in layer.weights}


def _changed(before: dict[str, np.ndarray], layer: keras.layers.Layer) -> set[str]:
    return {v.path for v in layer.weights if not np.array_equal(before[v.path], v.numpy())}


TWO_STAGES = Schedule((Stage("head", 6, 0, 0.02), Stage("top", 3, 1, 0.005, group_lr_decay=0.5)))


def _run_two_stages(model: keras.Model) -> tuple[set[str], set[str], list[float]]:
    ds = _data()
    backbone = model.get_layer("backbone")
    before = _snapshot(backbone)
    first = fine_tune(model, ds, ds, Schedule(TWO_STAGES.stages[:1]), verbose=0)
    after_head = _changed(before, backbone)
    mid = _snapshot(backbone)
    fine_tune(model, ds, ds, Schedule(TWO_STAGES.stages[1:]), verbose=0)
    after_top = _changed(mid, backbone)
    return after_head, after_top, first.metric("loss")


def test_keras_backbone_two_stages(tiny_backbone: object) -> None:
    keras.utils.set_random_seed(0)
    model = build_classifier("tiny_test", 3, augmentation=None, head=HeadConfig(dropout=0.0))
    after_head, after_top, losses = _run_two_stages(model)
    assert losses[-1] < losses[0] - 0.02, losses
    assert after_head == set(), "head-only stage moved backbone weights (incl. BatchNorm statistics)"
    assert after_top, "the thawed top group did not train"
    assert all(p.startswith("block2_") for p in after_top), after_top
    # BatchNorm stays frozen (inference mode) in the thawed group too, by default.
    assert not any("moving" in p or "gamma" in p for p in after_top), after_top


def test_batchnorm_can_train_when_asked(tiny_backbone: object) -> None:
    model = build_classifier("tiny_test", 3, augmentation=None, head=HeadConfig(bn_inference=False))
    _, after_top, _ = _run_two_stages(model)
    assert {"block2_bn/gamma", "block2_bn/moving_mean"} <= after_top
    assert all(p.startswith("block2_") for p in after_top)


def test_savedmodel_backbone_two_stages(tmp_path: Path) -> None:
    """The same contract through the TF-Hub/SavedModel path (variables grouped by path)."""
    tiny_cnn().export(str(tmp_path / "tiny_sm"), verbose=False)
    spec = tiny_spec("tiny_sm_test", source="savedmodel", location=str(tmp_path / "tiny_sm"), builder=None)
    keras.utils.set_random_seed(0)
    model = build_classifier(spec, 3, augmentation=None, head=HeadConfig(dropout=0.0))
    after_head, after_top, losses = _run_two_stages(model)
    assert losses[-1] < losses[0] - 0.02, losses
    assert after_head == set()
    assert after_top and all(p.startswith("block2_") for p in after_top), after_top
    assert not any("moving" in p for p in after_top)


def test_discriminative_learning_rates(tiny_backbone: object) -> None:
    """Two thawed groups at decay 0.1: the deeper group moves much less than the top one."""
    model = build_classifier("tiny_test", 3, augmentation=None)
    base = model.get_layer("backbone")
    before = {layer: np.array(base.get_layer(layer).kernel.numpy()) for layer in ("block1_conv", "block2_conv")}
    stage = Stage("two", 2, 2, 0.01, group_lr_decay=0.1, optimizer="sgd")
    fine_tune(model, _data(), None, Schedule((stage,)), verbose=0)
    moved = {k: float(np.abs(base.get_layer(k).kernel.numpy() - v).mean()) for k, v in before.items()}
    assert moved["block1_conv"] > 0
    assert moved["block2_conv"] > 3 * moved["block1_conv"], moved


def test_run_dir_resume_skips_finished_stages(tiny_backbone: object, tmp_path: Path) -> None:
    model = build_classifier("tiny_test", 3, augmentation=None)
    ds = _data()
    schedule = Schedule((Stage("head", 2, 0, 0.01), Stage("top", 2, 1, 0.001)))
    result = fine_tune(model, ds, ds, schedule, run_dir=tmp_path, verbose=0)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [s["name"] for s in history["stages"]] == ["head", "top"]
    assert [r["epoch"] for r in history["epochs"]] == [1, 2, 3, 4]
    assert (tmp_path / "checkpoints" / "top" / "done.json").is_file()
    assert any((tmp_path / "logs" / "head").rglob("events.out.tfevents*"))
    # Interrupted during "top": its done marker is gone, the backup says one epoch finished.
    (tmp_path / "checkpoints" / "top" / "done.json").unlink()
    backup = tmp_path / "checkpoints" / "top" / "backup"
    backup.mkdir()
    model.save_weights(backup / "latest.weights.h5")
    (backup / "training_metadata.json").write_text(json.dumps({"epoch": 1, "batch": 0}))
    fresh = build_classifier("tiny_test", 3, augmentation=None)
    resumed = fine_tune(fresh, ds, ds, schedule, run_dir=tmp_path, verbose=0)
    top_epochs = [r["stage_epoch"] for r in resumed.history if r["stage"] == "top"]
    assert top_epochs == [1, 2]  # epoch 1 kept from the first run, only epoch 2 re-trained
    assert len(resumed.history) == len(result.history)


def test_schedule_validation() -> None:
    with pytest.raises(ConfigError):
        Stage("bad name!", 1)
    with pytest.raises(ConfigError):
        Stage("x", 1, unfreeze=-1)
    with pytest.raises(ConfigError):
        Schedule(())
    with pytest.raises(ConfigError, match="unknown schedule preset"):
        Schedule.preset("nope")
    preset = Schedule.fine_tune(head_epochs=2, epochs=3, deeper_epochs=1)
    assert [s.unfreeze for s in preset.stages] == [0, 2, "all"]
    assert preset.stages[1].learning_rate < preset.stages[0].learning_rate


def test_too_many_groups_is_a_clear_error(tiny_backbone: object) -> None:
    model = build_classifier("tiny_test", 3, augmentation=None)
    with pytest.raises(ConfigError, match="3 groups"):
        fine_tune(model, _data(), None, Schedule((Stage("x", 1, 5),)), verbose=0)
