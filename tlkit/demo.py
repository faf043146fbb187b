"""``tlkit demo``: what transfer buys, measured offline on real data that ships with packages.

The main case is :func:`tlkit.demo_data.photo_patches`: patches of 20 real photographs, the
class of a patch being its photograph, test patches cut from bands of each photograph that
no training patch overlaps. On the same split it trains and scores, with test accuracy and
training time for each:

* **no-transfer baseline** (``kind="baseline"``): :func:`tlkit.baselines.no_transfer_baseline`,
  logistic regression on 16x16 pixels;
* **random init** (``"random_init"``): the same network trained from random weights, every
  layer, for as many epochs as tlkit's two stages together (see :func:`train_from_scratch` for
  how its BatchNorm statistics are made right);
* **linear probe** (``"probe"``): :func:`tlkit.baselines.linear_probe` on frozen features;
* **tlkit** (``"tlkit"``): :func:`tlkit.fine_tune` with the default recipe
  :meth:`tlkit.Schedule.fine_tune`, scored after its head stage (solved to convergence on cached
  features, ``"tlkit (head solved)"``) and after its fine-tuning stage (``"tlkit (fine-tuned)"``).

Then the documented negative-transfer case: scikit-learn's 8x8 digits, where raw pixels beat
the frozen ImageNet features and :func:`tlkit.baselines.transfer_verdict` says so.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np

from tlkit.blas import one_blas_thread
from tlkit.baselines import (BaselineResult, feature_extractor, frozen_features, linear_probe, no_transfer_baseline,
                             transfer_verdict)
from tlkit.data.batches import Batches
from tlkit.data.images import make_batches
from tlkit.data.listing import Example
from tlkit.demo_data import ArraySplits, digits_split, photo_patches, write_class_folders
from tlkit.finetune import fine_tune
from tlkit.layers import FrozenBatchNormalization
from tlkit.model import HeadConfig, build_classifier
from tlkit.model_info import all_layers
from tlkit.progress import ProgressBar
from tlkit.schedule import Schedule, Stage
from tlkit.text import format_table

Kind = Literal["baseline", "random_init", "probe", "tlkit"]


@dataclass(frozen=True)
class DemoConfig:
    """Knobs of the demo; the defaults take about 2-3 minutes on 2 CPU cores.

    ``labels_per_class`` is the training examples per class of both data sets; ``val_per_class`` /
    ``test_per_class`` the validation / test patches per photograph; ``digits_val_per_class`` /
    ``digits_test_size`` the digits the verdict and the test score use (the verdict compares the
    baseline and the probe on validation, so it gets enough examples to tell). ``head_epochs``
    only matters if the head cannot be solved on cached features; the random-init network trains
    ``head_epochs + fine_tune_epochs`` epochs.
    """

    backbone: str = "efficientnet_lite0"
    labels_per_class: int = 10
    val_per_class: int = 5
    test_per_class: int = 20
    patch_size: int = 64
    image_size: int = 96
    head_epochs: int = 5
    fine_tune_epochs: int = 6
    top_groups: int = 2
    batch_size: int = 16
    digits_val_per_class: int = 20
    digits_test_size: int = 500
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> "DemoConfig":
        """A shortened demo for tests (well under a minute on 2 CPU cores)."""
        small = {"labels_per_class": 6, "val_per_class": 3, "test_per_class": 8, "image_size": 64,
                 "head_epochs": 2, "fine_tune_epochs": 3, "digits_val_per_class": 10, "digits_test_size": 100}
        return cls(**{**small, **overrides})


@dataclass
class DemoRow:
    """One trained and scored model. ``detail`` (what was trained) is shown in the table only."""

    model: str
    kind: Kind
    test_accuracy: float
    train_seconds: float
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "kind": self.kind, "test_accuracy": self.test_accuracy,
                "train_seconds": self.train_seconds}


@dataclass
class DemoReport:
    """What :func:`run_demo` measured: the main data set's rows, then the negative-transfer case."""

    dataset: str
    rows: list[DemoRow]
    negative_dataset: str
    negative_rows: list[DemoRow]
    negative_warnings: list[str]
    warnings: list[str] = field(default_factory=list)  # transfer_verdict on the main data set
    machine: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """``{"dataset", "rows": [{"model", "kind", "test_accuracy", "train_seconds"}], "negative_transfer":
        {"dataset", "rows", "warnings"}}``; ``rows`` holds the main data set only."""
        return {
            "dataset": self.dataset,
            "rows": [row.to_dict() for row in self.rows],
            "negative_transfer": {"dataset": self.negative_dataset,
                                  "rows": [row.to_dict() for row in self.negative_rows],
                                  "warnings": list(self.negative_warnings)},
        }

    def table(self) -> str:
        """Both tables as text, with the warnings and the machine line."""
        lines = [self.dataset, _rows_table(self.rows)]
        best = _best(self.rows, "tlkit")
        for kinds, what in ((("baseline", "random_init"), "the best model without pretrained weights"),
                            (("probe",), "the linear probe")):
            other = _best(self.rows, *kinds)
            named = f" ({other.model})" if len(kinds) > 1 else ""
            lines.append(f"{best.model}: {100 * (best.test_accuracy - other.test_accuracy):+.1f} accuracy points "
                         f"over {what}{named}")
        lines += [f"warning: {w}" for w in self.warnings]
        lines += ["", f"negative transfer: {self.negative_dataset}", _rows_table(self.negative_rows)]
        lines += [f"tlkit warns: {w}" for w in self.negative_warnings] or ["tlkit warns: (nothing)"]
        lines += ["", f"machine: {self.machine}; demo wall time {self.seconds:.0f}s"]
        return "\n".join(lines)


