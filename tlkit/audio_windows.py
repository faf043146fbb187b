"""How an audio model trained on fixed crops scores a whole clip of any length: the window contract.

A run trained on ``clip_seconds`` crops scores a clip as the mean class probabilities of
``n = max(eval_crops, ceil(samples / clip_samples))`` evenly spaced ``clip_samples`` crops,
cut as :func:`tlkit.data.audio.fixed_crops` cuts them (the first starts at the clip's start,
the last ends at its end; a shorter clip is zero-padded equally on both sides). Up to
``eval_crops * clip_seconds`` of audio that is exactly the run's own evaluation
(``eval_crops`` crops, :func:`tlkit.data.audio.predict_clips`); a longer clip gets as many
windows as it takes to hear every sample, so a 36 s clip scored in 3 s crops is 12 windows,
not 3 s of it, and no window is ever longer than the model was trained on (Whisper's 30 s
position table, fixed-length TFLite inputs).

Every place that scores clips follows this one contract: ``tlkit predict RUN``
(:mod:`tlkit.predict`), the exported SavedModel's serving function (:func:`tf_clip_windows`,
the same windows in TensorFlow ops), the TFLite and ``.keras`` predictors
(:mod:`tlkit.artifacts`, which read it from ``metadata.json``: :meth:`ClipWindows.from_metadata`)
and the export's parity check.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from tlkit.data.audio import fixed_crops, predict_clips, window_count

METADATA_KEY = "audio_windows"
"""The ``metadata.json`` key holding the contract (:meth:`ClipWindows.to_metadata`)."""


@dataclass(frozen=True)
class ClipWindows:
    """The window contract of one audio model.

    Attributes:
        sample_rate: Hz of the waveform.
        clip_samples: samples per window (the training crop).
        crops: the least number of windows per clip (the run's ``eval_crops``).
    """

    sample_rate: int
    clip_samples: int
    crops: int = 1

    def count(self, samples: int) -> int:
        """Windows for a clip of ``samples`` samples (see :func:`window_count`)."""
        return window_count(samples, self.clip_samples, self.crops)

    def windows(self, waveform: np.ndarray) -> np.ndarray:
        """``(n, clip_samples)`` float32: the evenly spaced windows of one ``(samples,)`` clip."""
        wave = np.asarray(waveform, np.float32).reshape(-1)
        return fixed_crops(wave, self.clip_samples, self.count(len(wave)))

    def score(self, predict: Callable[[np.ndarray], Any], waveform: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """``(C,)`` float32: the mean of ``predict`` (a ``(b, clip_samples)`` batch -> ``(b, C)``) over the
        clip's windows, computed by :func:`tlkit.data.audio.predict_clips` as the run's evaluation does."""
        wave = np.asarray(waveform, np.float32).reshape(-1)
        count = self.count(len(wave))
        return predict_clips(predict, [wave], self.clip_samples, crops=count, batch_size=batch_size)[0]

    def to_metadata(self) -> dict[str, Any]:
        """The ``metadata.json`` entry (under :data:`METADATA_KEY`)."""
        return {
            "sample_rate": self.sample_rate,
            "clip_samples": self.clip_samples,
            "clip_seconds": self.clip_samples / self.sample_rate,
            "eval_crops": self.crops,
            "rule": "mean probabilities of max(eval_crops, ceil(samples / clip_samples)) evenly spaced "
                    "clip_samples windows (first at the start, last at the end; shorter clips zero-padded "
                    "equally on both sides)",
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ClipWindows | None:
        """The contract recorded in an export's ``metadata.json``; ``None`` when it records none."""
        entry = metadata.get(METADATA_KEY)
        if not isinstance(entry, Mapping):
            return None
        try:
            return cls(int(entry["sample_rate"]), int(entry["clip_samples"]), max(1, int(entry.get("eval_crops", 1))))
        except (KeyError, TypeError, ValueError):
            return None


def tf_clip_windows(waveforms: tf.Tensor, length: int, crops: int) -> tf.Tensor:
    """The windows of :meth:`ClipWindows.windows` in TensorFlow ops, for a batch of same-length clips.

    Args:
        waveforms: ``(B, samples)`` float32 (any ``samples``).

    Returns:
        ``(B, n, length)`` with ``n = max(crops, ceil(samples / length))``; the start offsets
        are computed as ``np.round(np.linspace(0, spare, n))`` is (float64, round half to
        even, the last start exactly ``spare``), so they equal :func:`fixed_crops`'s.
    """
    waveforms = tf.convert_to_tensor(waveforms, tf.float32)
    samples = tf.shape(waveforms, out_type=tf.int64)[1]
    size = tf.constant(length, tf.int64)
    shortfall = tf.maximum(size - samples, 0)
    left = shortfall // 2
    padded = tf.pad(waveforms, tf.stack([tf.zeros(2, tf.int64), tf.stack([left, shortfall - left])]))
    spare = tf.maximum(samples, size) - size
    count = tf.maximum(tf.constant(crops, tf.int64), (samples + size - 1) // size)
    step = tf.cast(spare, tf.float64) / tf.cast(tf.maximum(count - 1, 1), tf.float64)
    starts = tf.cast(tf.round(tf.range(count, dtype=tf.float64) * step), tf.int64)
    last = tf.range(count) == count - 1
    starts = tf.where(count == 1, spare // 2, tf.where(last, spare, starts))
    indices = starts[:, None] + tf.range(size, dtype=tf.int64)[None, :]  # (n, length)
    return tf.gather(padded, indices, axis=1)


def tf_score_windows(model: Callable[[tf.Tensor], tf.Tensor], waveforms: tf.Tensor, length: int,
                     crops: int) -> tf.Tensor:
    """``(B, C)``: ``model`` (``(b, length)`` -> ``(b, C)``) averaged over each clip's windows."""
    windows = tf_clip_windows(waveforms, length, crops)
    batch, count = tf.shape(windows)[0], tf.shape(windows)[1]
    flat = tf.reshape(windows, [-1, length])
    probabilities = model(flat)
    classes = tf.shape(probabilities)[-1]
    return tf.reduce_mean(tf.reshape(probabilities, [batch, count, classes]), axis=1)
