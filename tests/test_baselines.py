"""tlkit.baselines: the no-transfer baseline, the linear probe, frozen features and the verdict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tests.audio_fixtures import tiny_wave_spec, write_speaker_dataset
from tests.conftest import write_image_folder
from tests.transfer_fixtures import blind_spec, informative_spec
from tlkit.baselines import (
    C_GRID,
    BaselineResult,
    feature_extractor,
    frozen_clip_features,
    frozen_features,
    linear_probe,
    no_transfer_baseline,
    transfer_verdict,
)
from tlkit.data import fixed_crops, load_audio_splits, load_splits, make_batches
from tlkit.data.images import encode_labels
from tlkit.errors import DataError


def blobs(n: int, seed: int, classes: int = 3, dim: int = 20, spread: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian blobs: class means drawn once (seed 0), points per ``seed``."""
    means = np.random.default_rng(0).normal(size=(classes, dim))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return means[y] + spread * rng.normal(size=(n, dim)), y


def test_linear_probe_matches_plain_sklearn_and_picks_c_on_validation() -> None:
    (xt, yt), (xv, yv), (xs, ys) = blobs(150, 1), blobs(80, 2), blobs(200, 3)
    result = linear_probe(xt, yt, xv, yv, xs, ys)
    assert result.kind == "probe" and result.params["C"] in C_GRID
    assert result.params["val_count"] == 80 and result.params["test_count"] == 200
    plain = make_pipeline(StandardScaler(), LogisticRegression(C=result.params["C"], max_iter=1000)).fit(xt, yt)
    assert abs(result.test_accuracy - plain.score(xs, ys)) <= 0.01
    assert abs(result.val_accuracy - plain.score(xv, yv)) <= 0.01
    # The chosen C is the best of the grid on validation (first of equals: the smallest C).
    scores = [make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(xt, yt).score(xv, yv)
              for c in C_GRID]
    assert result.val_accuracy == pytest.approx(max(scores))
    assert result.params["C"] == C_GRID[int(np.argmax(scores))]
    assert 0.5 < result.test_accuracy < 1.0  # overlapping blobs: learnable, not trivial
    # One-hot targets give the same fit as class indices.
    one_hot = linear_probe(xt, np.eye(3)[yt], xv, np.eye(3)[yv])
    assert one_hot.val_accuracy == result.val_accuracy and one_hot.params["C"] == result.params["C"]


def test_linear_probe_multi_label_is_one_vs_rest_with_mean_label_accuracy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 6))
    y = np.stack([x[:, 0] > 0, x[:, 1] + 0.5 * rng.normal(size=240) > 0, x[:, 2] > 1], axis=1).astype(np.float32)
    result = linear_probe(x[:160], y[:160], x[160:], y[160:])
    assert result.params["metric"] == "mean_label_accuracy"
    c = result.params["C"]
    plain = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(C=c, max_iter=1000)))
    predicted = plain.fit(x[:160], y[:160]).predict(x[160:])
    assert result.val_accuracy == pytest.approx(float(np.mean(predicted == y[160:])))
    assert result.params["val_subset_accuracy"] == pytest.approx(float(np.mean((predicted == y[160:]).all(1))))
    assert result.params["val_subset_accuracy"] < result.val_accuracy


def test_linear_probe_refuses_one_class_and_bad_shapes() -> None:
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(DataError, match="single class"):
        linear_probe(x, np.zeros(10), x, np.zeros(10))
    with pytest.raises(DataError, match="labels for"):
        linear_probe(x, np.arange(10) % 2, x, np.arange(9) % 2)
    with pytest.raises(DataError, match="columns"):
        linear_probe(x, np.arange(10) % 2, x[:, :2], np.arange(10) % 2)


@pytest.fixture(scope="module")
def colour_splits(tmp_path_factory: pytest.TempPathFactory):
    root = write_image_folder(tmp_path_factory.mktemp("colour") / "images", n_per_class=20)
    return load_splits(root, val_fraction=0.3, test_fraction=0.15)


def probe_of(spec, splits) -> BaselineResult:
    parts = (splits.train, splits.val, splits.test)
    x = [frozen_features(spec, make_batches(p, splits.class_names, spec.image_size)) for p in parts]
    y = [encode_labels(p, splits.class_names) for p in parts]
    return linear_probe(x[0], y[0], x[1], y[1], x[2], y[2], name=f"linear probe on frozen {spec.name} features")


