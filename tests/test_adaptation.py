"""Domain adaptation: gradient reversal, CORAL, importance weights, AdaBN, and adapted runs that
resume after kill -9 and export without their domain head."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.conftest import colour_images, write_image_folder
from tests.test_resume import _config, _history, _train
from tlkit.adaptation.adabn import adapt_batchnorm
from tlkit.adaptation.layers import GradientReversal, ReversalRamp, coral_loss, ganin_lambda
from tlkit.adaptation.reweight import fit_importance_weights
from tlkit.adaptation.training import training_model
from tlkit.config import AdaptationConfig, config_from_dict
from tlkit.data.batches import Batches
from tlkit.errors import ConfigError
from tlkit.finetune import fine_tune
from tlkit.model import HeadConfig, build_classifier
from tlkit.schedule import Schedule, Stage


def test_gradient_reversal_negates_and_scales_the_input_gradient() -> None:
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 5)), tf.float32)
    weights = tf.constant(np.random.default_rng(1).normal(size=(4, 5)), tf.float32)
    layer = GradientReversal(0.7)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        reversed_out = layer(x)
        plain = tf.reduce_sum(tf.sin(x) * weights)
        through = tf.reduce_sum(tf.sin(reversed_out) * weights)
    np.testing.assert_array_equal(reversed_out.numpy(), x.numpy())  # identity forward
    want = -0.7 * tape.gradient(plain, x).numpy()
    np.testing.assert_allclose(tape.gradient(through, x).numpy(), want, rtol=1e-6)
    layer.scale.assign(0.0)
    with tf.GradientTape() as tape:
        tape.watch(x)
        zero = tf.reduce_sum(layer(x) * weights)
    np.testing.assert_array_equal(tape.gradient(zero, x).numpy(), np.zeros((4, 5), np.float32))
    assert GradientReversal.from_config(layer.get_config()).initial == 0.7


def test_ganin_ramp_runs_from_zero_to_one_over_the_stage() -> None:
    assert ganin_lambda(0.0) == 0.0
    assert ganin_lambda(1.0) > 0.9999
    assert 0.46 < ganin_lambda(0.1) < 0.47  # 2 / (1 + e^-1) - 1
    layer = GradientReversal(0.0)
    ramp = ReversalRamp(layer, epochs=4, steps=10)
    ramp.on_epoch_begin(2)  # a resumed stage starts at its own epoch
    ramp.on_train_batch_begin(5)
    assert float(layer.scale.numpy()) == pytest.approx(ganin_lambda(2.5 / 4))


def test_coral_loss_is_zero_for_equal_covariances_and_positive_otherwise() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 6)).astype(np.float32)
    assert float(coral_loss(a, a + 3.0)) == pytest.approx(0.0, abs=1e-7)  # a mean shift leaves covariances
    assert float(coral_loss(a, a[::-1].copy())) == pytest.approx(0.0, abs=1e-7)
    wider = float(coral_loss(a, 2.0 * a))
    assert wider > 1e-3
    # ||C - 4C||_F^2 / (4 d^2) with C the sample covariance of a.
    cov = np.cov(a, rowvar=False)
    assert wider == pytest.approx(float(np.sum((3 * cov) ** 2) / (4 * 36)), rel=1e-4)


def test_reweighting_recovers_the_density_ratio_of_two_gaussians() -> None:
    rng = np.random.default_rng(0)
    source = rng.normal(0.0, 1.0, size=(4000, 2))
    target = rng.normal(0.0, 1.0, size=(2000, 2)) + np.array([1.0, 0.0])
    weights = fit_importance_weights(source, target)
    true = np.exp(source[:, 0] - 0.5)  # N(1, 1) / N(0, 1) along the first axis
    central = np.abs(source[:, 0]) < 1.5
    got = weights(source)
    assert abs(float(got.mean()) - 1.0) < 1e-5
    relative = np.abs(got[central] - true[central]) / true[central]
    assert float(np.median(relative)) < 0.1, float(np.median(relative))
    assert np.corrcoef(np.log(got[central]), np.log(true[central]))[0, 1] > 0.99
    assert got.max() <= 10.0 / weights.scale + 1e-6  # clipped before normalising


def _snapshot(model: keras.Model) -> dict[str, np.ndarray]:
    return {v.path: np.array(v.numpy(), copy=True) for v in model.weights}


@pytest.mark.parametrize("bn_inference", [True, False], ids=["frozen-batchnorm", "plain-batchnorm"])
def test_adabn_moves_batchnorm_statistics_to_the_targets_and_nothing_else(
    tiny_backbone: object, bn_inference: bool
) -> None:
    model = build_classifier("tiny_test", 3, augmentation=None, head=HeadConfig(bn_inference=bn_inference))
    x, _ = colour_images(8)
    target = 255.0 - x * 0.5
    before = _snapshot(model)
    result = adapt_batchnorm(model, tf.data.Dataset.from_tensor_slices(target).batch(7))
    assert result.layers == 3 and result.examples == len(target)
    after = _snapshot(model)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed == {f"{name}/{stat}" for name in ("stem_bn", "block1_bn", "block2_bn")
                       for stat in ("moving_mean", "moving_variance")}
    # The first BatchNorm's input does not depend on another BatchNorm: its statistics are exact.
    backbone = model.get_layer("backbone")
    inputs = model.get_layer("preprocess")(model.get_layer("resize")(target))
    activations = np.asarray(backbone.get_layer("stem_conv")(inputs)).reshape(-1, 8).astype(np.float64)
    stem = backbone.get_layer("stem_bn")
    np.testing.assert_allclose(stem.moving_mean.numpy(), activations.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stem.moving_variance.numpy(), activations.var(axis=0), rtol=1e-3, atol=1e-6)


def _batches(x: np.ndarray, y: np.ndarray | None, batch: int = 8, shuffle: bool = True) -> Batches:
    rows = (x, keras.utils.to_categorical(y, 3)) if y is not None else x
    return Batches(tf.data.Dataset.from_tensor_slices(rows), len(x), batch, shuffle=shuffle)


def test_dann_training_model_shares_layers_and_the_classifier_has_no_domain_head(tiny_backbone: object) -> None:
    keras.utils.set_random_seed(0)
    model = build_classifier("tiny_test", 3, augmentation=None, head=HeadConfig(dropout=0.0))
    x, y = colour_images(16)
    train, val = _batches(x, y), _batches(x[:12], y[:12], shuffle=False)
    target = _batches(255.0 - x, None)
    schedule = Schedule((Stage("head", 2, 0, 0.02), Stage("top", 2, 1, 0.005)))
    result = fine_tune(model, train, val, schedule, adaptation=AdaptationConfig("t", "dann", 0.5), target=target,
                       verbose=0)
    top = [r for r in result.history if r["stage"] == "top"]
    assert len(top) == 2 and all("domain_loss" in r and "dann_lambda" in r for r in top)
    assert top[-1]["dann_lambda"] > top[0]["dann_lambda"] > 0
    assert "val_loss" in top[0] and "accuracy" in top[0]  # the classifier's own metric names
    assert not [layer for layer in model.layers if "domain" in layer.name or "reversal" in layer.name]
    trainer, align = training_model(model, "dann")
    shared = {id(v) for v in model.weights}
    extra = [v.path for v in trainer.weights if id(v) not in shared]
    assert extra and all(p.startswith(("domain_alignment/", "gradient_reversal/")) for p in extra), extra
    assert align.reversal is not None


def test_dann_under_a_distribution_strategy(tiny_backbone: object) -> None:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    x, y = colour_images(8)
    with strategy.scope():
        model = build_classifier("tiny_test", 3, augmentation=None)
    schedule = Schedule((Stage("head", 1, 0, 0.02), Stage("top", 2, 1, 0.005)))
    result = fine_tune(model, _batches(x, y), None, schedule, strategy=strategy, verbose=0,
                       adaptation=AdaptationConfig("t", "dann"), target=_batches(255.0 - x, None))
    assert [r["stage"] for r in result.history] == ["head", "top", "top"]
    assert all(np.isfinite(r["domain_loss"]) for r in result.history if r["stage"] == "top")


def test_coral_and_reweight_runs(tiny_backbone: object) -> None:
    x, y = colour_images(16)
    train, val = _batches(x, y), _batches(x[:12], y[:12], shuffle=False)
    target = _batches(np.clip(x * 0.6 + 40.0, 0, 255), None)
    schedule = Schedule((Stage("head", 2, 0, 0.02), Stage("top", 2, 1, 0.005)))
    keras.utils.set_random_seed(0)
    coral = fine_tune(build_classifier("tiny_test", 3, augmentation=None), train, val, schedule,
                      adaptation=AdaptationConfig("t", "coral", 100.0), target=target, verbose=0)
    assert all("coral_loss" in r for r in coral.history if r["stage"] == "top")
    keras.utils.set_random_seed(0)
    reweighted = fine_tune(build_classifier("tiny_test", 3, augmentation=None), train, val, schedule,
                           adaptation=AdaptationConfig("t", "reweight"), target=target, verbose=0)
    weights = reweighted.adaptation["importance_weights"]
    assert weights["examples"] == len(x) and weights["min"] <= 1.0 <= weights["max"]
    assert "head" in reweighted.head_fits  # the solved head took the weights


def test_adaptation_config_errors(tiny_backbone: object) -> None:
    with pytest.raises(ConfigError, match="needs `target`"):
        config_from_dict({"data": {"path": "x"}, "adaptation": {"method": "dann"}})
    with pytest.raises(ConfigError, match=r"\[adaptation\] method must be"):
        config_from_dict({"data": {"path": "x"}, "adaptation": {"method": "mmd", "target": "t"}})
    with pytest.raises(ConfigError, match=r"\[adaptation\] weight must be a number"):
        config_from_dict({"data": {"path": "x"}, "adaptation": {"method": "coral", "target": "t", "weight": "2"}})
    with pytest.raises(ConfigError, match=r"\[adaptation\] weight must be >= 0"):
        AdaptationConfig("t", "dann", -1.0)
    cfg = config_from_dict({"data": {"path": "x"}, "adaptation": {"method": "adabn", "target": "t"}}, "/base")
    assert cfg.adaptation.target == "/base/t" and config_from_dict(cfg.to_dict()).adaptation == cfg.adaptation
    model = build_classifier("tiny_test", 3, augmentation=None)
    x, y = colour_images(4)
    with pytest.raises(ConfigError, match="thaws none"):
        fine_tune(model, _batches(x, y), None, Schedule.feature_extraction(2),
                  adaptation=AdaptationConfig("t", "dann"), target=_batches(x, None), verbose=0)


def _inverted_folder(source: Path, out: Path) -> Path:
    """A flat (unlabelled) folder of the colour-inverted images of ``source``."""
    out.mkdir(parents=True)
    for index, file in enumerate(sorted(source.rglob("*.png"))):
        Image.fromarray(255 - np.asarray(Image.open(file))).save(out / f"{index:03d}.png")
    return out


DANN_STAGES = [
    {"name": "head", "epochs": 2, "learning_rate": 0.02},
    {"name": "top", "epochs": 3, "unfreeze": 1, "learning_rate": 0.004, "warmup_epochs": 1},
]


def test_dann_run_resumes_after_kill_and_exports_without_the_domain_head(tmp_path: Path) -> None:
    from tlkit.export import export_run

    data = write_image_folder(tmp_path / "data", n_per_class=10)
    target = _inverted_folder(write_image_folder(tmp_path / "other", n_per_class=6, seed=1), tmp_path / "target")

    def config(name: str) -> Path:
        path = _config(tmp_path, data, name, DANN_STAGES)
        path.write_text(path.read_text() + f'[adaptation]\ntarget = "{target}"\nmethod = "dann"\nweight = 0.5\n')
        return path

    killed = _train(config("killed"), kill_after=2, every_epoch=True)  # the head is solved: epoch 2 = top's 2nd
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoints" / "top" / "adapt_backup.json").is_file()
    resumed = _train(config("killed"), every_epoch=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = _train(config("whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    got, want = _history(tmp_path / "killed"), _history(tmp_path / "whole")
    assert [(r["stage"], r["stage_epoch"]) for r in got] == [(r["stage"], r["stage_epoch"]) for r in want]
    assert [(r["stage"], r["stage_epoch"]) for r in got] == [("head", 1), ("top", 1), ("top", 2), ("top", 3)]
    np.testing.assert_allclose([r["lr"] for r in got if "lr" in r], [r["lr"] for r in want if "lr" in r], rtol=1e-6)
    assert all("domain_loss" in r for r in got if r["stage"] == "top")
    status = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert status["status"] == "complete"
    record = status["adaptation"]
    assert record["method"] == "dann" and record["target_examples"] == 18
    assert 0.0 <= record["shift_auc_before"] <= 1.0 and 0.0 <= record["shift_auc_after"] <= 1.0

    report = export_run(tmp_path / "killed", ["savedmodel", "keras"], tmp_path / "exported")
    assert {r.format for r in report.results} == {"savedmodel", "keras"}
    exported = keras.saving.load_model(next(Path(report.out_dir).rglob("*.keras")), safe_mode=True)
    names = [layer.name for layer in exported.layers]
    assert not [n for n in names if "domain" in n or "reversal" in n], names
    assert exported.output.shape[-1] == 3
    saved = next(p.parent for p in Path(report.out_dir).rglob("saved_model.pb"))
    stored = [name for name, _ in tf.train.list_variables(str(saved / "variables" / "variables"))]
    assert stored and not [n for n in stored if "domain" in n or "reversal" in n]
    assert (saved / "saved_model.pb").read_bytes().count(b"domain_alignment") == 0
