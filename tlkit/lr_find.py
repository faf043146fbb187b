"""The learning-rate range test (Smith 2015/2017; fastai's ``lr_find``): sweep one stage's rate.

:func:`lr_find` thaws what one :class:`~tlkit.schedule.Stage` thaws, compiles with that stage's
optimizer kind (and its per-group rate ratios, ``group_lr_decay``), then trains one batch per
rate while the rate grows exponentially from ``min_lr`` to ``max_lr`` over ``steps`` batches
(the training data repeat as needed). It records each batch's loss and the smoothed loss (an
exponential moving average with bias correction, ``beta = 0.98``) and stops early when the
smoothed loss passes ``4 x`` its best so far or a loss is not finite. Afterwards the model's
weights (every variable, BatchNorm statistics and seeds included), its trainable flags and its
compile state are put back exactly: the sweep leaves the model untouched.

The suggestion rule (``LRFindResult.rule``): the rate where the loss falls fastest (the most
negative slope against ``log10(rate)``), looking only at rates below the one where the loss is
lowest, skipping the first 10% of the sweep. The rule reads the *centred* smoothing
(``LRFindResult.centred``: a moving average over about 5% of the sweep, run forward and then
backward so that it does not lag, over the batches up to the forward average's minimum so that
the divergence does not leak back), because the forward average lags the loss by about
``1 / (1 - beta) = 50`` batches, which would push the suggestion up towards divergence. When
the loss never fell, the minimum's rate divided by 10
(``candidates["minimum_over_10"]``, always reported beside it; fastai's older rule).

Stages are not configured with ``learning_rate = "lr_find"``: ``tlkit lr-find CONFIG`` prints
the line to paste (``learning_rate = 3.2e-04``) into the stage's ``[[schedule.stages]]`` table.
Head-only stages are solved to convergence by default (``Stage.solver = "auto"``), where no
learning rate is used; the range test matters for stages that thaw backbone groups and for
heads trained epoch by epoch (``solver = "sgd"``, or features that are not fixed).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit.config import RunConfig, load_config
from tlkit.data.images import class_weights
from tlkit.errors import ConfigError
from tlkit.evaluation.plots import figure, save
from tlkit.fileio import atomic_save, write_json
from tlkit.finetune import _batched, _stage_optimizer
from tlkit.model import HeadConfig, backbone_groups, build_classifier, classification_loss
from tlkit.run import _prepare_audio, _prepare_images, _resolve_spec, make_strategy
from tlkit.model_info import all_layers, model_name
from tlkit.rundir import RunDir
from tlkit.schedule import Stage
from tlkit.text import say

BETA = 0.98  # smoothing of the loss (fastai's value)
DIVERGE_FACTOR = 4.0  # stop once the smoothed loss exceeds this multiple of its best
SKIP_FRACTION = 0.1  # first part of the sweep left out of the suggestion (moving average warm-up)
CENTRED_WINDOW = 0.05  # width of the centred smoothing, as a fraction of the sweep
RULE = ("steepest descent of the centred smoothed loss against log10(rate), below the rate of its "
        "minimum (first 10% of the sweep skipped); minimum's rate / 10 when the loss never fell")
HEAD_ONLY_NOTE = ("a head-only stage with solver='auto' is solved to convergence on cached features and "
                  "ignores learning_rate; the rate applies when the head trains epoch by epoch "
                  "(solver='sgd', augmentation or random audio crops)")


@dataclass
class LRFindResult:
    """What :func:`lr_find` returns.

    ``rates[i]`` is the learning rate of batch ``i`` (of the head; thawed groups train at the
    stage's ``group_lr_decay`` ratios of it), ``losses[i]`` its training loss, ``smoothed[i]``
    the bias-corrected moving average the stop rule watched, ``centred[i]`` that average run
    forward and backward (no lag) up to the batch where ``smoothed`` is lowest, which the rule
    reads (so it may be shorter than ``rates``). ``suggestion`` follows ``rule``; ``candidates`` holds
    every rule's rate (``steepest``, ``minimum_over_10``; ``None`` where it does not apply).
    """

    rates: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    stopped_early: bool
    seconds: float
    stage: str = ""
    centred: list[float] = field(default_factory=list)
    rule: str = RULE
    candidates: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def toml_line(self) -> str:
        """The line to paste into the stage's ``[[schedule.stages]]`` table."""
        return f"learning_rate = {self.suggestion:.1e}" if self.suggestion is not None else ""

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "toml_line": self.toml_line()}


