"""Audio front-ends as Keras layers: waveform in, features out, TF ops only (they export).

:class:`LogMelSpectrogram` turns ``(B, samples)`` float32 audio at the backbone's rate into
``(B, frames, n_mels)`` log-mel features. Its mel filterbank is computed once in numpy
(:func:`mel_filterbank`, the same arithmetic as ``librosa.filters.mel``: Slaney mel scale,
Slaney area normalisation) and used as a constant, so neither librosa nor any Python
callback is needed when an exported model runs.

The short-time Fourier transform is, by default, a matrix product (``dft="matmul"``): the
signal is framed (``tf.signal.frame``), and each frame is multiplied by one constant
``(n_fft, 2 * (n_fft // 2 + 1))`` matrix holding the periodic Hann window times the cosine
and sine of every bin (:func:`dft_matrix`). That is ordinary MatMul, which every TFLite
variant converts and runs for any ``n_fft``; ``tf.signal.stft`` (``dft="fft"``) becomes
``RFFT2D``, which TFLite only prepares for power-of-two lengths, so Whisper's
``n_fft=400`` front-end did not convert. Both give the same features within float32
rounding (docs/audio.md has the measured differences and speeds).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit.backbones.spec import AudioFrontend
from tlkit.errors import ConfigError

__all__ = ["DFT_MODES", "LogMelSpectrogram", "dft_matrix", "hz_to_mel", "mel_filterbank", "mel_to_hz"]

_LOG_STYLES = ("natural", "whisper")
_PAD_MODES = ("reflect", "constant")
DFT_MODES = ("matmul", "fft")
_FLOAT_CONSTANT_LIMIT = 1023
"""Largest constant matrix TFLite's dynamic-range quantizer leaves in float (it rounds >= 1024 entries)."""
"""``LogMelSpectrogram(dft=...)``: a DFT-matrix product (default, converts to TFLite) or ``tf.signal.stft``."""


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Slaney mel scale (librosa's default, ``htk=False``): linear below 1 kHz, log above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    mels = hz / f_sp
    log_region = hz >= min_log_hz
    return np.where(log_region, min_log_mel + np.log(np.maximum(hz, 1e-12) / min_log_hz) / logstep, mels)


def mel_to_hz(mels: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mels = np.asarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Triangular Slaney-normalised mel filters, as ``librosa.filters.mel(...).T``.

    Returns:
        ``(n_fft // 2 + 1, n_mels)`` float32: ``power_spectrum @ filters`` gives the mel spectrum.
    """
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    mel_freqs = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_freqs)
    ramps = np.subtract.outer(mel_freqs, fft_freqs)
    weights = np.zeros((n_mels, len(fft_freqs)), dtype=np.float64)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2 : n_mels + 2] - mel_freqs[:n_mels]))[:, None]
    return weights.T.astype(np.float32)


def dft_matrix(n_fft: int) -> np.ndarray:
    """The windowed real DFT as one matrix: ``frames @ matrix`` = [Re X | Im X] per bin.

    Row ``n``, column ``k`` (``k < n_fft // 2 + 1``) is ``w[n] cos(2 pi n k / n_fft)``; column
    ``bins + k`` is ``-w[n] sin(2 pi n k / n_fft)``, with ``w`` the periodic Hann window of
    ``tf.signal.hann_window(n_fft, periodic=True)`` (librosa's ``"hann"``). Computed in
    float64 and rounded once, so the float32 product is as exact as an FFT in float32.

    Returns:
        ``(n_fft, 2 * (n_fft // 2 + 1))`` float32.
    """
    n = np.arange(n_fft, dtype=np.float64)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)
    # (n * k) mod n_fft keeps the angle small, so cos/sin stay exact for large n_fft.
    angle = 2.0 * np.pi * (np.outer(n, np.arange(n_fft // 2 + 1)) % n_fft) / n_fft
    return np.concatenate([window[:, None] * np.cos(angle), -window[:, None] * np.sin(angle)], axis=1).astype(
        np.float32
    )


@keras.saving.register_keras_serializable(package="tlkit")
class LogMelSpectrogram(keras.layers.Layer):
    """Waveform ``(B, samples)`` -> log-mel ``(B, frames, n_mels)`` float32.

    Steps: optional centring pad of ``n_fft // 2`` each side (``pad_mode`` "reflect" or
    "constant"), STFT with a periodic Hann window of ``n_fft`` and hop ``hop_length``
    (``dft="matmul"``: frames times :func:`dft_matrix`, the default, which converts to
    TFLite for any ``n_fft``; ``dft="fft"``: ``tf.signal.stft``), power spectrum
    ``|X|^2``, optional drop of the last frame, mel projection, then

    - ``log_style="whisper"``: ``log10(max(mel, 1e-10))``, floored at (per-example max - 8),
      then ``(m + 4) / 4`` — OpenAI Whisper's ``log_mel_spectrogram`` (which also drops the
      last frame, so 30 s at 16 kHz gives exactly 3000 frames). Whisper takes the max over
      the whole batch tensor; this layer takes it per example, identical for one clip.
    - ``log_style="natural"``: ``log(mel + log_offset)``.

    Frames: ``1 + samples // hop_length`` when centred (minus one with ``drop_last_frame``),
    ``1 + (samples - n_fft) // hop_length`` otherwise. With ``center=True`` and
    ``pad_mode="reflect"`` the input needs more than ``n_fft // 2`` samples.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 400,
        hop_length: int = 160,
        n_mels: int = 80,
        fmin: float = 0.0,
        fmax: float | None = None,
        log_style: str = "natural",
        log_offset: float = 1e-6,
        center: bool = True,
        pad_mode: str = "reflect",
        drop_last_frame: bool | None = None,
        dft: str = "matmul",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("dtype", "float32")  # an FFT in float16 loses the quiet bands
        super().__init__(**kwargs)
        if log_style not in _LOG_STYLES:
            raise ConfigError(f"LogMelSpectrogram log_style={log_style!r}; use one of {_LOG_STYLES}")
        if pad_mode not in _PAD_MODES:
            raise ConfigError(f"LogMelSpectrogram pad_mode={pad_mode!r}; use one of {_PAD_MODES}")
        if dft not in DFT_MODES:
            raise ConfigError(f"LogMelSpectrogram dft={dft!r}; use one of {DFT_MODES}")
        if fmax is not None and not 0 <= fmin < fmax <= sample_rate / 2:
            raise ConfigError(
                f"LogMelSpectrogram needs 0 <= fmin < fmax <= sample_rate/2, got fmin={fmin}, fmax={fmax}, "
                f"sample_rate={sample_rate}"
            )
        self.sample_rate = int(sample_rate)
        self.n_fft = int(n_fft)
        self.hop_length = int(hop_length)
        self.n_mels = int(n_mels)
        self.fmin = float(fmin)
        self.fmax = None if fmax is None else float(fmax)
        self.log_style = log_style
        self.log_offset = float(log_offset)
        self.center = bool(center)
        self.pad_mode = pad_mode
        self.drop_last_frame = (log_style == "whisper") if drop_last_frame is None else bool(drop_last_frame)
        self.dft = dft
        # Constants, not weights: nothing to load, nothing for layer groups to cover.
        self._filters = mel_filterbank(self.sample_rate, self.n_fft, self.n_mels, self.fmin, self.fmax)
        self._dft = dft_matrix(self.n_fft) if dft == "matmul" else None

    @classmethod
    def from_spec(cls, frontend: AudioFrontend, **kwargs: Any) -> LogMelSpectrogram:
        """The layer for a backbone's :class:`AudioFrontend` (``kind`` must be ``"log_mel"``)."""
        if frontend.kind != "log_mel":
            raise ConfigError(
                f"LogMelSpectrogram.from_spec needs an AudioFrontend with kind='log_mel', got {frontend.kind!r}"
            )
        return cls(
            sample_rate=frontend.sample_rate,
            n_fft=frontend.n_fft,
            hop_length=frontend.hop_length,
            n_mels=frontend.n_mels,
            fmin=frontend.fmin,
            fmax=frontend.fmax,
            log_style=frontend.log_style,
            log_offset=frontend.log_offset,
            **kwargs,
        )

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for ``num_samples`` samples."""
        if self.center:
            return 1 + num_samples // self.hop_length - int(self.drop_last_frame)
        return 1 + (num_samples - self.n_fft) // self.hop_length - int(self.drop_last_frame)

    def call(self, waveform: Any) -> Any:
        x = tf.cast(waveform, tf.float32)
        if self.center:
            half = self.n_fft // 2
            x = tf.pad(x, [[0, 0], [half, half]], mode=self.pad_mode.upper())
        power = self.power_spectrum(x)
        if self.drop_last_frame:
            power = power[:, :-1, :]
        mel = self.mel_projection(power)
        if self.log_style == "whisper":
            log_spec = tf.math.log(tf.maximum(mel, 1e-10)) / tf.math.log(tf.constant(10.0, tf.float32))
            peak = tf.reduce_max(log_spec, axis=[1, 2], keepdims=True)
            log_spec = tf.maximum(log_spec, peak - 8.0)
            return (log_spec + 4.0) / 4.0
        return tf.math.log(mel + self.log_offset)

    def mel_projection(self, power: Any) -> Any:
        """``(B, frames, bins) @ filters`` -> ``(B, frames, n_mels)``, in blocks of mel bands.

        Each block's filter matrix has fewer than 1024 entries, the size below which TFLite's
        dynamic-range quantizer keeps a constant in float. A larger one is rounded to int8 and
        its input, the power spectrum, quantized to int8 on the fly, which keeps about 24 dB
        of its range: measured on tones, the mean log-mel error of ``tflite-dynamic`` was 4.1
        (natural-log units) with one matrix and 0.08 with blocks. In float the sums are the same.
        """
        filters = self._filters
        step = max(1, _FLOAT_CONSTANT_LIMIT // filters.shape[0])
        blocks = [tf.tensordot(power, tf.constant(filters[:, i : i + step]), axes=[[2], [0]])
                  for i in range(0, filters.shape[1], step)]
        return blocks[0] if len(blocks) == 1 else tf.concat(blocks, axis=-1)

    def power_spectrum(self, x: Any) -> Any:
        """``|STFT|^2`` of an already padded ``(B, samples)`` signal: ``(B, frames, n_fft // 2 + 1)``."""
        if self._dft is not None:
            frames = tf.signal.frame(x, self.n_fft, self.hop_length, pad_end=False)  # (B, frames, n_fft)
            spectrum = tf.matmul(frames, tf.constant(self._dft))  # (B, frames, 2 * bins): [Re | Im]
            bins = self.n_fft // 2 + 1
            return tf.math.square(spectrum[..., :bins]) + tf.math.square(spectrum[..., bins:])
        stft = tf.signal.stft(
            x,
            frame_length=self.n_fft,
            frame_step=self.hop_length,
            fft_length=self.n_fft,
            window_fn=lambda length, dtype: tf.signal.hann_window(length, periodic=True, dtype=dtype),
            pad_end=False,
        )
        return tf.math.square(tf.math.real(stft)) + tf.math.square(tf.math.imag(stft))

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        samples = input_shape[-1]
        frames = None if samples is None else self.num_frames(int(samples))
        return (input_shape[0], frames, self.n_mels)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "sample_rate": self.sample_rate,
            "n_fft": self.n_fft,
            "hop_length": self.hop_length,
            "n_mels": self.n_mels,
            "fmin": self.fmin,
            "fmax": self.fmax,
            "log_style": self.log_style,
            "log_offset": self.log_offset,
            "center": self.center,
            "pad_mode": self.pad_mode,
            "drop_last_frame": self.drop_last_frame,
            "dft": self.dft,
        }
