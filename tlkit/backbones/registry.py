"""The backbone registry: ``register``, ``get`` and ``list_backbones`` are the whole surface.

Built-in specs are declared in :mod:`tlkit.backbones.catalog`; any name a source in
:data:`tlkit.backbones.sources.SOURCES` claims (a TF-Hub handle, a SavedModel directory,
a ``.keras`` file) is accepted by :func:`get` as well and turned into an ad-hoc spec.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from tlkit.backbones.sources import SOURCES, check_spec, claiming_source
from tlkit.backbones.spec import AudioFrontend, BackboneSpec, ImagePreprocessing, Modality
from tlkit.errors import BackboneNotFoundError, ConfigError

_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec, *, overwrite: bool = False) -> BackboneSpec:
    """Adds ``spec`` to the registry under ``spec.name`` and returns it.

    Raises:
        BackboneNotFoundError: the name is invalid or taken, or the spec's source is not
            in :data:`~tlkit.backbones.sources.SOURCES`.
        ConfigError: ``spec.source_options`` is not of the type its source reads.
    """
    if not re.fullmatch(r"[a-z0-9_.\-]+", spec.name):
        raise BackboneNotFoundError(
            f"backbone name {spec.name!r} is not valid: use lower-case letters, digits, '_', '-', '.'"
        )
    if spec.name in _REGISTRY and not overwrite:
        raise BackboneNotFoundError(
            f"a backbone named {spec.name!r} is already registered; pass overwrite=True to replace it"
        )
    check_spec(spec)
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Removes ``name`` from the registry (no error if absent)."""
    _REGISTRY.pop(name, None)


def list_backbones(modality: str | None = None) -> list[BackboneSpec]:
    """All registered specs, sorted by modality then name."""
    specs = [s for s in _REGISTRY.values() if modality is None or s.modality == modality]
    return sorted(specs, key=lambda s: (s.modality, s.name))


def get(
    name_or_handle: str | BackboneSpec,
    *,
    image_size: int | None = None,
    modality: Modality | None = None,
    sample_rate: int | None = None,
    frontend: AudioFrontend | None = None,
) -> BackboneSpec:
    """Resolves a registry name, a TF-Hub handle, a SavedModel directory or a ``.keras`` file.

    Args:
        name_or_handle: a registered name, ``https://...`` hub handle, a directory
            holding ``saved_model.pb``, a path ending in ``.keras``, or any other name a
            registered source claims.
        image_size: input size for ad-hoc image backbones (default 224).
        modality: for ad-hoc backbones only (registered specs know their own):
            ``"image"`` (the default) or ``"audio"``. An ad-hoc audio encoder takes the
            raw waveform ``(B, samples)`` unless ``frontend`` says otherwise.
        sample_rate: ad-hoc audio encoders: the rate they expect (default 16000, or
            ``frontend.sample_rate``).
        frontend: ad-hoc audio encoders: e.g. ``AudioFrontend(kind="log_mel", ...)``
            for an encoder that takes log-mel features ``(B, frames, n_mels)``.

    Raises:
        BackboneNotFoundError: nothing matches; the message lists close names.
    """
    if isinstance(name_or_handle, BackboneSpec):
        return name_or_handle
    key = str(name_or_handle)
    if key in _REGISTRY:
        return _REGISTRY[key]
    for spec in _REGISTRY.values():
        source = SOURCES.get(spec.source)
        if spec.location == key and source is not None and source.claims is not None:
            return spec  # a registered spec for this hub handle or path
    size = image_size or 224
    if modality not in (None, "image", "audio"):
        raise ConfigError(f"modality must be 'image' or 'audio', got {modality!r}")

    def adhoc(name: str, source: str, location: str) -> BackboneSpec:
        if modality == "audio":
            return _adhoc_audio(name, source, location, sample_rate, frontend)
        return _adhoc(name, source, location, size)

    claimed = claiming_source(key)
    if claimed is not None:
        if claimed.describe is not None and modality != "audio":
            return claimed.describe(key, image_size)  # the source reads its spec from the files
        adhoc_name, location = claimed.locate(key)
        return adhoc(adhoc_name, claimed.name, location)
    path = Path(key).expanduser()
    if path.exists() or "/" in key or key.startswith("."):
        raise BackboneNotFoundError(
            f"{key!r} is neither a SavedModel directory (with saved_model.pb) nor a .keras file"
        )
    close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise BackboneNotFoundError(
        f"unknown backbone {key!r}.{hint} Run `tlkit backbones` for the list, or pass a TF-Hub "
        "handle, a SavedModel directory or a .keras file."
    )


def _adhoc(name: str, source: str, location: str, size: int) -> BackboneSpec:
    """A spec for an unregistered hub handle or local model: an image backbone taking [0, 1]."""
    return BackboneSpec(
        name=name,
        modality="image",
        source=source,
        location=location,
        input_shape=(size, size, 3),
        preprocessing=ImagePreprocessing(scale=1.0 / 255.0),
        feature_dim=None,
        output="pooled",
        description="ad-hoc backbone (not in the registry); inputs scaled to [0, 1]",
    )


def _adhoc_audio(
    name: str, source: str, location: str, sample_rate: int | None, frontend: AudioFrontend | None
) -> BackboneSpec:
    """A spec for an unregistered audio encoder: raw waveform in (or ``frontend``'s features)."""
    if frontend is None:
        frontend = AudioFrontend(kind="waveform", sample_rate=sample_rate or 16000)
    elif sample_rate is not None and sample_rate != frontend.sample_rate:
        raise ConfigError(
            f"sample_rate={sample_rate} disagrees with the front-end's sample_rate={frontend.sample_rate}; "
            "give one of them"
        )
    rate = frontend.sample_rate
    takes = "raw waveform (B, samples)" if frontend.kind == "waveform" else f"log-mel (B, frames, {frontend.n_mels})"
    return BackboneSpec(
        name=name,
        modality="audio",
        source=source,
        location=location,
        input_shape=(rate,),
        preprocessing=frontend,
        feature_dim=None,
        output="sequence",
        sample_rate=rate,
        description=f"ad-hoc audio encoder (not in the registry) taking {takes} at {rate} Hz",
    )
