"""keras-hub as a backbone source: a tiny ResNetBackbone saved as a local preset is trained
(killed and resumed) and exported offline; Kaggle presets not in the cache fail fast naming
the fix; curated presets are registered by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tlkit.backbones as backbones
from tests.conftest import write_image_folder
from tests.test_resume import SCRIPT
from tlkit.backbones import keras_hub_source
from tlkit.backbones.groups import weighted_leaf_layers
from tlkit.errors import WeightsUnavailableError
from tlkit.export import export_run
from tlkit.rundir import RunDir

keras_hub = pytest.importorskip("keras_hub", reason="the keras-hub extra: pip install -e '.[keras-hub]' (in '.[test]')")
REPO = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny keras-hub ResNet (4 stages of one basic block) with a 0..1 image converter, as a local preset."""
    root = tmp_path_factory.mktemp("keras_hub") / "tiny_resnet_preset"
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 64, 64, 64],
        stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
        image_shape=(SIZE, SIZE, 3),
    )
    backbone.save_to_preset(str(root))
    keras_hub.layers.ResNetImageConverter(image_size=(SIZE, SIZE), scale=1 / 255.0).save_to_preset(str(root))
    return root


def test_keras_hub_preset_dir_resolves_with_groups_from_its_stages(preset: Path) -> None:
    spec = backbones.get(str(preset))
    assert spec.source == "keras_hub" and spec.input_shape == (SIZE, SIZE, 3) and spec.preprocessing.is_identity
    assert len(spec.layer_groups) == 4
    _, model = backbones.load_backbone(spec)
    groups = backbones.resolve_groups(spec, model)
    members = [id(layer) for group in groups.members for layer in group]
    assert len(members) == len(set(members)) == len(weighted_leaf_layers(model))
    assert all(len(group) > 0 for group in groups.members)
    # Raw pixels in: the preset's converter (x / 255) runs inside, then the preset's weights.
    pixels = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    reference = keras_hub.models.Backbone.from_preset(str(preset))
    np.testing.assert_allclose(np.asarray(model(pixels)), np.asarray(reference(pixels / 255.0)), atol=1e-4)
    assert model(pixels).shape[-1] == 64


def test_keras_hub_preset_trains_resumes_and_exports_offline(preset: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "images", n_per_class=10, size=SIZE)
    config = tmp_path / "kh.toml"
    config.write_text("\n".join([
        'name = "kh"', f'output_dir = "{tmp_path / "run"}"', "seed = 0", "[data]", f'path = "{data}"',
        "batch_size = 8", "val_fraction = 0.2", "test_fraction = 0.2", "[backbone]", f'name = "{preset}"',
        "[augmentation]", "enabled = false",
        "[[schedule.stages]]", 'name = "head"', "epochs = 2", "learning_rate = 0.02", 'solver = "sgd"',
        "[[schedule.stages]]", 'name = "top"', "epochs = 2", "unfreeze = 1", "learning_rate = 0.002",
    ]) + "\n")
    # Offline: an empty kagglehub cache, no network needed for a local preset.
    env = {**os.environ, "KAGGLEHUB_CACHE": str(tmp_path / "kagglehub"), "BACKUP_EVERY_EPOCH": "1"}
    killed = subprocess.run([sys.executable, "-c", SCRIPT, str(config)], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**env, "KILL_AFTER": "3"})  # mid top-stage epoch 2
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = subprocess.run([sys.executable, "-c", SCRIPT, str(config)], cwd=REPO, capture_output=True, text=True,
                             timeout=600, env={**env, "KILL_AFTER": "-1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = tmp_path / "run"
    epochs = json.loads((run / "history.json").read_text())["epochs"]
    assert [e["stage"] for e in epochs] == ["head", "head", "top", "top"]
    assert RunDir(run).is_complete
    report = export_run(run, formats=["savedmodel", "tflite-fp32"], out=tmp_path / "models", parity_samples=10)
    assert all(result.passed for result in report.results)


def test_keras_hub_kaggle_preset_offline_fails_fast_naming_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    assert not backbones.available_offline("kh_resnet_18_imagenet")
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        backbones.load_backbone("kh_resnet_18_imagenet")
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "resnet_18_imagenet" in message and "KAGGLEHUB_CACHE" in message and str(tmp_path / "kagglehub") in message
    assert "tlkit fetch kh_resnet_18_imagenet" in message and "KERAS_HOME" in message


def test_keras_hub_names_and_curated_presets() -> None:
    spec = backbones.get("keras_hub:resnet_50_imagenet")
    assert spec.source == "keras_hub" and spec.location == "resnet_50_imagenet"
    curated = [s.name for s in backbones.list_backbones() if s.source == "keras_hub"]
    assert {"kh_resnet_50_imagenet", "kh_efficientnet_b0_ra_imagenet"} <= set(curated)
    assert keras_hub_source.locate("keras_hub:resnet_18_imagenet") == ("keras_hub_resnet_18_imagenet",
                                                                       "resnet_18_imagenet")
