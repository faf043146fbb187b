"""The run being exported, read once through :class:`tlkit.rundir.RunDir`, and its examples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from keras.layers import TFSMLayer

from tlkit.artifacts import fit_fixed
from tlkit.audio_windows import METADATA_KEY, ClipWindows
from tlkit.data.audio import load_audio
from tlkit.data.images import Example
from tlkit.errors import ExportError
from tlkit.predict import load_image
from tlkit.model_info import all_layers
from tlkit.rundir import InputContract, RunDir
from tlkit.task_outputs import TaskLayout, run_layout
from tlkit.text import first_line


@dataclass
class ExportSource:
    """The run being exported, resolved once.

    Attributes:
        run: the run directory.
        name: the model name (the run config's ``name``, else the folder name).
        model: the run's Keras model, loaded by :meth:`RunDir.load_model` (``compile=False``).
        labels: class names in output order (multi-task: ``task:class`` of the tasks'
            concatenated probabilities, see :mod:`tlkit.task_outputs`).
        contract: the run's input contract (modality, image size or sample rate and clip).
        input_name: ``"image"`` or ``"waveform"``.
        fixed_shape: one example at the fixed size of the TFLite formats, no batch axis:
            (H, W, 3) at the run's image size, or (clip_seconds * sample_rate,).
        status: ``run.json``; config: ``config.json`` (both as dicts, for the metadata).
        multi_label: whether the head is multi-label.
        has_savedmodel_backbone: the model holds a SavedModel (TFSMLayer) backbone.
        notes: what the export decided on the user's behalf (goes into the report).
        tasks: a multi-task run's tasks (their classes, multi-label or not), else ``None``.
    """

    run: RunDir
    name: str
    model: Any
    labels: list[str]
    contract: InputContract
    input_name: str
    fixed_shape: tuple[int, ...]
    status: dict[str, Any]
    config: dict[str, Any]
    multi_label: bool
    has_savedmodel_backbone: bool
    notes: list[str]
    tasks: TaskLayout | None = None

    @property
    def modality(self) -> str:
        return self.contract.modality

    @property
    def sample_rate(self) -> int | None:
        return self.contract.sample_rate if self.contract.is_audio else None

    @property
    def windows(self) -> ClipWindows | None:
        """How the run scores a whole clip (audio; see :mod:`tlkit.audio_windows`), else ``None``."""
        if not self.contract.is_audio or not self.contract.clip_samples:
            return None
        return ClipWindows(int(self.contract.sample_rate or 0), int(self.contract.clip_samples),
                           max(1, int(self.contract.eval_crops)))

    def contract_metadata(self) -> dict[str, Any]:
        """The ``metadata.json`` keys every artifact's reader needs: labels, modality, sample rate
        and, for audio, the window contract (under :data:`tlkit.audio_windows.METADATA_KEY`)."""
        entry: dict[str, Any] = {"labels": self.labels, "modality": self.modality, "sample_rate": self.sample_rate}
        if self.tasks is not None:
            entry["tasks"] = self.tasks.to_metadata()
        if self.windows is not None:
            entry[METADATA_KEY] = self.windows.to_metadata()
        return entry

    def raw_input_spec(self, image_dtype: str, any_channels: bool = False) -> dict[str, Any]:
        """The ``metadata.json`` input entry of a format that takes raw, any-size input.

        ``any_channels``: images may have 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA)
        channels, made RGB inside the model (the SavedModel's serving function).
        """
        if self.modality == "image":
            if any_channels:
                return {"name": "image", "dtype": image_dtype, "shape": [None, None, None, None], "range": [0, 255],
                        "channels": [1, 2, 3, 4],
                        "layout": "channels last: grey, grey+alpha, RGB or RGBA (alpha dropped, grey repeated), "
                                  "any height and width (resized inside the model)"}
            return {"name": "image", "dtype": image_dtype, "shape": [None, None, None, 3], "range": [0, 255],
                    "layout": "RGB, channels last, any height and width (resized inside the model)"}
        return {"name": "waveform", "dtype": "float32", "shape": [None, None], "range": [-1.0, 1.0],
                "sample_rate": self.sample_rate, "layout": "mono"}


def load_source(run_dir: str | Path) -> ExportSource:
    """The run at ``run_dir``, with its model loaded under tlkit's one loading policy.

    Raises:
        ConfigError: ``run_dir`` is not a finished run, or its audio sample rate is unknown.
        ExportError: its ``model.keras`` cannot be loaded.
    """
    run = RunDir(run_dir)
    model_path = run.require_model()
    try:
        model = run.load_model(compile=False)
    except ValueError as exc:
        raise ExportError(f"cannot load {str(model_path)!r}: {first_line(exc)}") from exc
    contract = run.input_contract(model)
    if contract.is_audio:
        fixed: tuple[int, ...] = (int(contract.clip_samples or 1),)
    else:
        assert contract.image_size is not None
        fixed = (int(contract.image_size[0]), int(contract.image_size[1]), 3)
    task_labels = run.task_labels()
    tasks = run_layout(task_labels, model, run.status()) if task_labels else None
    return ExportSource(
        run=run, name=str(run.raw_config().get("name") or run.path.name), model=model,
        labels=tasks.flat_labels if tasks is not None else run.labels(),
        contract=contract, input_name="waveform" if contract.is_audio else "image", fixed_shape=fixed,
        status=run.status(), config=run.raw_config(), multi_label=False if tasks is not None else run.multi_label(model),
        has_savedmodel_backbone=any(isinstance(layer, TFSMLayer) for layer in all_layers(model)), notes=[],
        tasks=tasks,
    )


def parity_examples(source: ExportSource, count: int) -> tuple[list[np.ndarray], str]:
    """Up to ``count`` raw held-out examples (val, then test; training examples only if none)
    and where they came from (``"val+test"``)."""
    held_out: list[Example] = []
    names = []
    for split in ("val", "test"):
        examples = source.run.split(split)
        if examples:
            names.append(split)
        held_out.extend(examples)
    where = "+".join(names)
    if not held_out:
        held_out = source.run.split("train")
        where = "train"
        source.notes.append("the run has no val/test examples; parity was measured on training examples")
    if not held_out:
        raise ExportError(f"run {str(source.run.path)!r} lists no examples in {RunDir.SPLITS} to check parity on")
    return [load_raw(e.path, source) for e in sample(held_out, count)], where


def calibration_examples(source: ExportSource, count: int) -> list[np.ndarray]:
    """Up to ``count`` training examples fitted to the fixed TFLite input (no batch axis)."""
    train = source.run.split("train")
    if not train:
        raise ExportError(f"run {str(source.run.path)!r} has an empty training split; int8 calibration needs examples")
    return [fit_fixed(load_raw(e.path, source), source.fixed_shape) for e in sample(train, count)]


def check_calibration(calibration: list[np.ndarray], shape: tuple[int, ...]) -> None:
    """Raises ExportError unless every example has ``shape`` and finite values."""
    if not calibration:
        raise ExportError("the int8 calibration set is empty; give at least one representative example")
    for index, example in enumerate(calibration):
        if tuple(example.shape) != shape:
            what = "float32 pixels 0..255 at the run's image_size" if len(shape) == 3 else "waveform samples"
            raise ExportError(
                f"representative example {index} has shape {tuple(example.shape)}; the int8 model's input "
                f"needs {shape} ({what}), one example per item without a batch axis"
            )
        if not np.all(np.isfinite(example)):
            raise ExportError(f"representative example {index} holds NaN or infinite values")


def sample(items: list[Any], count: int) -> list[Any]:
    """Up to ``count`` of ``items``, the same ones every time (seed 0), in their order."""
    if len(items) <= count:
        return list(items)
    order = np.random.default_rng(0).permutation(len(items))[:count]
    return [items[i] for i in sorted(order)]


def load_raw(path: str, source: ExportSource) -> np.ndarray:
    """A file as the model's raw input: (H, W, 3) float32 0..255, or (samples,) float32."""
    if not Path(path).is_file():
        raise ExportError(f"example {path!r} listed in the run's {RunDir.SPLITS} is missing; was the data moved?")
    if source.modality == "image":
        return load_image(path)
    return load_audio(path, int(source.sample_rate or 0))
