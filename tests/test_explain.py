"""tlkit.explain: Grad-CAM finds what a tiny model was trained to see; fallbacks; overlays; audio saliency."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import tlkit
import tlkit.backbones as backbones
from tests.conftest import tiny_cnn, tiny_spec
from tlkit.errors import ConfigError
from tlkit.explain import (
    MIN_MAP_SIZE,
    audio_saliency,
    explain_images,
    find_spatial_layer,
    grad_cam,
    overlay,
)
from tlkit.finetune import Schedule, Stage, fine_tune
from tlkit.heatmap import OVERLAY_THRESHOLD

SIZE = 64
SQUARE = 14


def _square_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int] | None]]:
    """Dark noise; every odd image (class 1) has a bright square at a random place."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 60, (n, SIZE, SIZE, 3)).astype(np.float32)
    labels = np.zeros(n, np.int64)
    corners: list[tuple[int, int] | None] = []
    for i in range(n):
        if i % 2:
            row, col = (int(v) for v in rng.integers(0, SIZE - SQUARE, 2))
            images[i, row : row + SQUARE, col : col + SQUARE] = rng.uniform(200, 255)
            labels[i] = 1
            corners.append((row, col))
        else:
            corners.append(None)
    return images, labels, corners


@pytest.fixture(scope="module")
def square_model() -> keras.Model:
    """The tiny CNN at 64x64 (16x16 last activation), trained to tell a bright square from none."""
    spec = backbones.register(
        tiny_spec(name="tiny_square", builder=lambda weights: tiny_cnn(weights, size=SIZE),
                  input_shape=(SIZE, SIZE, 3)),
        overwrite=True,
    )
    keras.utils.set_random_seed(0)
    images, labels, _ = _square_images(128, seed=0)
    ds = tf.data.Dataset.from_tensor_slices((images, np.eye(2, dtype=np.float32)[labels])).batch(16)
    model = tlkit.build_classifier(spec, 2, weights=None, augmentation=None, seed=0)
    fine_tune(model, ds, None, Schedule((Stage("all", 8, "all", 0.01),)), verbose=0)
    yield model
    backbones.unregister(spec.name)


def test_grad_cam_puts_its_mass_on_the_square(square_model: keras.Model) -> None:
    images, labels, corners = _square_images(24, seed=1)
    probabilities = square_model.predict(images, verbose=0)
    assert (probabilities.argmax(1) == labels).mean() >= 0.9, "the tiny model did not learn the task"
    positives = np.flatnonzero(labels == 1)
    heatmaps = grad_cam(square_model, images[positives], class_index=1)
    assert heatmaps.shape == (len(positives), SIZE, SIZE)
    assert heatmaps.dtype == np.float32 and heatmaps.min() >= 0 and heatmaps.max() == pytest.approx(1.0)
    area = SQUARE * SQUARE / SIZE**2  # ~5% of the image
    for heat, index in zip(heatmaps, positives):
        row, col = corners[index]  # type: ignore[misc]
        inside = heat[row : row + SQUARE, col : col + SQUARE].sum() / heat.sum()
        assert inside > 0.5, f"only {inside:.2f} of the heatmap lies on the square"
        assert inside > 8 * area
        peak = np.unravel_index(heat.argmax(), heat.shape)
        assert row - 2 <= peak[0] < row + SQUARE + 2 and col - 2 <= peak[1] < col + SQUARE + 2


def test_grad_cam_maps_show_where_the_evidence_is_not(square_model: keras.Model) -> None:
    """A fixed 0..1 scale (over the 99th percentile): most of the image stays below the overlay threshold."""
    images, labels, corners = _square_images(24, seed=4)
    positives = np.flatnonzero(labels == 1)
    heatmaps = grad_cam(square_model, images[positives], class_index=1)
    for heat, index in zip(heatmaps, positives):
        row, col = corners[index]  # type: ignore[misc]
        hot = heat >= OVERLAY_THRESHOLD
        assert hot.mean() < 0.35, f"{hot.mean():.2f} of the image is coloured"
        assert heat[row : row + SQUARE, col : col + SQUARE].mean() > 3 * heat.mean()
        picture = overlay(images[index], heat)
        cold = ~hot
        np.testing.assert_array_equal(picture[cold], np.round(images[index][cold]).astype(np.uint8))
        assert (picture[hot] != np.round(images[index][hot]).astype(np.uint8)).any()


