"""Audio models: encoders through the Keras and SavedModel paths fine-tuned in stages, augmentation,
attention pooling, the audio catalog, ``tlkit train`` / ``tlkit predict`` on audio, and the export."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses
import json
import time
from pathlib import Path

import keras
import numpy as np
import pytest

import tlkit.backbones as backbones
from tests.audio_fixtures import (
    TINY_AUDIO_GROUPS,
    tiny_logmel_spec,
    tiny_wave_encoder,
    tiny_wave_spec,
    tone,
    write_audio,
    write_speaker_dataset,
)
from tlkit.audio_augment import AudioAugment, AudioAugmentation
from tlkit.backbones.spec import AudioFrontend
from tlkit.data.audio import load_audio_splits, make_audio_dataset
from tlkit.errors import ConfigError, WeightsUnavailableError
from tlkit.finetune import Schedule, Stage, fine_tune
from tlkit.model import AttentionPooling, HeadConfig, build_classifier

RATE = 8000
CLIP = 4000  # 0.5 s crops
AUDIO_HUB_SPECS = sorted(s.name for s in backbones.list_backbones("audio") if s.source == "tfhub")


@pytest.fixture(scope="module")
def tone_splits(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    manifest = write_speaker_dataset(tmp_path_factory.mktemp("tones"), speakers_per_class=6, clips_per_speaker=4,
                                     sample_rate=RATE)
    return load_audio_splits(manifest=manifest, sample_rate=RATE, val_fraction=0.25, test_fraction=0.0, seed=0)


def _encoder_spec(kind: str, tmp_path: Path):  # noqa: ANN202
    """The tiny encoder through one loading path."""
    if kind == "keras_file":
        path = tmp_path / "encoder.keras"
        tiny_wave_encoder().save(path)
        return backbones.get(str(path), modality="audio", sample_rate=RATE)  # default depth split: 4 groups
    if kind == "savedmodel":
        tiny_wave_encoder().export(str(tmp_path / "encoder_sm"), verbose=False)
        spec = backbones.get(str(tmp_path / "encoder_sm"), modality="audio", sample_rate=RATE)
        # SavedModel groups match variable paths (feat_conv_kernel, ..., block2_conv_bias).
        return dataclasses.replace(spec, layer_groups=TINY_AUDIO_GROUPS)
    return tiny_logmel_spec(sample_rate=RATE)


class _Snapshots(keras.callbacks.Callback):
    """Backbone weights at the end of every stage's ``fit`` (before the best epoch is restored)."""

    def __init__(self) -> None:
        super().__init__()
        self.taken: list[list[np.ndarray]] = []

    def on_train_end(self, logs: dict | None = None) -> None:
        self.taken.append([np.array(v) for v in self.model.get_layer("backbone").weights])


@pytest.mark.parametrize("kind,pooling", [("keras_file", "avg"), ("savedmodel", "attention"), ("log_mel", "avg")])
def test_encoder_trains_in_two_stages(tmp_path: Path, tone_splits, kind: str, pooling: str) -> None:  # noqa: ANN001
    spec = _encoder_spec(kind, tmp_path)
    assert spec.modality == "audio" and spec.sample_rate == RATE
    augmentation = AudioAugmentation(time_shift=0.1, gain_db=3.0, noise_snr_db=(25.0, 40.0),
                                     spec_time_masks=1, spec_time_mask_width=4, spec_freq_masks=1,
                                     spec_freq_mask_width=4)
    model = build_classifier(spec, 2, head=HeadConfig(dropout=0.0, pooling=pooling), augmentation=augmentation,
                             seed=0)
    assert model.input.name == "waveform" and model.get_layer("augment") is not None
    if kind == "log_mel":
        assert model.get_layer("frontend").__class__.__name__ == "LogMelSpectrogram"
    groups = model.tlkit_groups
    top = {id(v) for v in groups.variables(len(groups) - 1)}
    base = model.get_layer("backbone")
    initial = [np.array(v) for v in base.weights]
    splits = tone_splits
    train = make_audio_dataset(splits.train, splits.class_names, splits.waveforms, CLIP, 8, training=True, seed=0)
    val = make_audio_dataset(splits.val, splits.class_names, splits.waveforms, CLIP, 8, crops=2)
    snapshots = _Snapshots()
    # solver="sgd": this test follows the head epoch by epoch (tests/test_head_fit.py covers the solved head).
    schedule = Schedule((Stage("head", 6, 0, 0.03, solver="sgd"), Stage("top", 2, unfreeze=1, learning_rate=0.01)))
    result = fine_tune(model, train, val, schedule, callbacks=[snapshots], verbose=0)

    head_losses = [r["loss"] for r in result.history if r["stage"] == "head"]
    assert head_losses[-1] < head_losses[0], head_losses
    assert [r["stage"] for r in result.history].count("top") == 2
    # Stage one: the frozen encoder did not move, bit for bit.
    for before, after in zip(initial, snapshots.taken[0]):
        np.testing.assert_array_equal(before, after)
    # Stage two: only the top group moved; BatchNorm statistics and lower groups stayed put.
    moved = [not np.array_equal(b, a) for b, a in zip(initial, snapshots.taken[1])]
    for variable, changed in zip(base.weights, moved):
        if id(variable) not in top or "moving" in variable.path or not variable.trainable:
            assert not changed, variable.path
    assert any(changed for variable, changed in zip(base.weights, moved) if id(variable) in top)


