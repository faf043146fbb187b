"""The run directory, tlkit's own file format: one owner for its file names, readers and writers.

Layout (every file written atomically, see :mod:`tlkit.fileio`)::

    config.json           the config as used (paths resolved)
    config.original.*     the config file as the user wrote it
    labels.json           class names, in output order (multi-task: ``{"tasks": {task: [class, ...]}}``)
    splits.json           the files of the train / val / test splits
    skipped.csv           unreadable files with the reason (only when some were skipped)
    history.json          merged per-epoch history across stages (+ history.jsonl, appended live)
    logs/<stage>/         TensorBoard logs
    checkpoints/<stage>/  best and final weights of each stage, and a backup for resuming
    model.keras           the final model (loads with safe_mode=True after ``import tlkit``)
    model.weights.h5      its weights (SavedModel-backbone runs are rebuilt from config + these)
    calibration.json      ``{"temperature": T}`` once a temperature was fitted
    run.json              status, backbone and its source, test metrics, timings, versions and the
                          input contract (``modality``, ``image_size`` or ``sample_rate``,
                          ``clip_seconds``, ``eval_crops``)

Training, evaluation, export, predict and the apps read a run only through :class:`RunDir`;
the model-loading policy (safe mode; how SavedModel-backbone runs are rebuilt) lives in
:meth:`RunDir.load_model` alone.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from tlkit.backbones.registry import get as get_spec
from tlkit.backbones.sources import SOURCES
from tlkit.config import RunConfig, config_from_dict
from tlkit.data.images import Example, Splits
from tlkit.errors import ConfigError, TlkitError
from tlkit.fileio import atomic_write_text, read_json, write_json
from tlkit.model_info import model_image_size, model_sample_rate, takes_waveform
from tlkit.run_model import load_saved_model, rebuild_model
from tlkit.registration import register_serializables


@dataclass(frozen=True)
class InputContract:
    """What a run's model takes: the one answer to "is this an audio run?" and its sizes.

    Attributes:
        modality: ``"image"`` or ``"audio"``.
        image_size: ``(height, width)`` the model resizes to (images).
        sample_rate: Hz of the waveform the model takes (audio).
        clip_seconds: the training / evaluation crop (audio).
        eval_crops: crops averaged per clip when scoring (audio; 1 for images).
    """

    modality: str
    image_size: tuple[int, int] | None = None
    sample_rate: int | None = None
    clip_seconds: float | None = None
    eval_crops: int = 1

    @property
    def is_audio(self) -> bool:
        return self.modality == "audio"

    @property
    def clip_samples(self) -> int | None:
        """Samples per crop (audio with a crop length), else ``None``."""
        if not self.is_audio or not self.sample_rate or not self.clip_seconds:
            return None
        return max(1, int(round(self.clip_seconds * self.sample_rate)))

    def to_status(self) -> dict[str, Any]:
        """The ``run.json`` keys that record this contract."""
        if self.is_audio:
            return {"modality": "audio", "sample_rate": self.sample_rate, "clip_seconds": self.clip_seconds,
                    "eval_crops": self.eval_crops}
        return {"modality": "image", "image_size": list(self.image_size) if self.image_size else None}


class RunDir:
    """A run directory: ``RunDir("runs/flowers").labels()``, ``.split("test")``, ``.load_model()``.

    Readers raise :class:`~tlkit.errors.ConfigError` naming the file and the fix when a file is
    missing or unreadable; writers are atomic.
    """

    CONFIG = "config.json"
    LABELS = "labels.json"
    SPLITS = "splits.json"
    SKIPPED = "skipped.csv"
    HISTORY = "history.json"
    HISTORY_LIVE = "history.jsonl"
    STATUS = "run.json"
    MODEL = "model.keras"
    WEIGHTS = "model.weights.h5"
    CALIBRATION = "calibration.json"
    CHECKPOINTS = "checkpoints"
    LOGS = "logs"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_worker(cls, path: str | Path) -> RunDir:
        """The run directory this process of a multi-worker job writes (``TF_CONFIG``, see
        docs/distributed.md): ``path`` on the chief (task ``chief``, else ``worker`` 0) and
        without a cluster; on every other task a folder of its own under the system temp dir.

        Keras's multi-worker convention: every worker runs the same program and saves the same
        (synchronised) weights, but only the chief writes the real output. The other workers'
        folder is named after ``path`` and the task, so a restarted worker finds its own
        checkpoints and resumes at the same epoch as the chief.
        """
        try:
            tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
        except json.JSONDecodeError as exc:
            raise ConfigError(f"the TF_CONFIG environment variable is not valid JSON ({exc}); see docs/distributed.md") from exc
        task, cluster = tf_config.get("task") or {}, tf_config.get("cluster") or {}
        kind, index = str(task.get("type") or "worker"), int(task.get("index") or 0)
        if not task or kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster):
            return cls(path)
        digest = hashlib.sha1(str(Path(path).resolve()).encode("utf-8")).hexdigest()[:12]
        return cls(Path(tempfile.gettempdir()) / "tlkit-workers" / f"{Path(path).name}-{digest}" / f"{kind}-{index}")

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        """The path of one of the run's files (a class constant such as ``RunDir.MODEL``)."""
        return self.path / name

    # --- what the directory is -------------------------------------------------------------

    @staticmethod
    def is_run(path: str | Path) -> bool:
        """Whether ``path`` is a run directory (has ``config.json`` and ``model.keras``)."""
        p = Path(path)
        return (p / RunDir.CONFIG).is_file() and (p / RunDir.MODEL).is_file()

    @property
    def is_complete(self) -> bool:
        return self.status().get("status") == "complete" and self.file(self.MODEL).is_file()

    def require_model(self) -> Path:
        """``model.keras``, or a ConfigError saying how to finish the run."""
        model = self.file(self.MODEL)
        if not model.is_file() or not self.file(self.CONFIG).is_file():
            raise ConfigError(
                f"{str(self.path)!r} is not a finished tlkit run (needs {self.CONFIG} and {self.MODEL}); "
                "finish it with `tlkit train` first"
            )
        return model

    # --- claiming the directory for a config ------------------------------------------------

    def ensure_writable(self) -> None:
        """Creates the directory and proves a file can be written there, before any training.

        Raises:
            ConfigError: the directory cannot be created or written (read-only, permissions).
        """
        probe = self.path / ".tlkit-write-test"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(probe, "ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"output_dir {str(self.path)!r} is not writable ({exc.strerror or exc}); choose another "
                "output_dir or fix its permissions"
            ) from exc

    def has_progress(self) -> bool:
        """Whether any epoch or stage of this run has finished (a run without progress may be
        restarted with a changed config)."""
        return (self.is_complete or bool(self.live_history())
                or any(self.checkpoints().glob("*/done.json")))

    def claim(self, cfg: RunConfig) -> str | None:
        """Checks that ``cfg`` may use this directory; returns a note when stale state was cleared.

        A directory made with the same config resumes. One made with another config is refused,
        unless it never finished an epoch (e.g. it failed on a config typo): then its partial
        state is removed and the run starts afresh.

        Raises:
            ConfigError: a directory that is not a tlkit run, or a run with progress and a
                different config.
        """
        previous = self.file(self.CONFIG)
        if not previous.is_file():
            if self.path.is_dir() and any(p.name != ".tlkit-write-test" for p in self.path.iterdir()):
                raise ConfigError(f"output_dir {str(self.path)!r} exists and is not a tlkit run; choose another output_dir")
            return None
        new = json.loads(json.dumps(cfg.to_dict()))
        try:  # normalised by today's dataclasses, so fields added since the run (with defaults) compare equal
            old = json.loads(json.dumps(self.config().to_dict()))
        except TlkitError:
            old = self.raw_config()
        for raw in (old, new):
            raw.pop("source", None)
            raw.get("training", {}).pop("verbose", None)
        if old == new:
            return None
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if self.has_progress():
            raise ConfigError(
                f"run directory {str(self.path)!r} was made with a different config (differs in {changed}); "
                "to resume use the same config, otherwise set another output_dir or delete the directory"
            )
        for name in (self.STATUS, self.HISTORY, self.HISTORY_LIVE, self.LABELS, self.SPLITS, self.SKIPPED):
            self.file(name).unlink(missing_ok=True)
        for folder in (self.CHECKPOINTS, self.LOGS):
            shutil.rmtree(self.file(folder), ignore_errors=True)
        return f"the config changed ({', '.join(changed)}) before any epoch finished; starting {self.path} afresh"

    # --- config ----------------------------------------------------------------------------

    def raw_config(self) -> dict[str, Any]:
        """``config.json`` as a dict."""
        path = self.file(self.CONFIG)
        if not path.is_file():
            raise ConfigError(f"{str(self.path)!r} is not a tlkit run directory (no {self.CONFIG})")
        return self._json(path)

    def config(self) -> RunConfig:
        """The config the run was made with."""
        raw = self.raw_config()
        return config_from_dict(raw, self.path, source=raw.get("source"))

    def write_config(self, cfg: RunConfig) -> None:
        write_json(self.file(self.CONFIG), cfg.to_dict())
        if cfg.source and Path(cfg.source).is_file():
            original = self.file(f"config.original{Path(cfg.source).suffix}")
            atomic_write_text(original, Path(cfg.source).read_text(encoding="utf-8"))

    # --- labels and splits -----------------------------------------------------------------

    def labels(self) -> list[str]:
        """Class names in output order.

        Raises:
            ConfigError: no ``labels.json``, or a multi-task run (use :meth:`task_labels`).
        """
        raw = self._labels_file()
        if isinstance(raw, dict):
            raise ConfigError(f"run {str(self.path)!r} is a multi-task run (tasks {sorted(raw.get('tasks', {}))}); "
                              "its classes are per task: use RunDir.task_labels()")
        return [str(v) for v in raw]

    def task_labels(self) -> dict[str, list[str]] | None:
        """``{task: class names}`` of a multi-task run, in task order; ``None`` for a single-task run."""
        raw = self._labels_file()
        if not isinstance(raw, dict):
            return None
        return {str(task): [str(v) for v in classes] for task, classes in raw.get("tasks", {}).items()}

    @property
    def is_multitask(self) -> bool:
        """Whether the run predicts several tasks (its ``labels.json``, else its config's ``[tasks]``)."""
        if self.file(self.LABELS).is_file():
            return self.task_labels() is not None
        return bool(self.raw_config().get("tasks")) if self.file(self.CONFIG).is_file() else False

    def _labels_file(self) -> Any:
        path = self.file(self.LABELS)
        if not path.is_file():
            raise ConfigError(f"run {str(self.path)!r} has no {self.LABELS}; finish it with `tlkit train` first")
        return self._json(path)

    def split(self, name: str = "test") -> list[Example]:
        """The examples of one split (``train``, ``val`` or ``test``); a multi-task run's carry
        ``tasks`` (an empty label tuple where a task's label is missing)."""
        raw = self._json(self.file(self.SPLITS))
        if name not in raw:
            raise ConfigError(f"{str(self.file(self.SPLITS))!r} has no split {name!r} (train, val, test)")
        order = list(raw.get("tasks") or {})
        return [Example(r["path"], tuple(r["labels"]), r.get("group"),
                        tuple((task, tuple(r["tasks"].get(task, ()))) for task in order) if "tasks" in r else ())
                for r in raw[name]]

    def write_data(self, splits: Splits) -> None:
        """``labels.json``, ``splits.json`` and (when files were skipped or ignored) ``skipped.csv``."""
        tasks = {t.name: list(t.classes) for t in splits.tasks}
        write_json(self.file(self.LABELS), {"tasks": tasks} if tasks else splits.class_names)

        def rows(examples: list[Example]) -> list[dict[str, Any]]:
            return [{"path": e.path, "labels": list(e.labels), "group": e.group,
                     **({"tasks": {t: list(labels) for t, labels in e.tasks}} if e.tasks else {})} for e in examples]

        header: dict[str, Any] = {"tasks": tasks} if tasks else {"class_names": splits.class_names}
        write_json(self.file(self.SPLITS), {
            **header, "train": rows(splits.train), "val": rows(splits.val), "test": rows(splits.test),
        }, indent=None)
        if splits.skipped or splits.ignored:
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(["path", "reason"])
            writer.writerows([*splits.skipped, *splits.ignored])  # ignored reasons start "ignored: "
            atomic_write_text(self.file(self.SKIPPED), buffer.getvalue())

    # --- status (run.json) -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``run.json`` (empty before training started)."""
        path = self.file(self.STATUS)
        return self._json(path) if path.is_file() else {}

    def write_status(self, status: dict[str, Any]) -> None:
        write_json(self.file(self.STATUS), status)

    def update_status(self, **changes: Any) -> dict[str, Any]:
        """Merges ``changes`` into ``run.json`` and returns the result."""
        status = {**self.status(), **changes}
        self.write_status(status)
        return status

    # --- history, calibration --------------------------------------------------------------

    def history(self) -> dict[str, Any]:
        """``history.json``: ``{"epochs": [...], "stages": [...]}``."""
        path = self.file(self.HISTORY)
        if not path.is_file():
            raise ConfigError(f"no {self.HISTORY} in {str(self.path)!r}; the run has not finished an epoch")
        return self._json(path)

    def write_history(self, records: list[dict[str, Any]]) -> None:
        """``history.json`` from per-epoch records (``{"stage", "epoch", ...}``), with the stage spans."""
        stages: list[dict[str, Any]] = []
        for record in records:
            if not stages or stages[-1]["name"] != record["stage"]:
                stages.append({"name": record["stage"], "first_epoch": record["epoch"], "last_epoch": record["epoch"]})
            stages[-1]["last_epoch"] = record["epoch"]
        write_json(self.file(self.HISTORY), {"epochs": records, "stages": stages})

    def live_history(self) -> list[dict[str, Any]]:
        """The records of ``history.jsonl`` (appended once per epoch; a line cut by a kill is dropped)."""
        path = self.file(self.HISTORY_LIVE)
        if not path.is_file():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def append_live_history(self, record: dict[str, Any]) -> None:
        """Appends one epoch's record to ``history.jsonl`` (flushed, so a kill keeps it)."""
        with open(self.file(self.HISTORY_LIVE), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    def rewrite_live_history(self, records: list[dict[str, Any]]) -> None:
        atomic_write_text(self.file(self.HISTORY_LIVE), "".join(json.dumps(r) + "\n" for r in records))

    def logs(self, stage: str) -> Path:
        """The TensorBoard folder of one stage."""
        return self.file(self.LOGS) / stage

    def calibration(self) -> dict[str, Any]:
        """``calibration.json`` (empty when the run was never calibrated)."""
        path = self.file(self.CALIBRATION)
        return self._json(path) if path.is_file() else {}

    def temperature(self) -> float | None:
        """The temperature to apply to the model's probabilities, or ``None``.

        ``None`` also when the run's temperature is folded into the model (``tlkit train``
        does that by default): its outputs are then calibrated already, and applying the
        temperature again would be wrong. The folded value is in :meth:`calibration`.
        """
        record = self.calibration()
        if record.get("folded_into_model"):
            return None
        value = record.get("temperature")
        return float(value) if value is not None else None

    def write_calibration(self, temperature: float, **extra: Any) -> Path:
        """Writes ``calibration.json``. A temperature fitted later (``tlkit evaluate --calibrate``)
        on a model that already has one folded in keeps that record under ``"folded"``."""
        previous = self.calibration()
        record: dict[str, Any] = {"temperature": float(temperature), **extra}
        if not record.get("folded_into_model"):
            folded = previous if previous.get("folded_into_model") else previous.get("folded")
            if folded:
                record["folded"] = folded
        return write_json(self.file(self.CALIBRATION), record)

    def write_task_calibration(self, tasks: dict[str, dict[str, Any]]) -> Path:
        """Writes a multi-task run's ``calibration.json``: ``{"tasks": {task: {"temperature": T, ...}}}``."""
        return write_json(self.file(self.CALIBRATION), {"tasks": tasks})

    def checkpoints(self, stage: str | None = None) -> Path:
        base = self.file(self.CHECKPOINTS)
        return base / stage if stage else base

    # --- the input contract ----------------------------------------------------------------

    def input_contract(self, model: keras.Model | None = None) -> InputContract:
        """Modality, image size or sample rate / crop of the run, from ``run.json``.

        Runs made before ``run.json`` recorded all of it fall back to the model's layers
        (its ``resize`` layer, a front-end's ``sample_rate``) and then to the config and the
        backbone spec.

        Raises:
            ConfigError: an audio run whose sample rate cannot be found.
        """
        status = self.status()
        data = self.raw_config().get("data", {}) if self.file(self.CONFIG).is_file() else {}
        audio = status.get("modality") == "audio" or (model is not None and takes_waveform(model))
        if not audio:
            size = status.get("image_size") or (model_image_size(model) if model is not None else None)
            return InputContract("image", (int(size[0]), int(size[1])) if size else (224, 224))
        rate = status.get("sample_rate") or (model_sample_rate(model) if model is not None else None)
        if not rate:
            rate = self._spec_sample_rate()
        if not rate:
            raise ConfigError(
                f"run {str(self.path)!r} holds an audio model but its sample rate is unknown (no sample_rate in "
                f"{self.STATUS}, no front-end layer with one, backbone not in the registry); register the backbone"
            )
        clip = status.get("clip_seconds") or data.get("clip_seconds") or 5.0
        crops = status.get("eval_crops") or data.get("eval_crops") or 1
        return InputContract("audio", None, int(rate), float(clip), int(crops))

    def multi_label(self, model: keras.Model | None = None) -> bool:
        """Whether the head is multi-label: its output activation, else the config."""
        if model is not None and "probabilities" in [layer.name for layer in model.layers]:
            name = getattr(getattr(model.get_layer("probabilities"), "activation", None), "__name__", "")
            if name in ("sigmoid", "softmax"):
                return name == "sigmoid"
        try:
            return bool(self.config().head.multi_label)
        except (TlkitError, OSError, ValueError):
            return False

    # --- the model -------------------------------------------------------------------------

    def load_model(self, *, compile: bool = True) -> keras.Model:
        """The run's final model, under tlkit's one loading policy.

        ``model.keras`` is loaded with Keras's safe mode on. A model whose backbone is a
        SavedModel (TF-Hub or local) cannot be deserialised in safe mode (its graph is code),
        so such a run is rebuilt from its config and the backbone the config names, and its
        trained weights (``model.weights.h5``) are loaded into it. Nothing is ever loaded with
        ``safe_mode=False``.
        """
        model_path = self.require_model()
        register_serializables()
        status = self.status()
        # A source whose layer Keras's safe mode refuses (a SavedModel graph) says so in its record.
        source = SOURCES.get(str(status.get("backbone_source")))
        if source is None or source.reloads_safely:
            return load_saved_model(model_path, compile=compile)
        weights = self.file(self.WEIGHTS)
        if not weights.is_file():
            raise ConfigError(f"run {str(self.path)!r} has a SavedModel backbone but no {self.WEIGHTS}; retrain it")
        task_labels = self.task_labels()
        classes: list[str] | dict[str, list[str]] = self.labels() if task_labels is None else task_labels
        return rebuild_model(self.config(), status, classes, weights)

    # --- internals -------------------------------------------------------------------------

    def _spec_sample_rate(self) -> int | None:
        name = self.raw_config().get("backbone", {}).get("name") if self.file(self.CONFIG).is_file() else None
        if not name:
            return None
        try:
            spec = get_spec(name, modality="audio")
        except TlkitError:
            return None
        return spec.sample_rate or getattr(spec.preprocessing, "sample_rate", None)

    @staticmethod
    def _json(path: Path) -> Any:
        try:
            return read_json(path)
        except FileNotFoundError as exc:
            raise ConfigError(f"{str(path)!r} is missing; is this a finished tlkit run?") from exc
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{str(path)!r} cannot be read ({exc}); the run directory is damaged") from exc