def _best(rows: list[DemoRow], *kinds: str) -> DemoRow:
    return max((r for r in rows if r.kind in kinds), key=lambda r: r.test_accuracy)


def _rows_table(rows: list[DemoRow]) -> str:
    return format_table(
        ("model", "kind", "test accuracy", "train time", "what was trained"),
        [(r.model, r.kind, f"{r.test_accuracy:.3f}", f"{r.train_seconds:.0f}s", r.detail) for r in rows],
    )


def run_demo(cfg: DemoConfig | None = None, verbose: bool = True) -> DemoReport:
    """Measures both cases (see the module docstring) and returns a :class:`DemoReport`.

    With ``verbose``, progress bars go to stderr and the report is printed on stdout.
    """
    cfg = cfg or DemoConfig()
    started = time.monotonic()
    # The convex fits are small: one BLAS thread is faster, and far faster on a busy machine
    # (measured: 324 s against 0.1 s for one 20-class logistic regression with 2 OpenBLAS threads).
    with one_blas_thread(), tempfile.TemporaryDirectory(prefix="tlkit-demo-") as scratch:
        patches, photo_names = photo_patches(
            cfg.patch_size, (cfg.labels_per_class, cfg.val_per_class, cfg.test_per_class), cfg.seed)
        main = _Case(patches, photo_names, Path(scratch) / "photos", cfg)
        rows = [main.baseline_row(), train_from_scratch(main, cfg, verbose)]
        keras.utils.set_random_seed(cfg.seed)
        extractor = feature_extractor(cfg.backbone, image_size=cfg.image_size)  # both probes use it
        rows += [main.probe_row(extractor), *_tlkit_rows(main, cfg, verbose)]
        warnings = transfer_verdict(main.baseline, main.probe, main.tuned_val_accuracy)
        digits, digit_names = digits_split(cfg.labels_per_class, cfg.digits_val_per_class, cfg.digits_test_size,
                                           cfg.seed)
        negative = _Case(digits, digit_names, Path(scratch) / "digits", cfg)
        negative_rows = [negative.baseline_row(), negative.probe_row(extractor)]
        negative_warnings = transfer_verdict(negative.baseline, negative.probe, None)
    report = DemoReport(
        dataset=(f"photo patches (20 real photographs from scikit-image and scikit-learn; class = photograph): "
                 f"{main.describe()}; {cfg.patch_size}px patches, test patches from bands no training patch "
                 f"overlaps; {cfg.backbone} at {cfg.image_size}px"),
        rows=rows,
        negative_dataset=f"digits (scikit-learn, real 8x8 scans): {negative.describe()}; {cfg.backbone} at "
                         f"{cfg.image_size}px",
        negative_rows=negative_rows, negative_warnings=negative_warnings, warnings=warnings,
        machine=machine_line(), seconds=time.monotonic() - started,
    )
    if verbose:
        print(report.table(), flush=True)
    return report


