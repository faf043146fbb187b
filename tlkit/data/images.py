"""Image datasets: class folders or CSV manifests -> checked examples -> stratified splits -> ``tf.data``.

Every file is decoded once up front with the decoder training uses (:func:`decode_rgb`),
so corrupt or unreadable files are reported by path and skipped before training starts,
never in the middle of an epoch. Files that are not images (by suffix) are listed in
:attr:`Splits.ignored`; a class whose every file is unreadable is an error unless
``drop_unreadable_classes`` (then it is in :attr:`Splits.dropped_classes`). Listing and
label checks live in :mod:`tlkit.data.listing`.

WebP files are decoded with Pillow, inside the ``tf.data`` pipeline too: TensorFlow
2.21's WebP decoder refuses RGBA files when asked for RGB and corrupts memory on
animated ones.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf
from PIL import Image

from tlkit.data.batches import Batches
from tlkit.data.listing import (
    Example,
    Listing,
    TaskColumn,
    keep_readable_classes,
    list_folder,
    list_manifest,
    read_manifest,
    require_two_classes,
    single_example_classes,
)
from tlkit.errors import DataError

log = logging.getLogger("tlkit.data")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

__all__ = [
    "IMAGE_SUFFIXES",
    "Example",
    "Splits",
    "check_images",
    "class_weights",
    "decode_and_resize",
    "decode_rgb",
    "encode_labels",
    "load_splits",
    "make_batches",
    "make_dataset",
    "read_manifest",
    "scan_folder",
    "stratified_split",
]


@dataclass
class Splits:
    """Examples split three ways, plus what was left out and why.

    Attributes:
        skipped: ``(path, reason)`` of listed files that failed the check (unreadable...).
        ignored: ``(path, "ignored: <why>")`` of files found but never candidates (not an
            image suffix, outside the class folders).
        dropped_classes: classes left out because every file of theirs was skipped (only with
            ``drop_unreadable_classes``; otherwise that is an error).
        notes: warnings for the user (files outside the manifest's folder, repeated rows,
            single-example classes), printed by :meth:`summary`.
    """

    class_names: list[str]
    train: list[Example]
    val: list[Example]
    test: list[Example]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    dropped_classes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Multi-task runs: one entry per task (sorted by name) with its classes; ``class_names`` is then empty.
    tasks: tuple[TaskColumn, ...] = ()

    skipped_words: ClassVar[str] = "unreadable"  # what a skipped file was, in :meth:`summary`

    def summary(self) -> str:
        """One line of counts, then one ``note:`` line per note."""
        return "; ".join(self._summary_parts()) + "".join(f"\nnote: {note}" for note in self.notes)

    def _summary_parts(self) -> list[str]:
        counts = Counter(label for e in self.train for label in e.labels)
        per_class = ", ".join(f"{name}: {counts.get(name, 0)}" for name in self.class_names)
        parts = [
            f"{len(self.class_names)} classes",
            f"train {len(self.train)}, val {len(self.val)}, test {len(self.test)} (train per class: {per_class})",
        ]
        if self.tasks:
            parts = [f"{len(self.tasks)} tasks", f"train {len(self.train)}, val {len(self.val)}, test {len(self.test)}"]
            for task in self.tasks:
                labelled = [e for e in self.train if e.task_labels(task.name)]
                counts = Counter(label for e in labelled for label in e.task_labels(task.name))
                parts.append(f"task {task.name!r}: {len(task.classes)} classes, {len(labelled)} labelled in train ("
                             + ", ".join(f"{name}: {counts.get(name, 0)}" for name in task.classes) + ")")
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)} {self.skipped_words} file(s)")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} file(s) of other types or outside the class folders")
        if self.dropped_classes:
            parts.append(f"dropped class(es) {self.dropped_classes}: every file of theirs was skipped")
        return parts


def scan_folder(root: str | Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Example]:
    """Examples from ``root/<class>/**/<file>``; the sub-folder name is the label.

    Files with other suffixes are logged (counted) and left out; see
    :func:`tlkit.data.listing.list_folder` for the list of them.

    Raises:
        DataError: ``root`` is missing, has no class folders, a class folder is empty,
            or there is only one class.
    """
    return list_folder(root, suffixes, "image" if tuple(suffixes) == IMAGE_SUFFIXES else "data").examples


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
        image = decode_rgb(tf.io.read_file(path))
    except tf.errors.OpError as exc:
        return exc.message.splitlines()[0] if getattr(exc, "message", "") else type(exc).__name__
    if image.shape[0] == 0 or image.shape[1] == 0:
        return "empty image"
    return None


def decode_rgb(data: tf.Tensor) -> tf.Tensor:
    """Encoded image bytes (a scalar string tensor) -> ``(H, W, 3)`` uint8; works in graphs too.

    JPEG, PNG, BMP and GIF (first frame) go through ``tf.io.decode_image``; WebP (recognised
    by its ``RIFF....WEBP`` header) through Pillow, since TensorFlow's WebP decoder fails on
    RGBA and corrupts memory on animations. Grayscale becomes RGB; alpha is dropped (both
    decoders alike). Use it wherever tlkit reads an image file, so training, evaluation and
    prediction see the same pixels.

    Raises:
        tf.errors.OpError: the bytes are not a decodable image.
    """
    head = tf.strings.join([tf.strings.substr(data, 0, 12), "\0" * 12])  # padded: short files are not WebP
    is_webp = tf.logical_and(
        tf.equal(tf.strings.substr(head, 0, 4), b"RIFF"), tf.equal(tf.strings.substr(head, 8, 4), b"WEBP")
    )
    image = tf.cond(
        is_webp,
        lambda: tf.numpy_function(_pillow_rgb, [data], tf.uint8, stateful=False),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
    )
    image.set_shape([None, None, 3])
    return image


def _pillow_rgb(data: bytes | np.ndarray) -> np.ndarray:
    """Encoded bytes (or the 0-d array ``tf.numpy_function`` passes in eager mode) -> (H, W, 3)
    uint8 with Pillow (first frame of an animation)."""
    raw = data.item() if isinstance(data, np.ndarray) else data
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.seek(0)
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's errors for broken files
        # An OpError, as TensorFlow's own decoders raise, in eager mode and in tf.data alike.
        raise tf.errors.InvalidArgumentError(None, None, f"cannot decode WebP image ({type(exc).__name__})") from exc
    return rgb.reshape(rgb.shape[0], rgb.shape[1], 3)


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
    drop_unreadable_classes: bool = False,
) -> Splits:
    """Reads a class folder or a manifest, checks every image and splits stratified by class.

    Args:
        path / manifest: exactly one: ``path/<class>/**/<image>`` or a CSV (see
            :func:`tlkit.data.listing.list_manifest` for its checks).
        check: decode every file once and skip (and report) unreadable ones.
        drop_unreadable_classes: a class whose every file is unreadable is left out and
            named in :attr:`Splits.dropped_classes` instead of being an error.

    Raises:
        DataError: see :func:`tlkit.data.listing.list_folder` / ``list_manifest``; no file
            decodes; a class lost every file (without ``drop_unreadable_classes``).
    """
    if (path is None) == (manifest is None):
        raise DataError("give exactly one of a data folder (`data.path`) or a CSV manifest (`data.manifest`)")
    source = str(path or manifest)
    listing: Listing = (
        list_folder(path, IMAGE_SUFFIXES, "image") if path is not None else list_manifest(manifest)  # type: ignore[arg-type]
    )
    examples = listing.examples
    skipped: list[tuple[str, str]] = []
    dropped: list[str] = []
    if check:
        examples, skipped = check_images(listing.examples)
        if not examples:
            raise DataError(f"none of the image files under {source} could be decoded (first: {skipped[:3]})")
        dropped = keep_readable_classes(listing.examples, examples, skipped, source, drop_unreadable_classes)
        require_two_classes(examples, source)
    class_names = sorted({label for e in examples for label in e.labels})
    train, val, test = stratified_split(examples, val_fraction, test_fraction, seed)
    return Splits(class_names, train, val, test, skipped, listing.ignored, dropped,
                  [*listing.notes, *single_example_notes(examples)])


def single_example_notes(examples: Sequence[Example]) -> list[str]:
    """A note for :attr:`Splits.notes` naming the classes with one example (none: empty)."""
    single = single_example_classes(examples)
    if not single:
        return []
    return [f"class(es) {single} have a single example: it goes to the training split, so validation and "
            "test never measure them; add examples"]


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
    image = decode_rgb(tf.io.read_file(path))
    return tf.image.resize(tf.cast(image, tf.float32), image_size, method="bilinear", antialias=False)


def to_uint8(pixels: tf.Tensor) -> tf.Tensor:
    """Float pixels 0..255 -> uint8, rounded to the nearest grey level."""
    return tf.cast(tf.round(tf.clip_by_value(pixels, 0.0, 255.0)), tf.uint8)


def make_batches(
    examples: Sequence[Example],
    class_names: Sequence[str],
    image_size: tuple[int, int],
    batch_size: int = 32,
    *,
    training: bool = False,
    seed: int = 0,
    cache: bool | str = True,
    targets: Any = None,
) -> Batches:
    """Examples as :class:`~tlkit.data.batches.Batches` of ``(pixels (H, W, 3) uint8, targets (C,))``.

    ``targets``: the targets to pair with the examples instead of their one-hot ``class_names``
    rows, e.g. a dict ``{task: (N, C_task) array}`` for a multi-task model (one row per example).

    Files are decoded in parallel and resized once; the decoded images are cached
    (in memory, or in a file when ``cache`` is a path) so later epochs skip decoding.
    Training sets are reshuffled with ``seed`` every epoch (deterministic order).

    Pixels are stored as uint8 (the resized values rounded, at most half a grey level from
    :func:`decode_and_resize`): the cache and the shuffle buffer hold a quarter of the bytes of
    float32 (150 KB instead of 602 KB per image at 224 px). The model casts them to float32 at
    its input, as it does for the raw uint8 images it serves.
    """
    if not examples:
        raise DataError("cannot build a dataset from zero examples (is a split empty? lower val/test fractions)")
    paths = tf.constant([e.path for e in examples])
    targets = encode_labels(examples, class_names) if targets is None else targets
    ds = tf.data.Dataset.from_tensor_slices((paths, targets))
    ds = ds.map(
        lambda p, t: (to_uint8(decode_and_resize(p, image_size)), t),
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
    """A batched ``tf.data.Dataset`` of ``(pixels uint8 (B, H, W, 3), targets (B, C))``.

    See :func:`make_batches`; this is ``make_batches(...).batched()``.
    """
    return make_batches(
        examples, class_names, image_size, batch_size, training=training, seed=seed, cache=cache
    ).batched()
