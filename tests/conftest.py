"""Shared fixtures: tiny backbones built on the fly and tiny learnable image sets."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import keras
import numpy as np
import pytest

import tlkit.backbones as backbones
from tlkit.backbones.spec import BackboneSpec, ImagePreprocessing

TINY_SIZE = 32
TINY_GROUPS = (r"^stem_", r"^block1_", r"^block2_")


def tiny_cnn(weights: str | None = "pretrained", size: int = TINY_SIZE) -> keras.Model:
    """A 3-group CNN with BatchNorm: (B, size, size, 3) in [0, 1] -> (B, size/4, size/4, 16).

    ``"pretrained"`` weights are a fixed seeded initialisation; ``None`` another seed.
    """
    seed = 1 if weights == "pretrained" else 2
    init = keras.initializers.GlorotUniform(seed=seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", kernel_initializer=init, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", kernel_initializer=init, name="block1_conv")(x)
    x = keras.layers.BatchNormalization(name="block1_bn")(x)
    x = keras.layers.ReLU(name="block1_relu")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", kernel_initializer=init, name="block2_conv")(x)
    x = keras.layers.BatchNormalization(name="block2_bn")(x)
    x = keras.layers.ReLU(name="block2_relu")(x)
    model = keras.Model(inputs, x, name="tiny_cnn")
    if weights not in (None, "pretrained"):
        model.load_weights(weights)
    return model


def tiny_spec(name: str = "tiny_test", **overrides: object) -> BackboneSpec:
    fields: dict[str, object] = dict(
        name=name,
        modality="image",
        source="builder",
        location="tests.conftest:tiny_cnn",
        input_shape=(TINY_SIZE, TINY_SIZE, 3),
        preprocessing=ImagePreprocessing(scale=1 / 255.0),
        feature_dim=16,
        output="spatial",
        layer_groups=TINY_GROUPS,
        licence="test fixture",
        builder=tiny_cnn,
    )
    fields.update(overrides)
    return BackboneSpec(**fields)  # type: ignore[arg-type]


@pytest.fixture
def tiny_backbone() -> BackboneSpec:
    """The tiny CNN registered as ``tiny_test`` (unregistered afterwards)."""
    spec = backbones.register(tiny_spec(), overwrite=True)
    yield spec
    backbones.unregister(spec.name)


@pytest.fixture
def registered(tiny_backbone: BackboneSpec) -> None:
    """``tiny_test`` registered, for tests that name it in a run config (and need no spec object)."""
    yield


def colour_images(n_per_class: int = 12, size: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable 3-class set: the dominant colour channel is the class. Pixels 0..255 float32."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(3):
        for _ in range(n_per_class):
            img = rng.uniform(0, 90, size=(size, size, 3))
            img[..., label] += rng.uniform(110, 160)
            images.append(img)
            labels.append(label)
    order = rng.permutation(len(labels))
    return np.asarray(images, np.float32)[order], np.asarray(labels)[order]


@pytest.fixture
def colour_dataset() -> tuple[np.ndarray, np.ndarray]:
    return colour_images()


def write_image_folder(root: Path, n_per_class: int = 8, size: int = 40, seed: int = 0) -> Path:
    """Writes :func:`colour_images` as PNG files under ``root/<class>/``; returns ``root``."""
    from PIL import Image

    images, labels = colour_images(n_per_class, size, seed)
    names = ["red", "green", "blue"]
    for index, (img, label) in enumerate(zip(images, labels)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{index:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")


# --------------------------------------------------------------------------- multi-task runs


MULTITASK_STAGES = [
    {"name": "head", "epochs": 1},  # solved per task on cached features
    {"name": "top", "epochs": 3, "unfreeze": 1, "learning_rate": 0.003},
]


def write_multitask_manifest(root: Path, n_per_class: int = 10, seed: int = 0) -> Path:
    """:func:`colour_images` as PNGs plus ``labels.csv`` with two tasks: ``task:colour``
    (single-label red/green/blue) and ``task:tags`` (multi-label: red ``warm``, green
    ``cool|natural``, blue ``cool``). Every 4th row lacks its tags, every 5th its colour
    (never both). Returns the manifest's path."""
    from PIL import Image

    images, labels = colour_images(n_per_class, 40, seed)
    names, tags = ["red", "green", "blue"], ["warm", "cool|natural", "cool"]
    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,task:colour,task:tags"]
    for index, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / f"{index:03d}.png")
        colour = "" if index % 5 == 4 else names[label]
        tag = "" if index % 4 == 3 and colour else tags[label]
        lines.append(f"{index:03d}.png,{colour},{tag}")
    manifest = root / "labels.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def multitask_config(tmp: Path, manifest: Path, backbone: str = "tiny_test", **overrides: object) -> dict:
    """A tiny two-task run config (``[tasks]`` naming both columns) as a raw dict."""
    raw: dict = {
        "name": "multitask", "output_dir": str(tmp / "run"), "seed": 0,
        "data": {"manifest": str(manifest), "batch_size": 8, "val_fraction": 0.2, "test_fraction": 0.2},
        "backbone": {"name": backbone}, "augmentation": {"enabled": False},
        "tasks": {"colour": {"column": "task:colour"}, "tags": {"column": "task:tags", "multi_label": True,
                                                                  "loss_weight": 0.5}},
        "schedule": {"stages": [dict(stage) for stage in MULTITASK_STAGES]},
        "training": {"verbose": 0},
    }
    raw.update(overrides)
    return raw


@pytest.fixture(scope="session")
def multitask_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny two-task run directory (tasks ``colour``: red/green/blue and ``tags``:
    multi-label cool/natural/warm; some rows lack one task's label). Built once per session with
    its own backbone name, unregistered afterwards (the run reloads without it)."""
    from tlkit.config import config_from_dict
    from tlkit.run import train

    tmp = tmp_path_factory.mktemp("multitask_run")
    spec = backbones.register(tiny_spec("tiny_multitask_fixture"), overwrite=True)
    try:
        manifest = write_multitask_manifest(tmp / "data")
        result = train(config_from_dict(multitask_config(tmp, manifest, spec.name)))
    finally:
        backbones.unregister(spec.name)
    return result.run_dir
