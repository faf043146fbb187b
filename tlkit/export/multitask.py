"""Multi-task exports: one set of outputs per task in every format, and parity per task.

A multi-task run's model returns ``{task: (B, C_task) probabilities}`` (see
:mod:`tlkit.task_outputs`). Its exports keep the tasks apart, each output named after its task:

- SavedModel: ``<task>_probabilities`` float32 (B, C_task), ``<task>_labels`` string (B, k) and
  ``<task>_scores`` float32 (B, k), the top k = min(5, C_task) classes of the task, best first;
- TFLite: one signature output ``<task>_probabilities`` per task, read by name through the
  signature runner (the interpreter's tensor order need not follow the tasks); the frozen
  graph goes through a SavedModel so that the converter keeps those names;
- ``.keras``: the model itself (its call returns the dict); ONNX: one graph output per task,
  matched to its task by name, else by value against the Keras model.

``metadata.json`` names every task's output (``artifacts.<format>.outputs.<task>``), so a
reader never relies on output positions. Parity compares every task with the Keras model on
the same examples; the artifact passes only if every task does.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from tlkit.artifacts import MAX_TOP_K, onnxruntime_module
from tlkit.errors import ExportError
from tlkit.task_outputs import TaskLayout

try:
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )
except ImportError:  # pragma: no cover - TF moved it; the converter then freezes the SavedModel itself
    convert_variables_to_constants_v2 = None


def probabilities_name(task: str) -> str:
    """The output holding one task's probabilities (SavedModel, TFLite)."""
    return f"{task}_probabilities"


