"""Classifier assembly: raw input -> preprocessing -> augmentation -> backbone -> pooling -> head.

The result is a plain functional ``keras.Model``; every step is a named layer a user can
see in ``model.summary()``:

``resize`` (images) or ``frontend`` (audio) -> ``preprocess`` -> ``augment`` (training only)
-> ``backbone`` -> ``pool`` -> ``dropout`` -> ``hidden_i`` -> ``logits`` -> ``probabilities``.

Everything up to and including ``pool`` is the *feature extractor*; the rest is the *head*
(see :func:`split_head`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import keras

from tlkit.backbones.groups import LayerGroups, resolve_groups
from tlkit.backbones.loading import load_backbone
from tlkit.backbones.registry import get as get_spec
from tlkit.backbones.spec import AudioFrontend, BackboneSpec, ImagePreprocessing
from tlkit.errors import ConfigError, DataError
from tlkit.layers import ImageNormalization, RandomAffine, TrainingOnly, WaveformStandardization, with_frozen_batchnorm

FEATURES_LAYER = "pool"
HEAD_LAYER_PREFIXES = ("dropout", "hidden_", "logits", "probabilities")


@dataclass(frozen=True)
class HeadConfig:
    """The new classifier head.

    Attributes:
        hidden_units: sizes of optional hidden Dense+ReLU layers before the output.
        dropout: dropout rate before each Dense layer of the head (0 disables it).
        multi_label: sigmoid outputs and binary cross-entropy instead of softmax.
        label_smoothing: passed to the loss.
        pooling: how spatial or sequence features are reduced: ``"avg"``, ``"max"`` or
            ``"attention"`` (a learned softmax weighting over time steps or positions,
            :class:`AttentionPooling`, whose weights are never frozen by a stage).
        bn_inference: keep every BatchNorm layer of the backbone in inference mode, as
            Keras's transfer-learning guide advises for small datasets. By construction:
            :func:`build_classifier` builds the backbone with
            :class:`~tlkit.layers.FrozenBatchNormalization` layers, whose moving statistics
            never change, also after a hand-made ``backbone.trainable = True`` (their
            gamma/beta then train, as in the guide; :func:`tlkit.fine_tune` keeps those
            frozen as well). ``False`` keeps plain BatchNorm layers, which train (batch
            statistics, moving averages updated) in thawed groups.
    """

    hidden_units: tuple[int, ...] = ()
    dropout: float = 0.2
    multi_label: bool = False
    label_smoothing: float = 0.0
    pooling: Literal["avg", "max", "attention"] = "avg"
    bn_inference: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"head dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.pooling not in ("avg", "max", "attention"):
            raise ConfigError(f"head pooling must be 'avg', 'max' or 'attention', got {self.pooling!r}")


@dataclass(frozen=True)
class ImageAugmentation:
    """Image augmentation, active only in training (every layer XLA-compatible).

    Flips, contrast and brightness are Keras's random layers; rotation, zoom and shift are
    one :class:`tlkit.layers.RandomAffine` (the same sampling as Keras's ``RandomRotation``,
    ``RandomZoom`` and ``RandomTranslation`` with ``fill_mode="reflect"``, which XLA cannot
    compile), so ``jit_compile="auto"`` can turn XLA on for an augmented model.

    Attributes:
        horizontal_flip / vertical_flip: random flips (vertical is off by default:
            it breaks anatomy and text).
        rotation: max rotation as a fraction of a full turn (0.05 = +-18 degrees).
        zoom: max zoom in/out fraction. translation: max shift fraction.
        contrast / brightness: max relative change.
    """

    horizontal_flip: bool = True
    vertical_flip: bool = False
    rotation: float = 0.0
    zoom: float = 0.1
    translation: float = 0.0
    contrast: float = 0.0
    brightness: float = 0.0

    @property
    def enabled(self) -> bool:
        return any(
            (self.horizontal_flip, self.vertical_flip, self.rotation, self.zoom, self.translation,
             self.contrast, self.brightness)
        )

    def build_layer(self, spec: BackboneSpec, seed: int | None = None) -> keras.layers.Layer | None:
        """A ``keras.Sequential`` of random layers for input already preprocessed per ``spec``."""
        if not self.enabled:
            return None
        layers: list[keras.layers.Layer] = []
        flip = {(True, True): "horizontal_and_vertical", (True, False): "horizontal", (False, True): "vertical"}
        mode = flip.get((self.horizontal_flip, self.vertical_flip))
        if mode:
            layers.append(keras.layers.RandomFlip(mode, seed=seed))
        if self.rotation or self.zoom or self.translation:
            # One XLA-compatible resampling, not Keras's RandomRotation/RandomZoom/RandomTranslation:
            # those set supports_jit=False, which turns jit_compile="auto" off for the whole model.
            layers.append(RandomAffine(self.zoom, self.translation, self.rotation, seed=seed))
        if self.contrast:
            low, high = _value_range(spec.preprocessing)  # type: ignore[arg-type]
            layers.append(keras.layers.RandomContrast(self.contrast, value_range=(low, high), seed=seed))
        if self.brightness:
            low, high = _value_range(spec.preprocessing)  # type: ignore[arg-type]
            layers.append(keras.layers.RandomBrightness(self.brightness, value_range=(low, high), seed=seed))
        return TrainingOnly(layers, name="augment")


class Augmentation(Protocol):
    """Anything with ``build_layer(spec, seed) -> keras.layers.Layer | None`` (image or audio)."""

    def build_layer(self, spec: BackboneSpec, seed: int | None = None) -> keras.layers.Layer | None: ...


def _value_range(pre: ImagePreprocessing) -> tuple[float, float]:
    """The range 0..255 pixels take after ``pre`` (over all channels)."""
    ends = []
    for pixel in (0.0, 255.0):
        for mean, std in zip(pre.mean, pre.std):
            ends.append((pixel * pre.scale + pre.offset - mean) / std)
    return min(ends), max(ends)


def build_classifier(
    backbone: str | BackboneSpec,
    num_classes: int,
    *,
    weights: str | None = "pretrained",
    head: HeadConfig | None = None,
    augmentation: Augmentation | None = None,
    image_size: int | tuple[int, int] | None = None,
    seed: int | None = None,
    name: str = "tlkit_classifier",
) -> keras.Model:
    """Builds the transfer-learning classifier as a functional ``keras.Model``.

    Args:
        backbone: registry name, TF-Hub handle, SavedModel directory, ``.keras`` file or spec.
        num_classes: number of output classes (>= 2, or >= 1 with ``multi_label``).
        weights: ``"pretrained"``, ``None`` for random init, or a weights file path.
        head: head options (default :class:`HeadConfig`).
        augmentation: e.g. :class:`ImageAugmentation`; ``None`` disables augmentation.
        image_size: resize target, default the backbone's own input size.
        seed: seed of the augmentation layers.

    Returns:
        A model taking raw input: images (B, H, W, 3) with pixel values 0..255 of any
        H, W (float32; uint8 values cast), or waveforms (B, samples) float32 in -1..1 at
        the backbone's sample rate. It outputs (B, num_classes) float32 probabilities.
        The backbone spec and its resolved layer groups are attached as ``model.tlkit_spec``
        and ``model.tlkit_groups`` (Python attributes, not saved with the model). With
        ``head.bn_inference`` (the default) the backbone's BatchNorm layers are
        :class:`~tlkit.layers.FrozenBatchNormalization` (same weights, same outputs).
    """
    head = head or HeadConfig()
    if num_classes < (1 if head.multi_label else 2):
        raise ConfigError(f"num_classes must be at least 2 for single-label classification, got {num_classes}")
    trunk = build_trunk(backbone, weights=weights, head=head, augmentation=augmentation, image_size=image_size,
                        seed=seed)
    outputs = add_head(trunk.features, head, num_classes, head.multi_label)
    return trunk.model(outputs, head, name)


def add_head(x: Any, head: HeadConfig, num_classes: int, multi_label: bool, prefix: str = "",
             output_name: str = "probabilities") -> Any:
    """The head layers on pooled features ``x`` (B, C): ``<prefix>dropout_<i>`` -> ``<prefix>hidden_<i>``
    -> ``<prefix>dropout`` -> ``<prefix>logits`` -> ``output_name`` (softmax, or sigmoid when
    ``multi_label``), float32 probabilities (B, num_classes)."""
    for index, units in enumerate(head.hidden_units):
        if head.dropout:
            x = keras.layers.Dropout(head.dropout, name=f"{prefix}dropout_{index}")(x)
        x = keras.layers.Dense(units, activation="relu", name=f"{prefix}hidden_{index}")(x)
    if head.dropout:
        x = keras.layers.Dropout(head.dropout, name=f"{prefix}dropout")(x)
    logits = keras.layers.Dense(num_classes, name=f"{prefix}logits")(x)
    activation = "sigmoid" if multi_label else "softmax"
    return keras.layers.Activation(activation, dtype="float32", name=output_name)(logits)


@dataclass(frozen=True)
class Trunk:
    """Everything of a classifier up to its pooled features: raw input -> ... -> ``pool``.

    Attributes:
        spec: the backbone spec (resolved by the backbone's loader).
        backbone: the backbone layer (``"backbone"``), BatchNorm frozen when the head says so.
        inputs: the raw-input ``keras.Input``; features: the pooled (B, C) tensor.
    """

    spec: BackboneSpec
    backbone: Any
    inputs: Any
    features: Any

    def model(self, outputs: Any, head: HeadConfig, name: str) -> keras.Model:
        """The functional model from the raw input to ``outputs`` (a tensor or a dict of them), with
        ``tlkit_spec``, ``tlkit_groups`` and ``tlkit_head`` attached."""
        model = keras.Model(self.inputs, outputs, name=name)
        model.tlkit_spec = self.spec  # type: ignore[attr-defined]
        model.tlkit_groups = resolve_groups(self.spec, self.backbone)  # type: ignore[attr-defined]
        model.tlkit_head = head  # type: ignore[attr-defined]
        return model


def build_trunk(
    backbone: str | BackboneSpec,
    *,
    weights: str | None = "pretrained",
    head: HeadConfig,
    augmentation: Augmentation | None = None,
    image_size: int | tuple[int, int] | None = None,
    seed: int | None = None,
) -> Trunk:
    """The shared part of every tlkit classifier (see :func:`build_classifier` for the arguments):
    ``resize``/``frontend`` -> ``preprocess`` -> ``augment`` -> ``backbone`` -> ``pool``."""
    spec = get_spec(backbone)
    if spec.modality == "image":
        size = _image_size(spec, image_size)
        spec, base = load_backbone(spec, weights, input_shape=(*size, 3))
        inputs, x = _image_input(spec, size)
    else:
        spec, base = load_backbone(spec, weights)
        inputs, x = _audio_input(spec)
    if head.bn_inference:
        base = with_frozen_batchnorm(base)
    if augmentation is not None:
        augment = augmentation.build_layer(spec, seed)
        if augment is not None:
            x = augment(x)
    x = base(x)
    return Trunk(spec, base, inputs, _pool(spec, x, head.pooling))


def _image_size(spec: BackboneSpec, image_size: int | tuple[int, int] | None) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    return (int(image_size[0]), int(image_size[1])) if image_size else spec.image_size


def _image_input(spec: BackboneSpec, size: tuple[int, int]) -> tuple[Any, Any]:
    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    x = keras.layers.Resizing(size[0], size[1], name="resize")(inputs)
    pre = spec.preprocessing
    if not isinstance(pre, ImagePreprocessing):
        raise ConfigError(f"image backbone {spec.name!r} has audio preprocessing {pre!r}")
    x = ImageNormalization.from_spec(pre, name="preprocess")(x)
    return inputs, x


def _audio_input(spec: BackboneSpec) -> tuple[Any, Any]:
    frontend = spec.preprocessing
    if not isinstance(frontend, AudioFrontend):
        raise ConfigError(f"audio backbone {spec.name!r} has image preprocessing {frontend!r}")
    inputs = keras.Input(shape=(None,), dtype="float32", name="waveform")
    if frontend.kind == "log_mel":
        from tlkit.frontends import LogMelSpectrogram

        return inputs, LogMelSpectrogram.from_spec(frontend, name="frontend")(inputs)
    if frontend.normalize:
        return inputs, WaveformStandardization(name="frontend")(inputs)
    return inputs, inputs


@keras.saving.register_keras_serializable(package="tlkit")
class AttentionPooling(keras.layers.Layer):
    """Attention pooling: ``sum_t softmax_t(x_t . w + b) * x_t``.

    Input: (B, T, C) sequence features, or (B, h, w, C) spatial features (positions
    flattened). Output: (B, C). One learned score per step; its C + 1 weights are outside
    the backbone's layer groups, so staged unfreezing never freezes them.
    """

    def build(self, input_shape: Any) -> None:
        channels = int(input_shape[-1])
        self.score = self.add_weight(
            name="score", shape=(channels, 1), initializer="glorot_uniform", trainable=True
        )
        self.score_bias = self.add_weight(name="score_bias", shape=(1,), initializer="zeros", trainable=True)

    def call(self, inputs: Any) -> Any:
        x = inputs
        if len(x.shape) == 4:
            x = keras.ops.reshape(x, (keras.ops.shape(x)[0], -1, keras.ops.shape(x)[-1]))
        logits = keras.ops.matmul(x, keras.ops.cast(self.score, x.dtype)) + keras.ops.cast(self.score_bias, x.dtype)
        weights = keras.ops.softmax(keras.ops.cast(logits, "float32"), axis=1)
        return keras.ops.sum(keras.ops.cast(weights, x.dtype) * x, axis=1)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return (input_shape[0], input_shape[-1])


def _pool(spec: BackboneSpec, x: Any, pooling: str) -> Any:
    rank = len(x.shape)
    if rank == 2:
        return keras.layers.Identity(name=FEATURES_LAYER)(x)
    if pooling == "attention" and rank in (3, 4):
        return AttentionPooling(name=FEATURES_LAYER)(x)
    if rank == 3:
        layer = keras.layers.GlobalAveragePooling1D if pooling == "avg" else keras.layers.GlobalMaxPooling1D
    elif rank == 4:
        layer = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
    else:
        raise ConfigError(f"backbone {spec.name!r} returns rank-{rank} features; expected 2, 3 or 4")
    return layer(name=FEATURES_LAYER)(x)


def integer_labels(data: Any) -> bool:
    """Whether a dataset's targets are class indices rather than one-hot rows.

    Args:
        data: a batched ``tf.data.Dataset`` of ``(inputs, targets)``, or
            :class:`~tlkit.data.batches.Batches` (unbatched examples); anything else
            counts as one-hot.

    Returns:
        ``True`` for (B,) targets, or (B, 1) integer targets (what
        ``keras.utils.image_dataset_from_directory`` yields by default); ``False`` for
        (B, C) one-hot or multi-hot rows.
    """
    examples = getattr(data, "examples", None)
    batched = examples is None
    spec = getattr(examples if examples is not None else data, "element_spec", None)
    if not isinstance(spec, tuple) or len(spec) < 2 or not hasattr(spec[1], "shape"):
        return False
    target = spec[1]
    rank = target.shape.rank
    if rank is None:
        return False
    rank -= 1 if batched else 0  # the rank of one example's target
    return rank == 0 or (rank == 1 and target.shape[-1] == 1 and target.dtype.is_integer)


def classification_loss(head: HeadConfig, *, sparse: bool = False) -> keras.losses.Loss:
    """The loss matching the head: categorical or binary cross-entropy on probabilities.

    ``sparse``: the targets are class indices (see :func:`integer_labels`), single-label
    heads only; the loss is then ``SparseCategoricalCrossentropy``.

    Raises:
        DataError: ``sparse`` with a multi-label head (its targets are multi-hot rows).
    """
    if head.multi_label:
        if sparse:
            raise DataError(
                "a multi-label head needs multi-hot targets of shape (B, num_classes); the data has one "
                "class index per example: build the head with multi_label=False, or give multi-hot targets"
            )
        return keras.losses.BinaryCrossentropy(label_smoothing=head.label_smoothing)
    if sparse:
        if head.label_smoothing:
            raise DataError(
                f"label_smoothing={head.label_smoothing} needs one-hot targets (Keras's sparse cross-entropy "
                "has no smoothing); one-hot encode the labels (keras.utils.to_categorical, or "
                "label_mode='categorical' in keras.utils.image_dataset_from_directory) or set label_smoothing=0"
            )
        return keras.losses.SparseCategoricalCrossentropy()
    return keras.losses.CategoricalCrossentropy(label_smoothing=head.label_smoothing)


def classification_metrics(head: HeadConfig, num_classes: int, *, sparse: bool = False) -> list[Any]:
    """Accuracy (and top-3 accuracy when there are more than 3 classes), named ``accuracy`` and
    ``top3_accuracy``; their sparse versions when the targets are class indices (``sparse``)."""
    if head.multi_label:
        return [keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc", multi_label=True)]
    if sparse:
        metrics: list[Any] = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        if num_classes > 3:
            metrics.append(keras.metrics.SparseTopKCategoricalAccuracy(k=3, name="top3_accuracy"))
        return metrics
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 3:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(k=3, name="top3_accuracy"))
    return metrics


def split_head(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Cuts a tlkit classifier into ``(feature_extractor, head)`` sharing the same layers.

    ``feature_extractor``: raw input -> pooled features (B, C). ``head``: (B, C) -> probabilities.
    Training ``head`` trains the full model's head, since the layer objects are shared.
    """
    features = model.get_layer(FEATURES_LAYER).output
    extractor = keras.Model(model.input, features, name="feature_extractor")
    head_input = keras.Input(shape=features.shape[1:], dtype=features.dtype, name="features")
    x = head_input
    for layer in model.layers:
        if layer.name.startswith(HEAD_LAYER_PREFIXES):
            x = layer(x)
    return extractor, keras.Model(head_input, x, name="head")


def backbone_groups(model: keras.Model) -> LayerGroups:
    """The layer groups of a tlkit classifier's backbone (re-resolved after a reload)."""
    groups = getattr(model, "tlkit_groups", None)
    if groups is not None:
        return groups
    from tlkit.backbones.groups import _by_depth, weighted_leaf_layers

    base = model.get_layer("backbone")
    spec = getattr(model, "tlkit_spec", None)
    if spec is not None:
        return resolve_groups(spec, base)
    by_variable = not isinstance(base, keras.Model)
    members = list(base.weights) if by_variable else weighted_leaf_layers(base)
    return _by_depth(base, members, by_variable)  # type: ignore[arg-type]
