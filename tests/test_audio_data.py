"""tlkit.data.audio: decoding and resampling, checks, speaker-aware splits, crops; the log-mel front-end."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import numpy as np
import pytest

from tests.audio_fixtures import dominant_frequency, tone, write_audio, write_speaker_dataset
from tlkit.data.audio import (
    AudioSplits,
    fixed_crops,
    load_audio,
    load_audio_splits,
    make_audio_dataset,
    predict_clips,
)
from tlkit.errors import DataError

RATE = 16000


@pytest.mark.parametrize("native_rate", [44100, 8000, 16000])
def test_files_at_other_rates_arrive_at_the_encoder_rate(tmp_path: Path, native_rate: int) -> None:
    """Length (duration) and dominant frequency survive resampling to the encoder's 16 kHz."""
    path = write_audio(tmp_path / f"a{native_rate}.wav", tone(440.0, 1.5, native_rate), native_rate)
    waveform = load_audio(path, RATE)
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    assert abs(len(waveform) - int(1.5 * RATE)) <= 1
    assert abs(dominant_frequency(waveform, RATE) - 440.0) <= 1.0
    assert 0.45 < np.max(np.abs(waveform)) < 0.55  # amplitude preserved (0.5)


@pytest.mark.parametrize("suffix", [".flac", ".ogg", ".mp3"])
def test_compressed_formats_decode(tmp_path: Path, suffix: str) -> None:
    path = write_audio(tmp_path / f"clip{suffix}", tone(1000.0, 1.0, 22050), 22050)
    waveform = load_audio(path, RATE)
    # mp3 encoders add up to ~1-2 frames of padding; the others keep the length.
    assert abs(len(waveform) - RATE) <= (0.1 * RATE if suffix == ".mp3" else 1)
    assert abs(dominant_frequency(waveform, RATE) - 1000.0) <= 2.0


def test_stereo_is_mixed_down_to_mono(tmp_path: Path) -> None:
    left = tone(300.0, 1.0, RATE, amplitude=0.8)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    waveform = load_audio(write_audio(tmp_path / "stereo.wav", stereo, RATE), RATE)
    assert waveform.shape == (RATE,)
    np.testing.assert_allclose(waveform, left / 2, atol=1e-3)  # the mean of the channels


def test_unreadable_silent_and_short_files_are_reported_and_skipped(tmp_path: Path) -> None:
    root = write_speaker_dataset(tmp_path / "data", speakers_per_class=3, clips_per_speaker=2,
                                 sample_rate=RATE, layout="folders")
    corrupt = root / "low" / "corrupt.wav"
    corrupt.write_bytes(b"RIFF....WAVEfmt this is not audio")
    garbage_mp3 = root / "high" / "garbage.mp3"
    garbage_mp3.write_bytes(os.urandom(64))
    silent = write_audio(root / "high" / "silent.wav", np.zeros(RATE, np.float32), RATE)
    short = write_audio(root / "low" / "short.wav", tone(300.0, 0.02, RATE), RATE)
    splits = load_audio_splits(root, sample_rate=RATE, val_fraction=0.2, test_fraction=0.2, seed=0, min_seconds=0.1)
    reasons = dict(splits.skipped)
    assert set(reasons) == {str(corrupt), str(garbage_mp3), str(silent), str(short)}
    assert "silent" in reasons[str(silent)] and "too short" in reasons[str(short)]
    kept = splits.train + splits.val + splits.test
    assert len(kept) == 12 and not {e.path for e in kept} & set(reasons)
    assert set(splits.waveforms) == {e.path for e in kept}  # decoded once, cached in memory
    assert "skipped 4" in splits.summary()
    with pytest.raises(DataError, match="corrupt.wav"):
        load_audio(corrupt, RATE)


def test_an_audio_class_whose_every_file_is_unusable_is_an_error_or_dropped(tmp_path: Path) -> None:
    root = write_speaker_dataset(tmp_path / "data", speakers_per_class=3, clips_per_speaker=2,
                                 sample_rate=RATE, layout="folders")
    write_audio(root / "quiet" / "a.wav", np.zeros(RATE, np.float32), RATE)  # silent
    (root / "quiet" / "b.wav").write_bytes(b"RIFF....WAVEfmt not audio")  # unreadable
    with pytest.raises(DataError, match=r"every file of class\(es\) 'quiet' \(2 file\(s\)"):
        load_audio_splits(root, sample_rate=RATE, val_fraction=0.2, test_fraction=0.2)
    splits = load_audio_splits(root, sample_rate=RATE, val_fraction=0.2, test_fraction=0.2,
                               drop_unreadable_classes=True)
    assert splits.class_names == ["high", "low"] and splits.dropped_classes == ["quiet"]
    summary = splits.summary()
    assert "dropped class(es) ['quiet']" in summary and "skipped 2 unreadable, silent or too short" in summary


