"""Backbones: specs, the registry, and one table of weight sources (one adapter module per source)."""

from tlkit.backbones.catalog import register_builtin
from tlkit.backbones.groups import LayerGroups, resolve_groups
from tlkit.backbones.loading import available_offline, load_backbone, prefetch
from tlkit.backbones.registry import get, list_backbones, register, unregister
from tlkit.backbones.sources import SOURCES, BackboneSource, register_source, source_for, unregister_source
from tlkit.backbones.spec import (
    AudioEncoderOptions,
    AudioFrontend,
    BackboneSpec,
    HubOptions,
    ImagePreprocessing,
    KerasAppOptions,
    PackageOptions,
)

register_builtin()

__all__ = [
    "SOURCES",
    "AudioEncoderOptions",
    "AudioFrontend",
    "BackboneSource",
    "BackboneSpec",
    "HubOptions",
    "ImagePreprocessing",
    "KerasAppOptions",
    "LayerGroups",
    "PackageOptions",
    "available_offline",
    "get",
    "list_backbones",
    "load_backbone",
    "prefetch",
    "register",
    "register_source",
    "resolve_groups",
    "source_for",
    "unregister",
    "unregister_source",
]
