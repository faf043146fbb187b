"""`tlkit demo`: its data sets, its BatchNorm fix for random init, its JSON, and a shortened run on real weights."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tlkit import demo
from tlkit.cli import main
from tlkit.data.batches import Batches
from tlkit.demo import DemoConfig, DemoReport, DemoRow, reestimate_batchnorm, run_demo
from tlkit.demo_data import BANDS, digits_split, load_photos, photo_patches, write_class_folders
from tlkit.errors import ConfigError

KINDS = {"baseline", "random_init", "probe", "tlkit"}


def test_digits_split_is_per_class_and_disjoint() -> None:
    data, names = digits_split(labels_per_class=4, val_per_class=2, test_size=50)
    assert data["train"][0].shape == (40, 8, 8, 3)
    assert sorted(set(data["train"][1].tolist())) == list(range(10)) and names == [str(d) for d in range(10)]
    assert data["val"][0].shape[0] == 20 and data["test"][0].shape[0] == 50
    assert data["train"][0].max() <= 255


def _coordinate_photo(height: int, width: int) -> np.ndarray:
    """Red = column, green = row: every patch says where it was cut."""
    rows, cols = np.mgrid[:height, :width]
    return np.stack([cols, rows, np.zeros_like(rows)], axis=-1).astype(np.uint8)


def test_photo_patches_come_from_disjoint_bands() -> None:
    photos = {"wide": _coordinate_photo(40, 250), "tall": _coordinate_photo(250, 40)}
    data, names = photo_patches(patch_size=16, per_class=(9, 3, 4), seed=3, photos=photos)
    assert names == ["tall", "wide"]
    assert [len(data[s][0]) for s in ("train", "val", "test")] == [18, 6, 8]
    for label, name in enumerate(names):
        channel = 0 if name == "wide" else 1  # the coordinate along the longer side
        covered = {}
        for split, (pixels, labels) in data.items():
            patches = pixels[labels == label]
            covered[split] = {int(v) for v in np.unique(patches[..., channel])}
            bands = {v * BANDS // 250 for v in covered[split]}
            assert len(bands) == (3 if split == "train" else 1), (name, split, bands)
        assert not covered["train"] & covered["test"] and not covered["train"] & covered["val"]
        assert not covered["val"] & covered["test"]


def test_photo_patches_refuse_patches_wider_than_a_band() -> None:
    with pytest.raises(ConfigError, match="patch_size=64"):
        photo_patches(patch_size=64, photos={"small": _coordinate_photo(100, 200)})


def test_every_photo_ships_offline_and_writes_as_class_folders(tmp_path) -> None:
    photos = load_photos()
    assert len(photos) == 20 and all(p.dtype == np.uint8 and p.shape[-1] == 3 for p in photos.values())
    data, names = photo_patches(patch_size=32, per_class=(2, 1, 1), photos=photos)
    examples = write_class_folders(data, names, tmp_path)
    assert [len(examples[s]) for s in ("train", "val", "test")] == [40, 20, 20]
    first = examples["train"][0]
    assert first.labels == (names[int(data["train"][1][0])],) and first.path.endswith(".png")


def test_batchnorm_reestimation_sets_the_training_statistics() -> None:
    inputs = keras.Input((3,))
    bn = keras.layers.BatchNormalization(name="bn")
    model = keras.Model(inputs, bn(inputs))
    x = np.random.default_rng(0).normal(5.0, 2.0, (24, 3)).astype(np.float32)
    batches = Batches(tf.data.Dataset.from_tensor_slices((x, np.zeros((24, 1), np.float32))), 24, batch_size=8)
    assert reestimate_batchnorm(model, batches) == 1  # 24 examples: one batch, the exact statistics
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), x.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_variance), x.var(axis=0), rtol=1e-4)
    assert bn.momentum == 0.99  # restored
    reestimate_batchnorm(model, batches, batch_size=8)  # three batches: the cumulative average
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), x.mean(axis=0), rtol=1e-5)
    assert (keras.ops.convert_to_numpy(bn.moving_variance) < x.var(axis=0)).all()  # within-batch only


def _report() -> DemoReport:
    rows = [DemoRow("no-transfer baseline", "baseline", 0.4, 1.0), DemoRow("tlkit (fine-tuned)", "tlkit", 0.9, 9.0)]
    return DemoReport("patches", rows, "digits", [DemoRow("no-transfer baseline", "baseline", 0.8, 0.1)],
                      ["NEGATIVE-TRANSFER: ..."], machine="test")


def test_demo_json_prints_exactly_the_report(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen = {}

    def fake_run(cfg: DemoConfig, verbose: bool = True) -> DemoReport:
        seen.update(cfg=cfg, verbose=verbose)
        return _report()

    monkeypatch.setattr(demo, "run_demo", fake_run)
    assert main(["demo", "--json", "--quick", "--seed", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"dataset", "rows", "negative_transfer"}
    assert printed["rows"][1] == {"model": "tlkit (fine-tuned)", "kind": "tlkit", "test_accuracy": 0.9,
                                  "train_seconds": 9.0}
    assert printed["negative_transfer"]["warnings"] == ["NEGATIVE-TRANSFER: ..."]
    assert seen["verbose"] is False and seen["cfg"] == DemoConfig.quick(seed=3)


@pytest.mark.slow
def test_quick_demo_on_real_weights(capsys: pytest.CaptureFixture[str]) -> None:
    report = run_demo(DemoConfig.quick(), verbose=True)
    out = capsys.readouterr().out
    assert "test accuracy" in out and "negative transfer" in out and "machine:" in out
    result = json.loads(json.dumps(report.to_dict()))
    assert set(result) == {"dataset", "rows", "negative_transfer"}
    for row in result["rows"] + result["negative_transfer"]["rows"]:
        assert set(row) == {"model", "kind", "test_accuracy", "train_seconds"}
        assert row["kind"] in KINDS and 0.0 <= row["test_accuracy"] <= 1.0 and row["train_seconds"] >= 0
    by_kind: dict[str, list[float]] = {}
    for row in result["rows"]:
        by_kind.setdefault(row["kind"], []).append(row["test_accuracy"])
    assert set(by_kind) == KINDS, by_kind
    best_tlkit = max(by_kind["tlkit"])
    assert best_tlkit >= max(by_kind["baseline"] + by_kind["probe"]), result["rows"]
    # ImageNet features, not the network alone: the same network from random weights is far behind.
    assert best_tlkit > max(by_kind["random_init"]) + 0.25, result["rows"]
    negative = result["negative_transfer"]
    assert any(w.startswith("NEGATIVE-TRANSFER") for w in negative["warnings"]), negative
    scores = {row["kind"]: row["test_accuracy"] for row in negative["rows"]}
    assert scores["baseline"] > scores["probe"], negative