def test_non_audio_files_in_an_audio_folder_are_counted(tmp_path: Path) -> None:
    root = write_speaker_dataset(tmp_path / "data", speakers_per_class=3, clips_per_speaker=2,
                                 sample_rate=RATE, layout="speaker_folders")
    (root / "low" / "low_spk0" / "transcript.txt").write_text("hello")
    (root / "high" / "cover.png").write_bytes(b"png")
    splits = load_audio_splits(root, sample_rate=RATE, val_fraction=0.2, test_fraction=0.2, speaker_folders=True)
    assert sorted(reason for _, reason in splits.ignored) == [
        "ignored: not an audio suffix (.png)", "ignored: not an audio suffix (.txt)"]
    assert "ignored 2 file(s)" in splits.summary() and not splits.skipped


def test_speaker_aware_split_never_leaks_a_speaker(tmp_path: Path) -> None:
    manifest = write_speaker_dataset(tmp_path / "data", speakers_per_class=6, clips_per_speaker=3,
                                     sample_rate=8000, layout="manifest")
    for seed in range(5):
        splits = load_audio_splits(manifest=manifest, sample_rate=8000, val_fraction=0.2, test_fraction=0.2,
                                   seed=seed)
        groups = [{e.group for e in part} for part in (splits.train, splits.val, splits.test)]
        assert all(None not in g for g in groups)
        assert not groups[0] & groups[1] and not groups[0] & groups[2] and not groups[1] & groups[2]
        assert sum(len(g) for g in groups) == 12 and all(groups)
        for part in (splits.train, splits.val, splits.test):  # every split has both classes
            assert {e.labels[0] for e in part} == {"high", "low"}


def test_speaker_folders_layout_groups_by_speaker(tmp_path: Path) -> None:
    root = write_speaker_dataset(tmp_path / "data", speakers_per_class=5, clips_per_speaker=2,
                                 sample_rate=8000, layout="speaker_folders")
    splits = load_audio_splits(root, sample_rate=8000, val_fraction=0.2, test_fraction=0.2, seed=1,
                               speaker_folders=True)
    assert isinstance(splits, AudioSplits)
    train, val = {e.group for e in splits.train}, {e.group for e in splits.val}
    assert None not in train and train and val and not train & val
    assert "speakers, none shared" in splits.summary()


def test_fixed_crops_cover_the_clip_and_pad_short_ones() -> None:
    wave = np.arange(100, dtype=np.float32)
    crops = fixed_crops(wave, 40, 3)
    assert crops.shape == (3, 40)
    assert crops[0, 0] == 0 and crops[-1, -1] == 99 and crops[1, 0] == 30
    np.testing.assert_array_equal(fixed_crops(wave, 40, 1)[0], wave[30:70])  # centre
    short = fixed_crops(np.ones(10, np.float32), 16, 2)
    assert short.shape == (2, 16) and short.sum() == 20 and short[0, 3] == 1 and short[0, 2] == 0


def test_training_dataset_crops_are_seeded_and_change_per_epoch() -> None:
    from tlkit.data.images import Example

    rng = np.random.default_rng(0)
    examples = [Example(f"clip{i}", ("a" if i % 2 else "b",)) for i in range(6)]
    waveforms = {e.path: rng.normal(size=int(rng.integers(300, 900))).astype(np.float32) for e in examples}
    waveforms["clip0"] = waveforms["clip0"][:50]  # shorter than the crop: padded

    def epoch(ds):  # noqa: ANN001, ANN202
        return [(x.numpy(), y.numpy()) for x, y in ds]

    ds = make_audio_dataset(examples, ["a", "b"], waveforms, 200, 4, training=True, seed=3)
    first, second = epoch(ds), epoch(ds)
    again = epoch(make_audio_dataset(examples, ["a", "b"], waveforms, 200, 4, training=True, seed=3))
    assert [x.shape for x, _ in first] == [(4, 200), (2, 200)]
    assert all(x.dtype == np.float32 for x, _ in first)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, again))  # same seed, same crops
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, second))  # new crops next epoch
    # Every crop is a contiguous piece of its clip (or the padded short clip).
    for x, y in first:
        for row in x:
            sources = [w for w in waveforms.values() if _contains(w, row)]
            assert sources, "a crop is not a slice of any clip"