def test_negative_transfer_warning_fires_when_pixels_beat_the_probe_and_not_otherwise(colour_splits) -> None:
    baseline = no_transfer_baseline(colour_splits.train, colour_splits.val, colour_splits.class_names,
                                    test=colour_splits.test)
    assert baseline.kind == "baseline" and baseline.name.startswith("pixels 16x16")
    assert baseline.params["channels"] == 3 and baseline.params["features"] == 16 * 16 * 3
    assert baseline.val_accuracy >= 0.9 and baseline.test_accuracy is not None
    blind, informative = probe_of(blind_spec(), colour_splits), probe_of(informative_spec(), colour_splits)
    assert blind.val_accuracy < 0.7 and informative.val_accuracy >= 0.9  # the fixture does what it says

    fired = transfer_verdict(baseline, blind, None)
    assert len(fired) == 1 and fired[0].startswith("NEGATIVE-TRANSFER")
    gap = 100 * (baseline.val_accuracy - blind.val_accuracy)
    assert f"{gap:.1f} points" in fired[0] and "tlkit rank" in fired[0] and "Wilson" in fired[0]
    assert transfer_verdict(baseline, informative, None) == []
    assert transfer_verdict(baseline, informative, informative.val_accuracy) == []


def result(accuracy: float, kind: str = "probe", n: int = 100) -> BaselineResult:
    return BaselineResult("linear probe", kind, accuracy, None, 0.0, {"val_count": n, "metric": "accuracy"})


def test_fine_tuning_warning_and_the_one_point_margin() -> None:
    baseline, probe = result(0.70, "baseline"), result(0.80)
    assert transfer_verdict(baseline, probe, 0.85) == []
    assert transfer_verdict(baseline, probe, 0.795) == []  # within the 1-point margin
    fired = transfer_verdict(baseline, probe, 0.75)
    assert len(fired) == 1 and fired[0].startswith("FINE-TUNING") and "5.0 points" in fired[0]
    # The baseline 0.5 point above the probe is within the margin; 3 points is not, on 100 examples noise.
    assert transfer_verdict(result(0.805, "baseline"), probe, None) == []
    near = transfer_verdict(result(0.83, "baseline"), probe, None)
    assert len(near) == 1 and "within (so possibly noise)" in near[0]
    far = transfer_verdict(result(0.95, "baseline"), probe, 0.7)
    assert [w.split(":")[0] for w in far] == ["NEGATIVE-TRANSFER", "FINE-TUNING"]
    assert "beyond the probe's 95% Wilson interval" in far[0] and "below the baseline" in far[0]
    assert transfer_verdict(None, None, 0.1) == []


def test_pixel_baseline_keeps_one_channel_for_gray_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for label, level in (("dark", 60), ("light", 180)):
        (tmp_path / label).mkdir()
        for i in range(10):
            pixels = np.clip(rng.normal(level, 30, size=(24, 20)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(tmp_path / label / f"{i}.png")
    splits = load_splits(tmp_path, val_fraction=0.3, test_fraction=0.0)
    baseline = no_transfer_baseline(splits.train, splits.val, splits.class_names, image_size=8)
    assert baseline.params["channels"] == 1 and baseline.params["features"] == 64
    assert baseline.val_accuracy == 1.0 and baseline.test_accuracy is None


def test_audio_baseline_on_log_mel_statistics(tmp_path: Path) -> None:
    manifest = write_speaker_dataset(tmp_path, sample_rate=8000)
    splits = load_audio_splits(manifest=manifest, sample_rate=8000, val_fraction=0.25, test_fraction=0.25)
    baseline = no_transfer_baseline(splits.train, splits.val, splits.class_names, test=splits.test,
                                    waveforms=splits.waveforms, sample_rate=8000)
    assert baseline.name.startswith("log-mel") and baseline.params["features"] == 3 * 40
    assert baseline.val_accuracy >= 0.9 and baseline.test_accuracy >= 0.9  # low vs high tones


def test_frozen_features_same_for_arrays_datasets_and_batches(colour_splits) -> None:
    spec = informative_spec()
    extractor = feature_extractor(spec)
    batches = make_batches(colour_splits.val, colour_splits.class_names, spec.image_size, batch_size=4,
                           training=True)  # shuffling is ignored: features come in example order
    from_batches = frozen_features(extractor, batches)
    pixels = np.concatenate([x.numpy() for x, _ in batches.in_order()])
    from_array = frozen_features(extractor, pixels)
    from_dataset = frozen_features(extractor, tf.data.Dataset.from_tensor_slices(pixels).batch(5))
    assert from_array.shape == (len(colour_splits.val), 8)
    np.testing.assert_allclose(from_batches, from_array, atol=1e-5)
    np.testing.assert_allclose(from_dataset, from_array, atol=1e-5)
    # A classifier is cut at its pool layer: the same features as the spec gives.
    np.testing.assert_allclose(frozen_features(spec, pixels), from_array, atol=1e-5)


def test_frozen_clip_features_average_crops() -> None:
    spec = tiny_wave_spec()
    rng = np.random.default_rng(0)
    clips = [rng.normal(0, 0.1, size=n).astype(np.float32) for n in (3000, 8000, 12000)]
    extractor = feature_extractor(spec)
    features = frozen_clip_features(extractor, clips, 4000, crops=3)
    assert features.shape == (3, 16)
    crops = np.concatenate([fixed_crops(c, 4000, 3) for c in clips])
    expected = frozen_features(extractor, crops).reshape(3, 3, 16).mean(axis=1)
    np.testing.assert_allclose(features, expected, atol=1e-5)
