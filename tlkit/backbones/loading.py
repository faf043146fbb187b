"""Loads a backbone from its spec, whatever the source: each call asks the spec's record in
:data:`tlkit.backbones.sources.SOURCES`."""

from __future__ import annotations

from pathlib import Path

import keras

from tlkit.backbones.registry import get
from tlkit.backbones.sources import Weights, source_for
from tlkit.backbones.spec import BackboneSpec
from tlkit.errors import ConfigError


def _check_weights(weights: Weights) -> None:
    if weights is None or weights == "pretrained":
        return
    if not Path(str(weights)).expanduser().is_file():
        raise ConfigError(
            f"weights={weights!r} is neither 'pretrained', None (random init) nor an existing weights file"
        )


def load_backbone(
    backbone: str | BackboneSpec,
    weights: Weights = "pretrained",
    input_shape: tuple[int, ...] | None = None,
) -> tuple[BackboneSpec, keras.layers.Layer]:
    """Builds a backbone with its weights.

    Args:
        backbone: a registry name, hub handle, SavedModel directory, ``.keras`` file or spec.
        weights: ``"pretrained"`` (the source's weights), ``None`` (random initialisation,
            only when asked for explicitly) or a path to a weights file.
        input_shape: image backbones built per input size (Keras applications): the size
            to build for; default ``spec.input_shape``.

    Returns:
        ``(spec, layer)``: the layer takes the spec's preprocessed input and returns
        features shaped as ``spec.output`` says. Its name is ``"backbone"``.

    Raises:
        WeightsUnavailableError: pretrained weights cannot be fetched (offline); the message
            names the handle, the cache directory and how to pre-fetch.
        BackboneNotFoundError: the spec's source is not in the table.
    """
    spec = get(backbone)
    _check_weights(weights)
    layer = source_for(spec).load(spec, weights, input_shape)
    layer.name = "backbone"  # type: ignore[misc]
    return spec, layer


def available_offline(backbone: str | BackboneSpec) -> bool:
    """True when pretrained weights for a backbone (name, handle or spec) load without a network."""
    spec = get(backbone)
    return source_for(spec).available_offline(spec)


def prefetch(backbone: str | BackboneSpec) -> str:
    """Downloads (or converts) a backbone's pretrained weights into the local cache.

    Returns a human-readable description of where they now are. Run this on a connected
    machine, then copy the cache directory (``KERAS_HOME``, ``TFHUB_CACHE_DIR`` or
    ``TLKIT_CACHE``) to an offline one.
    """
    spec = get(backbone)
    return str(source_for(spec).prefetch(spec))
