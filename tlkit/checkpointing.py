"""Stage checkpoints that cost near nothing: the best epoch in memory, the resume backup on a time budget.

Keras's ``BackupAndRestore`` + ``ModelCheckpoint`` write two full checkpoints every epoch
(0.3-0.45 s each on EfficientNet-Lite0), which halves the speed of small-data epochs, and
``BackupAndRestore`` leaves ``model._initial_epoch`` set after a restore, so the *next*
``fit`` of a staged run starts at the wrong epoch. :class:`StageCheckpoint` replaces both:

- the best epoch's weights are kept in memory (a copy of the arrays, no disk write);
- with a run directory, the resume backup (weights with the optimizer state, then a small
  JSON with the epoch) is written atomically when ``budget_seconds`` have passed since the
  last one; the end of a stage writes its final weights instead; without a run directory
  nothing is written at all;
- the default budget is 30 s, or 20 times the last write's duration when that is longer (a
  backup then costs under 5% of training time), so a kill -9 loses at most that much work;
- multi-worker (``MultiWorkerMirroredStrategy`` over several processes): the chief's clock decides
  and every worker follows it (one all-reduce per epoch), so all workers back up at the same
  epochs and resume from the same one; :func:`check_workers_agree` refuses to resume workers
  whose checkpoints disagree (a lost worker folder, a kill between two workers' writes).

Resuming is explicit: :func:`restore_backup` loads the backup into the model and returns the
epoch to pass as ``fit(initial_epoch=...)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit.errors import ConfigError
from tlkit.fileio import atomic_save, read_json, write_json

BACKUP_WEIGHTS = "backup.weights.h5"
BACKUP_STATE = "backup.json"
BEST_WEIGHTS = "best.weights.h5"
FINAL_WEIGHTS = "final.weights.h5"
STAGE_DONE = "done.json"
#: A backup may cost at most 1 / BUDGET_FACTOR of the time between backups...
BUDGET_FACTOR = 20.0
#: ...and comes at most every MIN_BUDGET_SECONDS: a kill -9 loses at most this much work.
MIN_BUDGET_SECONDS = 30.0


@dataclass
class BackupState:
    """What ``backup.json`` holds: the epochs finished and the best monitored value so far."""

    epoch: int
    best: float
    best_epoch: int


class StageCheckpoint(keras.callbacks.Callback):
    """Best-epoch tracking in memory and a resume backup on a time budget (see the module docstring).

    Args:
        stage_dir: the stage's checkpoint folder (``None``: no files, only the in-memory best).
        monitor: ``"val_loss"`` or ``"loss"`` (lower is better).
        epochs: the stage's epoch count (the last epoch writes no backup: the stage's final
            weights follow it).
        prefix: file-name prefix of a stage trained on cached features (its files hold the
            head's weights, not the full model's).
        budget_seconds: fixed seconds between backups (``None``: adaptive, see above).
        resumed: the state restored from a backup, when resuming.
    """

    def __init__(
        self,
        stage_dir: Path | None,
        monitor: str,
        epochs: int,
        *,
        prefix: str = "",
        budget_seconds: float | None = None,
        resumed: BackupState | None = None,
    ) -> None:
        super().__init__()
        self.stage_dir = stage_dir
        self.monitor = monitor
        self.epochs = epochs
        self.prefix = prefix
        self.budget_seconds = budget_seconds
        self.best = resumed.best if resumed else math.inf
        self.best_epoch = resumed.best_epoch if resumed else 0
        self.best_weights: list[np.ndarray] | None = None
        self._best_on_disk = resumed is not None and resumed.best_epoch > 0
        self._last_write = time.monotonic()
        self._write_seconds = 0.0
        self.backups_written = 0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is not None and np.isfinite(value) and float(value) < self.best:
            self.best, self.best_epoch = float(value), epoch + 1
            # Only what the stage can change: a head stage copies the head, not the frozen backbone.
            self.best_weights = [np.array(v) for v in _changing_variables(self.model)]
            self._best_on_disk = False
        if self.stage_dir is None:
            return
        budget = self.budget_seconds
        if budget is None:
            budget = max(MIN_BUDGET_SECONDS, BUDGET_FACTOR * self._write_seconds)
        # The last epoch needs no backup: the stage's end writes its final weights and done marker.
        last = epoch + 1 >= self.epochs or bool(getattr(self.model, "stop_training", False))
        if last:  # the same on every worker: stop_training follows the all-reduced validation loss
            return
        due = time.monotonic() - self._last_write >= budget
        strategy = getattr(self.model, "distribute_strategy", None)
        if is_multi_worker(strategy):  # each worker's clock differs: the chief's decides for all
            due = _chief_value(strategy, float(due)) > 0.5
        if due:
            self.write_backup(epoch + 1)

    def write_backup(self, epoch: int) -> None:
        """Writes the best weights (if not yet on disk), then the backup and its state, atomically."""
        assert self.stage_dir is not None
        started = time.monotonic()
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        if self.best_weights is not None and not self._best_on_disk:
            variables = _changing_variables(self.model)
            current = [np.array(v) for v in variables]
            _assign(variables, self.best_weights)
            atomic_save(self.stage_dir / f"{self.prefix}{BEST_WEIGHTS}", self.model.save_weights)
            _assign(variables, current)
            self._best_on_disk = True
        atomic_save(self.stage_dir / f"{self.prefix}{BACKUP_WEIGHTS}", self.model.save_weights)
        # The state is written last: a kill between the two leaves the previous, consistent pair
        # (the weights file then holds one epoch more, which the state does not claim).
        write_json(self.stage_dir / f"{self.prefix}{BACKUP_STATE}",
                   {"epoch": epoch, "best": self.best if np.isfinite(self.best) else None,
                    "best_epoch": self.best_epoch})
        self._write_seconds = time.monotonic() - started
        self._last_write = time.monotonic()
        self.backups_written += 1

    def restore_best(self) -> bool:
        """Loads the stage's best epoch into the model; ``False`` when there was no best."""
        if self.best_weights is not None:
            _assign(_changing_variables(self.model), self.best_weights)
            return True
        best_file = self.stage_dir / f"{self.prefix}{BEST_WEIGHTS}" if self.stage_dir else None
        if best_file is not None and best_file.is_file() and self.best_epoch > 0:
            self.model.load_weights(best_file)
            return True
        return False


