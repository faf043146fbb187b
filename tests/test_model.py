"""Classifier assembly: raw input of any size, preprocessing inside, save/reload, precision policies."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

import tlkit
from tlkit.errors import ConfigError
from tlkit.model import HeadConfig, ImageAugmentation, build_classifier, split_head


def test_layers_in_order_and_any_input_size(tiny_backbone: object) -> None:
    model = build_classifier("tiny_test", 4, head=HeadConfig(hidden_units=(8,)), augmentation=ImageAugmentation())
    names = [layer.name for layer in model.layers]
    order = ["image", "resize", "preprocess", "augment", "backbone", "pool", "dropout_0", "hidden_0", "dropout",
             "logits", "probabilities"]
    assert [n for n in names if n in order] == order
    for shape in ((1, 17, 50, 3), (2, 64, 64, 3)):
        out = model.predict(np.full(shape, 128.0, np.float32), verbose=0)
        assert out.shape == (shape[0], 4)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


def test_augmentation_only_in_training(tiny_backbone: object) -> None:
    keras.utils.set_random_seed(0)
    model = build_classifier("tiny_test", 3, augmentation=ImageAugmentation(rotation=0.2, zoom=0.3), head=HeadConfig(dropout=0))
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    a, b = model(x, training=False), model(x, training=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model(x), a)  # a direct call does not augment either
    assert not np.allclose(model(x, training=True), a)


def test_preprocessing_matches_the_spec(tiny_backbone: object) -> None:
    model = build_classifier("tiny_test", 3, augmentation=None)
    x = np.random.default_rng(1).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    pre = keras.Model(model.input, model.get_layer("preprocess").output)
    np.testing.assert_allclose(pre(x), x / 255.0, rtol=1e-6)


def test_keras_save_reload_predicts_identically(tiny_backbone: object, tmp_path: Path) -> None:
    model = build_classifier("tiny_test", 3, head=HeadConfig(hidden_units=(4,)))
    x = np.random.default_rng(2).uniform(0, 255, (3, 40, 30, 3)).astype(np.float32)
    path = tmp_path / "m.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(model.predict(x, verbose=0), reloaded.predict(x, verbose=0))


def test_multi_label_head_and_loss(tiny_backbone: object) -> None:
    head = HeadConfig(multi_label=True, label_smoothing=0.1)
    model = build_classifier("tiny_test", 3, head=head, augmentation=None)
    assert model.get_layer("probabilities").get_config()["activation"] == "sigmoid"
    assert isinstance(tlkit.model.classification_loss(head), keras.losses.BinaryCrossentropy)


def test_mixed_precision_keeps_float32_output(tiny_backbone: object) -> None:
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_classifier("tiny_test", 3, augmentation=None)
        assert model.get_layer("logits").compute_dtype == "bfloat16"
        assert model.output.dtype == "float32"
        assert model.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0).dtype == np.float32
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_split_head_shares_layers(tiny_backbone: object) -> None:
    model = build_classifier("tiny_test", 3, augmentation=None, head=HeadConfig(dropout=0))
    extractor, head = split_head(model)
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(head(extractor(x)), model(x), rtol=1e-5, atol=1e-6)
    assert head.get_layer("logits") is model.get_layer("logits")


def test_bad_head_options(tiny_backbone: object) -> None:
    with pytest.raises(ConfigError):
        HeadConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="at least 2"):
        build_classifier("tiny_test", 1)


def test_waveform_standardization_frontend() -> None:
    from tlkit.backbones.spec import AudioFrontend, BackboneSpec

    def encoder(weights: str | None) -> keras.Model:
        inputs = keras.Input((None,))
        x = keras.layers.Reshape((-1, 1))(inputs)
        return keras.Model(inputs, keras.layers.Conv1D(4, 8, strides=4, name="conv")(x))

    spec = BackboneSpec("wave_norm_test", "audio", "builder", "x", (1600,),
                        AudioFrontend(kind="waveform", normalize=True), 4, "sequence", sample_rate=16000,
                        licence="test", builder=encoder)
    model = build_classifier(spec, 2, augmentation=None)
    frontend = keras.Model(model.input, model.get_layer("frontend").output)
    x = np.random.default_rng(0).normal(3.0, 5.0, (2, 1600)).astype(np.float32)
    y = np.asarray(frontend(x))
    np.testing.assert_allclose(y.mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(y.std(axis=1), 1, atol=1e-3)


def test_backbone_batchnorm_is_frozen_by_construction(tiny_backbone: object, tmp_path: Path) -> None:
    """bn_inference (default): FrozenBatchNormalization layers, same outputs as plain ones, kept on reload."""
    from tlkit.layers import FrozenBatchNormalization

    frozen = build_classifier("tiny_test", 3, augmentation=None, head=HeadConfig(dropout=0.0))
    plain = build_classifier("tiny_test", 3, augmentation=None, head=HeadConfig(dropout=0.0, bn_inference=False))
    bn = [la for la in frozen.get_layer("backbone").layers if isinstance(la, keras.layers.BatchNormalization)]
    assert [la.name for la in bn] == ["stem_bn", "block1_bn", "block2_bn"]
    assert all(isinstance(la, FrozenBatchNormalization) for la in bn)
    assert not any(isinstance(la, FrozenBatchNormalization) for la in plain.get_layer("backbone").layers)
    rng = np.random.default_rng(5)
    for variable in plain.weights:  # trained-looking statistics, so inference mode matters
        value = rng.uniform(0.5, 2.0, variable.shape) if "variance" in variable.path else rng.normal(0, 0.3, variable.shape)
        variable.assign(value.astype("float32"))
    frozen.set_weights(plain.get_weights())
    x = np.random.default_rng(6).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(frozen.predict(x, verbose=0), plain.predict(x, verbose=0))  # parity
    # In training mode, even thawed, the statistics neither change nor are used from the batch.
    frozen.get_layer("backbone").trainable = True
    before = [np.array(la.moving_variance.numpy(), copy=True) for la in bn]
    np.testing.assert_allclose(frozen(x, training=True), frozen(x, training=False), rtol=1e-6, atol=1e-7)
    assert all(np.array_equal(b, la.moving_variance.numpy()) for b, la in zip(before, bn))
    assert not np.allclose(plain(x, training=True), plain(x, training=False), atol=1e-4)  # plain BN would differ
    path = tmp_path / "frozen.keras"
    frozen.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(reloaded.get_layer("backbone").get_layer("stem_bn"), FrozenBatchNormalization)
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), frozen.predict(x, verbose=0))
