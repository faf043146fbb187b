"""Backbones: specs, the registry, and one loader per weights source."""

from tlkit.backbones.catalog import register_builtin
from tlkit.backbones.groups import LayerGroups, resolve_groups
from tlkit.backbones.loading import available_offline, load_backbone, prefetch
from tlkit.backbones.registry import get, list_backbones, register, unregister
from tlkit.backbones.spec import AudioFrontend, BackboneSpec, ImagePreprocessing

register_builtin()

__all__ = [
    "AudioFrontend",
    "BackboneSpec",
    "ImagePreprocessing",
    "LayerGroups",
    "available_offline",
    "get",
    "list_backbones",
    "load_backbone",
    "prefetch",
    "register",
    "resolve_groups",
    "unregister",
]
