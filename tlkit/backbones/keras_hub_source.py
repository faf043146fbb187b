"""Source adapter: keras-hub image backbones, from Kaggle presets or local preset directories.

Names: ``keras_hub:<preset>`` (e.g. ``keras_hub:resnet_50_imagenet``, fetched by keras-hub
through kagglehub into ``$KAGGLEHUB_CACHE``, default ``~/.cache/kagglehub``), a local preset
directory (``config.json`` whose ``class_name`` is a keras-hub backbone, as written by
``backbone.save_to_preset(dir)``), or a curated registered name (:data:`CURATED`,
``kh_resnet_50_imagenet``...).

The layer this source returns takes raw RGB pixels 0..255 (the spec's preprocessing is the
identity) and applies the preset's own ``image_converter.json`` rescaling (``x * scale +
offset``, per channel or scalar) before the backbone, so every preset keeps the input it
was trained on. Its output is the backbone's feature map (B, h, w, C). Layer groups come
from the backbone's structure: keras-hub CNNs name their stages ``stack<i>_`` (ResNet) or
``...block<i>``; a backbone whose config gives ``stackwise_num_filters`` is cut one group
per stage (the stem joins the first); others split into four groups by depth.

keras-hub is an optional extra (``pip install 'tlkit[keras-hub]'``; it pulls tensorflow-text,
~265 MB, and takes seconds to import), imported only when such a backbone is loaded.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from tlkit.backbones.layers import ImageNormalization
from tlkit.backbones.spec import BackboneSpec, ImagePreprocessing
from tlkit.errors import BackboneNotFoundError, ConfigError, WeightsUnavailableError
from tlkit.text import first_line

PREFIX = "keras_hub:"
EXTRA = "pip install 'tlkit[keras-hub]'"
IDENTITY = ImagePreprocessing()
KERAS_HUB_LICENCE = "see the preset's model card on Kaggle (keras-hub presets; most Apache-2.0)"


@dataclass(frozen=True)
class KerasHubOptions:
    """Options of the ``keras_hub`` source.

    ``kaggle_handle``: ``kaggle://keras/<model>/keras/<preset>/<version>`` of a Kaggle preset,
    so tlkit can tell whether it is in the kagglehub cache without importing keras-hub.
    """

    kaggle_handle: str = ""


def kagglehub_cache() -> Path:
    """``$KAGGLEHUB_CACHE`` or ``~/.cache/kagglehub`` (kagglehub's own rule)."""
    return Path(os.environ.get("KAGGLEHUB_CACHE") or Path.home() / ".cache" / "kagglehub").expanduser()


def is_preset_dir(name: str) -> bool:
    """A local directory holding a keras-hub backbone preset (``config.json`` naming a keras-hub class)."""
    config = Path(name).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        return str(json.loads(config.read_text(encoding="utf-8")).get("module", "")).startswith("keras_hub")
    except (OSError, ValueError):
        return False


def claims(name: str) -> bool:
    return name.startswith(PREFIX) or is_preset_dir(name)


def locate(name: str) -> tuple[str, str]:
    if name.startswith(PREFIX):
        preset = name[len(PREFIX):]
        if not preset:
            raise BackboneNotFoundError(f"{name!r} names no preset; write keras_hub:<preset>, e.g. keras_hub:resnet_50_imagenet")
        return f"keras_hub_{preset}", preset
    path = Path(name).expanduser().resolve()
    return path.name, str(path)


def describe(name: str, image_size: int | None) -> BackboneSpec:
    """The spec of an unregistered ``keras_hub:<preset>`` or preset directory (read from its
    files when local; a Kaggle preset's groups and size are known once it is fetched)."""
    spec_name, location = locate(name)
    config = _preset_config(location)
    size = image_size or _preset_size(location, config) or 224
    return BackboneSpec(
        name=re.sub(r"[^a-z0-9_.\-]", "_", spec_name.lower()), modality="image", source="keras_hub",
        location=location, input_shape=(size, size, 3), preprocessing=IDENTITY, feature_dim=None,
        output="spatial", layer_groups=_stage_groups(config), licence=KERAS_HUB_LICENCE,
        description=f"keras-hub preset {location} ({config.get('class_name', 'backbone')})",
    )


def _preset_config(location: str) -> dict[str, Any]:
    path = Path(location) / "config.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _preset_size(location: str, config: dict[str, Any]) -> int | None:
    shape = config.get("config", {}).get("image_shape") or [None]
    if shape[0]:
        return int(shape[0])
    converter = _converter_config(location)
    size = converter.get("image_size") if converter else None
    return int(size[0]) if size else None


def _stage_groups(config: dict[str, Any]) -> tuple[str, ...]:
    """One group per ``stack<i>_`` stage when the config says how many (stem with the first,
    ``post_`` layers with the last); ``()`` (split by depth) otherwise."""
    stages = len(config.get("config", {}).get("stackwise_num_filters") or [])
    if stages < 2:
        return ()
    later = "|".join(str(i) for i in range(1, stages))
    middle = tuple(rf"^stack{i}_" for i in range(1, stages - 1))
    return (rf"^(?!stack({later})_|post_)", *middle, rf"^(stack{stages - 1}_|post_)")


def _converter_config(location: str) -> dict[str, Any] | None:
    path = Path(location) / "image_converter.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("config", {})


def _keras_hub() -> Any:
    try:
        return importlib.import_module("keras_hub")  # optional and slow to import: only when used
    except ImportError as exc:
        raise ConfigError(f"keras-hub backbones need the keras-hub package, which is not installed: {EXTRA}") from exc


def _cached_kaggle_dir(spec: BackboneSpec) -> Path | None:
    """The preset's folder in the kagglehub cache, when it is there."""
    handle = spec.options_for(KerasHubOptions).kaggle_handle
    if not handle.startswith("kaggle://"):
        return None
    owner, model, framework, variation, *version = handle[len("kaggle://"):].split("/")
    root = kagglehub_cache() / "models" / owner / model / framework / variation
    candidates = [root / version[0]] if version else sorted(root.glob("*"))
    found = [c for c in candidates if (c / "config.json").is_file()]
    return found[-1] if found else None


def available_offline(spec: BackboneSpec) -> bool:
    """A local preset directory, or a Kaggle preset already in the kagglehub cache."""
    return is_preset_dir(spec.location) or _cached_kaggle_dir(spec) is not None


def _preset(spec: BackboneSpec) -> str:
    """What to hand ``from_preset``: the local directory when there is one (no network)."""
    if is_preset_dir(spec.location):
        return spec.location
    cached = _cached_kaggle_dir(spec)
    return str(cached) if cached is not None else spec.location


def load(spec: BackboneSpec, weights: str | None = "pretrained", input_shape: tuple[int, ...] | None = None) -> keras.Model:
    """Builds the preset's backbone behind its own input rescaling.

    Args:
        weights: ``"pretrained"`` (the preset's weights), ``None`` (the preset's architecture,
            random init) or a ``.weights.h5`` file of that architecture.
        input_shape: (H, W, 3) to build for (default ``spec.input_shape``).

    Returns:
        A model (B, H, W, 3) raw pixels 0..255 -> (B, h, w, C).

    Raises:
        WeightsUnavailableError: the preset is neither local nor cached and cannot be fetched.
        ConfigError: keras-hub is not installed.
    """
    hub = _keras_hub()
    preset = _preset(spec)
    shape = tuple(input_shape or spec.input_shape)
    start = time.monotonic()
    try:
        backbone = hub.models.Backbone.from_preset(preset, load_weights=weights == "pretrained", image_shape=shape)
        converter = _converter_config(preset) if Path(preset).is_dir() else None
    except Exception as exc:  # kagglehub / requests raise many kinds when offline
        if Path(preset).is_dir():
            raise
        raise WeightsUnavailableError(
            f"cannot fetch keras-hub preset {spec.location!r} for backbone {spec.name!r} after "
            f"{time.monotonic() - start:.1f}s: {type(exc).__name__}: {first_line(exc)}\n"
            f"keras-hub keeps presets in the kagglehub cache {kagglehub_cache()} (set KAGGLEHUB_CACHE to move it; "
            "KERAS_HOME holds Keras's own downloads).\n"
            f"Fix: on a connected machine run `tlkit fetch {spec.name}` (with the same KAGGLEHUB_CACHE), then copy "
            f"that folder to this machine; or save the backbone with save_to_preset(DIR) and name DIR instead."
        ) from exc
    if weights not in (None, "pretrained"):
        backbone.load_weights(str(weights))
    inputs = keras.Input(shape, name="pixels")
    x = inputs
    if converter:
        x = _rescaling(converter)(x)
    return keras.Model(inputs, backbone(x), name=f"keras_hub_{backbone.name}")


def _rescaling(converter: dict[str, Any]) -> keras.layers.Layer:
    """keras-hub's ``x * scale + offset`` (scalars or per channel) as tlkit's normalization layer."""

    scale, offset = converter.get("scale"), converter.get("offset")
    if isinstance(scale, list) or isinstance(offset, list):
        s = [float(v) for v in (scale if isinstance(scale, list) else [scale or 1.0] * 3)]
        o = [float(v) for v in (offset if isinstance(offset, list) else [offset or 0.0] * 3)]
        # (x - mean) / std == x * s + o with std = 1 / s, mean = -o / s.
        pre = ImagePreprocessing(mean=tuple(-b / a for a, b in zip(s, o)), std=tuple(1 / a for a in s))  # type: ignore[arg-type]
    else:
        pre = ImagePreprocessing(scale=float(scale if scale is not None else 1.0), offset=float(offset or 0.0))
    return ImageNormalization.from_spec(pre, name="preset_rescaling")


def prefetch(spec: BackboneSpec) -> Path:
    """Downloads the preset into the kagglehub cache (keras-hub's own download); returns its folder."""
    if is_preset_dir(spec.location):
        return Path(spec.location)
    load(spec, "pretrained")
    return _cached_kaggle_dir(spec) or kagglehub_cache()


def _curated(preset: str, handle: str, size: int, features: int, params: int, groups: tuple[str, ...],
             description: str) -> BackboneSpec:
    return BackboneSpec(
        name=f"kh_{preset}", modality="image", source="keras_hub", location=preset, input_shape=(size, size, 3),
        preprocessing=IDENTITY, feature_dim=features, output="spatial", layer_groups=groups,
        licence=KERAS_HUB_LICENCE, description=f"keras-hub {description}", params=params,
        source_options=KerasHubOptions(kaggle_handle=handle),
    )


_RESNET_STAGES = _stage_groups({"config": {"stackwise_num_filters": [0, 0, 0, 0]}})

CURATED: tuple[BackboneSpec, ...] = (
    _curated("resnet_18_imagenet", "kaggle://keras/resnetv1/keras/resnet_18_imagenet/3", 224, 512, 11_186_112,
             _RESNET_STAGES, "ResNet-18, ImageNet-1k"),
    _curated("resnet_50_imagenet", "kaggle://keras/resnetv1/keras/resnet_50_imagenet/3", 224, 2048, 23_561_152,
             _RESNET_STAGES, "ResNet-50, ImageNet-1k"),
    _curated("resnet_v2_50_imagenet", "kaggle://keras/resnetv2/keras/resnet_v2_50_imagenet/3", 224, 2048,
             23_561_152, _RESNET_STAGES, "ResNet-50 v2, ImageNet-1k"),
    _curated("resnet_vd_50_ssld_v2_imagenet", "kaggle://keras/resnet_vd/keras/resnet_vd_50_ssld_v2_imagenet/2",
             224, 2048, 25_629_512, _RESNET_STAGES, "ResNet-50-vd (SSLD v2 distilled), ImageNet-1k"),
    _curated("efficientnet_b0_ra_imagenet", "kaggle://keras/efficientnet/keras/efficientnet_b0_ra_imagenet/2",
             224, 1280, 5_288_548, (), "EfficientNet-B0 (timm RandAugment), ImageNet-1k"),
    _curated("mobilenet_v3_large_100_imagenet",
             "kaggle://keras/mobilenetv3/keras/mobilenet_v3_large_100_imagenet/1", 224, 960, 2_996_352, (),
             "MobileNetV3-Large 1.0, ImageNet-1k"),
)
"""Curated presets registered by name (``tlkit backbones`` lists them); groups of the
ResNets per stage, the others by depth. Kaggle handles from keras-hub 0.32's preset tables."""
