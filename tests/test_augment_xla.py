"""tlkit.layers.RandomAffine: the XLA-compatible zoom / shift / rotation of ImageAugmentation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.trainers.trainer import model_supports_jit

import tlkit.backbones  # noqa: F401  (import order: tlkit.layers needs the backbone registry loaded)
from tlkit.errors import ConfigError
from tlkit.finetune import Schedule, Stage, fine_tune
from tlkit.layers import RandomAffine, TrainingOnly, affine_resample
from tlkit.model import HeadConfig, ImageAugmentation, build_classifier
from tlkit.portable import portable_model
from tlkit.registration import SERIALIZABLES

SIZE = 32


def ramp(n: int, size: int = SIZE) -> np.ndarray:
    """(n, size, size, 3) images whose value is the column index: a zoom z makes the slope z."""
    row = np.arange(size, dtype=np.float32)
    return np.broadcast_to(row[None, None, :, None], (n, size, size, 3)).copy()


def zoom_slopes(images: np.ndarray) -> np.ndarray:
    """Per image, the slope of the centre row over its middle half (the zoom factor for a ramp)."""
    size = images.shape[2]
    cols = np.arange(size // 4, 3 * size // 4)
    centre = images[:, size // 2, cols, 0]
    return np.array([np.polyfit(cols, row, 1)[0] for row in centre])


def keras_zoom_matrix(zooms: np.ndarray, height: int, width: int) -> np.ndarray:
    """The transform ``keras.layers.RandomZoom`` passes to ``affine_transform`` (one zoom for both axes)."""
    z = zooms.reshape(-1, 1).astype(np.float32)
    zero = np.zeros_like(z)
    return np.concatenate([z, zero, (width - 1) / 2 * (1 - z), zero, z, (height - 1) / 2 * (1 - z), zero, zero], 1)


def test_identity_outside_training() -> None:
    x = np.random.default_rng(0).uniform(-2, 2, (4, SIZE, SIZE, 3)).astype(np.float32)
    layer = RandomAffine(zoom=0.3, translation=0.2, rotation=0.1, seed=1)
    np.testing.assert_array_equal(layer(x), x)
    np.testing.assert_array_equal(layer(x, training=False), x)


def test_training_changes_each_example_differently_and_keeps_range() -> None:
    x = ramp(64)
    out = np.asarray(RandomAffine(zoom=0.1, seed=3)(x, training=True))
    assert out.shape == x.shape
    assert np.abs(out - x).max() > 0.5
    assert out.min() >= x.min() - 1e-4 and out.max() <= x.max() + 1e-4  # bilinear: convex combinations
    slopes = zoom_slopes(out)
    assert np.all(slopes > 0.9 - 1e-3) and np.all(slopes < 1.1 + 1e-3)  # z ~ U(0.9, 1.1)
    assert slopes.min() < 0.97 and slopes.max() > 1.03  # both zoom-in and zoom-out occur
    assert len(np.unique(np.round(slopes, 4))) > 50  # per example, not one zoom per batch


def test_zoom_distribution_matches_keras_random_zoom() -> None:
    x = ramp(128)
    ours = zoom_slopes(np.asarray(RandomAffine(zoom=0.1, seed=5)(x, training=True)))
    theirs = zoom_slopes(np.asarray(keras.layers.RandomZoom(0.1, fill_mode="reflect", seed=5)(x, training=True)))
    for slopes in (ours, theirs):
        assert slopes.min() > 0.9 - 1e-3 and slopes.max() < 1.1 + 1e-3
    assert abs(ours.mean() - theirs.mean()) < 0.015  # both uniform on [0.9, 1.1]: mean 1, sd 0.058
    assert abs(ours.std() - theirs.std()) < 0.015


@pytest.mark.parametrize("zoom", [0.8, 0.9, 1.1, 1.25])
def test_fixed_zoom_equals_keras_affine_transform(zoom: float) -> None:
    """Zoom-in (< 1) crops, zoom-out (> 1) shrinks and reflects at the edges, as in RandomZoom."""
    x = np.random.default_rng(1).uniform(0, 1, (2, 24, 20, 3)).astype(np.float32)
    z = np.full((2, 1), zoom, np.float32)
    zero = np.zeros_like(z)
    ours = np.asarray(affine_resample(x, z, zero, zero, zero))
    theirs = np.asarray(keras.ops.image.affine_transform(
        x, keras_zoom_matrix(z, 24, 20), interpolation="bilinear", fill_mode="reflect"))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    if zoom > 1:  # the border holds reflected content: the first column mirrors the second one in
        np.testing.assert_allclose(ours[:, :, 0], theirs[:, :, 0], atol=1e-5)


def test_rotation_and_shift_equal_keras_affine_transform() -> None:
    x = np.random.default_rng(2).uniform(0, 1, (3, 24, 20, 3)).astype(np.float32)
    angle = np.array([[0.3], [-0.2], [0.1]], np.float32)
    shift_y = np.array([[0.1], [0.0], [-0.05]], np.float32)
    shift_x = np.array([[-0.1], [0.05], [0.0]], np.float32)
    one = np.ones_like(angle)
    ours = np.asarray(affine_resample(x, one, angle, shift_y, shift_x))
    c, s = np.cos(angle), np.sin(angle)
    cx, cy = 19 / 2, 23 / 2
    tx, ty = shift_x * 20, shift_y * 24
    matrix = np.concatenate([c, -s, cx - c * cx + s * cy - tx, s, c, cy - s * cx - c * cy - ty,
                             np.zeros_like(c), np.zeros_like(c)], 1)
    theirs = np.asarray(keras.ops.image.affine_transform(x, matrix, interpolation="bilinear", fill_mode="reflect"))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_runs_under_xla() -> None:
    layer = RandomAffine(zoom=0.1, translation=0.1, rotation=0.05, seed=7)
    x = tf.constant(ramp(8))
    step = tf.function(lambda images: layer(images, training=True), jit_compile=True)
    first, second = np.asarray(step(x)), np.asarray(step(x))
    assert first.shape == x.shape
    assert np.abs(first - x.numpy()).max() > 0.5
    assert not np.allclose(first, second)  # the seed generator advances inside the compiled step
    assert layer.supports_jit


def test_bad_fraction_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="zoom must be a fraction in"):
        RandomAffine(zoom=1.5)


def test_serializable_and_portable(tiny_backbone: object) -> None:
    assert RandomAffine in SERIALIZABLES
    layer = RandomAffine(zoom=0.2, translation=0.1, rotation=0.05, seed=4, name="affine")
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(clone, RandomAffine) and clone.get_config() == layer.get_config()
    model = build_classifier("tiny_test", 3, augmentation=ImageAugmentation(rotation=0.1, translation=0.1))
    portable = portable_model(model)
    assert not any(isinstance(sub, RandomAffine) for sub in portable._flatten_layers())


@pytest.mark.parametrize("augmentation", [
    ImageAugmentation(),
    ImageAugmentation(vertical_flip=True, rotation=0.05, zoom=0.2, translation=0.1, contrast=0.2, brightness=0.2),
])
def test_augmented_classifier_supports_xla(tiny_backbone: object, augmentation: ImageAugmentation) -> None:
    model = build_classifier("tiny_test", 3, augmentation=augmentation)
    augment = model.get_layer("augment")
    assert isinstance(augment, TrainingOnly)
    assert any(isinstance(sub, RandomAffine) for sub in augment.layers)
    unsupported = [sub.name for sub in model._flatten_layers() if not sub.supports_jit]
    assert unsupported == []
    assert model_supports_jit(model)


def test_jit_auto_turns_xla_on_and_trains(tiny_backbone: object, colour_dataset: tuple[np.ndarray, np.ndarray],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Keras's ``"auto"`` keeps XLA off on CPU-only machines; a pretend GPU makes it take the GPU
    decision (every layer ``supports_jit``), and training then really runs under XLA on the CPU."""
    devices = tf.config.list_physical_devices

    def with_gpu(device_type: str | None = None) -> list:
        found = devices(device_type)
        if device_type is None:  # Keras's auto-jit check lists all devices
            found = [*found, tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")]
        return found

    monkeypatch.setattr(tf.config, "list_physical_devices", with_gpu)
    x, y = colour_dataset
    size_x = tf.image.resize(x, (SIZE, SIZE)).numpy()
    onehot = np.eye(3, dtype=np.float32)[y]
    train = tf.data.Dataset.from_tensor_slices((size_x, onehot)).batch(12)
    keras.utils.set_random_seed(0)
    model = build_classifier("tiny_test", 3, augmentation=ImageAugmentation(), head=HeadConfig(dropout=0.0))
    schedule = Schedule((Stage("head", 3, 0, 3e-2, solver="sgd"), Stage("all", 3, "all", 3e-3)))
    result = fine_tune(model, train, schedule=schedule, feature_cache="off", jit_compile="auto", verbose=0)
    assert model.jit_compile is True  # resolved by Keras's own auto rule, not forced
    losses = [record["loss"] for record in result.history]
    assert losses[-1] < losses[0]