def test_augmentation_acts_only_in_training() -> None:
    layer = AudioAugment(mode="waveform", time_shift=0.2, gain_db=6.0, noise_snr_db=(10.0, 20.0), seed=1)
    x = np.stack([tone(440.0, 0.25, RATE), tone(880.0, 0.25, RATE)])
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    y = np.asarray(layer(x, training=True))
    assert y.shape == x.shape and not np.allclose(y, x)
    again = np.asarray(AudioAugment(mode="waveform", time_shift=0.2, gain_db=6.0, noise_snr_db=(10.0, 20.0),
                                    seed=1)(x, training=True))
    np.testing.assert_array_equal(y, again)  # seeded

    spec_layer = AudioAugment(mode="log_mel", time_masks=2, time_mask_width=5, freq_masks=1, freq_mask_width=3,
                              seed=0)
    feats = np.random.default_rng(0).normal(size=(3, 40, 16)).astype(np.float32) + 5.0
    masked = np.asarray(spec_layer(feats, training=True))
    changed = masked != feats
    assert changed.any()
    # A time mask hides whole frames, a frequency mask whole bands: at most 2*5 frames + 3 bands.
    for example in changed:
        full_frames = example.all(axis=1).sum()
        full_bands = example.all(axis=0).sum()
        assert full_frames <= 10 and full_bands <= 3
        assert example.sum() <= 10 * 16 + 3 * 40
    np.testing.assert_array_equal(np.asarray(spec_layer(feats, training=False)), feats)


def test_augmentation_config_builds_the_right_layer() -> None:
    wave = tiny_wave_spec()
    mel = tiny_logmel_spec()
    aug = AudioAugmentation()
    assert aug.build_layer(wave, seed=0).mode == "waveform"
    mel_layer = aug.build_layer(mel, seed=0)
    assert mel_layer.mode == "log_mel" and mel_layer.time_masks == 2
    off = AudioAugmentation(time_shift=0.0, gain_db=0.0, noise_snr_db=None, spec_time_masks=0, spec_freq_masks=0)
    assert off.build_layer(wave) is None and off.build_layer(mel) is None
    assert AudioAugmentation(time_shift=0, gain_db=0, noise_snr_db=None).build_layer(mel) is not None  # SpecAugment
    from tests.conftest import tiny_spec

    with pytest.raises(ConfigError, match="audio backbone"):
        aug.build_layer(tiny_spec())
    with pytest.raises(ConfigError, match="noise_snr_db"):
        AudioAugmentation(noise_snr_db=(30.0, 10.0))


