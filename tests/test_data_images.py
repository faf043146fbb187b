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


# --------------------------------------------------------------------------- nothing lost, nothing silent


def _corrupt_class(root: Path, name: str, count: int = 2) -> list[Path]:
    folder = root / name
    folder.mkdir()
    files = [folder / f"{i}.png" for i in range(count)]
    for file in files:
        file.write_bytes(b"\x89PNG\r\n\x1a\n not a png at all")
    return files


def test_a_class_whose_every_file_is_unreadable_is_an_error_naming_it(image_folder: Path) -> None:
    bad = _corrupt_class(image_folder, "purple")
    with pytest.raises(DataError) as info:
        load_splits(image_folder)
    message = str(info.value)
    assert "'purple' (2 file(s)" in message and str(bad[0]) in message
    assert "drop_unreadable_classes = true" in message


def test_drop_unreadable_classes_leaves_the_class_out_and_says_so(image_folder: Path) -> None:
    _corrupt_class(image_folder, "purple")
    splits = load_splits(image_folder, drop_unreadable_classes=True)
    assert splits.class_names == ["blue", "green", "red"] and splits.dropped_classes == ["purple"]
    assert len(splits.skipped) == 2
    assert "dropped class(es) ['purple']" in splits.summary()


def test_other_files_are_counted_as_ignored_and_written_to_skipped_csv(image_folder: Path, tmp_path: Path) -> None:
    from tlkit.rundir import RunDir

    (image_folder / "red" / "notes.txt").write_text("not an image")
    (image_folder / "README.md").write_text("outside the class folders")
    splits = load_splits(image_folder)
    reasons = {Path(p).name: r for p, r in splits.ignored}
    assert reasons == {"notes.txt": "ignored: not an image suffix (.txt)",
                       "README.md": "ignored: not inside a class folder"}
    assert splits.skipped == [] and "ignored 2 file(s)" in splits.summary()
    (tmp_path / "run").mkdir()
    RunDir(tmp_path / "run").write_data(splits)
    written = (tmp_path / "run" / RunDir.SKIPPED).read_text()
    assert "notes.txt,ignored: not an image suffix (.txt)" in written and "README.md" in written


