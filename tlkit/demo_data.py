"""The real data ``tlkit demo`` measures on, all of it shipped inside installed packages (no download).

* :func:`photo_patches` (the main case, where ImageNet transfer helps): square patches of 20
  real photographs that ship with scikit-image (``skimage.data``) and scikit-learn
  (``load_sample_images``); the class of a patch is the photograph it was cut from. Each
  photograph's longer side is cut into 5 equal bands; 3 bands give the training patches, one
  the validation patches and one the test patches (which bands, drawn per photograph), so a
  test patch shows a part of the scene that no training patch overlaps. Telling them apart
  takes texture and object features: mean colour alone does not do it (measured: logistic
  regression on 16x16 pixels reaches 0.38 of the test patches, a linear probe on frozen
  EfficientNet-Lite0 features 0.86, see docs/transfer.md).
* :func:`digits_split` (the negative-transfer case): scikit-learn's handwritten digits, real
  8x8 scans, where raw pixels beat ImageNet features.

Licences: the scikit-image photographs are public domain or CC0 (each function's docstring in
``skimage.data`` says which); ``china.jpg`` and ``flower.jpg`` from scikit-learn are CC BY 2.0
(``sklearn.datasets.load_sample_images().DESCR`` names the photographers); the digits are
scikit-learn's copy of the UCI optical digits (BSD-3-Clause through scikit-learn).

Both return :data:`ArraySplits`; :func:`write_class_folders` writes them as PNG class folders,
the form every tlkit entry point reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tlkit.data.listing import Example
from tlkit.errors import ConfigError

ArraySplits = dict[str, tuple[np.ndarray, np.ndarray]]
"""``{"train": (pixels, labels), "val": ..., "test": ...}``: uint8 pixels ``(N, H, W, 3)``, int64 labels ``(N,)``."""

SPLITS = ("train", "val", "test")

SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
)
"""Real photographs in ``skimage.data`` that ship with the wheel (the others download on first use)."""

BANDS = 5
"""Equal bands along each photograph's longer side: 3 for training, 1 validation, 1 test."""


def load_photos() -> dict[str, np.ndarray]:
    """The 20 photographs as uint8 RGB ``(H, W, 3)`` arrays (gray ones with R = G = B), by name.

    17 from ``skimage.data`` (:data:`SKIMAGE_PHOTOS`), the left view of
    ``skimage.data.stereo_motorcycle`` (``"motorcycle"``) and scikit-learn's two sample
    images (``"china"``, ``"flower"``).
    """
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS}
    photos["motorcycle"] = skimage.data.stereo_motorcycle()[0]
    china, flower = load_sample_images().images
    photos["china"], photos["flower"] = china, flower
    return {name: _rgb(image) for name, image in sorted(photos.items())}


def _rgb(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ConfigError(f"expected a uint8 photograph, got {array.dtype}")
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def photo_patches(
    patch_size: int = 64,
    per_class: tuple[int, int, int] = (10, 5, 20),
    seed: int = 0,
    photos: dict[str, np.ndarray] | None = None,
) -> tuple[ArraySplits, list[str]]:
    """Patches of each photograph, its bands split between train / val / test (see the module docstring).

    Args:
        patch_size: side of the square patches, in pixels of the photograph.
        per_class: patches per photograph in train, val and test; each is drawn uniformly inside
            its split's bands (patches of one split may overlap each other, never another split's).
        seed: draws the bands and the patch positions.
        photos: default :func:`load_photos`.

    Returns:
        ``(splits, class_names)``: :data:`ArraySplits` whose label ``i`` is ``class_names[i]``
        (the photographs' names, sorted).

    Raises:
        ConfigError: a band of some photograph is narrower than ``patch_size``.
    """
    photos = photos if photos is not None else load_photos()
    names = sorted(photos)
    rng = np.random.default_rng(seed)
    parts: dict[str, tuple[list[np.ndarray], list[int]]] = {s: ([], []) for s in SPLITS}
    for label, name in enumerate(names):
        image = photos[name]
        along = 1 if image.shape[1] >= image.shape[0] else 0  # cut along the longer side
        edges = np.linspace(0, image.shape[along], BANDS + 1).astype(int)
        if int(np.diff(edges).min()) < patch_size or image.shape[1 - along] < patch_size:
            raise ConfigError(
                f"photograph {name!r} ({image.shape[0]}x{image.shape[1]}) has bands narrower than "
                f"patch_size={patch_size}; choose a patch size of at most {int(np.diff(edges).min())}"
            )
        order = rng.permutation(BANDS)
        bands = {"train": order[:3], "val": order[3:4], "test": order[4:]}
        for split, count in zip(SPLITS, per_class):
            for index in range(count):
                band = bands[split][index % len(bands[split])]
                start = int(rng.integers(edges[band], edges[band + 1] - patch_size + 1))
                across = int(rng.integers(0, image.shape[1 - along] - patch_size + 1))
                top, left = (across, start) if along == 1 else (start, across)
                parts[split][0].append(image[top: top + patch_size, left: left + patch_size])
                parts[split][1].append(label)
    return {s: (np.stack(x), np.asarray(y, np.int64)) for s, (x, y) in parts.items()}, names


def digits_split(
    labels_per_class: int = 10, val_per_class: int = 5, test_size: int = 500, seed: int = 0,
) -> tuple[ArraySplits, list[str]]:
    """scikit-learn's digits as uint8 RGB 8x8 scans, ``labels_per_class`` / ``val_per_class`` per
    class for train / val, ``test_size`` of the rest (drawn at random) for test.

    Returns ``(splits, ["0", ..., "9"])``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.repeat((digits.images / 16.0 * 255.0).round().astype(np.uint8)[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for label in range(10):
        index = rng.permutation(np.flatnonzero(labels == label))
        parts["train"].extend(index[:labels_per_class])
        parts["val"].extend(index[labels_per_class: labels_per_class + val_per_class])
        parts["test"].extend(index[labels_per_class + val_per_class:])
    parts["test"] = list(rng.permutation(parts["test"])[:test_size])
    return {s: (images[np.asarray(v)], labels[np.asarray(v)]) for s, v in parts.items()}, [str(d) for d in range(10)]


def write_class_folders(
    splits: ArraySplits, class_names: Sequence[str], root: str | Path,
) -> dict[str, list[Example]]:
    """Writes ``root/<split>/<class>/<n>.png`` (lossless, so the pixels are kept exactly) and
    returns the :class:`~tlkit.data.Example` rows of each split, in the arrays' order."""
    from PIL import Image

    examples: dict[str, list[Example]] = {}
    for split, (pixels, labels) in splits.items():
        rows = []
        for index, (image, label) in enumerate(zip(pixels, labels)):
            name = class_names[int(label)]
            path = Path(root) / split / name / f"{index:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(image, np.uint8), "RGB").save(path)
            rows.append(Example(str(path), (name,)))
        examples[split] = rows
    return examples
