"""Image data: folders and manifests, corrupt files skipped and reported, clear errors, splits."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlkit.data.images import (
    Example,
    class_weights,
    load_splits,
    make_dataset,
    read_manifest,
    scan_folder,
    stratified_split,
)
from tlkit.errors import DataError
from tests.conftest import write_image_folder


def test_corrupt_image_is_reported_and_skipped(image_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = image_folder / "red" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (image_folder / "green" / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="tlkit.data"):
        splits = load_splits(image_folder, seed=0)
    skipped = {Path(p).name for p, _ in splits.skipped}
    assert skipped == {"broken.png", "empty.jpg"}
    assert str(bad) in caplog.text
    assert "skipped 2" in caplog.text
    assert all("broken" not in e.path for e in splits.train + splits.val + splits.test)
    assert "skipped 2" in splits.summary()


def test_grayscale_and_rgba_become_rgb(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", n_per_class=3)
    Image.fromarray(np.full((20, 30), 200, np.uint8), "L").save(root / "red" / "gray.png")
    Image.fromarray(np.full((25, 25, 4), 100, np.uint8), "RGBA").save(root / "blue" / "rgba.png")
    examples = scan_folder(root)
    ds = make_dataset(examples, ["blue", "green", "red"], (16, 16), batch_size=64)
    images, targets = next(iter(ds))
    assert images.shape == (len(examples), 16, 16, 3)
    assert targets.shape == (len(examples), 3)


def test_empty_class_folder_is_an_error(image_folder: Path) -> None:
    (image_folder / "purple").mkdir()
    with pytest.raises(DataError, match="purple"):
        scan_folder(image_folder)


def test_single_class_is_an_error(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", n_per_class=2)
    for name in ("green", "blue"):
        for f in (root / name).iterdir():
            f.unlink()
        (root / name).rmdir()
    with pytest.raises(DataError, match="single class"):
        scan_folder(root)


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        scan_folder(tmp_path / "nowhere")


def test_manifest_with_groups_and_multi_label(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", n_per_class=2)
    files = sorted(root.rglob("*.png"))
    lines = ["path,label,group"] + [f"{f.relative_to(root)},{f.parent.name}|extra,g{i % 3}" for i, f in enumerate(files)]
    (root / "labels.csv").write_text("\n".join(lines))
    examples = read_manifest(root / "labels.csv")
    assert len(examples) == len(files)
    assert all(Path(e.path).is_file() for e in examples)
    assert examples[0].labels == tuple(sorted((files[0].parent.name, "extra")))
    assert {e.group for e in examples} == {"g0", "g1", "g2"}


def test_manifest_needs_columns(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(DataError, match="'path' and 'label'"):
        read_manifest(tmp_path / "m.csv")


def test_stratified_split_is_seeded_and_keeps_groups_whole() -> None:
    examples = [Example(f"{c}{i}.png", (c,), f"{c}-g{i // 2}") for c in "abc" for i in range(20)]
    train, val, test = stratified_split(examples, 0.2, 0.2, seed=3)
    assert stratified_split(examples, 0.2, 0.2, seed=3) == (train, val, test)
    groups = [{e.group for e in part} for part in (train, val, test)]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    for part in (val, test):
        assert {e.labels[0] for e in part} == {"a", "b", "c"}
    assert len(train) + len(val) + len(test) == len(examples)


def test_class_weights_balance_rare_classes() -> None:
    examples = [Example("x", ("a",))] * 30 + [Example("y", ("b",))] * 10
    weights = class_weights(examples, ["a", "b"])
    assert weights[1] == pytest.approx(3 * weights[0])


def test_training_order_is_deterministic_under_a_seed(image_folder: Path) -> None:
    examples = scan_folder(image_folder)
    names = ["blue", "green", "red"]
    first = [t.numpy().argmax(1).tolist() for _, t in make_dataset(examples, names, (8, 8), 4, training=True, seed=5)]
    again = [t.numpy().argmax(1).tolist() for _, t in make_dataset(examples, names, (8, 8), 4, training=True, seed=5)]
    assert first == again


def test_pipeline_resize_equals_the_models_resize(tmp_path: Path, tiny_backbone: object) -> None:
    """Training resizes in the pipeline, serving in the model: both must give the same pixels."""
    import keras

    from tlkit.model import build_classifier

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (97, 131, 3), np.uint8)).save(tmp_path / "x.png")
    from tlkit.data.images import decode_and_resize

    pipeline = decode_and_resize(str(tmp_path / "x.png"), (32, 32)).numpy()
    model = build_classifier("tiny_test", 3, augmentation=None)
    resize = keras.Model(model.input, model.get_layer("resize").output)
    raw = np.asarray(Image.open(tmp_path / "x.png"), np.float32)[None]
    np.testing.assert_allclose(resize(raw)[0], pipeline, atol=1e-3)
