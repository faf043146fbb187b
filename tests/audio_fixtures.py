"""Audio test fixtures: synthetic clips written to disk, and tiny audio encoders built on the fly.

The data are tones, so no speech synthesiser is needed: class ``low`` has fundamentals
of 180-420 Hz, class ``high`` 1.4-2.6 kHz. Each *speaker* has its own fundamental and
harmonic mix (a timbre), so a speaker's clips resemble each other more than the class.
"""

from __future__ import annotations

import csv
from pathlib import Path

import keras
import numpy as np

from tlkit.backbones.spec import AudioFrontend, BackboneSpec

TINY_AUDIO_GROUPS = (r"^feat_", r"^block1_", r"^block2_")
CLASS_BANDS = {"low": (180.0, 420.0), "high": (1400.0, 2600.0)}


def tone(
    frequency: float,
    seconds: float,
    sample_rate: int,
    amplitude: float = 0.5,
    harmonics: tuple[float, ...] = (),
    noise: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """A float32 ``(samples,)`` tone with optional harmonics (relative amplitudes) and white noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * frequency * t + phase)
    for order, weight in enumerate(harmonics, start=2):
        if frequency * order < sample_rate / 2:
            wave += weight * np.sin(2 * np.pi * frequency * order * t + phase * order)
    wave = amplitude * wave / max(np.max(np.abs(wave)), 1e-9)
    if noise:
        wave = wave + rng.normal(0, noise, wave.shape)
    return wave.astype(np.float32)


def write_audio(path: Path, waveform: np.ndarray, sample_rate: int) -> Path:
    """Writes ``waveform`` (``(samples,)`` or ``(samples, channels)``) in the format the suffix names."""
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    subtype = {".wav": "PCM_16", ".flac": "PCM_16", ".ogg": "VORBIS", ".mp3": "MPEG_LAYER_III"}[path.suffix]
    sf.write(str(path), waveform, sample_rate, subtype=subtype)
    return path


def speaker_clips(
    label: str, speaker: int, count: int, sample_rate: int, seconds: tuple[float, float] = (0.6, 1.0), seed: int = 0
) -> list[np.ndarray]:
    """``count`` clips of one speaker of class ``label`` (its own fundamental and timbre)."""
    rng = np.random.default_rng([seed, speaker, len(label)])
    low, high = CLASS_BANDS[label]
    base = rng.uniform(low, high)
    harmonics = tuple(rng.uniform(0.0, 0.6, size=3))
    clips = []
    for index in range(count):
        duration = rng.uniform(*seconds)
        clips.append(tone(base * rng.uniform(0.97, 1.03), duration, sample_rate, rng.uniform(0.2, 0.8),
                          harmonics, noise=0.01, seed=int(rng.integers(1 << 30)) + index))
    return clips


def write_speaker_dataset(
    root: Path,
    speakers_per_class: int = 4,
    clips_per_speaker: int = 4,
    sample_rate: int = 8000,
    layout: str = "manifest",
    suffix: str = ".wav",
    seed: int = 0,
) -> Path:
    """Writes a two-class tone corpus; returns the manifest (``layout="manifest"``) or the root folder.

    ``"manifest"``: ``root/audio/<speaker>_<i>.wav`` and ``root/manifest.csv`` (path,label,speaker).
    ``"folders"``: ``root/<class>/<file>``. ``"speaker_folders"``: ``root/<class>/<speaker>/<file>``.
    """
    rows = []
    for label in CLASS_BANDS:
        for s in range(speakers_per_class):
            speaker = f"{label}_spk{s}"
            number = s + (0 if label == "low" else 100)
            for i, clip in enumerate(speaker_clips(label, number, clips_per_speaker, sample_rate, seed=seed)):
                if layout == "manifest":
                    file = root / "audio" / f"{speaker}_{i}{suffix}"
                elif layout == "folders":
                    file = root / label / f"{speaker}_{i}{suffix}"
                else:
                    file = root / label / speaker / f"{i}{suffix}"
                write_audio(file, clip, sample_rate)
                rows.append((str(file.relative_to(root)), label, speaker))
    if layout != "manifest":
        return root
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "speaker"])
        writer.writerows(rows)
    return manifest


def tiny_wave_encoder(weights: str | None = "pretrained") -> keras.Model:
    """Waveform ``(B, samples)`` -> ``(B, samples // 32 - 2, 16)``: strided Conv1D stack with BatchNorm.

    Three layer groups (``feat_``, ``block1_``, ``block2_``). ``"pretrained"`` is a fixed
    seeded initialisation; ``None`` another seed; a path loads weights.
    """
    init = keras.initializers.GlorotUniform(seed=1 if weights == "pretrained" else 2)
    inputs = keras.Input((None,), name="waveform")
    x = keras.layers.Reshape((-1, 1), name="feat_reshape")(inputs)
    x = keras.layers.Conv1D(8, 16, strides=8, kernel_initializer=init, name="feat_conv")(x)
    x = keras.layers.BatchNormalization(name="feat_bn")(x)
    x = keras.layers.ReLU(name="feat_relu")(x)
    x = keras.layers.Conv1D(16, 8, strides=4, padding="same", kernel_initializer=init, name="block1_conv")(x)
    x = keras.layers.ReLU(name="block1_relu")(x)
    x = keras.layers.Conv1D(16, 3, kernel_initializer=init, activation="relu", name="block2_conv")(x)
    model = keras.Model(inputs, x, name="tiny_wave_encoder")
    if weights not in (None, "pretrained"):
        model.load_weights(weights)
    return model


def tiny_logmel_encoder(weights: str | None = "pretrained", n_mels: int = 32) -> keras.Model:
    """Log-mel ``(B, frames, n_mels)`` -> ``(B, frames // 2, 16)``: a small Conv1D over time."""
    init = keras.initializers.GlorotUniform(seed=1 if weights == "pretrained" else 2)
    inputs = keras.Input((None, n_mels), name="log_mel")
    x = keras.layers.LayerNormalization(name="feat_norm")(inputs)
    x = keras.layers.Conv1D(16, 3, padding="same", kernel_initializer=init, activation="relu", name="block1_conv")(x)
    x = keras.layers.Conv1D(16, 3, strides=2, padding="same", kernel_initializer=init, activation="relu",
                            name="block2_conv")(x)
    return keras.Model(inputs, x, name="tiny_logmel_encoder")


def tiny_wave_spec(name: str = "tiny_audio_test", sample_rate: int = 8000, **overrides: object) -> BackboneSpec:
    """A builder spec for :func:`tiny_wave_encoder` (raw waveform at ``sample_rate``)."""
    fields: dict[str, object] = dict(
        name=name,
        modality="audio",
        source="builder",
        location="tests.audio_fixtures:tiny_wave_encoder",
        input_shape=(sample_rate,),
        preprocessing=AudioFrontend(kind="waveform", sample_rate=sample_rate),
        feature_dim=16,
        output="sequence",
        layer_groups=TINY_AUDIO_GROUPS,
        sample_rate=sample_rate,
        licence="test fixture",
        builder=tiny_wave_encoder,
    )
    fields.update(overrides)
    return BackboneSpec(**fields)  # type: ignore[arg-type]


def tiny_logmel_spec(name: str = "tiny_logmel_test", sample_rate: int = 8000, n_mels: int = 32) -> BackboneSpec:
    """A builder spec for :func:`tiny_logmel_encoder` behind a natural-log mel front-end."""
    return BackboneSpec(
        name=name,
        modality="audio",
        source="builder",
        location="tests.audio_fixtures:tiny_logmel_encoder",
        input_shape=(sample_rate,),
        preprocessing=AudioFrontend(kind="log_mel", sample_rate=sample_rate, n_fft=256, hop_length=128,
                                    n_mels=n_mels),
        feature_dim=16,
        output="sequence",
        layer_groups=(r"^feat_", r"^block1_", r"^block2_"),
        sample_rate=sample_rate,
        licence="test fixture",
        builder=lambda weights: tiny_logmel_encoder(weights, n_mels),
    )


def dominant_frequency(waveform: np.ndarray, sample_rate: int) -> float:
    """The frequency (Hz) of the largest FFT magnitude, with a Hann window."""
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return float(np.fft.rfftfreq(len(waveform), 1.0 / sample_rate)[int(np.argmax(spectrum))])


def write_multitask_speaker_dataset(root: Path, speakers_per_class: int = 4, clips_per_speaker: int = 4,
                                    sample_rate: int = 8000, seed: int = 0) -> Path:
    """The tone corpus of :func:`write_speaker_dataset` as a two-task manifest; returns its path.

    ``root/manifest.csv`` has ``path,task:band,task:voice,speaker``: ``band`` is the class
    (``low`` / ``high``), ``voice`` a per-speaker attribute (``a`` for even speaker numbers, ``b``
    for odd). Every 4th clip lacks its ``voice`` label and every 7th its ``band`` (never both).
    """
    manifest = write_speaker_dataset(root, speakers_per_class, clips_per_speaker, sample_rate, seed=seed)
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "task:band", "task:voice", "speaker"])
        for index, row in enumerate(rows):
            band = "" if index % 7 == 6 else row["label"]
            voice = "" if index % 4 == 3 and band else "ab"[int(row["speaker"].rsplit("spk", 1)[1]) % 2]
            writer.writerow([row["path"], band, voice, row["speaker"]])
    return manifest
