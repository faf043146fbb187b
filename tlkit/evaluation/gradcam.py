"""Grad-CAM overlays of the most confident right and wrong examples of an image model.

Writes ``evaluation/gradcam/{right,wrong}_NN.png`` (image beside its heatmap overlay) and one
grid per kind, ``evaluation/gradcam_{right,wrong}.png``; the heatmaps come from
:func:`tlkit.explain.explain_images` (the last layer with a map of at least 7x7 at the run's
image size) and are drawn on a fixed 0..1 scale (each map over its 99th percentile), left
uncoloured below 0.2 so the overlay shows where the evidence is not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image

from tlkit.data.images import decode_and_resize
from tlkit.evaluation.mistakes import Outcome
from tlkit.evaluation.plots import figure, save
from tlkit.explain import CAM_PERCENTILE, explain_images
from tlkit.heatmap import OVERLAY_THRESHOLD, overlay


def write_gradcam(
    model: Any, row_paths: Sequence[str], truth: np.ndarray, outcome: Outcome, names: Sequence[str],
    multi_label: bool, image_size: tuple[int, int], count: int, figures: Path,
) -> tuple[list[Path], dict[str, Any]]:
    """Grad-CAM overlays of the ``count`` most confident right and wrong examples.

    Args:
        model: the image classifier. row_paths: N image files. truth: (N, C) 0/1.
        outcome: right / wrong, explained class and confidence per example.
        image_size: ``(height, width)`` images are read at. figures: the ``evaluation/`` folder.

    Returns:
        ``(files written, info)``; ``info`` has ``method``, ``layer``, ``note``, the grid paths
        ``gradcam_right`` / ``gradcam_wrong`` and ``examples`` {kind: [{file, path, true,
        explained, confidence}]}.

    Raises:
        TlkitError: the model has no layer Grad-CAM can use.
    """
    folder = figures / "gradcam"
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    info: dict[str, Any] = {"examples": {}}
    order = np.argsort(-outcome.confidence, kind="stable")
    for kind, wanted in (("right", True), ("wrong", False)):
        chosen = [int(i) for i in order if bool(outcome.correct[i]) == wanted][:count]
        if not chosen:
            continue
        images = np.stack([decode_and_resize(tf.constant(row_paths[i]), image_size).numpy() for i in chosen])
        explanation = explain_images(model, images, class_index=outcome.explained[chosen])
        info.update(method=explanation.method, layer=explanation.layer, note=explanation.note)
        entries = []
        for rank, (i, image, heat) in enumerate(zip(chosen, images, explanation.heatmaps), start=1):
            blended = overlay(image, heat)
            pair = np.concatenate([np.clip(image, 0, 255).astype(np.uint8), blended], axis=1)
            file = folder / f"{kind}_{rank:02d}.png"
            scale = max(1, math.ceil(192 / min(pair.shape[:2])))  # small inputs are unreadable at 1:1
            picture = Image.fromarray(pair)
            if scale > 1:
                picture = picture.resize((pair.shape[1] * scale, pair.shape[0] * scale), Image.Resampling.NEAREST)
            picture.save(file)
            written.append(file)
            entries.append({
                "file": file, "path": row_paths[i], "true": "|".join(names[j] for j in np.flatnonzero(truth[i])),
                "explained": names[int(outcome.explained[i])], "confidence": float(outcome.confidence[i]),
                "image": image, "overlay": blended,
            })
        grid = figures / f"gradcam_{kind}.png"
        _draw_grid(entries, kind, explanation.method, explanation.layer, multi_label, grid)
        written.append(grid)
        info[f"gradcam_{kind}"] = grid
        info["examples"][kind] = [{k: v for k, v in e.items() if k not in ("image", "overlay")} for e in entries]
    return written, info


def _draw_grid(entries: list[dict[str, Any]], kind: str, method: str, layer: str | None, multi_label: bool,
               path: Path) -> None:
    columns = min(len(entries), 3)
    rows = math.ceil(len(entries) / columns)
    fig = figure(4.4 * columns, 2.9 * rows + 0.4)
    verb = "explained" if multi_label else "predicted"
    for k, entry in enumerate(entries):
        ax = fig.add_subplot(rows, columns, k + 1)
        image = np.clip(entry["image"], 0, 255).astype(np.uint8)
        ax.imshow(np.concatenate([image, entry["overlay"]], axis=1))
        ax.set_title(f"true {entry['true']}, {verb} {entry['explained']}\nconfidence {entry['confidence']:.3f}",
                     fontsize=8)
        ax.axis("off")
    label = "most confident correct predictions" if kind == "right" else "most confident mistakes"
    where = f" of {layer}" if layer else ""
    fig.suptitle(f"{method}{where}: {label}\n(left: image; right: heat over its {CAM_PERCENTILE:g}th percentile, "
                 f"blue 0 to red 1, uncoloured below {OVERLAY_THRESHOLD:g})", fontsize=9)
    fig.tight_layout()
    save(fig, path)
