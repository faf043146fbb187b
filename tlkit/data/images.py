"""Image datasets: class folders or CSV manifests -> checked examples -> stratified splits -> ``tf.data``.

Every file is decoded once up front with the same decoder training uses
(``tf.io.decode_image``), so corrupt or unreadable files are reported by path and
skipped before training starts, never in the middle of an epoch.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

from tlkit.data.batches import Batches
from tlkit.errors import DataError

log = logging.getLogger("tlkit.data")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


@dataclass(frozen=True)
class Example:
    """One labelled file. ``labels`` holds one class name, or several for multi-label data."""

    path: str
    labels: tuple[str, ...]
    group: str | None = None  # e.g. a patient or speaker id; splits never separate a group


@dataclass
class Splits:
    """Examples split three ways, plus what was skipped and why."""

    class_names: list[str]
    train: list[Example]
    val: list[Example]
    test: list[Example]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        counts = Counter(label for e in self.train for label in e.labels)
        per_class = ", ".join(f"{name}: {counts.get(name, 0)}" for name in self.class_names)
        text = (
            f"{len(self.class_names)} classes; train {len(self.train)}, val {len(self.val)}, test {len(self.test)} "
            f"(train per class: {per_class})"
        )
        if self.skipped:
            text += f"; skipped {len(self.skipped)} unreadable file(s)"
        return text


def scan_folder(root: str | Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Example]:
    """Examples from ``root/<class>/**/<file>``; the sub-folder name is the label.

    Raises:
        DataError: ``root`` is missing, has no class folders, a class folder is empty,
            or there is only one class.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"data folder {str(base)!r} does not exist or is not a directory; check `data.path`")
    classes = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"data folder {str(base)!r} has no class sub-folders; expected {base}/<class>/<image files>")
    examples: list[Example] = []
    for folder in classes:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise DataError(
                f"class folder {str(folder)!r} holds no files ending in {', '.join(suffixes)}; "
                "add examples or remove the folder"
            )
        examples.extend(Example(str(p), (folder.name,)) for p in files)
    _require_two_classes(examples, str(base))
    return examples


def read_manifest(path: str | Path, label_separator: str = "|") -> list[Example]:
    """Examples from a CSV with a header holding ``path`` and ``label`` (optional ``group``/``speaker``).

    Relative paths are resolved against the manifest's folder. A label holding
    ``label_separator`` is a multi-label example (``"cat|dog"``).
    """
    manifest = Path(path).expanduser()
    if not manifest.is_file():
        raise DataError(f"manifest {str(manifest)!r} does not exist; check `data.manifest`")
    with open(manifest, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = set(reader.fieldnames or ())
        if not {"path", "label"} <= fields:
            raise DataError(
                f"manifest {str(manifest)!r} needs a header with 'path' and 'label' columns, found {sorted(fields)}"
            )
        group_field = "group" if "group" in fields else "speaker" if "speaker" in fields else None
        examples = []
        for line, row in enumerate(reader, start=2):
            file_path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            if not file_path or not label:
                raise DataError(f"manifest {str(manifest)!r} line {line}: empty path or label")
            resolved = Path(file_path) if Path(file_path).is_absolute() else manifest.parent / file_path
            labels = tuple(sorted({part.strip() for part in label.split(label_separator) if part.strip()}))
            group = (row.get(group_field) or "").strip() or None if group_field else None
            examples.append(Example(str(resolved), labels, group))
    if not examples:
        raise DataError(f"manifest {str(manifest)!r} lists no files")
    _require_two_classes(examples, str(manifest))
    return examples


def _require_two_classes(examples: Sequence[Example], where: str) -> None:
    classes = {label for e in examples for label in e.labels}
    if len(classes) < 2:
        raise DataError(
            f"{where} has a single class {sorted(classes)}; a classifier needs at least two classes of examples"
        )


def check_images(examples: Sequence[Example]) -> tuple[list[Example], list[tuple[str, str]]]:
    """Decodes every file once; returns ``(readable, [(path, reason), ...])``.

    Unreadable files are logged with their path and skipped.
    """
    good: list[Example] = []
    bad: list[tuple[str, str]] = []
    for example in examples:
        reason = _decode_problem(example.path)
        if reason is None:
            good.append(example)
        else:
            bad.append((example.path, reason))
            log.warning("skipping %s: %s", example.path, reason)
    if bad:
        log.warning("skipped %d unreadable image file(s) of %d", len(bad), len(examples))
    return good, bad


def _decode_problem(path: str) -> str | None:
    try:
        data = tf.io.read_file(path)
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.OpError) as exc:
        return exc.message.splitlines()[0] if getattr(exc, "message", "") else type(exc).__name__
    if image.shape[0] == 0 or image.shape[1] == 0:
        return "empty image"
    return None