class _Sweep(keras.callbacks.Callback):
    """Sets the rate before each one-batch epoch, records the batch's loss, stops on divergence.

    One batch per epoch because Keras's per-batch logs hold the epoch's running mean loss."""

    def __init__(self, rates: np.ndarray, optimizers: list[Any], ratios: list[float], beta: float,
                 diverge_factor: float) -> None:
        super().__init__()
        self.rates, self.optimizers, self.ratios = rates, optimizers, ratios
        self.beta, self.diverge_factor = beta, diverge_factor
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.average = 0.0
        self.stopped_early = False

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        for optimizer, ratio in zip(self.optimizers, self.ratios):
            optimizer.learning_rate = float(self.rates[epoch]) * ratio

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        loss = float((logs or {}).get("loss", math.nan))
        if not math.isfinite(loss):
            self._stop()
            return
        self.average = self.beta * self.average + (1.0 - self.beta) * loss
        value = self.average / (1.0 - self.beta ** (len(self.losses) + 1))
        best = min(self.smoothed, default=value)
        self.losses.append(loss)
        self.smoothed.append(value)
        if len(self.smoothed) > 1 and value > self.diverge_factor * best:
            self._stop()

    def _stop(self) -> None:
        self.stopped_early = True
        self.model.stop_training = True


class _Snapshot:
    """Every variable's value, every layer's and variable's trainable flag and the compile
    arguments of a model, to put back after the sweep."""

    def __init__(self, model: keras.Model) -> None:
        self.variables = list(model.variables)
        self.values = [np.array(keras.ops.convert_to_numpy(v), copy=True) for v in self.variables]
        self.layer_flags = [(layer, layer.trainable) for layer in [model, *all_layers(model)]]
        self.variable_flags = [(v, v.trainable) for v in self.variables]
        self.compile_args = None
        if getattr(model, "compiled", False):  # the same optimizer object (and its state) comes back
            self.compile_args = {**model._compile_config.config, "optimizer": model.optimizer}

    def restore(self, model: keras.Model, strategy: tf.distribute.Strategy) -> None:
        for layer, flag in self.layer_flags:  # outer layers first: setting one sets its sub-layers
            layer.trainable = flag
        for variable, flag in self.variable_flags:
            variable.trainable = flag
        for variable, value in zip(self.variables, self.values):
            variable.assign(value)
        if self.compile_args is not None:
            with strategy.scope():
                model.compile(**self.compile_args)


def _inner_optimizers(optimizer: Any) -> list[Any]:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return list(inner.optimizers) if isinstance(inner, keras.optimizers.MultiOptimizer) else [inner]


def lr_find(
    model: keras.Model,
    train: Any,
    stage: Stage,
    *,
    head: HeadConfig | None = None,
    steps: int = 200,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    strategy: tf.distribute.Strategy | None = None,
    class_weight: dict[int, float] | None = None,
    jit_compile: bool | str = "auto",
    beta: float = BETA,
    diverge_factor: float = DIVERGE_FACTOR,
    verbose: int | str = "auto",
) -> LRFindResult:
    """Sweeps the learning rate of ``stage`` on ``model``; leaves the model as it was.

    Args:
        model: a tlkit classifier (:func:`tlkit.build_classifier`).
        train: ``tf.data.Dataset`` of ``(inputs, one_hot_labels)`` batches, or
            :class:`~tlkit.data.batches.Batches`; repeated as needed for ``steps`` batches.
        stage: the stage whose thawed groups, optimizer and ``group_lr_decay`` the sweep uses
            (its ``learning_rate``, epochs, warm-up and decay are ignored).
        head: the head config, for the loss and BatchNorm policy (default: the model's own).
        steps: batches in the sweep (rates ``min_lr * (max_lr / min_lr) ** (i / (steps - 1))``).
        strategy / class_weight / jit_compile: as in :func:`tlkit.fine_tune`.
        beta / diverge_factor: smoothing of the loss, and the stop rule.

    Returns:
        An :class:`LRFindResult` (``suggestion`` is ``None`` only if no batch had a finite loss).
    """
    _check_sweep(steps, min_lr, max_lr)
    head = head or getattr(model, "tlkit_head", None) or HeadConfig()
    strategy = strategy or tf.distribute.get_strategy()
    rates = np.geomspace(min_lr, max_lr, steps)
    snapshot = _Snapshot(model)
    start = time.monotonic()
    try:
        thawed = backbone_groups(model).set_trainable(stage.unfreeze, freeze_batchnorm=head.bn_inference)
        unit = dataclasses.replace(stage, learning_rate=1.0, decay="constant", warmup_epochs=0.0)
        with strategy.scope():
            optimizer = _stage_optimizer(unit, steps, model, thawed)
            model.compile(optimizer=optimizer, loss=classification_loss(head), jit_compile=jit_compile)
        inner = _inner_optimizers(model.optimizer)
        ratios = [float(keras.ops.convert_to_numpy(o.learning_rate)) for o in inner]
        sweep = _Sweep(rates, inner, ratios, beta, diverge_factor)
        trains = f"{len(thawed)} backbone group(s) thawed" if thawed else "head only"
        say(verbose, f"lr-find on stage {stage.name!r}: {steps} batches, rate {min_lr:g} -> {max_lr:g} "
                      f"({stage.optimizer}, {trains})")
        model._initial_epoch = None  # never inherit a previous fit's resume point (Keras keeps it)
        model.fit(_batched(train).repeat(), epochs=steps, steps_per_epoch=1, callbacks=[sweep], verbose=0,
                  class_weight=class_weight, shuffle=False)
        model._initial_epoch = None
    finally:
        snapshot.restore(model, strategy)
    recorded = [float(r) for r in rates[: len(sweep.losses)]]
    centred = centred_smoothing(sweep.losses, sweep.smoothed, steps)
    candidates = suggest(recorded, centred)
    result = LRFindResult(
        recorded, sweep.losses, sweep.smoothed, candidates["steepest"] or candidates["minimum_over_10"],
        sweep.stopped_early, time.monotonic() - start, stage.name, centred, candidates=candidates,
    )
    if not thawed and stage.solver != "sgd":
        result.notes.append(HEAD_ONLY_NOTE)
    if candidates["steepest"] is None and recorded:
        result.notes.append("the smoothed loss never fell before its minimum; lower --min-lr or raise --steps")
    if len(recorded) < steps and not sweep.stopped_early:
        result.notes.append(f"the sweep ended after {len(recorded)} of {steps} batches")
    return result


