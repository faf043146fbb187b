"""Source adapter: ``keras.applications`` backbones (weights fetched by Keras into ``$KERAS_HOME/models``)."""

from __future__ import annotations

import time
from pathlib import Path

import keras

from tlkit.backbones.spec import BackboneSpec, KerasAppOptions
from tlkit.cache import keras_home
from tlkit.errors import WeightsUnavailableError


def weights_path(spec: BackboneSpec) -> Path | None:
    """Where Keras caches this backbone's ImageNet weights (``None`` if the spec does not say)."""
    name = spec.options_for(KerasAppOptions).weights_file
    return keras_home() / "models" / name if name else None


def available_offline(spec: BackboneSpec) -> bool:
    """True when the pretrained weights are already in Keras's cache."""
    path = weights_path(spec)
    return bool(path and path.is_file())


def load(
    spec: BackboneSpec, weights: str | None = "pretrained", input_shape: tuple[int, ...] | None = None
) -> keras.Model:
    """Builds ``keras.applications.<spec.location>`` without its top.

    Args:
        spec: a ``keras_applications`` spec.
        weights: ``"pretrained"`` (ImageNet, downloaded by Keras on first use),
            ``None`` (random init) or a path to a weights file.
        input_shape: (H, W, 3) to build for, default ``spec.input_shape``.

    Returns:
        A model (B, H, W, 3) -> (B, h, w, feature_dim), taking input preprocessed as the
        spec says.
    """
    constructor = getattr(keras.applications, spec.location)
    keras_weights: str | None
    if weights == "pretrained":
        keras_weights = "imagenet"
    elif weights is None:
        keras_weights = None
    else:
        keras_weights = str(weights)
    start = time.monotonic()
    try:
        model = constructor(include_top=False, weights=keras_weights, input_shape=tuple(input_shape or spec.input_shape))
    except Exception as exc:  # Keras raises a bare Exception("URL fetch failure ...")
        message = str(exc)
        if "URL fetch failure" in message or "Name or service not known" in message or isinstance(exc, OSError):
            raise WeightsUnavailableError(
                f"cannot download ImageNet weights for backbone {spec.name!r} "
                f"(keras.applications.{spec.location}) after {time.monotonic() - start:.1f}s: {message.splitlines()[0]}\n"
                f"Keras looks for them in {weights_path(spec) or keras_home() / 'models'} (set KERAS_HOME to move it).\n"
                f"Fix: on a connected machine run `tlkit fetch {spec.name}` (with the same KERAS_HOME), then copy "
                f"{keras_home() / 'models'} to this machine; or pass weights=None for random initialisation."
            ) from exc
        raise
    return model


def prefetch(spec: BackboneSpec) -> Path:
    """Downloads the ImageNet weights into Keras's cache; returns the file (or the cache directory
    when the spec does not name the file)."""
    load(spec, "pretrained")
    return weights_path(spec) or keras_home() / "models"
