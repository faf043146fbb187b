"""The four TFLite formats: one writer, parametrised by each record's :class:`TFLiteOptions`.

Input: a fixed input of one example at the run's ``image_size``: float32 (1, H, W, 3)
pixels 0..255 (resize first; :class:`tlkit.artifacts.TFLitePredictor` does it with the same
bilinear resize the Keras model uses), or (1, samples) for audio with
``samples = clip_seconds * sample_rate``: one window. A whole clip is scored as the run
scores it, the mean over ``max(eval_crops, ceil(samples / clip_samples))`` evenly spaced
windows, as ``metadata.json``'s ``audio_windows`` says (:class:`tlkit.artifacts.TFLitePredictor`
and ``tlkit predict`` do it). Float input was chosen over uint8 so that every
TFLite variant takes the same tensor as the Keras model; with ``int8_io`` the int8 model
takes and returns int8 tensors instead, quantized with the scale and zero point written
to ``metadata.json``.

Audio front-ends convert because :class:`tlkit.frontends.LogMelSpectrogram` computes its
STFT as a DFT-matrix product by default; a front-end built with ``dft="fft"`` and an
``n_fft`` that is not a power of two becomes ``RFFT2D``, which TFLite cannot prepare, so
the TFLite formats do not apply to it (:func:`tflite_blocker` says why).

Full-integer audio models keep their log-mel front-end and their LayerNorms in float32 and
quantize the rest (:func:`float_layer_names` says why; ``metadata.json`` lists the layers
under ``float_layers``): the waveform goes in float32 (or int8 with ``int8_io``, dequantized
for the front-end) and the int8 part starts at the log-mel features.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit.artifacts import (
    TFLITE_DYNAMIC_FILE,
    TFLITE_FP16_FILE,
    TFLITE_FP32_FILE,
    TFLITE_INT8_FILE,
    TFLitePredictor,
    labels_beside,
    make_interpreter,
    metadata_beside,
    task_output_names,
)
from tlkit.audio_windows import ClipWindows
from tlkit.errors import ExportError
from tlkit.export.formats import ExportContext, ExportFormat
from tlkit.export.multitask import tflite_converter, tflite_outputs_entry
from tlkit.export.quantize import applied, bias_corrections, selective_int8
from tlkit.export.source import ExportSource
from tlkit.frontends import LogMelSpectrogram
from tlkit.model_info import all_layers
from tlkit.text import first_line

try:
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )
except ImportError:  # pragma: no cover - TF moved it; the converter's own freezing path follows
    convert_variables_to_constants_v2 = None


@dataclass(frozen=True)
class TFLiteOptions:
    """How one TFLite format is converted.

    Attributes:
        optimize: ``tf.lite.Optimize.DEFAULT`` (weight quantization).
        float16: float16 weights.
        full_integer: int8 weights and activations, calibrated on representative examples.
        int8_weights_min_elements: for formats whose weights the converter rounds to int8,
            the smallest weight tensor it rounds (bias correction follows the same rule);
            ``None``: no int8 weights, no bias correction.
        float_audio_layers: with ``full_integer``, an audio model's log-mel front-ends
            (:class:`tlkit.frontends.LogMelSpectrogram`) and ``LayerNormalization`` layers
            stay float32 and the rest is int8 (:func:`tlkit.export.quantize.selective_int8`;
            see :func:`float_layer_names` for why).
    """

    optimize: bool = False
    float16: bool = False
    full_integer: bool = False
    int8_weights_min_elements: int | None = None
    float_audio_layers: bool = False


def write_tflite(fmt: ExportFormat, source: ExportSource, directory: Path, context: ExportContext) -> dict[str, Any]:
    """Converts the model as ``fmt.options`` says, writes ``directory / fmt.file``; returns its metadata entry.

    Formats with int8 weights are bias-corrected first when ``context.bias_correction``
    (on a copy of the weights put back afterwards); a correction that fails converts
    uncorrected and says so in the entry's ``bias_correction``.
    """
    options: TFLiteOptions = fmt.options
    min_elements = options.int8_weights_min_elements
    correct = context.bias_correction and min_elements is not None
    examples = context.calibration() if options.full_integer or correct else None
    changes: list[tuple[Any, np.ndarray]] = []
    status: Any = "off"
    if correct:
        assert examples is not None and min_elements is not None
        try:
            changes = bias_corrections(source.model, examples, min_elements)
            status = {"layers": len(changes), "examples": len(examples)}
        except Exception as exc:  # an optional refinement: an unusual model converts uncorrected
            status = f"not applied ({type(exc).__name__}: {first_line(exc)})"
    with applied(changes):
        data, float_layers = _convert(source, options, examples if options.full_integer else None, context.int8_io)
    path = directory / fmt.file
    path.write_bytes(data)
    quantization = fmt.quantization + (f"; kept in float32: {', '.join(float_layers)}" if float_layers else "")
    info = {"quantization": quantization, **_tflite_io(path, source)}
    if float_layers:
        info["float_layers"] = float_layers
    if min_elements is not None:
        info["bias_correction"] = status
    return info


def reload_tflite(fmt: ExportFormat, path: Path, source: ExportSource) -> TFLitePredictor:
    return TFLitePredictor(str(path), labels_beside(path), windows=ClipWindows.from_metadata(metadata_beside(path)),
                           tasks=source.tasks, output_names=task_output_names(path))


def tflite_blocker(source: ExportSource) -> str:
    """Why the run's model cannot become a TFLite file ("" when nothing known stops it)."""
    for layer in all_layers(source.model):
        if isinstance(layer, LogMelSpectrogram) and layer.dft == "fft" and layer.n_fft & (layer.n_fft - 1):
            return (
                f"the log-mel front-end {layer.name!r} computes its STFT with an FFT of n_fft={layer.n_fft}, "
                "which TFLite converts to RFFT2D and only prepares for power-of-two lengths; rebuild the "
                "front-end with dft='matmul' (the default) or a power-of-two n_fft"
            )
    return ""


