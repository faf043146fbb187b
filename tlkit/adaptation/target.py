"""A run's target domain: its unlabelled examples read like the source, and the shift before/after.

:func:`load_target` reads ``[adaptation] target`` (a folder, flat or with class sub-folders,
or a CSV manifest; labels are ignored) with the run's own loader, image size or sample rate
and crop length, and serves it as training data: shuffled :class:`~tlkit.data.Batches` of
images, or a ``tf.data`` pipeline of random audio crops. :meth:`TargetData.shift_auc` is the
domain-classifier AUC (:func:`tlkit.shift.domain_auc`) between the source training split and
the target on a model's pooled features; ``tlkit train`` records it before training (the
pretrained backbone) and after (the adapted model) in ``run.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tlkit.baselines import feature_extractor
from tlkit.config import RunConfig
from tlkit.data.audio import make_audio_dataset
from tlkit.data.images import Example, make_batches
from tlkit.errors import DataError
from tlkit.shift import Side, domain_auc, read_side, side_features
from tlkit.transfer_report import RunSplits

#: At most this many examples per domain enter the shift AUC recorded by a run.
SHIFT_EXAMPLES = 500
UNLABELLED = ""


@dataclass
class TargetData:
    """The target domain of a run.

    Attributes:
        path: where it was read from.
        examples: its files (labels replaced by ``""``).
        data: training input: Batches (images) or a batched tf.data pipeline (audio crops).
        modality / image_size / sample_rate / clip: how it is read, as the source is.
        waveforms: decoded clips (audio).
        record: what ``run.json`` stores under ``"adaptation"`` (see :meth:`measure`).
    """

    path: str
    examples: list[Example]
    data: Any
    modality: str
    image_size: tuple[int, int] | None = None
    sample_rate: int | None = None
    clip: int | None = None
    waveforms: dict[str, np.ndarray] = field(default_factory=dict)
    batch_size: int = 32
    record: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        return f"adaptation target: {len(self.examples)} unlabelled {self.modality} examples from {self.path}"

    def measure(self, model: keras.Model, source: RunSplits, when: str, *, seed: int = 0,
                done: dict[str, Any] | None = None) -> float:
        """Records ``shift_auc_<when>`` (``"before"`` / ``"after"`` training) in :attr:`record`,
        with what the adaptation did (``done``: :attr:`tlkit.FineTuneResult.adaptation`)."""
        auc = self.shift_auc(model, source.train, source.waveforms, seed=seed)
        self.record.update({"target": self.path, "target_examples": len(self.examples), **(done or {}),
                            f"shift_auc_{when}": auc})
        return auc

    def shift_auc(self, model: keras.Model, source: Sequence[Example], source_waveforms: dict[str, np.ndarray] | None
                  = None, *, seed: int = 0) -> float:
        """Domain-classifier ROC-AUC between ``source`` and the target on ``model``'s pooled
        features (at most :data:`SHIFT_EXAMPLES` per domain, a seeded choice)."""
        extractor = feature_extractor(model)
        rng = np.random.default_rng(seed)
        features = []
        for examples, waves in ((list(source), source_waveforms or {}), (self.examples, self.waveforms)):
            if len(examples) > SHIFT_EXAMPLES:
                examples = [examples[i] for i in sorted(rng.choice(len(examples), SHIFT_EXAMPLES, replace=False))]
            side = Side(examples, dict(waves))
            features.append(side_features(extractor, side, modality=self.modality, image_size=self.image_size,
                                          sample_rate=self.sample_rate, clip=self.clip, batch_size=self.batch_size))
        return domain_auc(features[0], features[1], seed=seed)[0]


def load_run_target(config: RunConfig, source: RunSplits, modality: str, image_size: tuple[int, int] | None
                    ) -> TargetData:
    """``[adaptation] target`` of a run, read as its source is (size, rate, crop, batch size, seed)."""
    assert config.adaptation.target is not None
    target = load_target(config.adaptation.target, modality=modality, image_size=image_size,
                         sample_rate=source.sample_rate, clip=source.clip_samples,
                         batch_size=config.data.batch_size, seed=config.seed)
    target.record["method"] = config.adaptation.method
    return target


def load_target(
    path: str | Path, *, modality: str, image_size: tuple[int, int] | None = None, sample_rate: int | None = None,
    clip: int | None = None, batch_size: int = 32, seed: int = 0,
) -> TargetData:
    """Reads the target domain for training (see the module docstring).

    Raises:
        DataError: a missing or empty target, or fewer than 2 readable examples.
    """
    side = read_side(path, modality, sample_rate)
    examples = [Example(e.path, (UNLABELLED,)) for e in side.examples]
    if len(examples) < 2:
        raise DataError(f"[adaptation] target {str(path)!r} has {len(examples)} readable example(s); it needs at least 2")
    if modality == "audio":
        if clip is None:
            raise DataError("an audio adaptation target needs the run's crop length")
        data = make_audio_dataset(examples, [UNLABELLED], side.waveforms, clip, batch_size, training=True, seed=seed)
    else:
        data = make_batches(examples, [UNLABELLED], image_size or (224, 224), batch_size, training=True, seed=seed)
    return TargetData(str(path), examples, data, modality, image_size, sample_rate, clip, side.waveforms, batch_size)
