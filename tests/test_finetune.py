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


TWO_STAGES = Schedule((Stage("head", 6, 0, 0.02, solver="sgd"), Stage("top", 3, 1, 0.005, group_lr_decay=0.5)))


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


def test_discriminative_learning_rates(tiny_backbone: object, tmp_path: Path) -> None:
    """Two thawed groups at decay 0.1: the deeper group moves much less than the top one."""
    model = build_classifier("tiny_test", 3, augmentation=None)
    base = model.get_layer("backbone")
    before = {layer: np.array(base.get_layer(layer).kernel.numpy()) for layer in ("block1_conv", "block2_conv")}
    stage = Stage("two", 2, 2, 0.01, group_lr_decay=0.1, optimizer="sgd")
    fine_tune(model, _data(), None, Schedule((stage,)), verbose=0)
    moved = {k: float(np.abs(base.get_layer(k).kernel.numpy() - v).mean()) for k, v in before.items()}
    assert moved["block1_conv"] > 0
    assert moved["block2_conv"] > 3 * moved["block1_conv"], moved
    # The per-group optimizer is not left behind: the model saves and reloads in safe mode.
    path = tmp_path / "glr.keras"
    model.save(path)
    x = colour_images(2)[0][:4]
    np.testing.assert_array_equal(keras.saving.load_model(path, safe_mode=True).predict(x, verbose=0),
                                  model.predict(x, verbose=0))


def test_run_dir_resume_skips_finished_stages(tiny_backbone: object, tmp_path: Path) -> None:
    model = build_classifier("tiny_test", 3, augmentation=None)
    ds = _data()
    schedule = Schedule((Stage("head", 2, 0, 0.01, solver="sgd"), Stage("top", 2, 1, 0.001)))
    result = fine_tune(model, ds, ds, schedule, run_dir=tmp_path, verbose=0)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [s["name"] for s in history["stages"]] == ["head", "top"]
    assert [r["epoch"] for r in history["epochs"]] == [1, 2, 3, 4]
    assert (tmp_path / "checkpoints" / "top" / "done.json").is_file()
    assert any((tmp_path / "logs" / "head").rglob("events.out.tfevents*"))
    # Interrupted during "top": its done marker is gone, the backup says one epoch finished.
    top = tmp_path / "checkpoints" / "top"
    (top / "done.json").unlink()
    model.save_weights(top / "backup.weights.h5")
    (top / "backup.json").write_text(json.dumps({"epoch": 1, "best": None, "best_epoch": 0}))
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


