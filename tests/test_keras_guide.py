"""Keras's transfer-learning guide, followed on a tlkit model, and integer labels in fine_tune.

The guide (keras.io/guides/transfer_learning): load images with
``keras.utils.image_dataset_from_directory`` (integer labels by default), train a new head
on a frozen base, then ``base.trainable = True``, recompile with ``Adam(1e-5)`` and fit
again. Keras 3 hands the outer ``training=True`` to every layer of the nested backbone, so
plain BatchNorm layers would train there; a tlkit classifier's BatchNorm layers
(``HeadConfig.bn_inference``, the default) keep their statistics by construction.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tlkit.data.batches import Batches
from tlkit.errors import DataError
from tlkit.finetune import Schedule, Stage, fine_tune
from tlkit.layers import FrozenBatchNormalization
from tlkit.model import HeadConfig, build_classifier, classification_loss, integer_labels
from tests.conftest import TINY_SIZE, write_image_folder


@pytest.fixture
def guide_data(tmp_path: Path) -> tf.data.Dataset:
    """The guide's input pipeline on the learnable colour set: (B, 32, 32, 3) pixels, (B,) int labels."""
    root = write_image_folder(tmp_path / "images", n_per_class=12)
    return keras.utils.image_dataset_from_directory(
        root, image_size=(TINY_SIZE, TINY_SIZE), batch_size=8, seed=0, verbose=False)


def _statistics(backbone: keras.Model) -> dict[str, np.ndarray]:
    return {v.path: np.array(v.numpy(), copy=True) for v in backbone.weights if "moving_" in v.path}


def _follow_the_guide(model: keras.Model, data: tf.data.Dataset) -> tuple[float, dict[str, list[float]], dict]:
    """Head on a frozen base, then the hand-made unfreeze; returns (head accuracy, fine-tune
    history, BatchNorm statistics before the unfreeze)."""
    backbone = model.get_layer("backbone")
    backbone.trainable = False
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    model.fit(data, epochs=12, verbose=0)
    head_accuracy = model.evaluate(data, verbose=0, return_dict=True)["accuracy"]
    before = _statistics(backbone)
    backbone.trainable = True  # the guide's step
    model.compile(keras.optimizers.Adam(1e-5), keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    history = model.fit(data, epochs=3, verbose=0).history
    return head_accuracy, history, before


def test_hand_unfreezing_keeps_batchnorm_statistics(tiny_backbone: object, guide_data: tf.data.Dataset) -> None:
    keras.utils.set_random_seed(0)
    model = build_classifier("tiny_test", 3, augmentation=None)
    backbone = model.get_layer("backbone")
    kernel = np.array(backbone.get_layer("block2_conv").kernel.numpy(), copy=True)
    head_accuracy, history, before = _follow_the_guide(model, guide_data)
    assert head_accuracy >= 0.9, head_accuracy
    after = _statistics(backbone)
    assert set(before) == {f"{name}_bn/{stat}" for name in ("stem", "block1", "block2")
                           for stat in ("moving_mean", "moving_variance")}
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    assert not np.array_equal(kernel, backbone.get_layer("block2_conv").kernel.numpy()), "the thawed base did not train"
    # No collapse: training-mode accuracy (what fit reports) and inference accuracy stay up.
    assert min(history["accuracy"]) >= head_accuracy - 0.1, history
    assert model.evaluate(guide_data, verbose=0, return_dict=True)["accuracy"] >= head_accuracy - 0.1


def test_plain_batchnorm_would_train_its_statistics(tiny_backbone: object, guide_data: tf.data.Dataset) -> None:
    """The trap the default avoids, shown on purpose with ``bn_inference=False``."""
    keras.utils.set_random_seed(0)
    model = build_classifier("tiny_test", 3, augmentation=None, head=HeadConfig(bn_inference=False))
    assert not any(isinstance(la, FrozenBatchNormalization) for la in model.get_layer("backbone").layers)
    _, _, before = _follow_the_guide(model, guide_data)
    after = _statistics(model.get_layer("backbone"))
    assert all(not np.array_equal(after[p], v) for p, v in before.items()), "plain BatchNorm statistics did not move"


def test_integer_labels_are_recognised(guide_data: tf.data.Dataset) -> None:
    assert integer_labels(guide_data)  # (B,) int32, the loader's default
    assert integer_labels(guide_data.map(lambda x, y: (x, y[:, None])))  # (B, 1) int
    assert not integer_labels(guide_data.map(lambda x, y: (x, tf.one_hot(y, 3))))  # (B, 3) one-hot
    assert not integer_labels(guide_data.map(lambda x, y: (x, tf.cast(y[:, None], tf.float32))))  # (B, 1) float
    examples = tf.data.Dataset.from_tensor_slices((np.zeros((4, 2), np.float32), np.arange(4)))
    assert integer_labels(Batches(examples, 4, 2))  # unbatched () int targets
    assert not integer_labels(Batches(examples.map(lambda x, y: (x, tf.one_hot(y, 4))), 4, 2))
    with pytest.raises(DataError, match="multi-hot"):
        classification_loss(HeadConfig(multi_label=True), sparse=True)


@pytest.mark.parametrize("shape", ["(B,)", "(B, 1)"])
def test_fine_tune_takes_integer_labels(tiny_backbone: object, guide_data: tf.data.Dataset, shape: str) -> None:
    """Head solved on cached features, then a thawed stage, straight from the loader's int labels."""
    data = guide_data if shape == "(B,)" else guide_data.map(lambda x, y: (x, y[:, None]))
    keras.utils.set_random_seed(0)
    model = build_classifier("tiny_test", 3, augmentation=None)
    schedule = Schedule((Stage("head", 1, 0, solver="converge"), Stage("top", 2, 1, 1e-3)))
    result = fine_tune(model, data, data, schedule, verbose=0)
    assert "head" in result.head_fits
    assert [r["stage"] for r in result.history] == ["head", "top", "top"]
    assert result.history[0]["accuracy"] >= 0.9, result.history[0]
    assert result.metric("val_accuracy")[-1] >= 0.9, result.history
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)
    pairs = [(np.asarray(model.predict_on_batch(x)).argmax(axis=1), np.asarray(y).reshape(-1)) for x, y in data]
    assert np.mean(np.concatenate([p == y for p, y in pairs])) >= 0.9  # the loader reshuffles: batch by batch
