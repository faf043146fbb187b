"""Datasets: image folders and manifests (``tlkit.data.images``)."""

from tlkit.data.images import (
    Example,
    Splits,
    check_images,
    class_weights,
    load_splits,
    make_dataset,
    read_manifest,
    scan_folder,
    stratified_split,
)

__all__ = [
    "Example",
    "Splits",
    "check_images",
    "class_weights",
    "load_splits",
    "make_dataset",
    "read_manifest",
    "scan_folder",
    "stratified_split",
]