def test_attention_pooling_weights_time_steps() -> None:
    layer = AttentionPooling()
    x = np.random.default_rng(0).normal(size=(2, 7, 5)).astype(np.float32)
    out = np.asarray(layer(x))
    assert out.shape == (2, 5)
    layer.score.assign(np.zeros((5, 1), np.float32))  # equal scores: the plain mean
    np.testing.assert_allclose(np.asarray(layer(x)), x.mean(axis=1), atol=1e-6)
    spatial = np.random.default_rng(1).normal(size=(2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(layer(spatial)), spatial.reshape(2, 12, 5).mean(axis=1), atol=1e-6)
    with pytest.raises(ConfigError, match="pooling"):
        HeadConfig(pooling="median")  # type: ignore[arg-type]


def test_audio_classifier_saves_and_loads_in_safe_mode(tmp_path: Path) -> None:
    model = build_classifier(tiny_logmel_spec(sample_rate=RATE), 3, head=HeadConfig(pooling="attention"),
                             augmentation=AudioAugmentation(), seed=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    x = np.stack([tone(300.0, 0.7, RATE), tone(2000.0, 0.7, RATE)])
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_adhoc_audio_specs_from_the_registry(tmp_path: Path) -> None:
    path = tmp_path / "enc.keras"
    tiny_wave_encoder().save(path)
    assert backbones.get(str(path)).modality == "image"  # unchanged default
    spec = backbones.get(str(path), modality="audio")
    assert spec.modality == "audio" and spec.sample_rate == 16000 and spec.preprocessing.kind == "waveform"
    mel = AudioFrontend(kind="log_mel", sample_rate=22050, n_mels=64)
    assert backbones.get(str(path), modality="audio", frontend=mel).sample_rate == 22050
    with pytest.raises(ConfigError, match="sample_rate"):
        backbones.get(str(path), modality="audio", sample_rate=16000, frontend=mel)


def test_audio_catalog_specs_are_complete() -> None:
    names = {s.name for s in backbones.list_backbones("audio")}
    assert {"wav2vec2_base", "yamnet", "trill", "frill", "speech_embedding"} <= names
    for spec in backbones.list_backbones("audio"):
        assert isinstance(spec.preprocessing, AudioFrontend), spec.name
        assert spec.sample_rate == spec.preprocessing.sample_rate == 16000, spec.name
        assert spec.output in ("sequence", "pooled", "spatial") and spec.feature_dim, spec.name
        assert spec.licence and spec.description and len(spec.input_shape) == 1, spec.name


@pytest.mark.parametrize("name", AUDIO_HUB_SPECS)
def test_audio_hub_encoders_fail_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hub"))
    spec = backbones.get(name)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        build_classifier(name, 2)
    assert time.monotonic() - start < 30
    assert spec.location in str(info.value) and f"tlkit fetch {name}" in str(info.value)


def test_clip_length_follows_the_encoder_contract() -> None:
    from tlkit.run import audio_clip_length

    assert audio_clip_length(backbones.get("wav2vec2_base"), 5.0) == 246_000  # traced for one length
    assert audio_clip_length(backbones.get("trill"), 2.0) == 32_000
    with pytest.raises(ConfigError, match="at least 15600"):
        audio_clip_length(backbones.get("yamnet"), 0.5)


# ------------------------------------------------------------------ tlkit train / predict / export

CONFIG = """
name = "tones"
output_dir = "run"
seed = 0

[data]
manifest = "data/manifest.csv"
val_fraction = 0.25
test_fraction = 0.25
batch_size = 8
clip_seconds = 0.5
eval_crops = 2

[backbone]
name = "{encoder}"  # backbone paths are not resolved against the config's folder: absolute

[head]
dropout = 0.0
pooling = "attention"

[[schedule.stages]]
name = "head"
epochs = 4
learning_rate = 0.03

[[schedule.stages]]
name = "top"
epochs = 1
unfreeze = 1
learning_rate = 0.003

[training]
verbose = 0
"""


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tlkit train`` on an audio config: 16 kHz tone corpus with speakers, a .keras encoder."""
    from tlkit.cli import main

    root = tmp_path_factory.mktemp("audio_run")
    write_speaker_dataset(root / "data", speakers_per_class=4, clips_per_speaker=4, sample_rate=16000)
    (root / "data" / "audio" / "broken.wav").write_bytes(b"not audio at all")
    with open(root / "data" / "manifest.csv", "a", encoding="utf-8") as handle:
        handle.write("audio/broken.wav,low,low_spk0\n")
    tiny_wave_encoder().save(root / "encoder.keras")
    (root / "config.toml").write_text(CONFIG.replace("{encoder}", str(root / "encoder.keras")), encoding="utf-8")
    assert main(["train", str(root / "config.toml"), "--quiet"]) == 0
    return root / "run"


def test_tlkit_train_on_an_audio_config(audio_run: Path) -> None:
    for name in ("config.json", "labels.json", "splits.json", "history.json", "model.keras", "run.json",
                 "skipped.csv"):
        assert (audio_run / name).is_file(), name
    assert json.loads((audio_run / "labels.json").read_text()) == ["high", "low"]
    status = json.loads((audio_run / "run.json").read_text())
    assert status["status"] == "complete" and status["modality"] == "audio"
    assert status["sample_rate"] == 16000 and status["clip_seconds"] == 0.5 and status["eval_crops"] == 2
    assert {"loss", "accuracy"} <= set(status["test_metrics"])
    assert "broken.wav" in (audio_run / "skipped.csv").read_text()
    splits = json.loads((audio_run / "splits.json").read_text())
    speakers = [{row["group"] for row in splits[part]} for part in ("train", "val", "test")]
    assert not speakers[0] & speakers[1] and not speakers[0] & speakers[2] and not speakers[1] & speakers[2]
    history = json.loads((audio_run / "history.json").read_text())
    assert [s["name"] for s in history["stages"]] == ["head", "top"]
    from tlkit.run import load_run_model

    model, labels = load_run_model(audio_run)  # safe mode: every tlkit layer is registered
    assert model.get_layer("augment").mode == "waveform"


def test_tlkit_predict_on_audio_files(audio_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tlkit.cli import main

    low = write_audio(tmp_path / "low_44k.wav", tone(300.0, 1.2, 44100), 44100)  # resampled to 16 kHz
    high = write_audio(tmp_path / "high.flac", tone(2000.0, 0.3, 16000), 16000)  # shorter than a crop: padded
    capsys.readouterr()
    assert main(["predict", str(audio_run), str(low), str(high), "--json", "--top-k", "2"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in results] == [str(low), str(high)]
    for result in results:
        labels = [label for label, _ in result["top"]]
        assert sorted(labels) == ["high", "low"]
        assert sum(p for _, p in result["top"]) == pytest.approx(1.0, abs=1e-4)


def test_predict_file_averages_crops(audio_run: Path, tmp_path: Path) -> None:
    from tlkit.data.audio import fixed_crops, load_audio
    from tlkit.predict import audio_input, load_predictor, predict_file

    predictor = load_predictor(audio_run)
    contract = audio_input(predictor)
    assert contract is not None and (contract.sample_rate, contract.clip_samples, contract.crops) == (16000, 8000, 2)
    path = write_audio(tmp_path / "clip.wav", tone(500.0, 2.0, 16000), 16000)
    crops = fixed_crops(load_audio(path, 16000), 8000, 2)
    expected = np.mean([predictor.predict_one(c) for c in crops], axis=0)
    np.testing.assert_allclose(predict_file(predictor, path), expected, atol=1e-6)


def test_exported_audio_savedmodel_takes_a_raw_waveform(audio_run: Path, tmp_path: Path) -> None:
    import tensorflow as tf

    from tlkit.export import export_run
    from tlkit.predict import load_predictor, predict_file

    report = export_run(audio_run, formats=["savedmodel"], out=tmp_path / "exported", parity_samples=8)
    assert report.passed
    out = Path(report.out_dir)
    loaded = tf.saved_model.load(str(out))
    serve = loaded.signatures["serving_default"]
    waveforms = tf.constant(np.stack([tone(300.0, 0.5, 16000), tone(2200.0, 0.5, 16000)]))
    outputs = serve(waveform=waveforms)
    assert outputs["probabilities"].shape == (2, 2)
    labels = [[v.decode() for v in row] for row in outputs["labels"].numpy()]
    assert all(sorted(row) == ["high", "low"] for row in labels)
    from tlkit.run import load_run_model

    model, _ = load_run_model(audio_run)
    np.testing.assert_allclose(outputs["probabilities"].numpy(), model.predict(waveforms.numpy(), verbose=0),
                               atol=1e-5)
    # `tlkit predict` on the export: the sample rate comes from its metadata.json.
    clip = write_audio(tmp_path / "c.wav", tone(300.0, 0.5, 22050), 22050)
    probabilities = predict_file(load_predictor(out), clip, target=out)
    assert probabilities.shape == (2,) and probabilities.sum() == pytest.approx(1.0, abs=1e-4)