def serving_outputs(outputs: Mapping[str, tf.Tensor], tasks: TaskLayout,
                    label_names: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """The SavedModel signature's outputs: per task its probabilities, top labels and their scores."""
    result: dict[str, tf.Tensor] = {}
    for head in tasks.heads:
        probabilities = tf.cast(outputs[head.name], tf.float32)
        scores, indices = tf.math.top_k(probabilities, k=min(MAX_TOP_K, len(head.labels)))
        result[probabilities_name(head.name)] = probabilities
        result[f"{head.name}_labels"] = tf.gather(label_names[head.name], indices)
        result[f"{head.name}_scores"] = scores
    return result


def window_scores(score: Any, model: Any, raw: tf.Tensor, tasks: TaskLayout, clip_samples: int, crops: int
                  ) -> dict[str, tf.Tensor]:
    """Audio: each task's clip scores, the mean over the windows (``score`` is
    :func:`tlkit.audio_windows.tf_score_windows`, run on the tasks' joined probabilities)."""
    names = tasks.names

    def joined(x: tf.Tensor) -> tf.Tensor:
        out = model(x, training=False)
        return tf.concat([tf.cast(out[t], tf.float32) for t in names], axis=-1)

    flat = score(joined, raw, clip_samples, crops)
    return {t: flat[:, part] for t, part in tasks.slices().items()}


def savedmodel_outputs_entry(tasks: TaskLayout) -> dict[str, Any]:
    """``metadata.json`` ``outputs`` of a multi-task SavedModel."""
    entry: dict[str, Any] = {}
    for head in tasks.heads:
        k = min(MAX_TOP_K, len(head.labels))
        entry[probabilities_name(head.name)] = {"dtype": "float32", "shape": [None, len(head.labels)], "task": head.name}
        entry[f"{head.name}_labels"] = {"dtype": "string", "shape": [None, k], "task": head.name,
                                        "meaning": f"top {k} {head.name} class names, best first"}
        entry[f"{head.name}_scores"] = {"dtype": "float32", "shape": [None, k], "task": head.name,
                                        "meaning": "their probabilities"}
    return entry


def keras_outputs_entry(tasks: TaskLayout) -> dict[str, Any]:
    """``metadata.json`` ``outputs`` of a multi-task ``.keras`` model (its call returns a dict by task)."""
    return {h.name: {"name": h.name, "dtype": "float32", "shape": [None, len(h.labels)], "meaning": "probabilities"}
            for h in tasks.heads}


def tflite_converter(model: Any, tasks: TaskLayout, input_spec: tf.TensorSpec) -> tf.lite.TFLiteConverter:
    """A converter for the model at a fixed input whose signature outputs are ``<task>_probabilities``.

    The weights are frozen into constants first, as for single-task models (the converter's
    own path left some models reading uninitialised variables). A frozen function loses its
    output names (the converter would call them ``output_0``...), so it is wrapped in one that
    names them again and saved as a SavedModel, whose signature the converter keeps (the
    converter reads that folder when it converts; it is removed with the converter).
    """
    names = tasks.names

    class Fixed(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="tlkit_tflite")
            self.model = model

        @tf.function(input_signature=[input_spec])
        def serve(self, raw: tf.Tensor) -> dict[str, tf.Tensor]:
            out = self.model(raw, training=False)
            return {probabilities_name(t): tf.cast(out[t], tf.float32) for t in names}

    module = Fixed()
    function = module.serve.get_concrete_function()
    if convert_variables_to_constants_v2 is not None:
        frozen = convert_variables_to_constants_v2(function)
        structure = function.structured_outputs

        class Named(tf.Module):
            @tf.function(input_signature=[input_spec])
            def serve(self, raw: tf.Tensor) -> dict[str, tf.Tensor]:
                # The frozen function returns its outputs flattened (tf.nest order); pack them back.
                return tf.nest.pack_sequence_as(structure, frozen(raw))

        module = Named()
    folder = tempfile.mkdtemp(prefix="tlkit-tflite-")
    try:
        tf.saved_model.save(module, folder, signatures={"serving_default": module.serve})
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(converter, shutil.rmtree, folder, True)
    return converter


def tflite_outputs_entry(interpreter: Any, tasks: TaskLayout) -> dict[str, Any]:
    """``metadata.json`` ``outputs`` of a multi-task TFLite file: per task its signature output
    (name, dtype, shape, quantization), read back from the written file.

    Raises:
        ExportError: a task has no output of its name (the conversion lost the names).
    """
    details = interpreter.get_signature_runner().get_output_details()
    entry: dict[str, Any] = {}
    for head in tasks.heads:
        name = probabilities_name(head.name)
        if name not in details:
            raise ExportError(f"the TFLite file has outputs {sorted(details)}, none named {name!r} for task "
                              f"{head.name!r}")
        spec: dict[str, Any] = {"name": name, "dtype": np.dtype(details[name]["dtype"]).name,
                                "shape": [int(v) for v in details[name]["shape"]], "meaning": "probabilities"}
        if spec["dtype"].startswith(("int", "uint")):
            scale, zero_point = details[name]["quantization"]
            spec["quantization"] = {"scale": float(scale), "zero_point": int(zero_point),
                                    "real_value": "(q - zero_point) * scale"}
        entry[head.name] = spec
    return entry


def onnx_outputs_entry(path: Path, model: Any, tasks: TaskLayout, shape: tuple[int, ...]) -> dict[str, Any]:
    """``metadata.json`` ``outputs`` of a multi-task ONNX file: each task's graph output, by the
    task's name when a graph output carries it, else the one whose values on a probe input are
    nearest the Keras model's for that task (same shape required).

    Raises:
        ExportError: a task cannot be matched to a graph output of its shape.
    """
    session = onnxruntime_module().InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe = np.random.default_rng(0).uniform(0, 255, size=(2, *shape)).astype(np.float32)
    graph = [o.name for o in session.get_outputs()]
    values = dict(zip(graph, session.run(graph, {session.get_inputs()[0].name: probe})))
    reference = model(probe, training=False)
    want = {t: np.asarray(reference[t], np.float32) for t in tasks.names}
    return {t: {"name": name, "dtype": "float32", "shape": [None, len(tasks.head(t).labels)],
                "meaning": "probabilities"} for t, name in match_outputs(values, want).items()}


def match_outputs(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Task -> artifact output: an output named after the task (exactly, or ``<task>_...`` /
    ``.../<task>``) wins; the rest go, closest first, to the output of the same shape whose values
    are nearest the task's reference.

    Raises:
        ExportError: a task has no free output of its shape.
    """
    chosen: dict[str, str] = {}
    for task in want:
        named = [n for n in got if n == task or n.startswith(f"{task}_") or n.split("/")[-1] == task
                 or n.split(":")[0] == task]
        if len(named) == 1 and named[0] not in chosen.values():
            chosen[task] = named[0]
    pairs = sorted(
        (float(np.max(np.abs(np.asarray(got[n], np.float32) - want[t]))), t, n)
        for t in want if t not in chosen for n in got
        if n not in chosen.values() and np.shape(got[n]) == np.shape(want[t])
    )
    for _, task, name in pairs:
        if task not in chosen and name not in chosen.values():
            chosen[task] = name
    missing = [t for t in want if t not in chosen]
    if missing:
        raise ExportError(f"no output of the artifact matches task(s) {missing} (outputs: "
                          f"{ {n: tuple(np.shape(v)) for n, v in got.items()} })")
    return {t: chosen[t] for t in want}


def task_parity(want: np.ndarray, have: np.ndarray, tasks: TaskLayout) -> dict[str, dict[str, float]]:
    """Per task: top-1 agreement and max |dp| of the artifact (``have``) with the Keras model
    (``want``), both (N, C_total) concatenated probabilities."""
    wanted, had = tasks.split(want), tasks.split(have)
    return {t: {"top1_agreement": float(np.mean(had[t].argmax(1) == wanted[t].argmax(1))),
                "max_abs_diff": float(np.max(np.abs(had[t] - wanted[t])))} for t in tasks.names}
