"""``tlkit demo``: the transfer gain, measured offline on real data that ships with scikit-learn.

Takes scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes), keeps a few
labelled examples per class for training, and trains the same EfficientNet-Lite0
classifier twice on the same split for the same number of epochs:

* **pretrained**: ImageNet weights (converted offline from a pip package), two stages:
  head only with the backbone frozen, then the top layer groups at a lower learning rate;
* **random init**: the same network from random weights, every layer trained.

It prints a table of test accuracy for both.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DemoConfig:
    """Knobs of the demo; the defaults finish in a few minutes on 2 CPU cores."""

    backbone: str = "efficientnet_lite0"
    labels_per_class: int = 10
    val_per_class: int = 5
    test_size: int = 500
    image_size: int = 96
    head_epochs: int = 8
    fine_tune_epochs: int = 6
    top_groups: int = 2
    batch_size: int = 16
    seed: int = 0


def digits_split(cfg: DemoConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn digits as RGB pixels 0..255 (N, 8, 8, 3), split per class.

    Returns ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` with integer labels.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).astype(np.float32)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(cfg.seed)
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label in range(10):
        index = rng.permutation(np.flatnonzero(labels == label))
        parts["train"].extend(index[: cfg.labels_per_class])
        parts["val"].extend(index[cfg.labels_per_class: cfg.labels_per_class + cfg.val_per_class])
        parts["test"].extend(index[cfg.labels_per_class + cfg.val_per_class:])
    test = rng.permutation(parts["test"])[: cfg.test_size]
    parts["test"] = list(test)
    return {k: (images[np.asarray(v)], labels[np.asarray(v)]) for k, v in parts.items()}


def _dataset(x: np.ndarray, y: np.ndarray, size: int, batch: int, shuffle: bool, seed: int) -> Any:
    import keras
    import tensorflow as tf

    from tlkit.data import Batches

    # Upsample the 8x8 scans once, here, so every epoch reuses the resized pixels. Batches
    # (not a batched dataset) lets the head-only stage train on cached backbone features.
    resized = tf.image.resize(x, (size, size), method="bilinear").numpy()
    examples = tf.data.Dataset.from_tensor_slices((resized, keras.utils.to_categorical(y, 10)))
    return Batches(examples, len(x), batch, shuffle=shuffle, seed=seed)


def run_demo(cfg: DemoConfig | None = None, verbose: bool = True) -> list[dict[str, Any]]:
    """Trains both variants and returns one row per variant (also printed as a table)."""
    import keras

    from tlkit.finetune import Schedule, Stage, fine_tune
    from tlkit.model import HeadConfig, build_classifier
    from tlkit.progress import ProgressBar

    cfg = cfg or DemoConfig()
    data = digits_split(cfg)
    train = _dataset(*data["train"], cfg.image_size, cfg.batch_size, True, cfg.seed)
    val = _dataset(*data["val"], cfg.image_size, cfg.batch_size, False, cfg.seed)
    test = _dataset(*data["test"], cfg.image_size, cfg.batch_size, False, cfg.seed)
    steps = train.steps
    epochs = cfg.head_epochs + cfg.fine_tune_epochs
    # Pretrained: frozen BatchNorm (its ImageNet statistics are the point). Random init: every
    # layer trains, BatchNorm included, as one would train from scratch.
    variants = [
        ("pretrained (ImageNet)", "pretrained", HeadConfig(dropout=0.2), Schedule((
            Stage("head", cfg.head_epochs, 0, 1e-3),
            Stage("top", cfg.fine_tune_epochs, cfg.top_groups, 3e-4, group_lr_decay=0.5, warmup_epochs=1),
        )), f"head {cfg.head_epochs} ep, then top {cfg.top_groups} groups {cfg.fine_tune_epochs} ep"),
        ("random init", None, HeadConfig(dropout=0.2, bn_inference=False), Schedule((
            Stage("all", epochs, "all", 1e-3, warmup_epochs=1),
        )), f"all layers {epochs} ep"),
    ]
    rows = []
    for title, weights, head, schedule, description in variants:
        keras.utils.set_random_seed(cfg.seed)
        model = build_classifier(
            cfg.backbone, 10, weights=weights, head=head, augmentation=None,
            image_size=cfg.image_size, seed=cfg.seed,
        )
        start = time.monotonic()
        bars = [ProgressBar(epochs, steps, f"{title:22s}")] if verbose else []
        fine_tune(model, train, val, schedule, verbose=0, callbacks=bars)
        for bar in bars:
            bar.close()
        seconds = time.monotonic() - start
        result = model.evaluate(test.batched(), verbose=0, return_dict=True)
        rows.append({
            "model": title, "schedule": description, "epochs": epochs,
            "test_accuracy": float(result["accuracy"]), "train_seconds": seconds,
        })
    if verbose:
        print_report(cfg, data, rows)
    return rows


def print_report(cfg: DemoConfig, data: dict[str, tuple[np.ndarray, np.ndarray]], rows: list[dict[str, Any]]) -> None:
    from tlkit.text import format_table

    print()
    print(
        f"Digits (scikit-learn, real scans): {len(data['train'][0])} train ({cfg.labels_per_class}/class), "
        f"{len(data['val'][0])} val, {len(data['test'][0])} test; {cfg.backbone} at {cfg.image_size}px"
    )
    print(format_table(
        ("model", "schedule", "epochs", "test accuracy", "train time"),
        [(r["model"], r["schedule"], r["epochs"], f"{r['test_accuracy']:.3f}", f"{r['train_seconds']:.0f}s")
         for r in rows],
    ))
    gain = rows[0]["test_accuracy"] - rows[1]["test_accuracy"]
    print(f"transfer gain: {gain * 100:+.1f} accuracy points at equal epochs")
    print(f"machine: {platform.machine()}, {_cpu_count()} CPU cores, {platform.python_implementation()} "
          f"{platform.python_version()}")


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