def stratified_split(
    examples: Sequence[Example], val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> tuple[list[Example], list[Example], list[Example]]:
    """Splits per class (by the first label), keeping groups whole when groups are given.

    Every class with at least three examples gets at least one validation and one test
    example when the fractions are non-zero.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(f"val/test fractions {val_fraction}/{test_fraction} must be in [0, 1) and sum below 1")
    rng = np.random.default_rng(seed)
    # A unit is one example, or every example of one group (labelled by its first member).
    groups: dict[str, list[Example]] = {}
    merged: dict[str, list[list[Example]]] = {}
    for example in examples:
        if example.group is None:
            merged.setdefault(example.labels[0], []).append([example])
        else:
            groups.setdefault(example.group, []).append(example)
    for members in groups.values():
        merged.setdefault(members[0].labels[0], []).append(members)
    train: list[Example] = []
    val: list[Example] = []
    test: list[Example] = []
    for label in sorted(merged):
        unit_list = merged[label]
        order = rng.permutation(len(unit_list))
        n = len(unit_list)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 3:
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        for rank, index in enumerate(order):
            target = test if rank < n_test else val if rank < n_test + n_val else train
            target.extend(unit_list[index])
    return train, val, test


def class_weights(examples: Sequence[Example], class_names: Sequence[str]) -> dict[int, float]:
    """Balanced weights ``n / (k * count_c)`` (single-label), so rare classes count as much."""
    counts = Counter(e.labels[0] for e in examples)
    total = sum(counts.values())
    return {i: total / (len(class_names) * max(counts.get(name, 0), 1)) for i, name in enumerate(class_names)}


def load_splits(
    path: str | Path | None = None,
    manifest: str | Path | None = None,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    check: bool = True,
) -> Splits:
    """Reads a class folder or a manifest, checks every image and splits stratified by class."""
    if (path is None) == (manifest is None):
        raise DataError("give exactly one of a data folder (`data.path`) or a CSV manifest (`data.manifest`)")
    examples = scan_folder(path) if path is not None else read_manifest(manifest)  # type: ignore[arg-type]
    skipped: list[tuple[str, str]] = []
    if check:
        examples, skipped = check_images(examples)
        if not examples:
            raise DataError(f"none of the image files under {path or manifest} could be decoded")
        _require_two_classes(examples, str(path or manifest))
    class_names = sorted({label for e in examples for label in e.labels})
    train, val, test = stratified_split(examples, val_fraction, test_fraction, seed)
    return Splits(class_names, train, val, test, skipped)


def encode_labels(examples: Sequence[Example], class_names: Sequence[str]) -> np.ndarray:
    """(N, num_classes) float32 one-hot (or multi-hot) targets."""
    index = {name: i for i, name in enumerate(class_names)}
    targets = np.zeros((len(examples), len(class_names)), np.float32)
    for row, example in enumerate(examples):
        for label in example.labels:
            targets[row, index[label]] = 1.0
    return targets


def decode_and_resize(path: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """File path -> (H, W, 3) float32 pixels 0..255 at ``image_size``; grayscale and RGBA become RGB.

    The resize is the model's own (``keras.layers.Resizing``: bilinear, no antialiasing), so
    a served model that receives the full-size image sees the pixels training saw. To
    shrink very large images with antialiasing, do it before training *and* serving.
    """
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return tf.image.resize(tf.cast(image, tf.float32), image_size, method="bilinear", antialias=False)


def make_batches(
    examples: Sequence[Example],
    class_names: Sequence[str],
    image_size: tuple[int, int],
    batch_size: int = 32,
    *,
    training: bool = False,
    seed: int = 0,
    cache: bool | str = True,
) -> Batches:
    """Examples as :class:`~tlkit.data.batches.Batches` of ``(pixels (H, W, 3) float32 0..255, targets (C,))``.

    Files are decoded in parallel and resized once; the decoded images are cached
    (in memory, or in a file when ``cache`` is a path) so later epochs skip decoding.
    Training sets are reshuffled with ``seed`` every epoch (deterministic order).
    """
    if not examples:
        raise DataError("cannot build a dataset from zero examples (is a split empty? lower val/test fractions)")
    paths = tf.constant([e.path for e in examples])
    targets = tf.constant(encode_labels(examples, class_names))
    ds = tf.data.Dataset.from_tensor_slices((paths, targets))
    ds = ds.map(
        lambda p, t: (decode_and_resize(p, image_size), t),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if cache:
        ds = ds.cache("" if cache is True else str(cache))
    return Batches(ds, len(examples), batch_size, shuffle=training, seed=seed)


def make_dataset(
    examples: Sequence[Example],
    class_names: Sequence[str],
    image_size: tuple[int, int],
    batch_size: int = 32,
    *,
    training: bool = False,
    seed: int = 0,
    cache: bool | str = True,
) -> tf.data.Dataset:
    """A batched ``tf.data.Dataset`` of ``(pixels float32 (B, H, W, 3) 0..255, targets (B, C))``.

    See :func:`make_batches`; this is ``make_batches(...).batched()``.
    """
    return make_batches(
        examples, class_names, image_size, batch_size, training=training, seed=seed, cache=cache
    ).batched()
