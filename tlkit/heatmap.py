"""A heatmap drawn over its image, on a fixed 0..1 colour scale (Grad-CAM overlays).

Heat below :data:`OVERLAY_THRESHOLD` is not drawn, so the picture shows where the evidence is
*not* as well as where it is; above it the colour's weight rises linearly to ``alpha``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

__all__ = ["OVERLAY_THRESHOLD", "overlay"]

OVERLAY_THRESHOLD = 0.2
""":func:`overlay` leaves heat below this uncoloured."""


def overlay(
    image: np.ndarray,
    heatmap: np.ndarray,
    alpha: float = 0.45,
    colormap: str = "jet",
    threshold: float = OVERLAY_THRESHOLD,
) -> np.ndarray:
    """The heatmap drawn over the image, on a fixed 0..1 colour scale.

    Args:
        image: (H, W, 3) pixels 0..255 (float or uint8).
        heatmap: (h, w) values in [0, 1]; resized (bilinear) to (H, W) when needed.
        alpha: weight of the heatmap colours where the heat is 1.
        colormap: a matplotlib colormap name (heat 0 -> its first colour, 1 -> its last).
        threshold: heat below it is not drawn (the image shows through, so the picture
            shows where the evidence is not); above it the colour's weight rises from 0 to
            ``alpha``.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    import matplotlib

    pixels = np.clip(np.asarray(image, np.float32), 0, 255)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, np.float32)), 0.0, 1.0)
    if heat.shape != pixels.shape[:2]:
        resized = tf.image.resize(heat[..., None], pixels.shape[:2], method="bilinear")
        heat = np.clip(resized.numpy()[..., 0], 0.0, 1.0)
    colours = matplotlib.colormaps[colormap](heat)[..., :3] * 255.0
    weight = alpha * np.clip((heat - threshold) / max(1.0 - threshold, 1e-6), 0.0, 1.0)[..., None]
    blended = (1.0 - weight) * pixels + weight * colours
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)