def _strided(size: int | None, name: str = "strided") -> keras.Model:
    """Four stride-2 convolutions: maps of size/2, size/4, size/8, size/16."""
    inputs = keras.Input((size, size, 3))
    x = inputs
    for i in range(4):
        x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name=f"down{i}")(x)
    return keras.Model(inputs, x, name=name)


def test_grad_cam_layer_has_enough_resolution_for_the_input_size() -> None:
    assert MIN_MAP_SIZE == 7
    assert find_spatial_layer(_strided(96)) == "down2"  # 12x12; the last layer is 6x6
    assert find_spatial_layer(_strided(224)) == "down3"  # 14x14
    assert find_spatial_layer(_strided(16)) == "down0"  # 8x8
    assert find_spatial_layer(_strided(8)) == "down0"  # none reaches 7x7: the largest map
    dynamic = _strided(None)
    assert find_spatial_layer(dynamic) == "down3"  # sizes unknown without an input
    assert find_spatial_layer(dynamic, np.zeros((1, 96, 96, 3), np.float32)) == "down2"
    # Through a classifier whose backbone takes any size: measured at the input given.
    inputs = keras.Input((None, None, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="preprocess")(inputs)
    x = _strided(None, name="backbone")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(2, name="logits")(x)
    model = keras.Model(inputs, keras.layers.Activation("softmax", name="probabilities")(x))
    rng = np.random.default_rng(0)
    for size, layer in ((96, "down2"), (224, "down3")):
        explanation = explain_images(model, rng.uniform(0, 255, (1, size, size, 3)).astype(np.float32))
        assert explanation.layer == layer and explanation.heatmaps.shape == (1, size, size)


def test_grad_cam_options(square_model: keras.Model) -> None:
    images, _, _ = _square_images(3, seed=2)
    explanation = explain_images(square_model, images)
    assert explanation.method == "grad-cam" and explanation.layer == "block2_relu"
    assert explanation.layer == find_spatial_layer(square_model.get_layer("backbone"))
    assert np.array_equal(explanation.class_index, explanation.probabilities.argmax(1))
    np.testing.assert_allclose(explanation.probabilities, square_model.predict(images, verbose=0), atol=1e-5)
    # one image, another layer, one class per image, a different input size
    single = grad_cam(square_model, images[0], layer="block1_relu")
    assert single.shape == (1, SIZE, SIZE)
    bigger = np.repeat(np.repeat(images[:2], 2, axis=1), 2, axis=2)
    assert grad_cam(square_model, bigger, class_index=[0, 1]).shape == (2, 2 * SIZE, 2 * SIZE)
    assert explain_images(square_model, images, layer="backbone").method == "grad-cam (backbone output)"
    with pytest.raises(ConfigError, match="not a layer of backbone"):
        grad_cam(square_model, images, layer="no_such_layer")
    with pytest.raises(ConfigError, match="out of range"):
        grad_cam(square_model, images, class_index=5)


def test_grad_cam_leaves_the_model_usable(square_model: keras.Model) -> None:
    """Explaining must not add nodes to the model's layers (split_head still works)."""
    images, _, _ = _square_images(2, seed=3)
    grad_cam(square_model, images)
    extractor, head = tlkit.split_head(square_model)
    np.testing.assert_allclose(head(extractor(images)), square_model(images), atol=1e-5)


def _classifier_on(backbone: keras.layers.Layer, spatial: bool) -> keras.Model:
    inputs = keras.Input((None, None, 3), name="image")
    x = keras.layers.Resizing(32, 32, name="resize")(inputs)
    x = keras.layers.Rescaling(1 / 255.0, name="preprocess")(x)
    x = backbone(x)
    x = (keras.layers.GlobalAveragePooling2D(name="pool") if spatial else keras.layers.Identity(name="pool"))(x)
    x = keras.layers.Dense(2, name="logits")(x)
    return keras.Model(inputs, keras.layers.Activation("softmax", name="probabilities")(x))


@pytest.mark.parametrize("spatial", [True, False], ids=["spatial", "pooled"])
def test_opaque_savedmodel_backbone(tmp_path: Path, spatial: bool) -> None:
    from tlkit.backbones.hub import SavedModelBackbone

    network = tiny_cnn(size=32)
    if not spatial:
        network = keras.Model(network.input, keras.layers.GlobalAveragePooling2D()(network.output))
    network.export(str(tmp_path / "saved"), verbose=False)
    model = _classifier_on(SavedModelBackbone(str(tmp_path / "saved"), name="backbone"), spatial)
    images = np.random.default_rng(0).uniform(0, 255, (2, 40, 48, 3)).astype(np.float32)
    explanation = explain_images(model, images)
    assert explanation.heatmaps.shape == (2, 40, 48)
    assert 0 <= explanation.heatmaps.min() and explanation.heatmaps.max() <= 1
    if spatial:
        assert explanation.method == "grad-cam (backbone output)" and explanation.layer == "backbone"
    else:
        assert explanation.method == "saliency" and "not Grad-CAM" in explanation.note
    with pytest.raises(ConfigError, match="opaque"):
        grad_cam(model, images, layer="block2_conv")


def test_model_without_backbone_layer() -> None:
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(3, name="logits")(x)
    model = keras.Model(inputs, keras.layers.Activation("softmax")(x))
    explanation = explain_images(model, np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)))
    assert explanation.layer == "conv" and explanation.heatmaps.shape == (2, 16, 16)


