"""Datasets: image folders and manifests (``tlkit.data.images``), audio (``tlkit.data.audio``),
batching (``tlkit.data.batches``)."""

from tlkit.data.audio import (
    AudioSplits,
    check_audio,
    fixed_crops,
    load_audio,
    load_audio_splits,
    make_audio_dataset,
    predict_clips,
)
from tlkit.data.batches import Batches
from tlkit.data.images import (
    Example,
    Splits,
    check_images,
    class_weights,
    load_splits,
    make_batches,
    make_dataset,
    read_manifest,
    scan_folder,
    stratified_split,
)

__all__ = [
    "AudioSplits",
    "Batches",
    "Example",
    "Splits",
    "check_audio",
    "check_images",
    "class_weights",
    "fixed_crops",
    "load_audio",
    "load_audio_splits",
    "load_splits",
    "make_audio_dataset",
    "make_batches",
    "make_dataset",
    "predict_clips",
    "read_manifest",
    "scan_folder",
    "stratified_split",
]