def converts_to_tflite(source: ExportSource) -> bool:
    """``applies_to`` of the TFLite formats (see :func:`tflite_blocker`)."""
    return not tflite_blocker(source)


def float_layer_names(source: ExportSource) -> list[str]:
    """The layers an audio model's full-integer TFLite keeps in float32 (``[]`` for images).

    Its log-mel front-ends: the power spectrum spans far more range than int8 holds (one int8
    scale keeps about 24 dB of it, and the log brings the lost quiet bands back). And its
    ``LayerNormalization`` layers: TFLite computes them as mean, variance and rsqrt, each
    re-quantized, from a transformer's residual stream, whose few large channels set the int8
    scale for all. Measured on a Whisper tiny.en run (4 classes, 48 held-out clips), top-1
    agreement with the Keras model: 0.229 quantized whole, 0.688 with the front-end float,
    0.979 with the LayerNorms float too (8.9 MB against 8.4 MB).
    """
    if source.modality != "audio":
        return []
    return [layer.name for layer in all_layers(source.model)
            if isinstance(layer, (LogMelSpectrogram, keras.layers.LayerNormalization))]


def _convert(source: ExportSource, options: TFLiteOptions, calibration: list[np.ndarray] | None,
             int8_io: bool) -> tuple[bytes, list[str]]:
    """The TFLite flatbuffer of the model at the fixed input size (batch 1, float32 input), and
    the layers kept in float32 in a full-integer model (``[]`` when none)."""
    model = source.model

    class Fixed(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="tlkit_tflite")
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([1, *source.fixed_shape], tf.float32, name=source.input_name)])
        def serve(self, raw: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"probabilities": self.model(raw, training=False)}

    module = Fixed()
    function = module.serve.get_concrete_function()
    if source.tasks is not None:  # one output per task, named (tlkit.export.multitask)
        converter = tflite_converter(model, source.tasks, tf.TensorSpec([1, *source.fixed_shape], tf.float32,
                                                                         name=source.input_name))
    elif convert_variables_to_constants_v2 is None:  # pragma: no cover
        converter = tf.lite.TFLiteConverter.from_concrete_functions([function])
    else:
        # Freeze the weights into constants first. Handing the converter the live function
        # (its SavedModel path) left some models with READ_VARIABLE ops reading uninitialised
        # variables: wrong outputs in fp32 and no weight quantization.
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [convert_variables_to_constants_v2(function)], module
        )
    if options.optimize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if options.float16:
        converter.target_spec.supported_types = [tf.float16]
    if options.full_integer:
        assert calibration is not None

        def representative() -> Iterator[list[np.ndarray]]:
            for example in calibration:
                yield [example[None].astype(np.float32)]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    float_layers = float_layer_names(source) if options.full_integer and options.float_audio_layers else []
    try:
        with warnings.catch_warnings():
            # Emitted for float-input models under Optimize.DEFAULT; the inputs stay float on purpose.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
            if float_layers:
                data, nodes = selective_int8(converter, representative, float_layers, int8_io)
                return data, float_layers if nodes else []
            return converter.convert(), []
    except Exception as exc:
        raise ExportError(f"TFLite conversion failed: {type(exc).__name__}: {first_line(exc)}") from exc


