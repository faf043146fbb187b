"""Datasets: listing folders and manifests with their checks (``tlkit.data.listing``), images
(``tlkit.data.images``), audio (``tlkit.data.audio``), batching (``tlkit.data.batches``)."""

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
    decode_rgb,
    load_splits,
    make_batches,
    make_dataset,
    read_manifest,
    scan_folder,
    stratified_split,
)
from tlkit.data.listing import Listing, list_folder, list_manifest

__all__ = [
    "AudioSplits",
    "Batches",
    "Example",
    "Listing",
    "Splits",
    "check_audio",
    "check_images",
    "class_weights",
    "decode_rgb",
    "fixed_crops",
    "list_folder",
    "list_manifest",
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
