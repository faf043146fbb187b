"""Source adapter: TF-Hub handles and local SavedModel directories, trainable inside Keras 3.

``hub.KerasLayer`` is a tf-keras (Keras 2) layer and cannot live in a Keras 3 model.
:class:`SavedModelBackbone` instead builds on ``keras.layers.TFSMLayer``'s approach: it
wraps the SavedModel's own ``tf.Variable`` objects as Keras variables, so gradients reach
the hub weights once they are unfrozen. ``tensorflow_hub`` is used for what it is still good
at: resolving a handle into its local cache (``TFHUB_CACHE_DIR``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

import keras

from tlkit.backbones.spec import BackboneSpec, HubOptions
from tlkit.cache import tfhub_cache_dir
from tlkit.errors import BackboneNotFoundError, WeightsUnavailableError

# Tried in order when a SavedModel's endpoint is not named: Keras 3 `model.export`,
# TF2 hub modules (a callable object), then the classic serving signature.
_ENDPOINTS = ("serve", "__call__", "serving_default", "default")


@keras.saving.register_keras_serializable(package="tlkit")
class SavedModelBackbone(keras.layers.TFSMLayer):
    """A SavedModel (TF-Hub module or exported Keras model) as a trainable Keras 3 layer.

    Input: what the SavedModel's endpoint takes, batched: e.g. (B, H, W, 3) float in [0, 1]
    for TF-Hub image feature vectors, (B, samples) for audio encoders. Output: its output
    tensor; a dict output yields ``output_key`` (default: the first key in sorted order), a
    tuple/list output yields ``output_index``.

    Call contracts beyond "batch in, tensor out" (from the spec's :class:`HubOptions`):
        per_example: the module takes one example, not a batch; it is mapped over the
            batch (``per_example_rank=2`` gives it a batch of one) and outputs stacked.
        input_kwarg / call_kwargs: call as ``fn(**{input_kwarg: x, **call_kwargs})``.
        saved_model_tags: MetaGraph tags for TF1 Hub format modules.

    The SavedModel's own ``tf.Variable`` objects become this layer's Keras variables, so
    gradients reach them once they are unfrozen. Loading a model that holds this layer from
    a ``.keras`` file needs ``safe_mode=False`` (the SavedModel's graph is code; Keras's rule,
    inherited from ``TFSMLayer.from_config``).
    """

    def __init__(
        self,
        filepath: str,
        call_endpoint: str | None = None,
        output_key: str | None = None,
        output_index: int = 0,
        per_example: bool = False,
        per_example_rank: int = 1,
        input_kwarg: str | None = None,
        call_kwargs: dict[str, Any] | None = None,
        saved_model_tags: list[str] | None = None,
        feature_dim: int | None = None,
        trainable: bool = True,
        name: str | None = None,
        dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        import tensorflow as tf

        # TFSMLayer.__init__ cannot pass load tags, so the loading is done here; the rest of
        # TFSMLayer (safe-mode refusal in from_config) still applies.
        keras.layers.Layer.__init__(self, trainable=trainable, name=name, dtype=dtype, **kwargs)
        self.filepath = filepath
        self.saved_model_tags = list(saved_model_tags) if saved_model_tags else None
        self._reloaded_obj = tf.saved_model.load(filepath, tags=self.saved_model_tags)
        self.call_endpoint = call_endpoint or _detect_endpoint(self._reloaded_obj, filepath)
        self.call_training_endpoint = None
        self.call_endpoint_fn = _endpoint_function(self._reloaded_obj, self.call_endpoint, filepath)
        self.output_key = output_key
        self.output_index = int(output_index)
        self.per_example = bool(per_example)
        self.per_example_rank = int(per_example_rank)
        self.input_kwarg = input_kwarg
        self.call_kwargs = dict(call_kwargs or {})
        self.feature_dim = feature_dim
        self._kwarg_name = input_kwarg or _single_kwarg(self.call_endpoint_fn, set(self.call_kwargs))
        trainable_vars, other_vars = _variables_used_by(self.call_endpoint_fn)
        for variable in trainable_vars + other_vars:
            self._add_existing_weight(variable)
        self._build_at_init()

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

    def _call_one(self, inputs: Any) -> Any:
        if self._kwarg_name is not None:
            outputs = self.call_endpoint_fn(**{self._kwarg_name: inputs}, **self.call_kwargs)
        else:
            outputs = self.call_endpoint_fn(inputs, **self.call_kwargs)
        if isinstance(outputs, dict):
            return outputs[self.output_key or sorted(outputs)[0]]
        if isinstance(outputs, (list, tuple)):
            return outputs[self.output_index]
        return outputs

    def call(self, inputs: Any, training: bool = False, **kwargs: Any) -> Any:
        del training, kwargs  # BatchNorm inside a SavedModel always runs in inference mode.
        if not self.per_example:
            return self._call_one(inputs)
        import tensorflow as tf

        def one(example: Any) -> Any:
            if self.per_example_rank == 2:
                example = example[None]
            return tf.cast(self._call_one(example), tf.float32)

        outputs = tf.map_fn(one, inputs, fn_output_signature=tf.float32)
        outputs.set_shape([None, None, self.feature_dim])  # (B, T, C): one sequence per example
        return outputs

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "output_key": self.output_key, "output_index": self.output_index, "per_example": self.per_example,
            "per_example_rank": self.per_example_rank, "input_kwarg": self.input_kwarg,
            "call_kwargs": self.call_kwargs, "saved_model_tags": self.saved_model_tags,
            "feature_dim": self.feature_dim,
        })
        config.pop("call_training_endpoint", None)
        return config


def _endpoint_function(loaded: Any, endpoint: str, filepath: str) -> Any:
    signatures = getattr(loaded, "signatures", {})
    if endpoint in signatures:
        return signatures[endpoint]
    if hasattr(loaded, endpoint):
        return getattr(loaded, endpoint)
    raise BackboneNotFoundError(
        f"SavedModel {filepath!r} has no endpoint {endpoint!r}; it has signatures {sorted(signatures)}"
    )


def _detect_endpoint(loaded: Any, filepath: str) -> str:
    signatures = getattr(loaded, "signatures", {})
    for endpoint in _ENDPOINTS:
        if endpoint == "__call__":
            if callable(loaded) and getattr(getattr(loaded, "__call__", None), "concrete_functions", None):
                return endpoint
        elif endpoint in signatures or (endpoint == "serve" and hasattr(loaded, endpoint)):
            return endpoint
    raise BackboneNotFoundError(
        f"SavedModel {filepath!r} has no usable endpoint (looked for {', '.join(_ENDPOINTS)}); "
        "name one with the spec's source_options=HubOptions(endpoint=...)"
    )


def _single_kwarg(function: Any, known: set[str]) -> str | None:
    """The input's keyword name when the endpoint takes keyword arguments only (signatures)."""
    signature = getattr(function, "structured_input_signature", None)
    if signature is None or signature[0] or not signature[1]:
        return None
    names = sorted(set(signature[1]) - known)
    return names[0] if len(names) == 1 else None


def _variables_used_by(function: Any) -> tuple[list[Any], list[Any]]:
    """(trainable, other) variables captured by every concrete function behind ``function``."""
    if hasattr(function, "concrete_functions"):
        concrete = list(function.concrete_functions)
    elif hasattr(function, "get_concrete_function"):
        concrete = [function.get_concrete_function()]
    else:
        concrete = [function]
    trainable: dict[int, Any] = {}
    other: dict[int, Any] = {}
    for fn in concrete:
        for variable in fn.trainable_variables:
            trainable.setdefault(id(variable), variable)
        for variable in fn.variables:
            if id(variable) not in trainable:
                other.setdefault(id(variable), variable)
    return list(trainable.values()), list(other.values())


_HUB_PREFIXES = ("http://", "https://", "gs://")


def is_hub_handle(name: str) -> bool:
    """True for a TF-Hub / Kaggle Models handle: a URL ``tensorflow_hub`` resolves (http(s)://, gs://)."""
    return name.startswith(_HUB_PREFIXES)


def is_saved_model_dir(name: str) -> bool:
    """True for a local directory holding ``saved_model.pb``."""
    path = Path(name).expanduser()
    return path.is_dir() and (path / "saved_model.pb").is_file()


def hub_cache_path(handle: str) -> Path:
    """The directory ``tensorflow_hub`` caches ``handle`` into."""
    return tfhub_cache_dir() / hashlib.sha1(handle.encode("utf8")).hexdigest()


def handle_cached(spec: BackboneSpec) -> bool:
    """True when the hub handle ``spec.location`` is already in the TF-Hub cache."""
    return (hub_cache_path(spec.location) / "saved_model.pb").is_file()


def local_dir(spec: BackboneSpec) -> Path:
    """The SavedModel directory ``spec.location`` of a ``savedmodel`` spec.

    Raises:
        BackboneNotFoundError: it is not a SavedModel directory.
    """
    if not (Path(spec.location) / "saved_model.pb").is_file():
        raise BackboneNotFoundError(
            f"{spec.location!r} is not a SavedModel directory (no saved_model.pb); check the path"
        )
    return Path(spec.location)


def fetch_handle(spec: BackboneSpec) -> Path:
    """The local SavedModel directory of hub handle ``spec.location``, downloading it into the cache.

    Raises:
        WeightsUnavailableError: the handle cannot be fetched (offline) and is not cached.
    """
    start = time.monotonic()
    try:
        import tensorflow_hub as hub

        return Path(hub.resolve(spec.location))
    except Exception as exc:
        raise WeightsUnavailableError(
            f"cannot fetch TF-Hub handle {spec.location!r} for backbone {spec.name!r} after "
            f"{time.monotonic() - start:.1f}s ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).\n"
            f"It is not in the TF-Hub cache {hub_cache_path(spec.location)} (TFHUB_CACHE_DIR={tfhub_cache_dir()}).\n"
            f"Fix: on a connected machine run `TFHUB_CACHE_DIR={tfhub_cache_dir()} tlkit fetch {spec.name}`, then "
            f"copy that directory here and set TFHUB_CACHE_DIR to it; or download the SavedModel and pass its "
            f"directory as the backbone. (weights=None does not help: the network itself comes from the hub.)"
        ) from exc


def load(spec: BackboneSpec, weights: str | None, path: Path) -> keras.layers.Layer:
    """A :class:`SavedModelBackbone` for the SavedModel at ``path`` (``spec``'s, resolved).

    The call contract comes from the spec's :class:`HubOptions`. ``weights=None``
    re-initialises every variable randomly (Glorot-uniform for kernels with two or more
    dimensions, zeros otherwise; BatchNorm variances stay at one); a path loads that file.
    """
    contract = dataclasses.asdict(spec.options_for(HubOptions))  # the layer's arguments, by name
    layer = SavedModelBackbone(
        str(path), call_endpoint=contract.pop("endpoint"), **contract, feature_dim=spec.feature_dim, name="backbone"
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