class _Case:
    """One data set written as class folders, its tlkit batches, and its baseline and probe."""

    def __init__(self, splits: ArraySplits, class_names: list[str], root: Path, cfg: DemoConfig) -> None:
        self.class_names = class_names
        self.examples: dict[str, list[Example]] = write_class_folders(splits, class_names, root)
        size = (cfg.image_size, cfg.image_size)
        self.batches: dict[str, Batches] = {
            split: make_batches(rows, class_names, size, cfg.batch_size, training=split == "train", seed=cfg.seed)
            for split, rows in self.examples.items()
        }
        self.cfg = cfg
        self.baseline: BaselineResult | None = None
        self.probe: BaselineResult | None = None
        self.tuned_val_accuracy: float | None = None

    def describe(self) -> str:
        counts = {split: len(rows) for split, rows in self.examples.items()}
        return (f"{len(self.class_names)} classes, {counts['train']} train ({counts['train'] // len(self.class_names)}"
                f"/class), {counts['val']} val, {counts['test']} test")

    def targets(self, split: str) -> np.ndarray:
        return np.concatenate([y.numpy() for _, y in self.batches[split].in_order()])

    def baseline_row(self) -> DemoRow:
        e = self.examples
        self.baseline = no_transfer_baseline(e["train"], e["val"], self.class_names, test=e["test"])
        return _row(self.baseline, "no-transfer baseline", f"{self.baseline.name}, C={self.baseline.params['C']:g}")

    def probe_row(self, extractor: keras.Model) -> DemoRow:
        """The linear probe on ``extractor``'s features (its time: the features and the fits)."""
        started = time.monotonic()
        features = {split: frozen_features(extractor, batches) for split, batches in self.batches.items()}
        self.probe = linear_probe(features["train"], self.targets("train"), features["val"], self.targets("val"),
                                  features["test"], self.targets("test"), name=f"linear probe ({self.cfg.backbone})")
        self.probe.seconds = time.monotonic() - started  # frozen features + the fits
        return _row(self.probe, "linear probe", f"frozen {self.cfg.backbone} features, C={self.probe.params['C']:g}")

    def accuracy(self, model: keras.Model, split: str = "test") -> float:
        """Top-1 accuracy of ``model`` on a split, counted exactly (as the baselines count it)."""
        probabilities = model.predict(self.batches[split].in_order(), verbose=0)
        return float(np.mean(probabilities.argmax(axis=1) == self.targets(split).argmax(axis=1)))


def _row(result: BaselineResult, model: str, detail: str) -> DemoRow:
    assert result.test_accuracy is not None
    return DemoRow(model, result.kind, result.test_accuracy, result.seconds, detail)


def _tlkit_rows(case: _Case, cfg: DemoConfig, verbose: bool) -> list[DemoRow]:
    """The default recipe, scored after its head stage and after fine-tuning.

    The stages of ``Schedule.fine_tune(...)`` go through :func:`tlkit.fine_tune` one at a time on
    the same model (what one call does, with a test score in between).
    """
    keras.utils.set_random_seed(cfg.seed)
    model = build_classifier(cfg.backbone, len(case.class_names), head=HeadConfig(dropout=0.2),
                             image_size=cfg.image_size, seed=cfg.seed)
    schedule = Schedule.fine_tune(head_epochs=cfg.head_epochs, epochs=cfg.fine_tune_epochs, top_groups=cfg.top_groups)
    head, top = schedule.stages
    train, val = case.batches["train"], case.batches["val"]
    started = time.monotonic()
    result = fine_tune(model, train, val, Schedule((head,)), verbose=0)
    head_seconds = time.monotonic() - started
    solved = result.head_fits.get(head.name)
    rows = [DemoRow("tlkit (head solved)", "tlkit", case.accuracy(model), head_seconds,
                    f"head {solved.describe() if solved else f'{head.epochs} epochs'}")]
    bars = [ProgressBar(top.epochs, train.steps, f"{'tlkit fine-tuning':22s}")] if verbose else []
    started = time.monotonic()
    fine_tune(model, train, val, Schedule((top,)), verbose=0, callbacks=bars)
    _close(bars)
    rows.append(DemoRow(
        "tlkit (fine-tuned)", "tlkit", case.accuracy(model), head_seconds + time.monotonic() - started,
        f"then top {top.unfreeze} groups {top.epochs} ep at lr {top.learning_rate:g} (x{top.group_lr_decay:g}/group)",
    ))
    case.tuned_val_accuracy = case.accuracy(model, "val")
    return rows


