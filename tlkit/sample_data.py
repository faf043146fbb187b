"""Small real datasets that ship inside installed packages, written as class folders.

``tlkit sample-data digits DIR`` writes scikit-learn's handwritten digits (real 8x8 scans,
BSD-3-Clause via scikit-learn; originally the UCI optical digits set) as PNG files in
``DIR/<digit>/``, so the README's training example needs no download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tlkit.errors import ConfigError


def write_digits(out: str | Path, per_class: int | None = 30, size: int = 32, seed: int = 0) -> Path:
    """Writes ``per_class`` digits per class (all when ``None``) as ``size`` x ``size`` RGB PNGs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{str(root)!r} exists and is not empty; choose a new folder")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        index = np.flatnonzero(digits.target == label)
        chosen = rng.permutation(index)[: per_class or len(index)]
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        for i in chosen:
            pixels = (digits.images[i] / 16.0 * 255.0).astype(np.uint8)
            image = Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR).convert("RGB")
            image.save(folder / f"digit_{i:04d}.png")
    return root