def test_webp_files_train_like_any_other_image(tmp_path: Path) -> None:
    """RGB, RGBA and grayscale WebP; TensorFlow's own WebP decoder rejects RGBA as RGB."""
    from tlkit.data.images import decode_rgb

    root = write_image_folder(tmp_path / "d", n_per_class=2)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), np.uint8)).save(root / "red" / "rgb.webp")
    rgba = rng.integers(0, 255, (25, 25, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "blue" / "rgba.webp", lossless=True, exact=True)
    Image.fromarray(np.full((16, 16), 90, np.uint8), "L").save(root / "green" / "gray.webp", lossless=True)
    (root / "green" / "broken.webp").write_bytes(b"RIFF\x10\x00\x00\x00WEBPVP8 junk")
    splits = load_splits(root, val_fraction=0, test_fraction=0)
    used = {Path(e.path).name for e in splits.train}
    assert {"rgb.webp", "rgba.webp", "gray.webp"} <= used
    assert [Path(p).name for p, _ in splits.skipped] == ["broken.webp"] and not splits.ignored
    decoded = decode_rgb(tf_read(root / "blue" / "rgba.webp")).numpy()
    np.testing.assert_array_equal(decoded, rgba[..., :3])  # lossless: exact pixels, alpha dropped
    images, _ = next(iter(make_dataset(splits.train, splits.class_names, (8, 8), batch_size=64)))
    assert images.shape == (len(splits.train), 8, 8, 3)


def tf_read(path: Path):  # noqa: ANN201
    import tensorflow as tf

    return tf.io.read_file(str(path))


def _manifest(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / name)
    (root / "m.csv").write_text(text, encoding="utf-8")
    return root / "m.csv"


def test_manifest_labels_are_stripped_and_case_variants_are_an_error(tmp_path: Path) -> None:
    same = _manifest(tmp_path / "same", "path,label\na.png,Cat \nb.png,Cat\nc.png, dog\n")
    assert sorted({e.labels for e in read_manifest(same)}) == [("Cat",), ("dog",)]
    clash = _manifest(tmp_path / "clash", "path,label\na.png,Cat \nb.png,dog\n\nc.png,cat\n")
    with pytest.raises(DataError, match=r"'Cat' \(line 2\) and 'cat' \(line 5\)"):
        read_manifest(clash)


@pytest.mark.parametrize("label", ["nan", "NaN", "None", "", "  ", "null", "<NA>"])
def test_missing_value_labels_are_refused_with_their_line(tmp_path: Path, label: str) -> None:
    # The blank line 3 counts: the bad row is on line 5 of the file.
    manifest = _manifest(tmp_path, f"path,label\na.png,cat\n\nb.png,dog\nc.png,{label}\n")
    with pytest.raises(DataError, match=r"1 row\(s\) without a usable path or label: line 5: "):
        read_manifest(manifest)


def test_manifest_line_numbers_count_blank_lines_for_empty_paths(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, "path,label\n\n\na.png,cat\n,dog\nb.png,dog\n")
    with pytest.raises(DataError, match="line 5: empty path"):
        read_manifest(manifest)


def test_a_file_under_two_labels_is_an_error_unless_the_manifest_is_multi_label(tmp_path: Path) -> None:
    single = _manifest(tmp_path / "single", "path,label\na.png,cat\nb.png,dog\n./a.png,dog\n")
    with pytest.raises(DataError, match=r"'./a.png' is 'cat' on line 2 and 'dog' on line 4"):
        read_manifest(single)
    multi = _manifest(tmp_path / "multi", "path,label\na.png,cat\nb.png,cat|dog\na.png,dog\n")
    examples = read_manifest(multi)
    assert [e.labels for e in examples] == [("cat", "dog"), ("cat", "dog")]
    splits = load_splits(manifest=multi, val_fraction=0, test_fraction=0)
    assert any("merged" in note for note in splits.notes)


def test_a_repeated_row_is_used_once_and_noted(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, "path,label\na.png,cat\nb.png,cat\nc.png,dog\nd.png,dog\na.png,cat\n")
    splits = load_splits(manifest=manifest, val_fraction=0.25, test_fraction=0.25, seed=0)
    everything = [e.path for e in splits.train + splits.val + splits.test]
    assert len(everything) == 4 == len(set(everything))
    assert "repeat a file with the same label" in splits.summary()


def test_single_example_classes_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = _manifest(tmp_path, "path,label\na.png,cat\nb.png,cat\nc.png,cat\nd.png,dog\n")
    with caplog.at_level(logging.WARNING, logger="tlkit.data"):
        splits = load_splits(manifest=manifest, val_fraction=0.2, test_fraction=0.2)
    assert "['dog'] have a single example" in caplog.text
    assert "['dog'] have a single example" in splits.summary()


def test_paths_outside_the_manifest_folder_are_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside / "x.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside / "y.png")
    root = tmp_path / "data" / "sub"
    text = f"path,label\na.png,cat\nb.png,cat\n../../elsewhere/x.png,dog\n{outside / 'y.png'},dog\n"
    manifest = _manifest(root, text)
    with caplog.at_level(logging.WARNING, logger="tlkit.data"):
        splits = load_splits(manifest=manifest, val_fraction=0, test_fraction=0)
    warnings = [r.getMessage() for r in caplog.records if "outside its folder" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("2 of 4 file(s)")
    assert "2 of 4 file(s) listed in manifest" in splits.summary()
    assert {Path(e.path).name for e in splits.train} == {"a.png", "b.png", "x.png", "y.png"}


def test_batches_store_uint8_pixels_within_half_a_grey_level(tmp_path: Path) -> None:
    """The cache and shuffle buffer hold uint8 (a quarter of float32's bytes); values are the
    model-equivalent resize, rounded."""
    from tlkit.data.images import decode_and_resize, load_splits, make_batches

    root = write_image_folder(tmp_path / "images", n_per_class=3, size=45)
    splits = load_splits(root, val_fraction=0.0, test_fraction=0.0)
    batches = make_batches(splits.train, splits.class_names, (32, 32), 4)
    images = np.concatenate([x.numpy() for x, _ in batches.in_order()])
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
    exact = np.stack([decode_and_resize(e.path, (32, 32)).numpy() for e in splits.train])
    assert np.abs(images.astype(np.float32) - exact).max() <= 0.5 + 1e-4
