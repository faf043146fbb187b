"""The head is solved to convergence on cached features, images and audio alike."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import tlkit.backbones as backbones
from tlkit.data import Batches
from tlkit.errors import ConfigError
from tlkit.finetune import Schedule, Stage, fine_tune
from tlkit.model import HeadConfig, ImageAugmentation, build_classifier, split_head
from tests.audio_fixtures import tiny_wave_encoder, tiny_wave_spec, write_speaker_dataset


def _digits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Real scanned digits (scikit-learn), upscaled to 32x32 RGB pixels 0..255: 400 train, 200 val, 600 test."""
    digits = load_digits()
    images = np.repeat(np.kron(digits.images, np.ones((4, 4)))[..., None] * (255.0 / 16.0), 3, axis=-1)
    order = np.random.default_rng(seed).permutation(len(images))
    images, labels = images[order].astype(np.float32), digits.target[order]
    cuts = {"train": (0, 400), "val": (400, 600), "test": (600, 1200)}
    return {k: (images[a:b], labels[a:b]) for k, (a, b) in cuts.items()}


def _batches(x: np.ndarray, y: np.ndarray, shuffle: bool) -> Batches:
    examples = tf.data.Dataset.from_tensor_slices((x, keras.utils.to_categorical(y, 10)))
    return Batches(examples, len(x), batch_size=32, shuffle=shuffle, seed=0)


def test_converged_head_matches_sklearn_logistic_regression(tiny_backbone: object) -> None:
    data = _digits()
    model = build_classifier("tiny_test", 10, augmentation=ImageAugmentation(), head=HeadConfig(dropout=0.0))
    base = model.get_layer("backbone")
    before = [w.copy() for w in base.get_weights()]
    result = fine_tune(model, _batches(*data["train"], True), _batches(*data["val"], False),
                       Schedule.feature_extraction(epochs=10), verbose=0)
    assert result.head_fits["head"].solver == "lbfgs"
    assert result.head_fits["head"].C is not None
    for old, new in zip(before, base.get_weights()):
        np.testing.assert_array_equal(old, new)  # the frozen backbone (BatchNorm statistics too) did not move
    extractor, _ = split_head(model)
    features = {k: extractor.predict(x, verbose=0) for k, (x, _) in data.items()}
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    reference.fit(features["train"], data["train"][1])
    sklearn_accuracy = reference.score(features["test"], data["test"][1])
    x_test, y_test = data["test"]
    ours = float((model.predict(x_test, verbose=0).argmax(axis=1) == y_test).mean())
    assert ours >= sklearn_accuracy - 0.01, (ours, sklearn_accuracy)
    assert sklearn_accuracy > 0.3  # the fixture is informative, so the comparison means something

    # The old recipe (a few Adam epochs) stays available, and lands below the solved head.
    keras.utils.set_random_seed(0)
    sgd = build_classifier("tiny_test", 10, augmentation=None, head=HeadConfig(dropout=0.0))
    fine_tune(sgd, _batches(*data["train"], True), _batches(*data["val"], False),
              Schedule((Stage("head", 3, 0, 1e-3, solver="sgd"),)), verbose=0)
    sgd_accuracy = float((sgd.predict(x_test, verbose=0).argmax(axis=1) == y_test).mean())
    assert sgd_accuracy < ours, (sgd_accuracy, ours)


def test_hidden_layer_head_trains_to_early_stopping(tiny_backbone: object) -> None:
    data = _digits()
    model = build_classifier("tiny_test", 10, augmentation=None, head=HeadConfig(hidden_units=(32,), dropout=0.0))
    result = fine_tune(model, _batches(*data["train"], True), _batches(*data["val"], False),
                       Schedule.feature_extraction(epochs=2), verbose=0)
    fit = result.head_fits["head"]
    assert fit.solver == "adam-early-stopping" and fit.epochs and fit.epochs > 2
    record = result.history[-1]
    assert record["solver"] == "adam-early-stopping" and record["val_accuracy"] > 0.3


def test_converge_solver_names_what_prevents_it(tiny_backbone: object) -> None:
    model = build_classifier("tiny_test", 3, augmentation=None, head=HeadConfig(pooling="attention"))
    x = np.random.default_rng(0).uniform(0, 255, (12, 32, 32, 3)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, keras.utils.to_categorical(np.arange(12) % 3, 3))).batch(4)
    with pytest.raises(ConfigError, match="attention pooling"):
        fine_tune(model, ds, None, Schedule((Stage("head", 1, solver="converge"),)), verbose=0)


class _CountingEncoder(keras.layers.Layer):
    """Wraps the tiny wave encoder and counts the examples it encodes (a variable, so compiled calls count)."""

    def __init__(self, inner: keras.Model, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.inner = inner
        self.seen = self.add_weight(shape=(), initializer="zeros", trainable=False, name="seen")

    def call(self, x: tf.Tensor) -> tf.Tensor:
        self.seen.assign_add(tf.cast(tf.shape(x)[0], tf.float32))
        return self.inner(x)


def test_audio_head_stage_runs_the_encoder_once_per_cached_crop(tmp_path: Path) -> None:
    from tlkit.data.audio import clip_samples, load_audio_splits, make_audio_dataset

    counter: list[_CountingEncoder] = []

    def build(weights: str | None = "pretrained") -> keras.Model:
        inner = tiny_wave_encoder(weights)
        layer = _CountingEncoder(inner, name="counting")
        inputs = keras.Input((None,), name="waveform")
        counter.append(layer)
        return keras.Model(inputs, layer(inputs), name="counting_encoder")

    spec = backbones.register(tiny_wave_spec("counting_audio", builder=build, layer_groups=(r"^counting$",)),
                              overwrite=True)
    try:
        manifest = write_speaker_dataset(tmp_path / "tones", speakers_per_class=3, clips_per_speaker=4)
        splits = load_audio_splits(manifest=manifest, sample_rate=8000, val_fraction=0.25, test_fraction=0.0)
        clip = clip_samples(0.5, 8000)
        train = make_audio_dataset(splits.train, splits.class_names, splits.waveforms, clip, 8, training=True)
        val = make_audio_dataset(splits.val, splits.class_names, splits.waveforms, clip, 8, crops=2)
        model = build_classifier(spec, 2, augmentation=None)
        result = fine_tune(model, train, val, Schedule.feature_extraction(epochs=20), feature_passes=3, verbose=0)
        assert result.head_fits["head"].solver == "lbfgs"
        seen = float(counter[-1].seen.numpy())
        # One pass per cached crop: 3 random crops of each training clip, 2 fixed crops of each val clip,
        # then nothing more: 20 epochs would have cost 20 training passes.
        assert seen == 3 * len(splits.train) + 2 * len(splits.val), seen
        assert result.history[-1]["accuracy"] >= 0.9  # the solved head fits the cached crops
    finally:
        backbones.unregister("counting_audio")
