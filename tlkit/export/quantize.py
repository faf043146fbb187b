"""Int8 refinements for the TFLite formats: bias correction and float islands.

Bias correction, for the formats whose weights the converter rounds to int8
(``tflite-dynamic``, ``tflite-int8``): :func:`bias_corrections` measures the mean output
shift the rounding causes on calibration examples and :func:`applied` puts the corrections
into the Keras model only while it is converted.

Selective quantization, for ``tflite-int8``: :func:`selective_int8` converts a model to full
integer except the ops under given name scopes, which stay float32 (TFLite's
``tf.lite.experimental.QuantizationDebugger`` with ``denylisted_nodes``). A log-mel front-end
is kept float this way: its power spectrum spans far more range than int8 holds.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

try:
    from keras.src.models.functional import Functional
except ImportError:  # pragma: no cover - Keras moved it: correct the top level only
    Functional = ()  # type: ignore[assignment,misc]

CORRECTION_BATCH = 16
"""Calibration examples run through the probe model at once."""

Corrections = list[tuple[Any, np.ndarray]]
"""``(variable, delta)`` pairs."""

Levels = list[tuple[Any, list[tuple[Any, np.ndarray, Any]], list[Any]]]
"""Per functional (sub)model: ``(model, [(layer, kernel error, BatchNorm or None)], sub-models)``."""


@contextlib.contextmanager
def applied(changes: Corrections) -> Iterator[None]:
    """Adds each ``delta`` to its variable for the block; the original values are put back on exit."""
    originals = [(variable, variable.numpy()) for variable, _ in changes]
    try:
        for variable, delta in changes:
            variable.assign(variable.numpy() + delta.astype(variable.numpy().dtype))
        yield
    finally:
        for variable, value in originals:
            variable.assign(value)


@contextlib.contextmanager
def bias_corrected(model: Any, examples: list[np.ndarray], min_elements: int) -> Iterator[int]:
    """:func:`bias_corrections` applied to ``model`` for the block; yields the layer count."""
    changes = bias_corrections(model, examples, min_elements)
    with applied(changes):
        yield len(changes)


def bias_corrections(model: Any, examples: list[np.ndarray], min_elements: int) -> Corrections:
    """Bias correction for int8 weights: ``(variable, delta)`` pairs that remove the mean error.

    The TFLite converter rounds each kernel to int8 per output channel (symmetric,
    ``scale = max|w| / 127``; a following BatchNorm is folded in first, which scales each
    channel and so leaves the rounding unchanged). That rounding error ``dW`` is small
    per weight, but its effect on a layer's output, ``x * dW``, has a non-zero mean
    wherever the inputs do: ReLU6 outputs are positive, and images with flat regions
    (backgrounds, scanned digits) feed the same values at every position. Such a shift is
    the same at every position, so global pooling keeps all of it, and it adds up
    through the network. Here each layer's mean shift ``E[x * dW]`` per output channel is
    measured on the calibration examples (inputs from the float model) and subtracted
    from the layer's bias, or added to the moving mean of the BatchNorm that directly
    follows a layer without bias (Nagel et al. 2019, "Data-Free Quantization Through
    Weight Equalization and Bias Correction", empirical variant).

    Covered: Keras ``Conv1D``, ``Conv2D``, ``DepthwiseConv1D``, ``DepthwiseConv2D`` and
    ``Dense`` layers (channels last, float32 kernels of at least ``min_elements``, one
    call site), also inside nested functional models. Anything else (a SavedModel
    backbone, shared layers) is left as it is.
    """
    per_level = _correction_targets(model, min_elements)
    if not any(targets for _, targets, _ in per_level):
        return []
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for start in range(0, len(examples), CORRECTION_BATCH):
        batch = np.stack(examples[start:start + CORRECTION_BATCH]).astype(np.float32)
        _accumulate_errors(model, batch, per_level, sums, counts)
    changes: Corrections = []
    for _, targets, _ in per_level:
        for layer, error, bn in targets:
            if id(layer) not in sums:
                continue
            mean = sums[id(layer)] / max(counts[id(layer)], 1)
            if bn is not None:
                changes.append((bn.moving_mean, mean))  # BN subtracts it: (x + e) - (mean + e)
            else:
                changes.append((layer.bias, -mean))
    return changes


def _correction_targets(model: Any, min_elements: int) -> Levels:
    """Per functional (sub)model: ``(model, [(layer, kernel error, BatchNorm or None)], sub-models)``."""
    conv = (keras.layers.Conv1D, keras.layers.Conv2D)
    depthwise = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
    levels: Levels = []

    def walk(m: Any) -> None:
        if len(getattr(m, "inputs", None) or []) != 1:
            return
        targets: list[tuple[Any, np.ndarray, Any]] = []
        children: list[Any] = []
        for layer in m.layers:
            if len(getattr(layer, "_inbound_nodes", [])) != 1:
                continue  # an input layer, or a layer called more than once
            if Functional and isinstance(layer, Functional):
                children.append(layer)
                continue
            if type(layer) not in (*conv, *depthwise, keras.layers.Dense):
                continue
            if getattr(layer, "quantization_mode", None) or str(layer.kernel.dtype) != "float32":
                continue
            if getattr(layer, "data_format", "channels_last") != "channels_last":
                continue
            kernel = np.asarray(layer.kernel.numpy(), np.float64)
            if kernel.size < min_elements:
                continue
            bn = _following_batchnorm(layer)
            if not layer.use_bias and bn is None:
                continue
            if layer.use_bias:
                bn = None
            # Per output channel: the last axis, or (channels, multiplier) for depthwise.
            keep = 2 if isinstance(layer, depthwise) else 1
            axes = tuple(range(kernel.ndim - keep))
            scale = np.max(np.abs(kernel), axis=axes, keepdims=True) / 127.0
            rounded = np.where(scale > 0, np.round(kernel / np.where(scale > 0, scale, 1.0)) * scale, 0.0)
            targets.append((layer, (rounded - kernel).astype(np.float32), bn))
        levels.append((m, targets, children))
        for child in children:
            walk(child)

    walk(model)
    return levels


def _following_batchnorm(layer: Any) -> Any:
    """The BatchNormalization (over the channel axis) that alone consumes a linear layer's output."""
    if getattr(getattr(layer, "activation", None), "__name__", "") != "linear":
        return None
    outbound = getattr(layer, "_outbound_nodes", [])
    if len(outbound) != 1:
        return None
    bn = outbound[0].operation
    if not isinstance(bn, keras.layers.BatchNormalization) or len(getattr(bn, "_inbound_nodes", [])) != 1:
        return None
    rank = len(layer.output.shape)
    return bn if bn.axis in (-1, rank - 1) else None


def _accumulate_errors(
    m: Any,
    batch: Any,
    per_level: Levels,
    sums: dict[int, np.ndarray],
    counts: dict[int, int],
) -> None:
    """Adds, per target layer of ``m`` (and of its sub-models), the summed output error of one batch."""
    level = next((entry for entry in per_level if entry[0] is m), None)
    if level is None:
        return
    _, targets, children = level
    layers = [t[0] for t in targets] + children
    if not layers:
        return
    probe = keras.Model(m.inputs[0], [layer._inbound_nodes[0].input_tensors[0] for layer in layers])
    values = probe(batch, training=False)
    values = values if isinstance(values, (list, tuple)) else [values]
    for (layer, error, _), x in zip(targets, values[: len(targets)]):
        if isinstance(layer, keras.layers.Dense):
            y = keras.ops.matmul(x, error)
        elif isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
            y = keras.ops.depthwise_conv(x, error, strides=layer.strides, padding=layer.padding,
                                         data_format="channels_last", dilation_rate=layer.dilation_rate)
        else:
            y = layer.convolution_op(x, error)
        y = np.asarray(keras.ops.convert_to_numpy(y), np.float64)
        flat = y.reshape(-1, y.shape[-1])
        sums[id(layer)] = sums.get(id(layer), 0.0) + flat.sum(axis=0)
        counts[id(layer)] = counts.get(id(layer), 0) + flat.shape[0]
    for child, x in zip(children, values[len(targets):]):
        _accumulate_errors(child, x, per_level, sums, counts)


def selective_int8(
    converter: Any,
    representative: Callable[[], Iterable[list[np.ndarray]]],
    float_scopes: list[str],
    fully_quantize: bool,
) -> tuple[bytes, list[str]]:
    """Full-integer TFLite except the ops under ``float_scopes``, which stay float32.

    Args:
        converter: a ``tf.lite.TFLiteConverter`` set up for full-integer conversion
            (``Optimize.DEFAULT`` and ``representative_dataset``).
        representative: the calibration generator factory (what ``representative_dataset`` is).
        float_scopes: Keras layer names whose ops are kept in float; in the converted graph an
            op belongs to layer ``name`` when a path segment of its output tensor's name is
            ``name`` or ``name_<n>`` (TensorFlow's name scope of the layer call).
        fully_quantize: int8 input and output tensors as well (else float32 ones).

    Returns:
        The flatbuffer and the names of the ops kept in float (empty when no op matched: then
        the model is quantized whole, as without this function).

    The converter first calibrates (``QuantizationDebugger`` runs the representative data
    through the float graph), then the MLIR quantizer quantizes every op except the denylisted
    nodes, with quantize / dequantize ops at the edges of the float region.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the debugger's interpreter is tf.lite's deprecated one
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=representative,
            debug_options=tf.lite.experimental.QuantizationDebugOptions(fully_quantize=fully_quantize))
        nodes = nodes_under(debugger.calibrated_model, float_scopes)
        if nodes:
            debugger.options = tf.lite.experimental.QuantizationDebugOptions(
                denylisted_nodes=nodes, fully_quantize=fully_quantize)
        return debugger.get_nondebug_quantized_model(), nodes


def nodes_under(model: bytes, scopes: list[str]) -> list[str]:
    """Output tensor names of the ops of a TFLite ``model`` that sit under one of the name ``scopes``.

    A fused op's name joins its parts with ``;``; it is under a scope when any part is.
    """
    if not scopes:
        return []
    pattern = re.compile("(?:^|/)(?:" + "|".join(re.escape(s) for s in scopes) + r")(?:_\d+)?/")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_content=model)
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    found: list[str] = []
    for op in interpreter._get_ops_details():  # the same op listing the debugger itself reads
        for index in op["outputs"]:
            name = names.get(int(index), "")
            if any(pattern.search(part) for part in name.split(";")) and name not in found:
                found.append(name)
    return found