def train_from_scratch(case: _Case, cfg: DemoConfig, verbose: bool) -> DemoRow:
    """The same network from random weights, every layer trained, BatchNorm included, for
    ``cfg.head_epochs + cfg.fine_tune_epochs`` epochs.

    Its BatchNorm statistics are made right twice over. During training the layers' momentum is
    ``1 - 1 / steps_per_epoch``, so the moving statistics follow about the last epoch: with
    Keras's default 0.99 they barely leave their initial values in ~100 steps, every validation
    epoch scores chance (measured: 0.05 on 20 classes, all 11 epochs), and the checkpoint keeps
    the "best" epoch of a meaningless validation loss. After training, :func:`reestimate_batchnorm`
    sets them to the training set's statistics under the final weights ("precise BN").
    """
    keras.utils.set_random_seed(cfg.seed)
    model = build_classifier(cfg.backbone, len(case.class_names), weights=None,
                             head=HeadConfig(dropout=0.2, bn_inference=False), image_size=cfg.image_size,
                             seed=cfg.seed)
    train = case.batches["train"]
    for layer in _batchnorm_layers(model):
        layer.momentum = max(0.0, 1.0 - 1.0 / train.steps)
    epochs = cfg.head_epochs + cfg.fine_tune_epochs
    bars = [ProgressBar(epochs, train.steps, f"{'random init':22s}")] if verbose else []
    started = time.monotonic()
    fine_tune(model, train, case.batches["val"], Schedule((Stage("scratch", epochs, "all", 1e-3, warmup_epochs=1),)),
              verbose=0, callbacks=bars)
    _close(bars)
    reestimate_batchnorm(model, train)
    seconds = time.monotonic() - started
    return DemoRow("random init (same network)", "random_init", case.accuracy(model), seconds,
                   f"all layers {epochs} ep at lr 1e-3, BatchNorm re-estimated")


def _batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
            and not isinstance(layer, FrozenBatchNormalization)]


def reestimate_batchnorm(model: keras.Model, batches: Batches, batch_size: int = 256) -> int:
    """Sets the moving mean and variance of every plain BatchNorm layer of ``model`` to the
    statistics of the training examples under the final weights ("precise BN").

    One pass over ``batches``' examples, shuffled (seeded) and re-batched by ``batch_size``, in
    training mode, the weights fixed; each layer keeps the cumulative average of its batch
    statistics (momentum ``k / (k + 1)`` at batch ``k``). With at most ``batch_size`` examples
    that is exactly their mean and (biased) variance. Shuffled, because class-sorted batches
    would miss the variance between classes. Returns the number of layers set.
    """
    layers = _batchnorm_layers(model)
    saved = [layer.momentum for layer in layers]
    examples = batches.examples.shuffle(max(1, batches.count), seed=batches.seed).batch(batch_size)
    try:
        for index, (inputs, _) in enumerate(examples):
            for layer in layers:
                layer.momentum = index / (index + 1)
            model(inputs, training=True)  # eager: each call reads the momentum just set
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
    return len(layers)


def _close(bars: list[ProgressBar]) -> None:
    for bar in bars:
        bar.close()


def machine_line() -> str:
    """``"x86_64, 2 CPU cores (AMD EPYC ...), Python 3.11.9, 2025-01-31"``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return (f"{platform.machine()}, {cores} CPU cores{_cpu_model()}, {platform.python_implementation()} "
            f"{platform.python_version()}, {date.today().isoformat()}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f" ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return ""


__all__ = ["DemoConfig", "DemoReport", "DemoRow", "reestimate_batchnorm", "run_demo", "train_from_scratch"]
