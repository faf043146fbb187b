"""Every Keras-serialisable class tlkit defines, in one place.

Each class is registered under the ``tlkit>`` package by its own module's decorator; this
module imports them all, so a ``model.keras`` written by any tlkit run deserialises once this
module is imported (:meth:`tlkit.rundir.RunDir.load_model` does). A test checks that every
``tlkit>`` name Keras knows is listed here, so a new layer cannot be forgotten.
"""

from __future__ import annotations

from tlkit.adaptation.layers import GradientReversal
from tlkit.audio_augment import AudioAugment
from tlkit.backbones.hub import SavedModelBackbone
from tlkit.backbones.layers import MultiHeadAttention
from tlkit.backbones.whisper import SlicedPositionEmbedding
from tlkit.frontends import LogMelSpectrogram
from tlkit.layers import (FrozenBatchNormalization, ImageNormalization, RandomAffine, StochasticDepth,
                          TrainingOnly, WaveformStandardization)
from tlkit.model import AttentionPooling
from tlkit.multitask.losses import MaskedAccuracy, MaskedCrossentropy

SERIALIZABLES: tuple[type, ...] = (
    AttentionPooling,
    AudioAugment,
    FrozenBatchNormalization,
    GradientReversal,
    ImageNormalization,
    LogMelSpectrogram,
    MaskedAccuracy,
    MaskedCrossentropy,
    MultiHeadAttention,
    RandomAffine,
    SavedModelBackbone,
    SlicedPositionEmbedding,
    StochasticDepth,
    TrainingOnly,
    WaveformStandardization,
)


def register_serializables() -> tuple[type, ...]:
    """The serialisable classes (importing this module registered them with Keras)."""
    return SERIALIZABLES
