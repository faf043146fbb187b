"""What a built Keras model says about itself: its input kind, image size, sample rate, layers.

Small introspection helpers for models tlkit built (or loaded back), used where a run's or an
artifact's input contract must be recovered from the model itself.
"""

from __future__ import annotations

from typing import Any


def model_name(name: str) -> str:
    """A Keras model name from a run name (letters, digits and ``_``)."""
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return cleaned or "tlkit_classifier"


def takes_waveform(model: Any) -> bool:
    """Whether a Keras model's first input is a waveform (rank 2, or named ``waveform``)."""
    inputs = getattr(model, "inputs", None) or []
    return bool(inputs) and (inputs[0].name == "waveform" or len(inputs[0].shape) == 2)


def all_layers(layer: Any) -> list[Any]:
    """Every layer under ``layer``, nested models included, depth first."""
    found = []
    for sub in getattr(layer, "layers", []):
        found.append(sub)
        found.extend(all_layers(sub))
    return found


def model_image_size(model: Any) -> tuple[int, int] | None:
    """``(height, width)`` of the model's ``resize`` layer, or ``None``."""
    if "resize" not in [layer.name for layer in getattr(model, "layers", [])]:
        return None
    resize = model.get_layer("resize")
    return int(resize.height), int(resize.width)


def model_sample_rate(model: Any) -> int | None:
    """The ``sample_rate`` of the first layer (nested included) that has one."""
    for layer in all_layers(model):
        rate = getattr(layer, "sample_rate", None)
        if rate:
            return int(rate)
    return None
