"""Adaptation inside :func:`tlkit.fine_tune`: the loop stays ``model.fit``; what changes is the
model and the data a stage fits.

:class:`Adapter` is what ``fine_tune(..., adaptation=AdaptationConfig(...), target=data)``
asks at four points:

1. :meth:`Adapter.prepare`, before the first stage: ``adabn`` re-estimates the BatchNorm
   statistics on the *source* training data (so the classifier trains on source-normalised
   features); ``reweight`` fits the domain classifier on the frozen pooled features of the
   source training set and the target (:mod:`tlkit.adaptation.reweight`).
2. :meth:`Adapter.solve_weights`, for a head-only stage solved in closed form: ``reweight``
   gives the importance weight of every cached feature row (the weights are a function of
   the features, so they line up with the cache whatever its order or number of crops).
3. :meth:`Adapter.plan`, for a stage trained epoch by epoch: ``dann`` and ``coral`` fit a
   *training model* (:func:`training_model`) in stages that thaw backbone groups; ``reweight``
   adds the weights to the data as Keras sample weights. ``None`` keeps the stage as it is.
4. :meth:`Adapter.finish`, after the last stage: ``adabn`` re-estimates the statistics on the
   *target* data, so the saved classifier normalises target inputs with target statistics.

Why ``dann`` and ``coral`` act only in stages that thaw backbone groups: both align the pooled
features, and in a head-only stage those are fixed (the backbone is frozen), so the alignment
gradient has nothing to move. Head-only stages therefore run as without adaptation (solved in
closed form by default, which stays fast), and a schedule with no thawed stage is refused.

The training model shares every layer with the classifier: its inputs are a source batch and a
target batch, stacked into one batch before the classifier's feature extractor (BatchNorm
layers that train see both domains); :class:`~tlkit.adaptation.layers.DomainAlignment` adds the
alignment loss on the pooled features and hands the source rows to the classifier head. The
class loss and metrics are the classifier's own, so the history keeps its names; the domain
head lives in the training model only, and the classifier that is saved and exported never
contains it. Adapted stages keep their last epoch rather than the epoch with the best source
validation loss (the source loss says nothing about the target, and picking its minimum picks
the least adapted epoch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit.adaptation.adabn import adapt_batchnorm
from tlkit.adaptation.layers import DomainAlignment, ReversalRamp, StackDomains
from tlkit.adaptation.reweight import ImportanceWeights, fit_importance_weights
from tlkit.baselines import frozen_features
from tlkit.config import AdaptationConfig
from tlkit.data.batches import Batches
from tlkit.errors import ConfigError
from tlkit.feature_cache import FeatureCache
from tlkit.model import split_head
from tlkit.schedule import Schedule, Stage

#: File-name prefix of an adapted stage's resume backups (they hold the training model's weights).
PREFIX = "adapt_"


def training_model(model: keras.Model, method: str, weight: float = 1.0, *, seed: int | None = None
                   ) -> tuple[keras.Model, DomainAlignment]:
    """The training model of ``dann`` / ``coral`` for a tlkit classifier (layers shared).

    Inputs: ``[source (B_s, ...), target (B_t, ...)]`` raw inputs of the classifier's kind.
    Output: ``(B_s, num_classes)`` probabilities of the source rows. While training, the
    alignment loss (``weight`` times the domain cross-entropy behind gradient reversal, or the
    CORAL loss) is added with ``add_loss``. Build it in the strategy scope that fits it.
    """
    extractor, head = split_head(model)
    shape, dtype = model.input.shape[1:], model.input.dtype
    source = keras.Input(shape=shape, dtype=dtype, name="source")
    target = keras.Input(shape=shape, dtype=dtype, name="target")
    features = extractor(StackDomains(name="stack_domains")([source, target]))
    align = DomainAlignment(method, weight, seed=seed, name="domain_alignment")
    outputs = head(align([features, source]))
    return keras.Model([source, target], outputs, name=f"{model.name}_adaptation"), align


def _inputs(data: Any) -> tf.data.Dataset:
    """Batches of raw inputs (targets dropped) from Batches or a batched tf.data.Dataset."""
    ds = data.batched() if isinstance(data, Batches) else data
    if not isinstance(ds, tf.data.Dataset):
        raise ConfigError(f"the adaptation target must be tlkit Batches or a batched tf.data.Dataset, got "
                          f"{type(data).__name__}")
    return ds.map(lambda x, *rest: x) if isinstance(ds.element_spec, tuple) else ds


def paired(source: Any, target: Any) -> tf.data.Dataset:
    """``((source_x, target_x), source_y[, w])`` batches: every source batch of one epoch with the
    next batch of the repeated target data (so an epoch is still one pass over the source)."""
    ds = source.batched() if isinstance(source, Batches) else source
    return tf.data.Dataset.zip((ds, _inputs(target).repeat())).map(
        lambda s, t: ((s[0], tf.cast(t, s[0].dtype)), *s[1:]))


def with_weights(examples: tf.data.Dataset, weights: np.ndarray, class_weight: dict[int, float] | None
                 ) -> tf.data.Dataset:
    """Unbatched ``(x, y)`` examples zipped with per-example ``weights`` -> ``(x, y, w)``; class
    weights (by each target row's arg-max, or a sparse label) are multiplied in."""
    w = tf.data.Dataset.from_tensor_slices(np.asarray(weights, np.float32))
    table = None
    if class_weight:
        table = tf.constant([float(class_weight.get(i, 1.0)) for i in range(max(class_weight) + 1)], tf.float32)

    def attach(pair: Any, weight: tf.Tensor) -> Any:
        x, y = pair[0], pair[1]
        if table is not None:
            if y.dtype.is_integer:  # a class index, () or (1,)
                index = tf.reshape(tf.cast(y, tf.int32), [-1])[0]
            else:
                index = tf.argmax(y, output_type=tf.int32)
            weight = weight * tf.gather(table, index)
        return x, y, weight

    return tf.data.Dataset.zip((examples, w)).map(attach)


@dataclass
class StagePlan:
    """What an adapted stage fits instead of the plain model and data (see :meth:`Adapter.plan`)."""

    model: keras.Model
    train: Any
    validation: Any
    prefix: str
    callbacks: list[keras.callbacks.Callback] = field(default_factory=list)
    class_weight: dict[int, float] | None = None
    keep_last: bool = False


@dataclass
class Adapter:
    """One fine-tuning run's adaptation (see the module docstring). Build it with :meth:`create`."""

    config: AdaptationConfig
    target: Any
    model: keras.Model
    strategy: tf.distribute.Strategy
    seed: int = 0
    say: Callable[[str], None] = lambda message: None
    weights: ImportanceWeights | None = None
    source_weights: np.ndarray | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, config: AdaptationConfig | None, target: Any, model: keras.Model, schedule: Schedule,
               strategy: tf.distribute.Strategy, *, seed: int = 0, say: Callable[[str], None] = lambda m: None,
               ) -> Adapter | None:
        """``None`` when ``config`` is ``None`` or its method ``"none"``.

        Raises:
            ConfigError: no target data; ``dann`` / ``coral`` with a schedule that thaws no
                backbone group.
        """
        if config is None or config.method == "none":
            return None
        if target is None:
            raise ConfigError(f"adaptation method {config.method!r} needs target data: pass fine_tune(..., target=...)"
                              " (tlkit Batches or a batched tf.data.Dataset of target inputs)")
        if config.method in ("dann", "coral") and not any(_thaws(s) for s in schedule.stages):
            raise ConfigError(
                f"adaptation method {config.method!r} aligns the pooled features, which change only in stages that "
                f"thaw backbone groups, and the schedule {[s.name for s in schedule.stages]} thaws none: add a stage "
                "with unfreeze >= 1, or use method 'reweight' or 'adabn' (both work with a frozen backbone)"
            )
        return cls(config, target, model, strategy, seed, say, summary={"method": config.method,
                                                                         "weight": config.weight})

    def prepare(self, train: Any) -> None:
        """Before the first stage (see the module docstring)."""
        method = self.config.method
        if method == "adabn":
            result = adapt_batchnorm(self.model, train)
            self.say(f"adabn: BatchNorm statistics of {result.layers} layer(s) estimated on {result.examples} source "
                     "rows for training" if result.layers else "adabn: the model has no BatchNorm layer; nothing to do")
            self.summary["batchnorm_layers"] = result.layers
        elif method == "reweight":
            source = frozen_features(self.model, train)
            target = frozen_features(self.model, _inputs(self.target))
            self.weights = fit_importance_weights(source, target, seed=self.seed)
            self.source_weights = self.weights.source_weights if isinstance(train, Batches) else None
            self.summary["importance_weights"] = self.weights.summary()
            s = self.weights.summary()
            self.say(f"reweight: importance weights of {s['examples']} source examples in {s['min']:.2f}..{s['max']:.2f}"
                     f" (worth {s['effective_size']:.0f} examples; domain classifier C={s['C']:g})")

    def solve_weights(self, cache: FeatureCache) -> np.ndarray | None:
        """Importance weights of the cached training rows (``reweight``), else ``None``."""
        return self.weights(cache.train_x) if self.weights is not None else None

    def plan(self, stage: Stage, thawed: list[int], cache: FeatureCache | None, train: Any, validation: Any,
             steps: int, class_weight: dict[int, float] | None) -> StagePlan | None:
        """The stage's training model and data, or ``None`` to run it unchanged."""
        method = self.config.method
        if method == "reweight" and self.weights is not None:
            return self._weighted_plan(stage, cache, train, validation, class_weight)
        if method not in ("dann", "coral") or not thawed:
            return None
        with self.strategy.scope():  # the training model belongs to the strategy that fits it
            fit_model, align = training_model(self.model, method, self.config.weight,
                                              seed=self.seed + _stage_index(stage))
        callbacks: list[keras.callbacks.Callback] = []
        if align.reversal is not None:
            callbacks.append(ReversalRamp(align.reversal, stage.epochs, steps))
        val = paired(validation, self.target) if validation is not None else None
        return StagePlan(fit_model, paired(train, self.target), val, PREFIX, callbacks, class_weight, keep_last=True)

    def _weighted_plan(self, stage: Stage, cache: FeatureCache | None, train: Any, validation: Any,
                       class_weight: dict[int, float] | None) -> StagePlan:
        assert self.weights is not None
        if cache is not None:
            weighted = cache.train.with_examples(with_weights(cache.train.examples, self.weights(cache.train_x),
                                                              class_weight))
            return StagePlan(cache.head, weighted.batched(), cache.validation, "head_")
        if not isinstance(train, Batches) or self.source_weights is None:
            raise ConfigError(
                f"stage {stage.name!r}: method 'reweight' needs the training data as tlkit Batches "
                "(tlkit.data.make_batches) to attach one weight per example; this data is a tf.data pipeline "
                "(e.g. random audio crops). Use method 'dann', 'coral' or 'adabn', or a head-only schedule "
                "(its solved head takes the weights)"
            )
        weighted = train.with_examples(with_weights(train.examples, self.source_weights, class_weight))
        return StagePlan(self.model, weighted.batched(), validation, "")

    def finish(self) -> None:
        """After the last stage (see the module docstring)."""
        if self.config.method == "adabn":
            result = adapt_batchnorm(self.model, self.target)
            if result.layers:
                self.say(f"adabn: BatchNorm statistics of {result.layers} layer(s) re-estimated on {result.examples} "
                         "target rows")
            self.summary["target_rows"] = result.examples


def _thaws(stage: Stage) -> bool:
    return stage.epochs > 0 and stage.unfreeze != 0


def _stage_index(stage: Stage) -> int:
    """A stable small number per stage name (seeds each stage's domain head the same way on resume)."""
    return sum(ord(c) for c in stage.name)
