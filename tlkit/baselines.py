"""The strongest simple things a transfer result must beat: a no-transfer baseline and a linear probe.

* :func:`no_transfer_baseline`: multinomial logistic regression on raw pixels downsampled to
  16x16 (images) or on log-mel statistics (audio), with no pretrained network at all.
* :func:`linear_probe`: the same convex fit on frozen backbone features (Kornblith et al.,
  CVPR 2019, use it as the standard few-shot baseline).
* :func:`transfer_verdict`: the warnings a user with a few hundred examples must see when the
  pretrained features lose to raw pixels, or when fine-tuning ends below its own probe.

Both fits standardise their inputs on the training split, choose the L2 strength ``C`` of a
scikit-learn ``LogisticRegression`` from :data:`C_GRID` by validation accuracy (ties go to
the smallest ``C``, the strongest regularisation), and keep the model fitted on the training
split with that ``C``. The test split, when given, is scored once with the chosen model.

Multi-label targets are fitted one-vs-rest (one logistic regression per class). Their
``val_accuracy`` / ``test_accuracy`` is then the *mean per-label accuracy* at a 0.5 threshold,
what tlkit's multi-label models report as ``accuracy`` (Keras ``BinaryAccuracy``), so the
numbers compare like with like; the stricter subset (exact-match) accuracy is in
``params["val_subset_accuracy"]`` / ``params["test_subset_accuracy"]``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf
from scipy.stats import binomtest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tlkit.blas import one_blas_thread
from tlkit.backbones.spec import BackboneSpec
from tlkit.data.audio import fixed_crops
from tlkit.data.batches import Batches
from tlkit.data.images import Example, decode_rgb, encode_labels
from tlkit.errors import ConfigError, DataError
from tlkit.model import FEATURES_LAYER, HeadConfig, build_classifier, split_head

C_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
"""Inverse L2 strengths tried on the validation split (standardised inputs)."""

MARGIN = 0.01
"""A warning needs a gap of more than this (1 accuracy point) on the same split."""

BASELINE_IMAGE_SIZE = 16
MAX_ITER = 1000


@dataclass
class BaselineResult:
    """One convex fit, scored on validation (and test when given).

    Attributes:
        name: what was fitted, e.g. ``"pixels 16x16 + logistic regression"``.
        kind: ``"baseline"`` (no pretrained network) or ``"probe"`` (frozen features).
        val_accuracy / test_accuracy: accuracy in 0..1 (mean per-label accuracy for
            multi-label data); ``test_accuracy`` is ``None`` without a test split.
        seconds: wall time of feature extraction (baselines) and the fits.
        params: ``C`` (chosen), ``c_grid``, ``val_count``, ``test_count``, ``features``
            (input dimension), ``metric`` (``"accuracy"`` or ``"mean_label_accuracy"``),
            ``converged``, and what the features were (``image_size``, ``channels``, ``n_mels``...).
    """

    name: str
    kind: Literal["baseline", "probe"]
    val_accuracy: float
    test_accuracy: float | None
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- convex fits


def linear_probe(
    train_features: np.ndarray,
    train_y: np.ndarray,
    val_features: np.ndarray,
    val_y: np.ndarray,
    test_features: np.ndarray | None = None,
    test_y: np.ndarray | None = None,
    *,
    c_grid: Sequence[float] = C_GRID,
    multi_label: bool | None = None,
    name: str = "linear probe",
    kind: Literal["baseline", "probe"] = "probe",
) -> BaselineResult:
    """Logistic regression on fixed features, ``C`` chosen on validation (see the module docstring).

    Args:
        train_features / val_features / test_features: ``(N, D)`` arrays (any float dtype).
        train_y / val_y / test_y: class indices ``(N,)``, or one-hot / multi-hot ``(N, C)``.
        multi_label: fit one-vs-rest on multi-hot targets. ``None``: multi-label when the
            targets are 2-D and some row does not hold exactly one 1.
        name / kind: recorded in the result.

    Raises:
        DataError: empty or mismatched splits, or a training split with one class only.
    """
    start = time.monotonic()
    x_train, x_val = _matrix(train_features, "train"), _matrix(val_features, "validation")
    if x_val.shape[1] != x_train.shape[1]:
        raise DataError(f"validation features have {x_val.shape[1]} columns, training features {x_train.shape[1]}")
    if multi_label is None:
        multi_label = any(_is_multi_hot(y) for y in (train_y, val_y, test_y) if y is not None)
    y_train, y_val = _targets(train_y, multi_label, len(x_train)), _targets(val_y, multi_label, len(x_val))
    if not multi_label and len(np.unique(y_train)) < 2:
        raise DataError("the training split holds a single class; a classifier needs at least two")
    if not c_grid:
        raise ConfigError("c_grid must hold at least one value of C")
    fits = []
    for c in sorted(float(v) for v in c_grid):
        model, converged = _fit(x_train, y_train, c, multi_label)
        fits.append((_accuracy(y_val, model.predict(x_val)), c, model, converged))
    # max() keeps the first of equal scores: ties go to the smallest C.
    val_score, chosen_c, model, converged = max(fits, key=lambda fit: fit[0])
    params: dict[str, Any] = {
        "C": chosen_c, "c_grid": [float(v) for v in c_grid], "features": int(x_train.shape[1]),
        "train_count": len(x_train), "val_count": len(x_val), "test_count": 0, "converged": converged,
        "metric": "mean_label_accuracy" if multi_label else "accuracy",
    }
    if multi_label:
        params["val_subset_accuracy"] = _subset_accuracy(y_val, model.predict(x_val))
    test_score = None
    if test_features is not None and test_y is not None and len(test_features):
        x_test = _matrix(test_features, "test")
        y_test = _targets(test_y, multi_label, len(x_test))
        predicted = model.predict(x_test)
        test_score = _accuracy(y_test, predicted)
        params["test_count"] = len(x_test)
        if multi_label:
            params["test_subset_accuracy"] = _subset_accuracy(y_test, predicted)
    return BaselineResult(name, kind, val_score, test_score, time.monotonic() - start, params)


def _fit(x: np.ndarray, y: np.ndarray, c: float, multi_label: bool) -> tuple[Any, bool]:
    """A standardise + logistic-regression pipeline fitted on ``(x, y)``; also whether lbfgs converged."""
    logistic = LogisticRegression(C=c, max_iter=MAX_ITER)  # lbfgs: multinomial for >2 classes
    estimator = OneVsRestClassifier(logistic) if multi_label else logistic
    pipeline = make_pipeline(StandardScaler(), estimator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        # One-vs-rest warns when a label is constant in training; it then predicts that constant.
        warnings.filterwarnings("ignore", message=r".*not present in all training examples.*")
        with one_blas_thread():
            pipeline.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return pipeline, converged


def _matrix(features: Any, split: str) -> np.ndarray:
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise DataError(f"the {split} features must be a non-empty (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError(f"the {split} features hold NaN or infinite values")
    return x


def _is_multi_hot(y: Any) -> bool:
    y = np.asarray(y)
    return y.ndim == 2 and bool((y.sum(axis=1) != 1).any())


def _targets(y: Any, multi_label: bool, count: int) -> np.ndarray:
    """Class indices ``(N,)`` (single-label) or a 0/1 matrix ``(N, C)`` (multi-label)."""
    y = np.asarray(y)
    if len(y) != count:
        raise DataError(f"{len(y)} labels for {count} feature rows")
    if multi_label:
        if y.ndim != 2:
            raise DataError(f"multi-label targets must be (N, C) multi-hot, got shape {y.shape}")
        return (y > 0.5).astype(np.int64)
    return np.argmax(y, axis=1) if y.ndim == 2 else y.astype(np.int64)


def _accuracy(y: np.ndarray, predicted: np.ndarray) -> float:
    """Accuracy; mean per-label accuracy for multi-label (Keras ``BinaryAccuracy``)."""
    return float(np.mean(np.asarray(predicted) == y))


def _subset_accuracy(y: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean((np.asarray(predicted) == y).all(axis=1)))


# --------------------------------------------------------------------------- no-transfer baseline


def no_transfer_baseline(
    train: Sequence[Example],
    val: Sequence[Example],
    class_names: Sequence[str],
    *,
    test: Sequence[Example] = (),
    waveforms: Mapping[str, np.ndarray] | None = None,
    sample_rate: int | None = None,
    image_size: int = BASELINE_IMAGE_SIZE,
    n_mels: int = 40,
    c_grid: Sequence[float] = C_GRID,
) -> BaselineResult:
    """Logistic regression with no pretrained network, on the same splits as the transfer model.

    Images (``waveforms`` is ``None``): each file decoded (:func:`tlkit.data.images.decode_rgb`), area-resized
    to ``image_size`` x ``image_size``, scaled to 0..1 and flattened; when every image is gray
    (R = G = B) one channel is kept, otherwise RGB (gray files become RGB).
    Audio: :func:`log_mel_statistics` of each decoded clip (``waveforms[path]`` at
    ``sample_rate``, e.g. :attr:`tlkit.data.AudioSplits.waveforms`).

    Returns a :class:`BaselineResult` with ``kind="baseline"``.
    """
    start = time.monotonic()
    if not train or not val:
        raise DataError("the no-transfer baseline needs non-empty training and validation splits")
    multi_label = any(len(e.labels) != 1 for e in (*train, *val, *test))
    splits = [list(train), list(val), list(test)]
    if waveforms is None:
        features, details = _pixel_features(splits, image_size)
        name = f"pixels {image_size}x{image_size} + logistic regression"
    else:
        if not sample_rate:
            raise ConfigError("audio baselines need the sample_rate the waveforms were decoded at")
        features = [_audio_matrix(split, waveforms, sample_rate, n_mels) for split in splits]
        details = {"n_mels": n_mels, "sample_rate": int(sample_rate)}
        name = "log-mel statistics + logistic regression"
    targets = [encode_labels(split, class_names) for split in splits]
    result = linear_probe(
        features[0], targets[0], features[1], targets[1], features[2] if test else None,
        targets[2] if test else None, c_grid=c_grid, multi_label=multi_label, name=name, kind="baseline",
    )
    result.params.update(details)
    result.seconds = time.monotonic() - start
    return result


def _pixel_features(splits: list[list[Example]], size: int) -> tuple[list[np.ndarray], dict[str, Any]]:
    if size < 1:
        raise ConfigError(f"the baseline image size must be a positive number of pixels, got {size}")

    def load(path: tf.Tensor) -> tf.Tensor:
        image = decode_rgb(tf.io.read_file(path))  # the decoder training uses
        return tf.image.resize(tf.cast(image, tf.float32) / 255.0, (size, size), method="area")

    arrays = []
    for split in splits:
        if not split:
            arrays.append(np.zeros((0, size, size, 3), np.float32))
            continue
        ds = tf.data.Dataset.from_tensor_slices([e.path for e in split]).map(load, num_parallel_calls=tf.data.AUTOTUNE)
        arrays.append(np.concatenate([b.numpy() for b in ds.batch(256)]))
    gray = all(np.allclose(a[..., 0], a[..., 1]) and np.allclose(a[..., 0], a[..., 2]) for a in arrays)
    if gray:
        arrays = [a[..., :1] for a in arrays]
    flat = [a.reshape(len(a), int(np.prod(a.shape[1:]))) for a in arrays]
    return flat, {"image_size": size, "channels": 1 if gray else 3}


def _audio_matrix(split: list[Example], waveforms: Mapping[str, np.ndarray], rate: int, n_mels: int) -> np.ndarray:
    missing = [e.path for e in split if e.path not in waveforms]
    if missing:
        raise DataError(f"{len(missing)} example(s) have no decoded waveform (first: {missing[0]!r})")
    rows = [log_mel_statistics(waveforms[e.path], rate, n_mels) for e in split]
    return np.stack(rows) if rows else np.zeros((0, 3 * n_mels), np.float32)


def log_mel_statistics(waveform: np.ndarray, sample_rate: int, n_mels: int = 40) -> np.ndarray:
    """``(3 * n_mels,)`` float32: per-band mean and std of a clip's log-mel spectrogram, and the
    std of its deltas (librosa; 25 ms windows rounded up to a power of two, 10 ms hop)."""
    import librosa

    wave = np.asarray(waveform, np.float32).reshape(-1)
    n_fft = int(2 ** np.ceil(np.log2(max(16, 0.025 * sample_rate))))
    mel = librosa.feature.melspectrogram(y=wave, sr=sample_rate, n_fft=n_fft, hop_length=max(1, sample_rate // 100),
                                         n_mels=n_mels)
    log_mel = np.log(mel + 1e-10)
    frames = log_mel.shape[1]
    width = min(9, frames if frames % 2 else frames - 1)
    delta = librosa.feature.delta(log_mel, width=width) if width >= 3 else np.zeros_like(log_mel)
    return np.concatenate([log_mel.mean(axis=1), log_mel.std(axis=1), delta.std(axis=1)]).astype(np.float32)


# --------------------------------------------------------------------------- frozen features


def feature_extractor(
    backbone: str | BackboneSpec | keras.Model,
    *,
    weights: str | None = "pretrained",
    image_size: int | tuple[int, int] | None = None,
) -> keras.Model:
    """A model from raw input (pixels 0..255 ``(B, H, W, 3)`` or waveforms ``(B, samples)``) to
    pooled backbone features ``(B, C)``.

    ``backbone``: a tlkit classifier (cut at its ``pool`` layer with :func:`tlkit.split_head`),
    a model that already returns ``(B, C)``, or a backbone name / spec (built with
    :func:`tlkit.build_classifier` with ``weights``, then cut).
    """
    if isinstance(backbone, keras.Model):
        if FEATURES_LAYER in [layer.name for layer in backbone.layers]:
            return split_head(backbone)[0]
        if len(backbone.output.shape) == 2:
            return backbone
        raise ConfigError(
            f"model {backbone.name!r} has no {FEATURES_LAYER!r} layer and returns rank-{len(backbone.output.shape)} "
            "output; pass a tlkit classifier, a (B, C) feature extractor or a backbone name"
        )
    model = build_classifier(backbone, 2, weights=weights, head=HeadConfig(dropout=0.0), image_size=image_size)
    return split_head(model)[0]


def frozen_features(
    backbone_or_classifier: str | BackboneSpec | keras.Model,
    data: Any,
    *,
    batch_size: int = 32,
    image_size: int | tuple[int, int] | None = None,
) -> np.ndarray:
    """Pooled backbone features ``(N, C)`` float32 of ``data``, in its order, in inference mode.

    Args:
        backbone_or_classifier: see :func:`feature_extractor` (built once per call; pass the
            extractor itself to reuse it).
        data: a numpy array of raw inputs (pixels 0..255 ``(N, H, W, 3)``, or equal-length
            waveforms ``(N, samples)``); :class:`~tlkit.data.Batches` (read in their fixed
            order, shuffling ignored); or a finite batched ``tf.data.Dataset`` of inputs or
            ``(inputs, targets)`` (read once, in its own order).
    """
    extractor = feature_extractor(backbone_or_classifier, image_size=image_size)
    if isinstance(data, Batches):
        data = data.in_order()
    if isinstance(data, tf.data.Dataset):
        if isinstance(data.element_spec, tuple):
            data = data.map(lambda x, *rest: x)
        # predict runs the extractor as one compiled function, as the feature cache does.
        return np.asarray(extractor.predict(data, verbose=0), np.float32)
    array = np.asarray(data, np.float32)
    if len(array) == 0:
        return np.zeros((0, int(extractor.output.shape[-1])), np.float32)
    return np.asarray(extractor.predict(array, batch_size=batch_size, verbose=0), np.float32)


def frozen_clip_features(
    backbone_or_classifier: str | BackboneSpec | keras.Model,
    waveforms: Sequence[np.ndarray],
    clip_length: int,
    *,
    crops: int = 3,
    batch_size: int = 32,
) -> np.ndarray:
    """Audio: features ``(N, C)`` of clips of any length, the mean over ``crops`` evenly spaced
    ``clip_length`` crops per clip (:func:`tlkit.data.fixed_crops`, as evaluation crops them)."""
    if not waveforms:
        raise DataError("frozen_clip_features needs at least one clip")
    rows = np.concatenate([fixed_crops(w, clip_length, crops) for w in waveforms])
    features = frozen_features(backbone_or_classifier, rows, batch_size=batch_size)
    return features.reshape(len(waveforms), crops, -1).mean(axis=1)


# --------------------------------------------------------------------------- the verdict


def transfer_verdict(
    baseline: BaselineResult | None,
    probe: BaselineResult | None,
    model_accuracy: float | None,
    *,
    margin: float = MARGIN,
) -> list[str]:
    """Warnings for a run summary; empty when transfer helps and fine-tuning kept its gain.

    * ``NEGATIVE-TRANSFER``: the no-transfer baseline beats the linear probe on validation by
      more than ``margin`` (default 1 accuracy point). The message gives the gap, says whether
      the baseline lies beyond the probe's 95% Wilson interval on the validation count (a gap
      inside it may be noise), and what to try.
    * ``FINE-TUNING``: ``model_accuracy`` (the fine-tuned model's *validation* accuracy, the
      same metric and split as the probe's) is more than ``margin`` below the probe on the
      model's own pretrained, frozen backbone.

    ``None`` arguments skip the checks that need them.
    """
    found: list[str] = []
    if baseline is not None and probe is not None and baseline.val_accuracy - probe.val_accuracy > margin:
        gap = 100 * (baseline.val_accuracy - probe.val_accuracy)
        text = (
            f"NEGATIVE-TRANSFER: the no-transfer baseline ({baseline.name}) reaches {_pct(baseline.val_accuracy)} "
            f"validation accuracy, {gap:.1f} points above the {probe.name} ({_pct(probe.val_accuracy)})"
            f"{_noise_note(baseline, probe)}. The pretrained features do not suit these data: try another "
            "backbone (`tlkit rank DATA` compares them), a larger image size, or use the baseline itself."
        )
        if model_accuracy is not None:
            side = "below" if model_accuracy < baseline.val_accuracy else "at or above"
            text += f" The fine-tuned model reaches {_pct(model_accuracy)}, {side} the baseline."
        found.append(text)
    if probe is not None and model_accuracy is not None and probe.val_accuracy - model_accuracy > margin:
        gap = 100 * (probe.val_accuracy - model_accuracy)
        found.append(
            f"FINE-TUNING: the fine-tuned model ends at {_pct(model_accuracy)} validation accuracy, {gap:.1f} points "
            f"below a linear probe on its own frozen pretrained backbone ({probe.name}: {_pct(probe.val_accuracy)}). "
            "Fine-tuning lost what the features already had: train the head longer first, thaw fewer groups, "
            "lower the fine-tuning learning rate, stop early, or keep the feature-extraction schedule."
        )
    return found


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _noise_note(baseline: BaselineResult, probe: BaselineResult) -> str:
    """`` [n=50 validation examples; beyond the probe's 95% Wilson interval 40.1%-67.2%]`` (single-label only)."""
    n = int(probe.params.get("val_count") or 0)
    if n <= 0 or probe.params.get("metric", "accuracy") != "accuracy":
        return ""
    low, high = wilson_interval(probe.val_accuracy, n)
    where = "beyond" if baseline.val_accuracy > high else "within (so possibly noise)"
    return f" [n={n} validation examples; {where} the probe's 95% Wilson interval {_pct(low)}-{_pct(high)}]"


def wilson_interval(accuracy: float, count: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy measured on ``count`` examples (scipy)."""
    interval = binomtest(round(accuracy * count), count).proportion_ci(confidence, method="wilson")
    return float(interval.low), float(interval.high)