def smooth(values: list[float], beta: float = BETA) -> list[float]:
    """The bias-corrected exponential moving average of ``values`` (fastai's smoothing)."""
    out, average = [], 0.0
    for n, value in enumerate(values):
        average = beta * average + (1.0 - beta) * value
        out.append(average / (1.0 - beta ** (n + 1)))
    return out


def centred_smoothing(losses: list[float], smoothed: list[float], steps: int,
                      window: float = CENTRED_WINDOW) -> list[float]:
    """:func:`smooth` over ``window * steps`` batches (at least 3), run forward and then backward
    (no lag), over ``losses`` up to the minimum of ``smoothed`` (their forward moving average,
    which the divergence has not reached yet)."""
    if not losses:
        return []
    head = losses[: int(np.argmin(smoothed)) + 1]
    beta = 1.0 - 1.0 / max(3.0, window * steps)
    return smooth(smooth(head, beta)[::-1], beta)[::-1]


def _check_sweep(steps: int, min_lr: float, max_lr: float) -> None:
    if steps < 2:
        raise ConfigError(f"lr-find needs --steps >= 2, got {steps}")
    if not 0 < min_lr < max_lr:
        raise ConfigError(f"lr-find needs 0 < --min-lr < --max-lr, got {min_lr:g} and {max_lr:g}")


def suggest(rates: list[float], smoothed: list[float], skip_fraction: float = SKIP_FRACTION
            ) -> dict[str, float | None]:
    """Candidate rates from a sweep (see the module docstring for the rule).

    Returns ``{"steepest": rate or None, "minimum_over_10": rate or None}``.
    """
    if not smoothed:
        return {"steepest": None, "minimum_over_10": None}
    values = np.asarray(smoothed, np.float64)
    lowest = int(np.argmin(values))
    out: dict[str, float | None] = {"steepest": None, "minimum_over_10": rates[lowest] / 10.0}
    first = int(len(values) * skip_fraction)
    if lowest - first >= 2:
        window = values[first: lowest + 1]
        slopes = np.gradient(window, np.log10(np.asarray(rates[first: lowest + 1])))
        if slopes.min() < 0:
            out["steepest"] = rates[first + int(np.argmin(slopes))]
    return out


