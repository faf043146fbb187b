"""Backbone features computed once, so head-only stages cost one backbone pass.

A head-only stage with a frozen backbone and fixed pooling sees the same feature vector for an
example every epoch, so the backbone need not run again: the features of the training and
validation examples are computed once (with ``predict``, as a compiled function) and the head
trains on them. The head model shares its layers with the full model, so training it trains
the full model's head.

Inputs may be :class:`~tlkit.data.batches.Batches` (image runs: features are batched in exactly
the order the images would have been, same seed and batch size) or any finite batched
``tf.data.Dataset`` (audio runs: the training set draws a new random crop per clip on every
pass, so ``train_passes`` passes cache that many random crops per clip).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit.data.batches import Batches
from tlkit.model import FEATURES_LAYER, split_head

MEMORY_LIMIT = 2 << 30


def cache_blocker(model: keras.Model, train: Any, validation: Any, *, augmented_ok: bool) -> str | None:
    """Why the feature cache cannot stand in for the backbone, or ``None`` when it can.

    Args:
        augmented_ok: the stage's head is solved on clean features (augmentation is the
            identity outside training, so features of un-augmented input are what the model
            sees at inference); ``False`` for epoch-by-epoch training, where augmentation
            must stay in the loop.
    """
    pooling = model.get_layer(FEATURES_LAYER) if FEATURES_LAYER in [la.name for la in model.layers] else None
    if pooling is not None and pooling.trainable_weights:
        return f"the pooling layer {pooling.name!r} has trainable weights (attention pooling), so features change"
    if not augmented_ok and any(layer.name == "augment" for layer in model.layers):
        return "the model augments its input during training (build it with augmentation=None, or solver='auto')"
    for name, data in (("training", train), ("validation", validation)):
        if data is None or isinstance(data, Batches):
            continue
        if not isinstance(data, tf.data.Dataset):
            return f"the {name} data is a {type(data).__name__}, not tlkit Batches or a tf.data.Dataset"
        if int(data.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
            return f"the {name} dataset repeats forever; pass one epoch of data"
    return None


@dataclass
class FeatureCache:
    """Cached features and the head model that trains on them.

    Attributes:
        head: ``features -> probabilities``, sharing layers with the full model.
        train / validation: the features as :class:`Batches` (for epoch-by-epoch training).
        train_x / train_y / val_x / val_y: the same as arrays (for a convex fit of the head).
        seconds: time spent computing them.
        backbone_passes: how many times the backbone ran over each split.
    """

    head: keras.Model
    train: Batches
    validation: Batches | None
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray | None
    val_y: np.ndarray | None
    seconds: float
    backbone_passes: int = 1

    @classmethod
    def build(
        cls, model: keras.Model, train: Any, validation: Any, mode: str, folder: Path, *,
        train_passes: int = 1, memory_limit: int = MEMORY_LIMIT,
    ) -> "FeatureCache":
        """Computes the features of ``train`` (``train_passes`` passes when it is a random
        ``tf.data`` pipeline) and ``validation`` with the model's feature extractor."""
        start = time.monotonic()
        extractor, head_model = split_head(model)
        tx, ty, batches = _features(extractor, train, mode, folder / "train", memory_limit, train_passes, shuffle=True)
        vx = vy = None
        val_batches = None
        if validation is not None:
            vx, vy, val_batches = _features(extractor, validation, mode, folder / "validation", memory_limit, 1,
                                            shuffle=False)
        passes = 1 if isinstance(train, Batches) else train_passes
        return cls(head_model, batches, val_batches, tx, ty, vx, vy, time.monotonic() - start, passes)


def _features(
    extractor: keras.Model, data: Any, mode: str, path: Path, memory_limit: int, passes: int, *, shuffle: bool,
) -> tuple[np.ndarray, np.ndarray, Batches]:
    if isinstance(data, Batches):
        # predict runs the extractor as a compiled function (several times faster than eager calls).
        features = np.asarray(extractor.predict(data.in_order().map(lambda x, y: x), verbose=0), np.float32)
        labels = _concatenate([y for _, y in data.in_order()])
        template = data
    else:
        feats, labs = [], []
        for _ in range(max(1, passes)):
            for x, y in data:
                feats.append(np.asarray(extractor.predict_on_batch(x), np.float32))
                labs.append(y)
        features, labels = np.concatenate(feats), _concatenate(labs)
        template = Batches(tf.data.Dataset.range(0), len(features), len(feats[0]), shuffle=shuffle)
    if mode == "disk" or features.nbytes > memory_limit:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".features.npy"), features)
        features = np.load(path.with_suffix(".features.npy"), mmap_mode="r")
        stored = features

        def rows() -> Any:
            for i in range(len(stored)):
                yield np.asarray(stored[i]), tf.nest.map_structure(lambda column: column[i], labels)

        signature = (tf.TensorSpec(stored.shape[1:], tf.float32),
                     tf.nest.map_structure(lambda column: tf.TensorSpec(column.shape[1:], column.dtype), labels))
        examples = tf.data.Dataset.from_generator(rows, output_signature=signature).apply(
            tf.data.experimental.assert_cardinality(len(stored))
        )
    else:
        examples = tf.data.Dataset.from_tensor_slices((features, labels))
    return features, labels, template.with_examples(examples)


def _concatenate(batches: list[Any]) -> Any:
    """Batches of targets -> one array (or, for a multi-task model's dict of targets, one per task)."""
    return tf.nest.map_structure(lambda *parts: np.concatenate([np.asarray(p) for p in parts]), *batches)