def _changing_variables(model: keras.Model) -> list[Any]:
    """The variables training can change: trainable ones, and the non-trainable state (BatchNorm
    moving statistics, seed states) of layers that are trainable. Frozen layers' weights are left
    out, so keeping the best epoch of a head stage copies kilobytes, not the backbone."""
    found = {id(v): v for v in model.trainable_variables}
    for layer in model._flatten_layers(include_self=False):
        if layer.trainable and not list(layer._flatten_layers(include_self=False)):  # trainable leaf layers
            for v in layer.non_trainable_variables:
                found.setdefault(id(v), v)
    return list(found.values())


def _assign(variables: list[Any], values: list[np.ndarray]) -> None:
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


def restore_backup(model: keras.Model, stage_dir: Path, prefix: str = "") -> BackupState | None:
    """Loads a stage's resume backup into ``model`` (compiled, so its optimizer state is restored
    too) and returns its state; ``None`` when the stage has no backup yet."""
    state_file = stage_dir / f"{prefix}{BACKUP_STATE}"
    weights = stage_dir / f"{prefix}{BACKUP_WEIGHTS}"
    if not state_file.is_file() or not weights.is_file():
        return None
    raw = read_json(state_file)
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(weights)
    best = raw.get("best")
    return BackupState(int(raw["epoch"]), float(best) if best is not None else math.inf, int(raw.get("best_epoch", 0)))


def stage_finished(stage_dir: Path | None) -> bool:
    """Whether the stage in ``stage_dir`` finished (its final weights and ``done.json`` were written)."""
    return stage_dir is not None and (stage_dir / STAGE_DONE).is_file()


def finish_stage(stage_dir: Path, model: keras.Model, stage: Any, **details: Any) -> None:
    """Records a finished stage: its final weights, then ``done.json`` (the stage as a dict, ``details``,
    the time), so a run that resumes skips it and loads those weights (:func:`stage_finished`)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_save(stage_dir / FINAL_WEIGHTS, model.save_weights)
    write_json(stage_dir / STAGE_DONE, {"stage": asdict(stage), **details, "finished": time.time()})


def is_multi_worker(strategy: Any) -> bool:
    """Whether ``strategy`` spans several workers (processes), whose checkpoint decisions must agree."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and (
        strategy.num_replicas_in_sync > len(strategy.extended.worker_devices))


def _chief_value(strategy: tf.distribute.Strategy, value: float) -> float:
    """The chief's ``value`` on every worker (an all-reduce of the chief's value and zeros)."""
    local = len(strategy.extended.worker_devices)  # every worker has as many replicas
    mine = value if strategy.extended.should_checkpoint else 0.0
    return _sum_over_replicas(strategy, mine) / local


def _sum_over_replicas(strategy: tf.distribute.Strategy, value: float) -> float:
    """``value`` of every replica of every worker, summed (a collective: every worker must call it)."""
    values = strategy.experimental_distribute_values_from_function(lambda _: tf.constant(value, tf.float32))
    return float(strategy.reduce("SUM", values, axis=None))


def check_workers_agree(strategy: Any, value: int, what: str, folder: Path | None) -> None:
    """Multi-worker: raises unless every worker holds the same ``value`` (e.g. the epoch its backup
    resumes from); a no-op otherwise. Every worker reaches the same verdict (two all-reduces), so a
    disagreement stops the whole job instead of leaving workers waiting in mismatched collectives.

    Raises:
        ConfigError: naming ``what``, this worker's value and checkpoint ``folder``, and the fix.
    """
    if not is_multi_worker(strategy):
        return
    chief = _chief_value(strategy, float(value))
    gap = (float(value) - chief) ** 2
    if _sum_over_replicas(strategy, gap) > 0.0:
        raise ConfigError(
            f"multi-worker resume: the workers' checkpoints disagree on {what} (the chief: {chief:g}, this "
            f"worker: {value}, in {folder}); a worker's folder was lost or a kill landed between two workers' "
            "writes. Delete that stage's checkpoints folder in the run directory and in every worker's temp "
            "folder (RunDir.for_worker), then start all workers again: the stage restarts from its beginning"
        )