def _contains(wave: np.ndarray, crop: np.ndarray) -> bool:
    if len(wave) < len(crop):
        inner = crop[np.flatnonzero(crop)[0] : np.flatnonzero(crop)[-1] + 1]
        return len(inner) == len(wave) and np.array_equal(inner, wave)
    starts = np.flatnonzero(wave == crop[0])
    return any(np.array_equal(wave[s : s + len(crop)], crop) for s in starts)


def test_evaluation_dataset_and_crop_averaging() -> None:
    from tlkit.data.images import Example

    examples = [Example("x", ("a",)), Example("y", ("b",))]
    waveforms = {"x": np.linspace(-1, 1, 300, dtype=np.float32), "y": np.ones(120, np.float32)}
    ds = make_audio_dataset(examples, ["a", "b"], waveforms, 100, 8, crops=3)
    x, y = next(iter(ds))
    assert x.shape == (6, 100) and y.numpy().tolist() == [[1, 0]] * 3 + [[0, 1]] * 3

    def mean_predictor(batch: np.ndarray) -> np.ndarray:  # "probability" = the crop's mean
        m = batch.mean(axis=1, keepdims=True)
        return np.concatenate([m, 1 - m], axis=1)

    probabilities = predict_clips(mean_predictor, list(waveforms.values()), 100, crops=3, batch_size=4)
    expected_x = np.mean([c.mean() for c in fixed_crops(waveforms["x"], 100, 3)])
    assert probabilities.shape == (2, 2)
    assert probabilities[0, 0] == pytest.approx(expected_x, abs=1e-6)
    assert probabilities[1, 0] == pytest.approx(np.mean(fixed_crops(waveforms["y"], 100, 3)), abs=1e-6)


def test_missing_waveform_is_a_clear_error() -> None:
    from tlkit.data.images import Example

    with pytest.raises(DataError, match="no decoded waveform"):
        make_audio_dataset([Example("nowhere.wav", ("a",))], ["a", "b"], {}, 100)


# Tolerance of the log-mel check, in natural-log units on every cell: LogMelSpectrogram
# (TF float32 STFT, centre reflect-padding, periodic Hann, power 2, Slaney mel filters,
# log(mel + 1e-6)) against librosa.feature.melspectrogram with the same settings, then
# np.log(mel + 1e-6). Measured on this test's chirp plus noise: max |difference| 3.9e-5
# (16 kHz, n_fft 400) and 3.3e-6 (8 kHz, n_fft 256), i.e. relative power errors < 0.004 %.
LOG_MEL_ATOL = 2e-4


@pytest.mark.parametrize("sample_rate,n_fft,hop,n_mels", [(16000, 400, 160, 80), (8000, 256, 128, 32)])
def test_log_mel_layer_matches_librosa(sample_rate: int, n_fft: int, hop: int, n_mels: int) -> None:
    import librosa

    from tlkit.frontends import LogMelSpectrogram

    rng = np.random.default_rng(0)
    t = np.arange(sample_rate) / sample_rate
    signal = (0.4 * np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.05 * rng.normal(size=t.shape)).astype(np.float32)
    layer = LogMelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels,
                              log_style="natural", log_offset=1e-6, center=True, pad_mode="reflect")
    ours = np.asarray(layer(signal[None]))[0]
    mel = librosa.feature.melspectrogram(
        y=signal, sr=sample_rate, n_fft=n_fft, hop_length=hop, win_length=n_fft, window="hann", center=True,
        pad_mode="reflect", power=2.0, n_mels=n_mels, htk=False, norm="slaney",
    )
    reference = np.log(mel + 1e-6).T
    assert ours.shape == reference.shape == (1 + sample_rate // hop, n_mels)
    assert mel.min() > 1e-5  # the noise keeps every cell well above the log offset
    np.testing.assert_allclose(ours, reference, rtol=0, atol=LOG_MEL_ATOL)