def _tflite_io(path: Path, source: ExportSource) -> dict[str, Any]:
    """The ``input`` / ``output`` metadata entries, read back from the written file."""
    interpreter, _ = make_interpreter(str(path), 1)
    entry: dict[str, Any] = {}
    for key, details in (("input", interpreter.get_input_details()[0]), ("output", interpreter.get_output_details()[0])):
        dtype = np.dtype(details["dtype"]).name
        spec: dict[str, Any] = {"name": source.input_name if key == "input" else "probabilities",
                                "dtype": dtype, "shape": [int(v) for v in details["shape"]]}
        if key == "input":
            spec["range"] = [0, 255] if source.modality == "image" else [-1.0, 1.0]
            spec["layout"] = (
                "RGB, channels last, resized to this size (bilinear, as keras.layers.Resizing)"
                if source.modality == "image" else
                f"mono, {source.sample_rate} Hz, one window; score a clip as the mean over the windows "
                "that metadata.json's audio_windows describes"
            )
        if dtype.startswith(("int", "uint")):
            scale, zero_point = details["quantization"]
            spec["quantization"] = {"scale": float(scale), "zero_point": int(zero_point),
                                    "real_value": "(q - zero_point) * scale"}
        entry[key] = spec
    if source.tasks is not None:  # one output per task, by its signature name
        del entry["output"]
        entry["outputs"] = tflite_outputs_entry(interpreter, source.tasks)
    return entry


def _tflite(name: str, file: str, min_agreement: float, quantization: str, options: TFLiteOptions) -> ExportFormat:
    return ExportFormat(name=name, file=file, min_agreement=min_agreement, quantization=quantization,
                        write=write_tflite, reload=reload_tflite, options=options, applies_to=converts_to_tflite,
                        not_applicable="the model holds an op TFLite cannot convert", why_not=tflite_blocker)


# The dynamic-range quantizer leaves weight tensors under 1024 elements in float; the
# full-integer one rounds them all.
TFLITE_FORMATS: tuple[ExportFormat, ...] = (
    _tflite("tflite-fp32", TFLITE_FP32_FILE, 0.99, "none (float32)", TFLiteOptions()),
    _tflite("tflite-fp16", TFLITE_FP16_FILE, 0.99, "float16 weights, float32 compute on CPU",
            TFLiteOptions(optimize=True, float16=True)),
    _tflite("tflite-dynamic", TFLITE_DYNAMIC_FILE, 0.9,
            "dynamic range: int8 weights, activations quantized on the fly",
            TFLiteOptions(optimize=True, int8_weights_min_elements=1024)),
    _tflite("tflite-int8", TFLITE_INT8_FILE, 0.9,
            "full integer: int8 weights and activations, calibrated on training examples",
            TFLiteOptions(optimize=True, full_integer=True, int8_weights_min_elements=0,
                          float_audio_layers=True)),
)
"""The TFLite records, in build order."""