def test_overlay() -> None:
    image = np.full((20, 30, 3), 100, np.float32)
    heat = np.zeros((5, 6), np.float32)
    heat[2, 3] = 1.0
    blended = overlay(image, heat)
    assert blended.shape == (20, 30, 3) and blended.dtype == np.uint8
    assert not np.array_equal(blended[8, 15], blended[0, 0])  # hot and cold regions differ
    np.testing.assert_array_equal(overlay(image, heat, alpha=0.0), image.astype(np.uint8))
    # Below the threshold nothing is drawn; the colour's weight rises with the heat above it.
    flat = np.full((20, 30), OVERLAY_THRESHOLD - 0.01, np.float32)
    np.testing.assert_array_equal(overlay(image, flat), image.astype(np.uint8))
    ramp = np.tile(np.linspace(0.0, 1.0, 30, dtype=np.float32), (20, 1))
    change = np.abs(overlay(image, ramp, colormap="gray").astype(int) - 100).sum(axis=-1)[0]
    assert change[0] == 0 and change[-1] > change[20] > 0


def test_audio_saliency_over_the_frontend() -> None:
    frames, bins = 20, 8
    inputs = keras.Input((frames * bins,), name="waveform")
    x = keras.layers.Reshape((frames, bins), name="frontend")(inputs)
    x = keras.layers.Conv1D(4, 3, padding="same", activation="relu", name="encoder")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    x = keras.layers.Dense(3, name="logits")(x)
    model = keras.Model(inputs, keras.layers.Activation("softmax", name="probabilities")(x))
    waves = np.random.default_rng(0).uniform(-1, 1, (2, frames * bins)).astype(np.float32)
    explanation = audio_saliency(model, waves, class_index=2)
    assert explanation.heatmaps.shape == (2, frames, bins)
    assert explanation.heatmaps.max() == pytest.approx(1.0) and explanation.heatmaps.min() >= 0
    assert explanation.class_index.tolist() == [2, 2]
    no_frontend = keras.Model(model.inputs, model.outputs)
    no_frontend.get_layer("frontend").name = "reshape"
    with pytest.raises(ConfigError, match="frontend"):
        audio_saliency(no_frontend, waves)


def test_grad_cam_through_augmentation_and_hidden_layers(tiny_backbone: object) -> None:
    """Random augmentation layers are identities at inference; the replayed chain must match the model."""
    model = tlkit.build_classifier(
        "tiny_test", 3, weights=None, augmentation=tlkit.ImageAugmentation(rotation=0.1, contrast=0.2),
        head=tlkit.HeadConfig(hidden_units=(8,), dropout=0.3, multi_label=True), seed=0,
    )
    images = np.random.default_rng(0).uniform(0, 255, (3, 36, 36, 3)).astype(np.float32)
    explanation = explain_images(model, images)
    np.testing.assert_allclose(explanation.probabilities, model.predict(images, verbose=0), atol=1e-5)
    assert explanation.heatmaps.shape == (3, 36, 36) and explanation.layer == "block2_relu"
