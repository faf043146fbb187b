"""Source adapter: TF-Hub handles and local SavedModel directories, trainable inside Keras 3.

``hub.KerasLayer`` is a tf-keras (Keras 2) layer and cannot live in a Keras 3 model.
:class:`SavedModelBackbone` instead builds on ``keras.layers.TFSMLayer``, which wraps
the SavedModel's own ``tf.Variable`` objects as Keras variables, so gradients reach the
hub weights once they are unfrozen. ``tensorflow_hub`` is used for what it is still good
at: resolving a handle into its local cache (``TFHUB_CACHE_DIR``).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import keras

from tlkit.backbones.spec import BackboneSpec
from tlkit.cache import tfhub_cache_dir
from tlkit.errors import BackboneNotFoundError, WeightsUnavailableError

# Tried in order when a SavedModel's endpoint is not named: Keras 3 `model.export`,
# TF2 hub modules (a callable object), then the classic serving signature.
_ENDPOINTS = ("serve", "__call__", "serving_default")


@keras.saving.register_keras_serializable(package="tlkit")
class SavedModelBackbone(keras.layers.TFSMLayer):
    """A SavedModel (TF-Hub module or exported Keras model) as a trainable Keras 3 layer.

    Input: whatever the SavedModel's endpoint takes, e.g. (B, H, W, 3) float in [0, 1]
    for TF-Hub image feature vectors. Output: its output tensor; an endpoint returning a
    dict yields ``output_key`` (default: the first key in sorted order).

    Loading a model that holds this layer from a ``.keras`` file needs
    ``safe_mode=False``, because the SavedModel's graph is code (Keras's own rule).
    """

    def __init__(
        self,
        filepath: str,
        call_endpoint: str | None = None,
        output_key: str | None = None,
        trainable: bool = True,
        name: str | None = None,
        dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        endpoint = call_endpoint or _detect_endpoint(filepath)
        super().__init__(filepath, call_endpoint=endpoint, trainable=trainable, name=name, dtype=dtype, **kwargs)
        self.output_key = output_key
        signature = getattr(self.call_endpoint_fn, "structured_input_signature", None)
        self._kwarg_name: str | None = None
        if signature is not None and not signature[0] and signature[1]:
            self._kwarg_name = sorted(signature[1])[0]

    def _add_existing_weight(self, weight: Any) -> None:
        """Tracks a SavedModel variable under a name optimizers accept (no ``/`` or ``:0``)."""
        variable = keras.Variable(
            initializer=weight,
            trainable=weight.trainable,
            dtype=weight.dtype,
            shape=weight.shape,
            name=weight.name.split(":")[0].replace("/", "_"),
        )
        self._track_variable(variable)

    def call(self, inputs: Any, training: bool = False, **kwargs: Any) -> Any:
        del training, kwargs  # BatchNorm inside a SavedModel always runs in inference mode.
        if self._kwarg_name is not None:
            outputs = self.call_endpoint_fn(**{self._kwarg_name: inputs})
        else:
            outputs = self.call_endpoint_fn(inputs)
        if isinstance(outputs, dict):
            key = self.output_key or sorted(outputs)[0]
            outputs = outputs[key]
        return outputs

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["output_key"] = self.output_key
        return config


def _detect_endpoint(filepath: str) -> str:
    import tensorflow as tf

    loaded = tf.saved_model.load(filepath)
    for endpoint in _ENDPOINTS:
        if endpoint == "__call__":
            if callable(loaded) and hasattr(loaded, "__call__") and getattr(loaded.__call__, "concrete_functions", None):
                return endpoint
        elif endpoint in getattr(loaded, "signatures", {}) or (
            endpoint != "serving_default" and hasattr(loaded, endpoint)
        ):
            return endpoint
    raise BackboneNotFoundError(
        f"SavedModel {filepath!r} has no usable endpoint (looked for {', '.join(_ENDPOINTS)}); "
        "pass `endpoint` in the backbone's options"
    )


def hub_cache_path(handle: str) -> Path:
    """The directory ``tensorflow_hub`` caches ``handle`` into."""
    return tfhub_cache_dir() / hashlib.sha1(handle.encode("utf8")).hexdigest()


def available_offline(spec: BackboneSpec) -> bool:
    """True when the SavedModel is on disk (a local path, or a hub handle already cached)."""
    if spec.source == "savedmodel":
        return (Path(spec.location) / "saved_model.pb").is_file()
    return (hub_cache_path(spec.location) / "saved_model.pb").is_file()


def resolve(spec: BackboneSpec) -> str:
    """The local SavedModel directory for ``spec``, downloading a hub handle into the cache.

    Raises:
        WeightsUnavailableError: the handle cannot be fetched (offline) and is not cached.
        BackboneNotFoundError: a local path is not a SavedModel.
    """
    if spec.source == "savedmodel":
        if not (Path(spec.location) / "saved_model.pb").is_file():
            raise BackboneNotFoundError(
                f"{spec.location!r} is not a SavedModel directory (no saved_model.pb); check the path"
            )
        return spec.location
    start = time.monotonic()
    try:
        import tensorflow_hub as hub

        return str(hub.resolve(spec.location))
    except Exception as exc:
        raise WeightsUnavailableError(
            f"cannot fetch TF-Hub handle {spec.location!r} for backbone {spec.name!r} after "
            f"{time.monotonic() - start:.1f}s ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).\n"
            f"It is not in the TF-Hub cache {hub_cache_path(spec.location)} (TFHUB_CACHE_DIR={tfhub_cache_dir()}).\n"
            f"Fix: on a connected machine run `TFHUB_CACHE_DIR={tfhub_cache_dir()} tlkit fetch {spec.name}`, then "
            f"copy that directory here and set TFHUB_CACHE_DIR to it; or download the SavedModel and pass its "
            f"directory as the backbone. (weights=None does not help: the network itself comes from the hub.)"
        ) from exc


def load(spec: BackboneSpec, weights: str | None = "pretrained") -> keras.layers.Layer:
    """A :class:`SavedModelBackbone` for a TF-Hub handle or SavedModel directory.

    ``weights=None`` re-initialises every variable randomly (Glorot-uniform for kernels
    with two or more dimensions, zeros otherwise; BatchNorm variances stay at one).
    """
    path = resolve(spec)
    layer = SavedModelBackbone(
        path,
        call_endpoint=spec.option("endpoint"),
        output_key=spec.option("output_key"),
        name="backbone",
    )
    if weights is None:
        _reinitialise(layer)
    elif weights != "pretrained":
        layer.load_weights(weights)
    return layer


def _reinitialise(layer: keras.layers.Layer) -> None:
    glorot = keras.initializers.GlorotUniform(seed=0)
    for variable in layer.weights:
        shape = tuple(variable.shape)
        lowered = variable.path.lower()
        if "variance" in lowered or "gamma" in lowered or "scale" in lowered:
            variable.assign(keras.ops.ones(shape, variable.dtype))
        elif len(shape) >= 2:
            variable.assign(glorot(shape, variable.dtype))
        else:
            variable.assign(keras.ops.zeros(shape, variable.dtype))
