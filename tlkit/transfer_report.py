"""Every run measured against the strongest simple things, on its own split, and the warnings that follow.

Before fine-tuning, ``tlkit train`` fits (a) the no-transfer baseline (logistic regression on
downsampled pixels or log-mel statistics, :func:`tlkit.baselines.no_transfer_baseline`) and (b)
the linear probe of its own pretrained, frozen backbone (:func:`tlkit.baselines.linear_probe`).
After training it puts the model's own validation and test accuracy beside them, and warns:

- **NEGATIVE-TRANSFER** when the no-transfer baseline beats the linear probe: the pretrained
  features do not help on this data;
- **FINE-TUNING** when the fine-tuned model ends below its own linear probe.

The report goes into ``run.json`` (``"transfer"``), the run summary and ``report.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tlkit.baselines import (
    BaselineResult,
    feature_extractor,
    frozen_clip_features,
    frozen_features,
    linear_probe,
    no_transfer_baseline,
    transfer_verdict,
)
from tlkit.data.images import Example, encode_labels
from tlkit.feature_cache import FeatureCache
from tlkit.text import format_table


@dataclass
class TransferReport:
    """The baselines of a run, the model's own accuracy beside them, and the warnings."""

    baseline: BaselineResult | None
    probe: BaselineResult | None
    model_val_accuracy: float | None = None
    model_test_accuracy: float | None = None
    model_seconds: float | None = None
    warnings: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """``{"model", "kind", "val_accuracy", "test_accuracy", "seconds"}`` per row, baseline first."""
        rows = [{"model": r.name, "kind": r.kind, "val_accuracy": r.val_accuracy, "test_accuracy": r.test_accuracy,
                 "seconds": r.seconds} for r in (self.baseline, self.probe) if r is not None]
        rows.append({"model": "tlkit fine-tuned", "kind": "tlkit", "val_accuracy": self.model_val_accuracy,
                     "test_accuracy": self.model_test_accuracy, "seconds": self.model_seconds})
        return rows

    def table(self) -> str:
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        body = [(r["model"], r["kind"], pct(r["val_accuracy"]), pct(r["test_accuracy"]),
                 "-" if r["seconds"] is None else f"{r['seconds']:.1f}s") for r in self.rows()]
        return format_table(("model", "kind", "val accuracy", "test accuracy", "time"), body)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows(), "warnings": list(self.warnings),
                "baseline": self.baseline.to_dict() if self.baseline else None,
                "probe": self.probe.to_dict() if self.probe else None}


@dataclass(frozen=True)
class RunSplits:
    """What the baselines need of a run's data: the examples of each split, and for audio the
    decoded clips and the crop contract."""

    train: Sequence[Example]
    val: Sequence[Example]
    test: Sequence[Example]
    class_names: Sequence[str]
    waveforms: dict[str, np.ndarray] | None = None
    sample_rate: int | None = None
    clip_samples: int | None = None
    eval_crops: int = 1


def measure_baselines(
    model: Any,
    splits: RunSplits,
    image_batches: Callable[[Sequence[Example]], Any] | None,
    *,
    multi_label: bool = False,
    cache: FeatureCache | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> TransferReport:
    """The no-transfer baseline and the linear probe of ``model``'s frozen backbone, before training.

    Args:
        model: the tlkit classifier, with its pretrained backbone not yet fine-tuned.
        image_batches: image runs: examples -> un-augmented :class:`~tlkit.data.Batches` at the
            model's size (``None`` for audio runs).
        cache: image runs: the feature cache of this model on the training and validation
            batches (``FeatureCache.build``); its features serve the probe, and ``fine_tune``
            reuses the same cache, so the backbone runs once over those splits.
    """
    if not splits.val:
        say("baselines skipped: the run has no validation split to choose their regularisation on")
        return TransferReport(None, None)
    baseline = no_transfer_baseline(
        list(splits.train), list(splits.val), list(splits.class_names), test=list(splits.test),
        waveforms=splits.waveforms, sample_rate=splits.sample_rate,
    )
    say(f"no-transfer baseline ({baseline.name}): val accuracy {baseline.val_accuracy:.3f} "
        f"in {baseline.seconds:.1f}s")
    started = time.monotonic()
    extractor = feature_extractor(model)
    parts = [list(splits.train), list(splits.val), list(splits.test)]
    if splits.waveforms is not None:
        assert splits.clip_samples is not None
        features = [frozen_clip_features(extractor, [splits.waveforms[e.path] for e in part], splits.clip_samples,
                                         crops=splits.eval_crops) if part else None for part in parts]
    elif cache is not None and cache.val_x is not None:
        assert image_batches is not None
        test = frozen_features(extractor, image_batches(parts[2])) if parts[2] else None
        features = [np.asarray(cache.train_x), np.asarray(cache.val_x), test]
    else:
        assert image_batches is not None
        features = [frozen_features(extractor, image_batches(part)) if part else None for part in parts]
    targets = [encode_labels(part, list(splits.class_names)) if part else None for part in parts]
    probe = linear_probe(features[0], targets[0], features[1], targets[1], features[2], targets[2],
                         multi_label=multi_label, name="linear probe (frozen backbone)")
    probe.seconds = time.monotonic() - started
    say(f"linear probe on the frozen backbone: val accuracy {probe.val_accuracy:.3f} in {probe.seconds:.1f}s")
    return TransferReport(baseline, probe)


def finish_report(
    report: TransferReport, val: tuple[np.ndarray, np.ndarray] | None, test: tuple[np.ndarray, np.ndarray] | None,
    *, multi_label: bool, seconds: float,
) -> TransferReport:
    """Adds the fine-tuned model's accuracy (``(targets, probabilities)`` of val and test, scored as
    the run scores them) and the warnings."""
    report.model_val_accuracy = _accuracy(*val, multi_label) if val is not None else None
    report.model_test_accuracy = _accuracy(*test, multi_label) if test is not None else None
    report.model_seconds = seconds
    report.warnings = transfer_verdict(report.baseline, report.probe, report.model_val_accuracy)
    return report


def _accuracy(targets: np.ndarray, probabilities: np.ndarray, multi_label: bool) -> float | None:
    if not len(targets):
        return None
    if multi_label:  # the same measure the probe reports: mean per-label accuracy
        return float(((np.asarray(probabilities) >= 0.5) == (np.asarray(targets) >= 0.5)).mean())
    return float((np.asarray(probabilities).argmax(axis=1) == np.asarray(targets).argmax(axis=1)).mean())
