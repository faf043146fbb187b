"""The keras.applications backbones beyond the first seven: each spec's preprocessing is its
architecture's own ``preprocess_input``, and an offline cache fails fast naming the fix.

(The build / input / feature size / layer-group contract of every ``keras_applications``
spec is :func:`tests.test_backbones.test_keras_application_contract`, parametrised over
the registry, so it covers these names too.)
"""

from __future__ import annotations

import time
from pathlib import Path

import keras
import numpy as np
import pytest

import tlkit.backbones as backbones
from tlkit.backbones import keras_apps
from tlkit.errors import WeightsUnavailableError
from tlkit.layers import ImageNormalization

# name -> the keras.applications module whose preprocess_input the spec must reproduce.
ADDED = {
    "vgg16": keras.applications.vgg16,
    "vgg19": keras.applications.vgg19,
    "resnet101": keras.applications.resnet,
    "resnet152": keras.applications.resnet,
    "xception": keras.applications.xception,
    "densenet121": keras.applications.densenet,
    "convnext_tiny": keras.applications.convnext,
    "efficientnetv2_b0": keras.applications.efficientnet_v2,
}


def test_added_keras_applications_are_registered() -> None:
    specs = {s.name: s for s in backbones.list_backbones()}
    for name in ADDED:
        assert specs[name].source == "keras_applications", name
        # The weights file Keras caches them under is known, so `tlkit backbones` can tell offline.
        assert keras_apps.weights_path(specs[name]) is not None, name


@pytest.mark.parametrize("name", sorted(ADDED))
def test_preprocessing_matches_preprocess_input(name: str) -> None:
    """tlkit's in-model preprocessing of raw 0..255 RGB pixels == keras.applications' preprocess_input."""
    spec = backbones.get(name)
    pixels = np.random.default_rng(0).uniform(0, 255, size=(2, 8, 8, 3)).astype(np.float32)
    ours = np.asarray(ImageNormalization.from_spec(spec.preprocessing)(pixels))
    theirs = np.asarray(ADDED[name].preprocess_input(pixels.copy()))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cls", ["ConvNeXtTiny", "EfficientNetV2B0"])
def test_identity_specs_rescale_inside_the_model(cls: str) -> None:
    """The IDENTITY specs rely on Keras's include_preprocessing=True: the model takes 0..255."""
    model = getattr(keras.applications, cls)(include_top=False, weights=None, input_shape=(32, 32, 3))
    kinds = {type(layer).__name__ for layer in model.layers}
    assert "Normalization" in kinds or "Rescaling" in kinds


def test_offline_added_backbone_fails_fast_naming_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    spec = backbones.get("densenet121")
    assert not keras_apps.available_offline(spec)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        backbones.load_backbone("densenet121")
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "KERAS_HOME" in message and "tlkit fetch densenet121" in message
    assert "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
