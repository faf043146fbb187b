"""``tlkit rank``: which backbone suits these data, measured before any fine-tuning.

For each candidate backbone the frozen, pretrained feature extractor runs once over the
training and validation examples; a linear probe (:func:`tlkit.baselines.linear_probe`) is
scored on validation and LogME (:func:`tlkit.transferability.logme`) on the training
features. The first row is always the no-transfer baseline (logistic regression on pixels
or log-mel statistics), so a backbone that does not beat it is plain to see. The test split
is never touched: ranking is model selection.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlkit import baselines
from tlkit.backbones.loading import available_offline
from tlkit.backbones.registry import get as get_spec
from tlkit.backbones.registry import list_backbones
from tlkit.backbones.spec import BackboneSpec
from tlkit.data.audio import AUDIO_SUFFIXES, AudioSplits, load_audio_splits
from tlkit.data.images import (
    IMAGE_SUFFIXES,
    Example,
    Splits,
    encode_labels,
    load_splits,
    make_batches,
    read_manifest,
    scan_folder,
)
from tlkit.errors import ConfigError, DataError, TlkitError
from tlkit.run import audio_clip_length
from tlkit.text import first_line, format_table
from tlkit.transferability import logme

BASELINE_NAME = "no-transfer baseline"


@dataclass
class RankRow:
    """One row of the ranking.

    Attributes:
        name: the backbone's name, or ``"no-transfer baseline"``.
        kind: ``"baseline"`` or ``"backbone"``.
        val_accuracy: linear-probe (or baseline) validation accuracy, 0..1 (``None`` on error).
        logme: LogME of the training features (``None`` for the baseline or on error).
        feature_dim: width of the features the probe saw.
        seconds: time for this row (building the backbone, features, probe, LogME).
        method: what was fitted, e.g. ``"pixels 16x16 + logistic regression"``.
        error: why a backbone could not be scored (e.g. weights not on this machine).
        result: the probe's :class:`~tlkit.baselines.BaselineResult` (not in the JSON).
    """

    name: str
    kind: str
    val_accuracy: float | None
    logme: float | None
    feature_dim: int | None
    seconds: float
    method: str = ""
    error: str | None = None
    result: baselines.BaselineResult | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "val_accuracy": self.val_accuracy, "logme": self.logme,
            "feature_dim": self.feature_dim, "seconds": round(self.seconds, 3), "method": self.method,
            "error": self.error, "val_count": (self.result.params.get("val_count") if self.result else None),
            "C": (self.result.params.get("C") if self.result else None),
        }


def rank_backbones(
    data: str | Path,
    candidates: Sequence[str | BackboneSpec] | None = None,
    *,
    image_size: int | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    clip_seconds: float = 5.0,
    crops: int = 3,
    batch_size: int = 32,
    verbose: bool = True,
) -> list[RankRow]:
    """Ranks backbones on a labelled folder or CSV manifest by linear-probe validation accuracy.

    Args:
        data: a class folder (``data/<class>/<files>``) or a ``.csv`` manifest, images or audio.
        candidates: backbone names or specs (all of one modality). Default: every registered
            backbone of the data's modality whose pretrained weights are on this machine.
        image_size: image backbones: resize to this size (default: each backbone's own).
        max_per_class: keep at most this many training and validation examples per class
            (seeded) for a quick ranking of a large set.
        seed / val_fraction / test_fraction: the split, as ``tlkit train`` makes it with the
            same values.
        clip_seconds / crops: audio: features are the mean over ``crops`` evenly spaced crops
            of ``clip_seconds`` per clip.
        verbose: one progress line per row on stderr.

    Returns:
        The no-transfer baseline first, then the backbones by validation accuracy (ties by
        LogME), then any that could not be scored (with ``error`` set).
    """
    specs = _candidates(data, candidates)
    modality = specs[0].modality if specs else _data_modality(data)
    rates = sorted({_rate(s) for s in specs}) or [16000]
    loaded: dict[int, Splits] = {}

    def splits_at(rate: int | None) -> Splits:
        key = rate or 0
        if key not in loaded:
            loaded[key] = _load(data, modality, rate, seed, val_fraction, test_fraction, max_per_class)
        return loaded[key]

    first = splits_at(rates[0] if modality == "audio" else None)
    total = len(specs) + 1
    start = time.monotonic()
    audio = {"waveforms": first.waveforms, "sample_rate": first.sample_rate} if isinstance(first, AudioSplits) else {}
    baseline = baselines.no_transfer_baseline(first.train, first.val, first.class_names, **audio)  # type: ignore[arg-type]
    rows = [RankRow(BASELINE_NAME, "baseline", baseline.val_accuracy, None, baseline.params["features"],
                    time.monotonic() - start, baseline.name, result=baseline)]
    _progress(verbose, 1, total, rows[0])
    tf_log = logging.getLogger("tensorflow")
    level = tf_log.level
    tf_log.setLevel(logging.ERROR)  # each backbone traces its own predict function: no retracing warnings
    try:
        for index, spec in enumerate(specs, start=2):
            splits = splits_at(_rate(spec) if modality == "audio" else None)
            rows.append(_score(spec, splits, image_size, clip_seconds, crops, batch_size))
            _progress(verbose, index, total, rows[-1])
    finally:
        tf_log.setLevel(level)
    scored = sorted((r for r in rows[1:] if r.error is None), key=lambda r: (-(r.val_accuracy or 0), -(r.logme or 0)))
    return [rows[0], *scored, *(r for r in rows[1:] if r.error is not None)]


def _score(
    spec: BackboneSpec, splits: Splits, image_size: int | None, clip_seconds: float, crops: int, batch_size: int
) -> RankRow:
    start = time.monotonic()
    size = (image_size, image_size) if image_size else (spec.image_size if spec.modality == "image" else None)

    def features(part: list[Example]) -> np.ndarray:
        if isinstance(splits, AudioSplits):
            waves = [splits.waveforms[e.path] for e in part]
            return baselines.frozen_clip_features(extractor, waves, clip, crops=crops, batch_size=batch_size)
        return baselines.frozen_features(extractor, make_batches(part, splits.class_names, size, batch_size))

    try:
        extractor = baselines.feature_extractor(spec, image_size=image_size)
        clip = audio_clip_length(spec, clip_seconds) if isinstance(splits, AudioSplits) else 0
        x_train, x_val = features(splits.train), features(splits.val)
    except TlkitError as exc:
        return RankRow(spec.name, "backbone", None, None, None, time.monotonic() - start, error=first_line(exc))
    y_train, y_val = (encode_labels(part, splits.class_names) for part in (splits.train, splits.val))
    name = f"linear probe on frozen {spec.name} features"
    probe = baselines.linear_probe(x_train, y_train, x_val, y_val, name=name)
    score = logme(x_train, y_train)
    return RankRow(spec.name, "backbone", probe.val_accuracy, score, int(x_train.shape[1]),
                   time.monotonic() - start, "linear probe on frozen features", result=probe)


def _candidates(data: str | Path, candidates: Sequence[str | BackboneSpec] | None) -> list[BackboneSpec]:
    if candidates is not None:
        specs = [get_spec(c) for c in candidates]
        modalities = {s.modality for s in specs}
        if len(modalities) > 1:
            raise ConfigError(f"backbones {[s.name for s in specs]} mix image and audio; rank one modality at a time")
        return specs
    modality = _data_modality(data)
    return [s for s in list_backbones(modality) if available_offline(s)]


def _data_modality(data: str | Path) -> str:
    """``"image"`` or ``"audio"``, by which kind of file the folder or manifest holds more of."""
    path = Path(data).expanduser()
    if path.is_dir():
        examples = scan_folder(path, (*IMAGE_SUFFIXES, *AUDIO_SUFFIXES))
    elif path.suffix.lower() == ".csv":
        examples = read_manifest(path)
    else:
        raise DataError(f"{str(path)!r} is neither a class folder nor a .csv manifest; check the DATA argument")
    kinds = Counter("audio" if Path(e.path).suffix.lower() in AUDIO_SUFFIXES else "image" for e in examples)
    return "audio" if kinds["audio"] > kinds["image"] else "image"


def _rate(spec: BackboneSpec) -> int:
    return int(spec.sample_rate or getattr(spec.preprocessing, "sample_rate", 16000))


def _load(
    data: str | Path, modality: str, rate: int | None, seed: int, val_fraction: float, test_fraction: float,
    max_per_class: int | None,
) -> Splits:
    path = Path(data).expanduser()
    where = {"manifest": path} if path.suffix.lower() == ".csv" and path.is_file() else {"path": path}
    if modality == "audio":
        splits: Splits = load_audio_splits(**where, sample_rate=int(rate or 16000), val_fraction=val_fraction,
                                           test_fraction=test_fraction, seed=seed)
    else:
        splits = load_splits(**where, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    if max_per_class is not None:
        if max_per_class < 1:
            raise ConfigError(f"--max-per-class must be at least 1, got {max_per_class}")
        splits.train = _cap(splits.train, max_per_class, seed)
        splits.val = _cap(splits.val, max_per_class, seed)
    if not splits.val:
        raise DataError(f"{str(path)!r} gives an empty validation split; ranking needs one (add examples)")
    return splits


def _cap(examples: list[Example], limit: int, seed: int) -> list[Example]:
    """At most ``limit`` examples per (first) label, a seeded random choice, in the original order."""
    order = np.random.default_rng(seed).permutation(len(examples))
    taken: Counter[str] = Counter()
    keep = set()
    for index in order:
        label = examples[index].labels[0]
        if taken[label] < limit:
            taken[label] += 1
            keep.add(int(index))
    return [e for i, e in enumerate(examples) if i in keep]


def _progress(verbose: bool, index: int, total: int, row: RankRow) -> None:
    if not verbose:
        return
    if row.error:
        text = f"not scored: {row.error}"
    else:
        text = f"val accuracy {_pct(row.val_accuracy)}" + (f", LogME {row.logme:.3f}" if row.logme is not None else "")
    print(f"[tlkit] rank {index}/{total} {row.name}: {text} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_rank_table(rows: Sequence[RankRow]) -> str:
    """The ranking as a plain-text table, then the warning when no backbone beats the baseline."""
    baseline = next((r for r in rows if r.kind == "baseline"), None)
    table = []
    for number, row in enumerate(rows):
        gain = "-"
        if baseline is not None and row is not baseline and row.val_accuracy is not None:
            gain = f"{100 * (row.val_accuracy - (baseline.val_accuracy or 0)):+.1f}"
        table.append((
            "-" if row.kind == "baseline" else str(number), row.name, _pct(row.val_accuracy), gain,
            "-" if row.logme is None else f"{row.logme:.3f}", row.feature_dim or "-", f"{row.seconds:.1f}",
            row.error or row.method,
        ))
    text = format_table(("rank", "backbone", "val acc", "vs baseline", "LogME", "features", "s", "note"), table)
    count = baseline.result.params.get("val_count") if baseline is not None and baseline.result else None
    text += (f"\n\nval acc: on {count or '?'} validation examples, logistic regression (C chosen on validation) on "
             "frozen features; LogME: on the training features. The test split is not used.")
    for warning in rank_warnings(rows):
        text += f"\n{warning}"
    return text


def rank_warnings(rows: Sequence[RankRow]) -> list[str]:
    """The NEGATIVE-TRANSFER warning of :func:`~tlkit.baselines.transfer_verdict` for the best backbone."""
    baseline = next((r.result for r in rows if r.kind == "baseline"), None)
    best = next((r.result for r in rows if r.kind == "backbone" and r.result is not None), None)
    return baselines.transfer_verdict(baseline, best, None)


def rank_to_json(rows: Sequence[RankRow]) -> str:
    """The ranking as a JSON list of row objects (see :meth:`RankRow.to_dict`), baseline first."""
    return json.dumps([row.to_dict() for row in rows], indent=1)
