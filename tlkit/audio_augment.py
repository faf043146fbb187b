"""Audio augmentation inside the model, active only in training.

:class:`AudioAugmentation` is the config (a frozen dataclass, like
:class:`tlkit.ImageAugmentation`); its :meth:`~AudioAugmentation.build_layer` returns one
:class:`AudioAugment` layer that :func:`tlkit.build_classifier` places right after the
audio front-end, so it sees:

- the raw waveform ``(B, samples)`` for waveform encoders (``AudioFrontend.kind ==
  "waveform"``): random time shift, gain and additive white noise at a random SNR;
- log-mel features ``(B, frames, n_mels)`` for spectrogram encoders (``kind ==
  "log_mel"``): the time shift (in frames) and the gain (an offset in the log domain),
  then SpecAugment time and frequency masks. Additive noise cannot be added exactly
  after the log, so it is not applied there.

At inference (``training=False``, what ``predict``, ``evaluate`` and exported models
use) the layer returns its input unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
from keras import ops

from tlkit.backbones.spec import AudioFrontend, BackboneSpec
from tlkit.errors import ConfigError

__all__ = ["AudioAugment", "AudioAugmentation", "audio_augmentation"]


@dataclass(frozen=True)
class AudioAugmentation:
    """Audio augmentation, active only in training.

    Attributes:
        time_shift: max shift as a fraction of the input length (0.1 = up to +-10 %);
            the vacated part is filled with silence (waveform) or the quietest value of
            the example (log-mel).
        gain_db: max gain change in dB, uniform in ``[-gain_db, +gain_db]``.
        noise_snr_db: ``(low, high)``: white noise at an SNR drawn uniformly from that
            range (dB, relative to the example's mean power); ``None`` disables it.
            Waveform encoders only.
        spec_time_masks / spec_time_mask_width: SpecAugment: this many time masks per
            example, each up to ``spec_time_mask_width`` frames wide. Log-mel encoders only.
        spec_freq_masks / spec_freq_mask_width: this many frequency masks, each up to
            ``spec_freq_mask_width`` mel bands wide. Log-mel encoders only.
        Masked cells take the example's mean feature value.
    """

    time_shift: float = 0.1
    gain_db: float = 6.0
    noise_snr_db: tuple[float, float] | None = (20.0, 40.0)
    spec_time_masks: int = 2
    spec_time_mask_width: int = 10
    spec_freq_masks: int = 2
    spec_freq_mask_width: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.time_shift < 1.0:
            raise ConfigError(f"[augmentation] time_shift must be in [0, 1), got {self.time_shift}")
        if self.gain_db < 0:
            raise ConfigError(f"[augmentation] gain_db must be >= 0, got {self.gain_db}")
        if self.noise_snr_db is not None:
            snr = tuple(float(v) for v in self.noise_snr_db)
            if len(snr) != 2 or snr[0] > snr[1]:
                raise ConfigError(f"[augmentation] noise_snr_db must be (low, high) with low <= high, got {self.noise_snr_db}")
            object.__setattr__(self, "noise_snr_db", snr)
        for name in ("spec_time_masks", "spec_time_mask_width", "spec_freq_masks", "spec_freq_mask_width"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"[augmentation] {name} must be >= 0, got {getattr(self, name)}")

    def settings_for(self, frontend: AudioFrontend) -> dict[str, Any]:
        """The :class:`AudioAugment` arguments that apply to ``frontend``'s output."""
        settings: dict[str, Any] = {"time_shift": self.time_shift, "gain_db": self.gain_db}
        if frontend.kind == "waveform":
            settings.update(mode="waveform", noise_snr_db=self.noise_snr_db)
        else:
            # mel power scales with amplitude squared: +1 dB adds ln(10)/10 to the natural
            # log; whisper style is log10 divided by 4.
            per_db = math.log(10.0) / 10.0 if frontend.log_style == "natural" else 0.1 / 4.0
            settings.update(
                mode="log_mel",
                log_per_db=per_db,
                time_masks=int(self.spec_time_masks) if self.spec_time_mask_width else 0,
                time_mask_width=int(self.spec_time_mask_width),
                freq_masks=int(self.spec_freq_masks) if self.spec_freq_mask_width else 0,
                freq_mask_width=int(self.spec_freq_mask_width),
            )
        return settings

    def build_layer(self, spec: BackboneSpec, seed: int | None = None) -> keras.layers.Layer | None:
        """An :class:`AudioAugment` layer for the output of ``spec``'s front-end (``None``: nothing to do)."""
        frontend = spec.preprocessing
        if not isinstance(frontend, AudioFrontend):
            raise ConfigError(
                f"AudioAugmentation needs an audio backbone; {spec.name!r} is a {spec.modality} backbone "
                "(use ImageAugmentation)"
            )
        layer = AudioAugment(seed=seed, name="augment", **self.settings_for(frontend))
        return layer if layer.enabled else None


@keras.saving.register_keras_serializable(package="tlkit")
class AudioAugment(keras.layers.Layer):
    """Random waveform or log-mel augmentation; the identity unless ``training=True``.

    ``mode="waveform"``: input and output ``(B, samples)`` float32.
    ``mode="log_mel"``: input and output ``(B, frames, n_mels)`` float32.
    Every example gets its own random draws; ``seed`` makes them reproducible.
    """

    def __init__(
        self,
        mode: str = "waveform",
        time_shift: float = 0.0,
        gain_db: float = 0.0,
        noise_snr_db: tuple[float, float] | list[float] | None = None,
        log_per_db: float = math.log(10.0) / 10.0,
        time_masks: int = 0,
        time_mask_width: int = 0,
        freq_masks: int = 0,
        freq_mask_width: int = 0,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("dtype", "float32")  # noise powers and dB in float16 lose too much
        super().__init__(**kwargs)
        if mode not in ("waveform", "log_mel"):
            raise ConfigError(f"AudioAugment mode must be 'waveform' or 'log_mel', got {mode!r}")
        self.mode = mode
        self.time_shift = float(time_shift)
        self.gain_db = float(gain_db)
        self.noise_snr_db = None if noise_snr_db is None else (float(noise_snr_db[0]), float(noise_snr_db[1]))
        self.log_per_db = float(log_per_db)
        self.time_masks = int(time_masks)
        self.time_mask_width = int(time_mask_width)
        self.freq_masks = int(freq_masks)
        self.freq_mask_width = int(freq_mask_width)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = False

    @property
    def enabled(self) -> bool:
        """False when every augmentation is switched off (the layer would be the identity)."""
        return bool(
            self.time_shift
            or self.gain_db
            or (self.mode == "waveform" and self.noise_snr_db is not None)
            or (self.mode == "log_mel" and (self.time_masks or self.freq_masks))
        )

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if not training:
            return inputs
        x = ops.cast(inputs, "float32")
        batch = ops.shape(x)[0]
        if self.time_shift:
            x = self._shift(x, batch)
        if self.gain_db:
            gain = keras.random.uniform((batch,), -self.gain_db, self.gain_db, seed=self.seed_generator)
            if self.mode == "waveform":
                x = x * ops.expand_dims(ops.power(10.0, gain / 20.0), 1)
            else:
                x = x + ops.reshape(gain * self.log_per_db, (-1, 1, 1))
        if self.mode == "waveform" and self.noise_snr_db is not None:
            low, high = self.noise_snr_db
            snr = keras.random.uniform((batch, 1), low, high, seed=self.seed_generator)
            power = ops.mean(ops.square(x), axis=1, keepdims=True)
            scale = ops.sqrt(power / ops.power(10.0, snr / 10.0))
            x = x + scale * keras.random.normal(ops.shape(x), seed=self.seed_generator)
        if self.mode == "log_mel":
            fill = ops.mean(x, axis=(1, 2), keepdims=True)
            for _ in range(self.time_masks):
                x = self._mask(x, fill, axis=1, width=self.time_mask_width, batch=batch)
            for _ in range(self.freq_masks):
                x = self._mask(x, fill, axis=2, width=self.freq_mask_width, batch=batch)
        return x

    def _shift(self, x: Any, batch: Any) -> Any:
        """Shifts each example by up to ``time_shift`` of its length along axis 1, filling the gap."""
        length = ops.shape(x)[1]
        limit = ops.cast(ops.floor(self.time_shift * ops.cast(length, "float32")), "int32")
        draw = keras.random.uniform((batch,), 0.0, 1.0, seed=self.seed_generator)
        shift = ops.cast(ops.floor(draw * ops.cast(2 * limit + 1, "float32")), "int32") - limit
        index = ops.expand_dims(ops.arange(length, dtype="int32"), 0) - ops.expand_dims(shift, 1)
        valid = ops.logical_and(index >= 0, index < length)
        index = ops.clip(index, 0, length - 1)
        if self.mode == "waveform":
            moved = ops.take_along_axis(x, index, axis=1)
            return ops.where(valid, moved, ops.zeros_like(moved))
        moved = ops.take_along_axis(x, ops.expand_dims(index, 2), axis=1)
        floor = ops.min(x, axis=(1, 2), keepdims=True)
        return ops.where(ops.expand_dims(valid, 2), moved, floor)

    def _mask(self, x: Any, fill: Any, axis: int, width: int, batch: Any) -> Any:
        """One SpecAugment mask per example: ``[start, start + w)`` along ``axis``, ``w <= width``."""
        size = ops.shape(x)[axis]
        size_f = ops.cast(size, "float32")
        w = ops.floor(keras.random.uniform((batch,), 0.0, 1.0, seed=self.seed_generator) * (width + 1))
        w = ops.minimum(w, size_f)
        start = ops.floor(keras.random.uniform((batch,), 0.0, 1.0, seed=self.seed_generator) * (size_f - w + 1))
        position = ops.expand_dims(ops.cast(ops.arange(size), "float32"), 0)
        inside = ops.logical_and(position >= ops.expand_dims(start, 1), position < ops.expand_dims(start + w, 1))
        inside = ops.expand_dims(inside, 2 if axis == 1 else 1)
        return ops.where(inside, fill, x)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "mode": self.mode,
            "time_shift": self.time_shift,
            "gain_db": self.gain_db,
            "noise_snr_db": None if self.noise_snr_db is None else list(self.noise_snr_db),
            "log_per_db": self.log_per_db,
            "time_masks": self.time_masks,
            "time_mask_width": self.time_mask_width,
            "freq_masks": self.freq_masks,
            "freq_mask_width": self.freq_mask_width,
            "seed": self.seed,
        }


def audio_augmentation(augmentation: Any, say: Callable[[str], None] | None = None) -> AudioAugmentation | None:
    """An audio run's augmentation: an :class:`AudioAugmentation` as given, none when disabled, and
    the audio defaults in place of an image augmentation table (``say`` is told so)."""
    if augmentation is None or isinstance(augmentation, AudioAugmentation):
        return augmentation
    if say is not None:
        say("audio run: using AudioAugmentation() defaults (time shift, gain, noise or SpecAugment)")
    return AudioAugmentation()