def plot(result: LRFindResult, path: str | Path) -> Path:
    """Writes the loss-vs-rate PNG (log rate axis; loss per batch, its moving average and the
    centred smoothing the rule reads; the suggestion marked)."""
    fig = figure(6.4, 4.2)
    ax = fig.add_subplot()
    ax.plot(result.rates, result.losses, color="0.75", linewidth=1, label="loss per batch")
    ax.plot(result.rates, result.smoothed, color="C0", linewidth=1, linestyle=":", label="moving average")
    ax.plot(result.rates[: len(result.centred)], result.centred, color="C0", linewidth=2,
            label="centred smoothing (rule)")
    if result.suggestion is not None:
        ax.axvline(result.suggestion, color="C3", linestyle="--", label=f"suggestion {result.suggestion:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    if result.centred:  # keep the divergence from flattening the interesting part
        low, high = min(result.losses), result.centred[0]
        ax.set_ylim(max(0.0, low - 0.05 * (high - low + 1e-3)), max(high, low) * 1.5 + 1e-3)
    stop = ", stopped early (diverged)" if result.stopped_early else ""
    ax.set_title(f"LR range test, stage {result.stage!r}{stop}", fontsize=10)
    ax.legend(fontsize=8)
    return atomic_save(path, lambda tmp: save(fig, tmp))


def pick_stage(cfg: RunConfig, name: str | None) -> Stage:
    """The stage named ``name``; by default the first stage that thaws groups, else the first."""
    stages = cfg.schedule.stages
    if name is not None:
        for stage in stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"the config has no stage {name!r}; its stages are {[s.name for s in stages]}")
    return next((s for s in stages if s.unfreeze != 0), stages[0])


def lr_find_config(
    config: RunConfig | str | Path,
    stage_name: str | None = None,
    *,
    steps: int = 200,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    out: str | Path | None = None,
    verbose: int | str | None = None,
) -> LRFindResult:
    """Runs :func:`lr_find` for one stage of a run config, without writing its run directory.

    The data and model are built as ``tlkit train`` builds them (same splits, seed,
    augmentation and backbone). Writes ``lr_find_<stage>.png`` and ``lr_find_<stage>.json``
    into ``out`` (default: the config's folder); their paths are in ``result.files``.
    """
    _check_sweep(steps, min_lr, max_lr)
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    verbose = cfg.training.verbose if verbose is None else verbose
    stage = pick_stage(cfg, stage_name)
    folder = Path(out) if out is not None else Path(cfg.source).parent if cfg.source else Path.cwd()
    spec = _resolve_spec(cfg)
    keras.utils.set_random_seed(cfg.seed)
    policy = keras.mixed_precision.global_policy()
    try:
        if cfg.training.mixed_precision != "none":
            keras.mixed_precision.set_global_policy(cfg.training.mixed_precision)
        with tempfile.TemporaryDirectory(prefix="tlkit-lr-find-") as scratch:  # labels/splits land here
            prepare = _prepare_audio if spec.modality == "audio" else _prepare_images
            data = prepare(cfg, spec, RunDir(scratch), verbose)
        strategy = make_strategy(cfg.training.distribute)
        with strategy.scope():
            model = build_classifier(
                spec, len(data.splits.class_names), weights=cfg.backbone.weights, head=cfg.head,
                augmentation=data.augmentation, image_size=data.image_size, seed=cfg.seed,
                name=model_name(cfg.name),
            )
        weights = None
        if cfg.data.class_weights and not cfg.head.multi_label:
            weights = class_weights(data.splits.train, data.splits.class_names)
        result = lr_find(model, data.train, stage, head=cfg.head, steps=steps, min_lr=min_lr, max_lr=max_lr,
                         strategy=strategy, class_weight=weights, jit_compile=cfg.training.jit_compile,
                         verbose=verbose)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    folder.mkdir(parents=True, exist_ok=True)
    png, js = folder / f"lr_find_{stage.name}.png", folder / f"lr_find_{stage.name}.json"
    result.files = {"plot": str(plot(result, png)), "json": str(js)}
    write_json(js, result.to_dict())
    return result


def summary(result: LRFindResult) -> str:
    """The lines ``tlkit lr-find`` prints: the suggestion, the TOML line to paste, notes, files."""
    lines = [f"stage {result.stage!r}: {len(result.rates)} batches, rate {result.rates[0]:.1e} -> "
             f"{result.rates[-1]:.1e}" + (" (stopped early: the loss diverged)" if result.stopped_early else "")
             if result.rates else f"stage {result.stage!r}: no batch had a finite loss; lower --max-lr"]
    if result.suggestion is not None:
        alt = result.candidates.get("minimum_over_10")
        lines.append(f"suggested learning rate: {result.suggestion:.1e}"
                     + (f" (minimum / 10: {alt:.1e})" if alt is not None else ""))
        lines.append(f"rule: {result.rule}")
        lines.append(f'paste into the [[schedule.stages]] table with name = "{result.stage}":')
        lines.append(f"    {result.toml_line()}")
        if result.stage in ("top", "deeper"):
            lines.append("(a config with [schedule] preset = \"fine_tune\" sets this rate as "
                         "fine_tune_learning_rate; its \"deeper\" stage trains at half of it)")
    lines += [f"note: {n}" for n in result.notes]
    lines += [f"wrote {p}" for p in result.files.values()]
    return "\n".join(lines)

