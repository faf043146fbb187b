"""Domain shift between two data sets, measured on frozen backbone features.

``tlkit shift SOURCE TARGET`` (or :func:`measure_shift`) computes the pooled features of a
frozen backbone once for both sets (a registry name, or a run's own model when SOURCE is a
run directory) and reports:

- **domain AUC**: a logistic regression (standardised features, ``C`` = :data:`DOMAIN_C`) tells
  target from source; its ROC-AUC under stratified k-fold cross-validation (the mean over folds)
  is 0.5 when the two sets cannot be told apart and 1.0 when every example gives its domain away;
- **MMD**: the unbiased squared maximum mean discrepancy with an RBF kernel whose bandwidth is
  the median pairwise distance (the median heuristic), and a permutation p-value (domains
  shuffled :data:`PERMUTATIONS` times);
- the **target classes** (when the target is labelled) and **target examples** that look
  least like the source: the highest out-of-fold probability of "target";
- a one-line **verdict**.

A folder with at least two class sub-folders is read with its labels
(:func:`tlkit.data.load_splits` / :func:`tlkit.data.load_audio_splits` with no validation or
test split); any other folder (flat, or one class) is read unlabelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tlkit.blas import one_blas_thread
from tlkit.backbones.registry import get as get_spec
from tlkit.baselines import feature_extractor, frozen_clip_features, frozen_features
from tlkit.data.audio import AUDIO_SUFFIXES, check_audio, clip_samples, load_audio, load_audio_splits
from tlkit.data.images import IMAGE_SUFFIXES, Example, check_images, load_splits, make_batches
from tlkit.errors import ConfigError, DataError
from tlkit.rundir import RunDir
from tlkit.text import format_table

DEFAULT_IMAGE_BACKBONE = "efficientnet_lite0"
DEFAULT_AUDIO_BACKBONE = "whisper_tiny_en_encoder"
#: Inverse L2 strength of the domain classifier (standardised features, often more dimensions than rows).
DOMAIN_C = 0.1
FOLDS = 5
PERMUTATIONS = 500
#: At most this many examples per domain (a seeded random choice) enter the measurement.
MAX_PER_DOMAIN = 1000


@dataclass
class ShiftReport:
    """What :func:`measure_shift` found (``to_dict`` is what ``--json`` prints).

    Attributes:
        auc: out-of-fold domain-classifier ROC-AUC (0.5 = indistinguishable).
        mmd: unbiased squared MMD of the RBF kernel; ``p_value`` its permutation p-value.
        classes: per target class: ``{"class", "auc", "n_source", "n_target"}`` (AUC of the
            same out-of-fold probabilities within the class), most shifted first.
        examples: the target examples most unlike the source: ``{"path", "label", "p_target"}``.
    """

    auc: float
    mmd: float
    p_value: float
    n_source: int
    n_target: int
    verdict: str
    backbone: str = "features"
    bandwidth: float = 0.0
    folds: int = FOLDS
    permutations: int = PERMUTATIONS
    classes: list[dict[str, Any]] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """Text for the terminal: the figures, the verdict, the most shifted classes and examples."""
        lines = [f"source {self.n_source} examples, target {self.n_target}, backbone {self.backbone}",
                 f"domain classifier ROC-AUC {self.auc:.3f} ({self.folds}-fold, 0.5 = indistinguishable)",
                 f"MMD^2 {self.mmd:.4g} (RBF, bandwidth {self.bandwidth:.3g}), permutation p = {self.p_value:.3g}",
                 f"verdict: {self.verdict}"]
        if self.classes:
            rows = [(c["class"], "-" if c["auc"] is None else f"{c['auc']:.3f}", c["n_source"], c["n_target"])
                    for c in self.classes]
            lines += ["", "target classes, most shifted first:",
                      format_table(("class", "domain AUC", "source", "target"), rows)]
        if self.examples:
            rows = [(e["path"], e["label"] or "-", f"{e['p_target']:.3f}") for e in self.examples]
            lines += ["", "target examples least like the source:", format_table(("file", "label", "p(target)"), rows)]
        return "\n".join(lines)


# --------------------------------------------------------------------------- statistics


def domain_auc(source: np.ndarray, target: np.ndarray, *, folds: int = FOLDS, seed: int = 0
               ) -> tuple[float, np.ndarray, int]:
    """Cross-validated ROC-AUC of a domain classifier; also the out-of-fold ``P(target)`` of every
    row (source rows first, then target rows) and the number of folds used.

    The AUC is the mean of the per-fold AUCs, each of one fold's classifier on that fold's held-out
    rows. Pooling the out-of-fold scores of different classifiers into one AUC is biased below
    0.5 when the domains do not differ (Airola et al., 2011), by a lot when features outnumber rows.

    Raises:
        DataError: fewer than 2 examples in either domain.
    """
    xs, xt = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if len(xs) < 2 or len(xt) < 2:
        raise DataError(f"measuring a shift needs at least 2 examples per domain, got {len(xs)} and {len(xt)}")
    x = np.concatenate([xs, xt])
    y = np.r_[np.zeros(len(xs), int), np.ones(len(xt), int)]
    k = int(min(folds, len(xs), len(xt)))
    probs = np.zeros(len(x))
    aucs = []
    with one_blas_thread():  # small fits: BLAS threads only fight TensorFlow's (tlkit/blas.py)
        for train, test in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y):
            classifier = make_pipeline(StandardScaler(), LogisticRegression(C=DOMAIN_C, max_iter=2000))
            probs[test] = classifier.fit(x[train], y[train]).predict_proba(x[test])[:, 1]
            aucs.append(roc_auc_score(y[test], probs[test]))
    return float(np.mean(aucs)), probs, k


def mmd_test(source: np.ndarray, target: np.ndarray, *, permutations: int = PERMUTATIONS, seed: int = 0
             ) -> tuple[float, float, float]:
    """``(MMD^2, p_value, bandwidth)``: unbiased squared MMD, RBF kernel ``exp(-d^2 / (2 s^2))``
    with ``s`` the median pairwise distance of the pooled rows; p-value ``(1 + #{perm >= obs}) /
    (1 + permutations)`` over random reassignments of the domain labels."""
    x = np.concatenate([np.asarray(source, np.float64), np.asarray(target, np.float64)])
    m = len(source)
    squares = np.sum(x * x, axis=1)
    distances = np.maximum(squares[:, None] + squares[None, :] - 2.0 * x @ x.T, 0.0)
    off = distances[~np.eye(len(x), dtype=bool)]
    bandwidth = float(np.sqrt(np.median(off))) if off.size else 1.0
    bandwidth = bandwidth if bandwidth > 0 else 1.0
    kernel = np.exp(-distances / (2.0 * bandwidth ** 2))
    np.fill_diagonal(kernel, 0.0)
    rng = np.random.default_rng(seed)
    masks = np.zeros((permutations + 1, len(x)))
    masks[0, :m] = 1.0
    for row in range(1, permutations + 1):
        masks[row, rng.permutation(len(x))[:m]] = 1.0
    values = _mmd_rows(kernel, masks, m, len(x) - m)
    p_value = float((1 + np.sum(values[1:] >= values[0])) / (1 + permutations))
    return float(values[0]), p_value, bandwidth


def _mmd_rows(kernel: np.ndarray, masks: np.ndarray, m: int, n: int) -> np.ndarray:
    """Unbiased MMD^2 for each row of ``masks`` (1 = the first domain); ``kernel`` has a zero diagonal."""
    inside = masks @ kernel  # (P, N): row sums of the kernel over each first-domain set
    ss = np.sum(inside * masks, axis=1)
    total = kernel.sum()
    st = np.sum(inside * (1.0 - masks), axis=1)
    tt = total - ss - 2.0 * st
    return ss / (m * (m - 1)) + tt / (n * (n - 1)) - 2.0 * st / (m * n)


def verdict(auc: float, p_value: float) -> str:
    """One line: how shifted, and what to do."""
    figures = f"domain AUC {auc:.2f}, MMD p = {p_value:.2g}"
    if auc < 0.6 and p_value >= 0.05:
        return f"no detectable shift ({figures}): source accuracy should carry over"
    if auc < 0.6:
        return f"slight shift ({figures}): statistically detectable, hard to tell apart example by example"
    if auc < 0.75:
        return f"mild shift ({figures}): check accuracy on a few labelled target examples"
    if auc < 0.9:
        return (f"moderate shift ({figures}): expect lower accuracy on the target; measure it on labelled "
                "target examples, or adapt ([adaptation] in the run config, docs/adaptation.md)")
    return (f"strong shift ({figures}): the target is easy to tell from the source; do not trust source accuracy "
            "there; label target examples or adapt ([adaptation], docs/adaptation.md)")


def shift_from_features(
    source: np.ndarray, target: np.ndarray, *, source_labels: Sequence[str] | None = None,
    target_labels: Sequence[str] | None = None, target_paths: Sequence[str] | None = None,
    backbone: str = "features", seed: int = 0, top: int = 10, permutations: int = PERMUTATIONS,
) -> ShiftReport:
    """A :class:`ShiftReport` from precomputed features ``(n_s, D)`` and ``(n_t, D)``; labels and
    paths (one per row, ``""`` = unlabelled) add the per-class table and the example list."""
    auc, probs, k = domain_auc(source, target, seed=seed)
    mmd, p_value, bandwidth = mmd_test(source, target, permutations=permutations, seed=seed)
    p_target = probs[len(source):]
    report = ShiftReport(auc, mmd, p_value, len(source), len(target), verdict(auc, p_value), backbone, bandwidth,
                         k, permutations)
    if target_labels is not None and any(target_labels):
        report.classes = _per_class(probs, list(source_labels or [""] * len(source)), list(target_labels))
    paths = list(target_paths) if target_paths is not None else [f"#{i}" for i in range(len(target))]
    labels = list(target_labels) if target_labels is not None else [""] * len(target)
    order = np.argsort(-p_target, kind="stable")[:top]
    report.examples = [{"path": paths[i], "label": labels[i], "p_target": float(p_target[i])} for i in order]
    return report


def _per_class(probs: np.ndarray, source_labels: list[str], target_labels: list[str]) -> list[dict[str, Any]]:
    n_s = len(source_labels)
    rows = []
    for name in sorted(set(target_labels) - {""}):
        s = [i for i, label in enumerate(source_labels) if label == name]
        t = [n_s + i for i, label in enumerate(target_labels) if label == name]
        auc = None
        if s and t:
            y = np.r_[np.zeros(len(s)), np.ones(len(t))]
            auc = float(roc_auc_score(y, probs[s + t]))
        rows.append({"class": name, "auc": auc, "n_source": len(s), "n_target": len(t)})
    return sorted(rows, key=lambda r: -1.0 if r["auc"] is None else -r["auc"])


# --------------------------------------------------------------------------- data and features


@dataclass
class Side:
    """One domain: its examples and, for audio, their decoded clips."""

    examples: list[Example]
    waveforms: dict[str, np.ndarray] = field(default_factory=dict)


def _modality(path: Path) -> str:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    audio = sum(p.suffix.lower() in AUDIO_SUFFIXES for p in files)
    return "audio" if audio > len(files) - audio else "image"


def read_side(data: str | Path | Sequence[Example], modality: str, sample_rate: int | None = None) -> Side:
    """A folder, CSV manifest, run directory (its training split) or list of examples."""
    if not isinstance(data, (str, Path)):
        return Side(list(data))
    path = Path(data).expanduser()
    if RunDir.is_run(path):
        return Side(RunDir(path).split("train"))
    where: dict[str, Any] = {"manifest": path} if path.suffix.lower() == ".csv" else {"path": path}
    classes = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")] if path.is_dir() else []
    if "manifest" in where or len(classes) >= 2:
        if modality == "audio":
            splits = load_audio_splits(**where, sample_rate=int(sample_rate or 16000), val_fraction=0,
                                       test_fraction=0)
            return Side(splits.train, dict(splits.waveforms))
        return Side(load_splits(**where, val_fraction=0, test_fraction=0).train)
    if not path.is_dir():
        raise DataError(f"{str(path)!r} is neither a folder, a .csv manifest nor a run directory")
    suffixes = AUDIO_SUFFIXES if modality == "audio" else IMAGE_SUFFIXES
    listed = [Example(str(p), (p.relative_to(path).parts[0] if len(p.relative_to(path).parts) > 1 else "",))
              for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in suffixes]
    if not listed:
        raise DataError(f"{str(path)!r} holds no {modality} files ({', '.join(suffixes)})")
    if modality == "audio":
        kept, waveforms, _ = check_audio(listed, int(sample_rate or 16000))
        return Side(kept, dict(waveforms))
    return Side(check_images(listed)[0])


def _cap(examples: list[Example], limit: int, seed: int) -> list[Example]:
    if len(examples) <= limit:
        return examples
    keep = sorted(np.random.default_rng(seed).choice(len(examples), limit, replace=False))
    return [examples[i] for i in keep]


def side_features(extractor: keras.Model, side: Side, *, modality: str, image_size: tuple[int, int] | None,
                  sample_rate: int | None, clip: int | None, batch_size: int = 32, crops: int = 3) -> np.ndarray:
    """Pooled features ``(N, C)`` of one domain's examples (images resized as training does; audio
    the mean of ``crops`` evenly spaced crops per clip)."""
    if modality == "audio":
        rate = int(sample_rate or 16000)
        waves = [side.waveforms[e.path] if e.path in side.waveforms else load_audio(e.path, rate) for e in side.examples]
        return frozen_clip_features(extractor, waves, int(clip or rate), crops=crops, batch_size=batch_size)
    names = sorted({label for e in side.examples for label in e.labels})
    batches = make_batches(side.examples, names, image_size or (224, 224), batch_size, cache=False)
    return frozen_features(extractor, batches)


def measure_shift(
    source: str | Path | Sequence[Example],
    target: str | Path | Sequence[Example],
    *,
    backbone: str | keras.Model | None = None,
    image_size: int | tuple[int, int] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    max_per_domain: int = MAX_PER_DOMAIN,
    top: int = 10,
    permutations: int = PERMUTATIONS,
    sample_rate: int | None = None,
    clip_seconds: float = 5.0,
) -> ShiftReport:
    """Measures the shift from ``source`` to ``target`` (see the module docstring).

    Args:
        source / target: class folders, flat folders (unlabelled), CSV manifests or lists of
            :class:`~tlkit.data.Example`; ``source`` may be a run directory (its training split,
            and its own model as the backbone unless ``backbone`` is given).
        backbone: a registry name or a Keras model (a tlkit classifier or a (B, C) extractor);
            default the run's model, else ``efficientnet_lite0`` for images and
            ``whisper_tiny_en_encoder`` for audio.
        image_size: images are read at this size (an int: squared; default: the backbone's / run's).
        max_per_domain: a seeded random subset of at most this many examples per domain.
        sample_rate / clip_seconds: audio read at this rate (default the backbone's), features the
            mean of 3 crops of ``clip_seconds`` (or the encoder's fixed input length).

    Raises:
        DataError / ConfigError: unreadable data, too few examples, unknown backbone.
    """
    if max_per_domain < 2 or permutations < 1:
        raise ConfigError(f"max_per_domain must be >= 2 and permutations >= 1, got {max_per_domain} and "
                          f"{permutations}")
    run = RunDir(source) if isinstance(source, (str, Path)) and RunDir.is_run(source) else None
    model: keras.Model | None = backbone if isinstance(backbone, keras.Model) else None
    contract = None
    if run is not None and backbone is None:
        model = run.load_model()
        contract = run.input_contract(model)
    clip = None
    pair = (image_size, image_size) if isinstance(image_size, int) else (tuple(image_size) if image_size else None)
    if model is not None:
        modality = "audio" if (contract and contract.is_audio) or len(model.input.shape) == 2 else "image"
        name = model.name
        size = pair or (contract.image_size if contract else None)
        rate = sample_rate or (contract.sample_rate if contract else None)
        clip = contract.clip_samples if contract and contract.is_audio else None
    else:
        probe = target if isinstance(target, (str, Path)) else source
        modality = _modality(Path(probe)) if isinstance(probe, (str, Path)) else "image"
        name = str(backbone or (DEFAULT_AUDIO_BACKBONE if modality == "audio" else DEFAULT_IMAGE_BACKBONE))
        spec = get_spec(name, image_size=pair[0] if pair else None)
        modality = spec.modality
        size = pair or spec.image_size
        rate = sample_rate or (int(spec.sample_rate or getattr(spec.preprocessing, "sample_rate", 16000))
                               if modality == "audio" else None)
        if modality == "audio":
            clip = int(spec.audio_encoder.fixed_input_samples or clip_samples(clip_seconds, int(rate or 16000)))
    sides = [read_side(data, modality, rate) for data in (source, target)]
    for side, offset in zip(sides, (0, 1)):
        side.examples = _cap(side.examples, max_per_domain, seed + offset)
    extractor = feature_extractor(model if model is not None else name, image_size=size if model is None else None)
    if clip is None and modality == "audio":
        clip = clip_samples(clip_seconds, int(rate or 16000))
    features = [side_features(extractor, side, modality=modality, image_size=size, sample_rate=rate, clip=clip,
                              batch_size=batch_size) for side in sides]
    return shift_from_features(
        features[0], features[1], source_labels=[e.labels[0] for e in sides[0].examples],
        target_labels=[e.labels[0] for e in sides[1].examples], target_paths=[e.path for e in sides[1].examples],
        backbone=name, seed=seed, top=top, permutations=permutations,
    )