def _batches(seed: int = 0) -> "tlkit.data.Batches":
    from tlkit.data import Batches

    x, y = colour_images(16)
    examples = tf.data.Dataset.from_tensor_slices((x, keras.utils.to_categorical(y, 3)))
    return Batches(examples, len(x), batch_size=8, shuffle=True, seed=seed)


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_feature_cache_gives_the_same_head(tiny_backbone: object, mode: str) -> None:
    """Head-only training on cached features equals the normal path (same data, seed, batches)."""
    schedule = Schedule((Stage("head", 4, 0, 0.01, warmup_epochs=1, solver="sgd"),))
    heads = {}
    for cache in (mode, "off"):
        keras.utils.set_random_seed(0)
        model = build_classifier("tiny_test", 3, augmentation=None, head=HeadConfig(hidden_units=(8,), dropout=0.2))
        result = fine_tune(model, _batches(), _batches(), schedule, feature_cache=cache, verbose=0)
        assert (result.feature_seconds > 0) == (cache != "off")
        heads[cache] = [w.numpy() for w in model.trainable_weights]
        heads[cache + "_loss"] = result.metric("loss")
    for cached, plain in zip(heads[mode], heads["off"]):
        np.testing.assert_allclose(cached, plain, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(heads[mode + "_loss"], heads["off_loss"], rtol=1e-4)


def test_feature_cache_is_skipped_with_augmentation(tiny_backbone: object) -> None:
    from tlkit.model import ImageAugmentation

    model = build_classifier("tiny_test", 3, augmentation=ImageAugmentation())
    result = fine_tune(model, _batches(), None, Schedule((Stage("head", 1, 0, 0.01, solver="sgd"),)), verbose=0)
    assert result.feature_seconds == 0
    with pytest.raises(ConfigError, match="augmentation"):
        fine_tune(model, _batches(), None, Schedule((Stage("head", 1, 0, 0.01, solver="sgd"),)), feature_cache="memory", verbose=0)


def test_mirrored_strategy_on_two_logical_cpus_matches_single_device() -> None:
    """MirroredStrategy over two logical CPU devices trains, with the single-device loss trend.

    Runs in a subprocess: logical devices must be configured before TensorFlow initialises.
    """
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import json, sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras
        import tlkit.backbones as backbones
        from tests.conftest import tiny_spec, colour_images
        from tlkit.finetune import Schedule, Stage, fine_tune
        from tlkit.model import HeadConfig, build_classifier
        backbones.register(tiny_spec(), overwrite=True)
        x, y = colour_images(16)
        ds = tf.data.Dataset.from_tensor_slices((x, keras.utils.to_categorical(y, 3))).batch(8)
        schedule = Schedule((Stage("head", 4, 0, 0.02, solver="sgd"), Stage("top", 2, 1, 0.005)))
        out = {}
        for name, strategy in (("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])),
                               ("single", tf.distribute.get_strategy())):
            keras.utils.set_random_seed(0)
            with strategy.scope():
                model = build_classifier("tiny_test", 3, augmentation=None, head=HeadConfig(dropout=0.0))
            result = fine_tune(model, ds, None, schedule, strategy=strategy, verbose=0)
            out[name] = {"loss": result.metric("loss"), "replicas": strategy.num_replicas_in_sync}
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mirrored"]["replicas"] == 2
    mirrored, single = out["mirrored"]["loss"], out["single"]["loss"]
    assert mirrored[-1] < mirrored[0]
    np.testing.assert_allclose(mirrored, single, rtol=0.02, atol=0.02)


def test_head_only_schedule_leaves_a_compiled_model(tiny_backbone: object) -> None:
    model = build_classifier("tiny_test", 3, augmentation=None)
    result = fine_tune(model, _batches(), _batches(), Schedule.feature_extraction(epochs=1), verbose=0)
    assert result.feature_seconds > 0
    values = model.evaluate(_batches().batched(), verbose=0, return_dict=True)
    assert "accuracy" in values


def _tiny_with_stochastic_depth(weights: str | None = "pretrained") -> keras.Model:
    from tlkit.layers import StochasticDepth

    base = tiny_cnn(weights)
    x = StochasticDepth(0.5, noise_shape=(None, 1, 1, 1), name="block2_drop")(base.output)
    return keras.Model(base.input, x, name="tiny_sd")


def test_frozen_backbone_dropout_is_inactive_and_cache_still_matches() -> None:
    """Keras passes training=True into a frozen nested backbone; its drop-connect must not fire."""
    spec = backbones.register(tiny_spec("tiny_sd_test", builder=_tiny_with_stochastic_depth), overwrite=True)
    try:
        schedule = Schedule((Stage("head", 3, 0, 0.01, solver="sgd"),))
        heads = {}
        for cache in ("memory", "off"):
            keras.utils.set_random_seed(0)
            model = build_classifier(spec, 3, augmentation=None, head=HeadConfig(dropout=0.0))
            fine_tune(model, _batches(), None, schedule, feature_cache=cache, verbose=0)
            heads[cache] = [w.numpy() for w in model.trainable_weights]
        for cached, plain in zip(heads["memory"], heads["off"]):
            np.testing.assert_allclose(cached, plain, rtol=1e-4, atol=1e-5)
        model.get_layer("backbone").trainable = True
        x = colour_images(8)[0][:16]  # per-example drop-connect: 16 examples make a repeat mask ~2**-16
        assert not np.allclose(model(x, training=True), model(x, training=True))  # thawed: it drops
    finally:
        backbones.unregister("tiny_sd_test")
