"""A small synthetic leaf set in PlantVillage layout, for the offline smoke path.

No package ships leaf-disease photographs, so ``prepare.py --sample`` draws them: one leaf
per image, centred on a plain lab-style background like PlantVillage's, with the visual
cue of each class painted on it. It is a pipeline test, not plant pathology: a model that
learns it has learnt "brown rings vs grey dots vs yellow margins", nothing about tomatoes.

Classes (PlantVillage names, so the folder layout and labels match the real data set):

=====================================  ==================================================
``Tomato___healthy``                   uniform green leaf with veins
``Tomato___Early_blight``              a few dark-brown spots with concentric rings and a
                                       yellow halo ("target spots")
``Tomato___Septoria_leaf_spot``        many small grey-white spots with dark borders
``Tomato___Tomato_Yellow_Leaf_Curl_Virus``  yellowed (chlorotic) margins, mottled, pale
``Potato___Late_blight``               large irregular dark water-soaked patches, pale rim
=====================================  ==================================================
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = (
    "Potato___Late_blight",
    "Tomato___Early_blight",
    "Tomato___Septoria_leaf_spot",
    "Tomato___Tomato_Yellow_Leaf_Curl_Virus",
    "Tomato___healthy",
)


def _leaf_mask(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A leaf-shaped mask (pointed ellipse, random size and angle) and its own coordinates.

    Returns ``(mask (S, S) bool, u (S, S), v (S, S))``: ``u`` runs along the midrib from
    -1 (stalk) to 1 (tip), ``v`` across the blade, -1..1 at the margins.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + rng.normal(0, size * 0.03, 2)
    angle = rng.uniform(0, np.pi)
    length = size * rng.uniform(0.36, 0.44)
    width = length * rng.uniform(0.42, 0.6)
    dx, dy = xx - cx, yy - cy
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / length
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / width
    # Width tapers towards tip and stalk: |v| <= (1 - u^2)^0.8 gives a pointed ellipse.
    limit = np.clip(1 - u**2, 0, None) ** 0.8
    wobble = 1 + 0.04 * np.sin(u * rng.uniform(8, 14) + rng.uniform(0, 6))  # serrated-ish margin
    mask = (np.abs(u) <= 1) & (np.abs(v) <= limit * wobble)
    return mask, u, v / np.maximum(limit, 1e-3)


def _spots(size: int, count: int, radius: tuple[float, float], mask: np.ndarray, rng: np.random.Generator
           ) -> list[tuple[float, float, float]]:
    """``count`` random (x, y, r) spots whose centres lie on the leaf."""
    ys, xs = np.nonzero(mask)
    picks = rng.integers(0, len(xs), count)
    return [(float(xs[i]), float(ys[i]), float(rng.uniform(*radius)) * size) for i in picks]


def draw_leaf(label: str, size: int = 128, seed: int = 0) -> np.ndarray:
    """One synthetic leaf photo of class ``label``: (size, size, 3) uint8 RGB."""
    if label not in CLASSES:
        raise ValueError(f"unknown synthetic class {label!r}; known: {CLASSES}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Background: a plain grey-beige board with a soft light gradient, as in lab photos.
    base = rng.uniform(120, 190)
    gradient = (xx / size - 0.5) * rng.uniform(-30, 30) + (yy / size - 0.5) * rng.uniform(-30, 30)
    image = np.stack([base + gradient + d for d in rng.uniform(-12, 12, 3)], axis=-1)
    mask, u, v = _leaf_mask(size, rng)
    # Leaf: green with per-leaf hue variation, darker veins (midrib and side veins).
    green = np.array([rng.uniform(50, 90), rng.uniform(120, 165), rng.uniform(35, 70)])
    shade = 1 - 0.15 * np.abs(v)  # the blade is lighter at the midrib
    leaf = green[None, None, :] * shade[..., None]
    veins = (np.abs(v) < 0.06) | (np.abs(np.sin((u * 5 - np.abs(v) * 2.2) * np.pi)) < 0.08)
    leaf[veins] *= 0.8
    if label == "Tomato___Tomato_Yellow_Leaf_Curl_Virus":
        margin = np.clip((np.abs(v) - 0.45) / 0.55, 0, 1)
        mottle = 0.5 + 0.5 * np.sin(xx * rng.uniform(0.2, 0.4)) * np.sin(yy * rng.uniform(0.2, 0.4))
        yellow = np.array([200.0, 190.0, 60.0])
        amount = np.clip(margin * 0.9 + mottle * 0.35, 0, 1)[..., None]
        leaf = leaf * (1 - amount) + yellow * amount
    image[mask] = leaf[mask]

    def paint(spots: list[tuple[float, float, float]], centre: np.ndarray, edge: np.ndarray | None,
              rings: bool = False, halo: np.ndarray | None = None) -> None:
        for x, y, r in spots:
            d = np.sqrt((xx - x) ** 2 + (yy - y) ** 2) / r
            if halo is not None:
                ring = mask & (d >= 1) & (d < 1.5)
                image[ring] = image[ring] * 0.4 + halo * 0.6
            core = mask & (d < 1)
            colour = np.broadcast_to(centre, image.shape).copy()
            if rings:  # concentric "target" rings
                colour *= (0.75 + 0.25 * np.cos(d * 3 * np.pi))[..., None]
            image[core] = colour[core]
            if edge is not None:
                rim = mask & (d >= 0.7) & (d < 1)
                image[rim] = edge

    if label == "Tomato___Early_blight":
        paint(_spots(size, rng.integers(3, 6), (0.04, 0.07), mask, rng), np.array([95.0, 60, 30]), None,
              rings=True, halo=np.array([210.0, 200, 70]))
    elif label == "Tomato___Septoria_leaf_spot":
        paint(_spots(size, rng.integers(14, 24), (0.012, 0.022), mask, rng), np.array([205.0, 200, 185]),
              np.array([70.0, 45, 30]))
    elif label == "Potato___Late_blight":
        for x, y, r in _spots(size, rng.integers(1, 3), (0.1, 0.16), mask, rng):
            noise = rng.normal(0, 0.25, (size, size))
            d = np.sqrt((xx - x) ** 2 + ((yy - y) * rng.uniform(0.6, 1.4)) ** 2) / r + noise * 0.3
            patch = mask & (d < 1)
            image[patch] = np.array([55.0, 60, 40]) + rng.normal(0, 6, 3)
            rim = mask & (d >= 1) & (d < 1.25)
            image[rim] = image[rim] * 0.5 + np.array([170.0, 185, 110]) * 0.5
    # Camera noise and a mild blur-free sensor grain.
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_sample(out: str | Path, per_class: int = 16, size: int = 128, seed: int = 0) -> list[tuple[str, str]]:
    """Writes ``per_class`` JPEG leaves per class under ``out/images/<class>/``.

    Returns ``[(relative path, label), ...]`` in the order written.
    """
    from PIL import Image

    root = Path(out)
    rows = []
    for class_index, label in enumerate(CLASSES):
        folder = root / "images" / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = draw_leaf(label, size, seed=seed * 100_003 + class_index * 1_009 + i)
            file = folder / f"synthetic_{i:03d}.jpg"
            Image.fromarray(pixels).save(file, quality=92)
            rows.append((file.relative_to(root).as_posix(), label))
    return rows
