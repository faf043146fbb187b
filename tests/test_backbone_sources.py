"""The table of backbone sources: every spec's source is in it, and adding a source is one record.

``test_adding_a_source_*`` follow the recipe in :mod:`tlkit.backbones.sources` once, end to
end: a toy source that builds a tiny random Keras model, reached both through an ad-hoc
name it claims (``"toy:<width>"``) and through a registered spec with typed options.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest

import tlkit
import tlkit.backbones as backbones
from tlkit.backbones import hub
from tlkit.backbones.sources import SOURCES, BackboneSource, source_for
from tlkit.backbones.spec import BackboneSpec, HubOptions, ImagePreprocessing, PackageOptions
from tlkit.config import config_from_dict
from tlkit.errors import BackboneNotFoundError, ConfigError

TOY_PREFIX = "toy:"


@dataclass(frozen=True)
class ToyOptions:
    """The toy source's typed options: the feature width of the model it builds."""

    width: int = 4


def _toy_model(width: int, input_shape: tuple[int, ...]) -> keras.Model:
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(width, 3, strides=2, padding="same", name="toy_conv")(inputs)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name="toy_pool")(x), name="toy")


def _toy_width(spec: BackboneSpec) -> int:
    if spec.location.startswith(TOY_PREFIX):
        return int(spec.location[len(TOY_PREFIX):])
    return spec.options_for(ToyOptions).width


def _toy_load(spec: BackboneSpec, weights: str | None, input_shape: tuple[int, ...] | None) -> keras.Model:
    model = _toy_model(_toy_width(spec), tuple(input_shape or spec.input_shape))
    if weights not in (None, "pretrained"):
        model.load_weights(weights)
    return model


def _toy_locate(name: str) -> tuple[str, str]:
    if not name[len(TOY_PREFIX):].isdigit():
        raise BackboneNotFoundError(f"{name!r}: a toy backbone is named 'toy:<width>'")
    return name.replace(":", "_"), name


TOY = BackboneSource(
    name="toy",
    load=_toy_load,
    available_offline=lambda spec: True,
    prefetch=lambda spec: Path(spec.location),
    claims=lambda name: name.startswith(TOY_PREFIX),
    locate=_toy_locate,
    options=ToyOptions,
)


@pytest.fixture
def toy_source() -> Iterator[BackboneSource]:
    backbones.register_source(TOY)
    try:
        yield TOY
    finally:
        backbones.unregister_source(TOY.name)
        backbones.unregister("toy_registered")


def test_every_registered_spec_has_a_source_in_the_table() -> None:
    for spec in backbones.list_backbones():
        source = source_for(spec)
        assert SOURCES[spec.source] is source and source.name == spec.source, spec.name
        if spec.source_options is not None:
            assert source.options is not None and isinstance(spec.source_options, source.options), spec.name


def test_builtin_sources_and_what_they_claim(tmp_path: Path) -> None:
    assert {"keras_applications", "tfhub", "savedmodel", "keras_file", "package", "builder"} <= set(SOURCES)
    # Only SavedModel-backed sources (and keras-hub, whose classes register only when the optional
    # package is imported) need a run to be rebuilt instead of loaded in safe mode.
    assert {name for name, s in SOURCES.items() if not s.reloads_safely} == {"tfhub", "savedmodel", "keras_hub"}
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"")
    claimed = {
        "https://tfhub.dev/google/yamnet/1": "tfhub",
        "gs://bucket/module": "tfhub",
        str(tmp_path / "sm"): "savedmodel",
        str(tmp_path / "model.keras"): "keras_file",
        "mobilenet_v2": None,
        str(tmp_path): None,
    }
    for name, expected in claimed.items():
        got = [s.name for s in SOURCES.values() if s.claims is not None and s.claims(name)]
        assert got == ([expected] if expected else []), name
    # The config's "is this a hub handle, not a path?" is the tfhub source's own claim.
    assert source_for("tfhub").claims is hub.is_hub_handle
    raw = {"data": {"path": "images"}, "backbone": {"name": "https://tfhub.dev/google/yamnet/1"}}
    assert config_from_dict(raw, tmp_path).backbone.name == "https://tfhub.dev/google/yamnet/1"
    raw["backbone"] = {"name": "sub/model.keras"}
    assert config_from_dict(raw, tmp_path).backbone.name == str(tmp_path / "sub" / "model.keras")


def test_adding_a_source_makes_its_names_resolve_and_build(toy_source: BackboneSource) -> None:
    spec = backbones.get("toy:6", image_size=32)
    assert spec.source == "toy" and spec.location == "toy:6" and spec.name == "toy_6"
    assert backbones.available_offline(spec) and backbones.prefetch(spec) == "toy:6"
    model = tlkit.build_classifier(spec, 3, augmentation=None, image_size=32)
    x = np.random.default_rng(0).uniform(0, 255, (2, 40, 50, 3)).astype(np.float32)
    out = np.asarray(model(x))
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    assert model.get_layer("backbone").output.shape[-1] == 6
    with pytest.raises(BackboneNotFoundError, match="toy:<width>"):
        backbones.get("toy:wide")


def test_adding_a_source_with_typed_options(toy_source: BackboneSource) -> None:
    fields = dict(modality="image", source="toy", location="toy", input_shape=(24, 24, 3),
                  preprocessing=ImagePreprocessing(scale=1 / 255.0), feature_dim=5, output="pooled",
                  licence="test fixture")
    backbones.register(BackboneSpec("toy_registered", source_options=ToyOptions(width=5), **fields))
    model = tlkit.build_classifier("toy_registered", 2, augmentation=None)
    assert model.get_layer("backbone").output.shape[-1] == 5
    assert model(np.zeros((1, 24, 24, 3), np.float32)).shape == (1, 2)
    with pytest.raises(ConfigError, match="reads ToyOptions"):
        backbones.register(BackboneSpec("toy_wrong", source_options=HubOptions(), **fields))


def test_removed_source_is_gone_everywhere(toy_source: BackboneSource) -> None:
    backbones.unregister_source("toy")
    with pytest.raises(BackboneNotFoundError, match="unknown backbone"):
        backbones.get("toy:4")
    orphan = BackboneSpec("toy_orphan", "image", "toy", "toy", (8, 8, 3), ImagePreprocessing(), 4,
                          licence="test fixture")
    with pytest.raises(BackboneNotFoundError, match="unknown backbone source 'toy'"):
        backbones.register(orphan)
    with pytest.raises(BackboneNotFoundError, match="register_source"):
        backbones.load_backbone(orphan)


def test_spec_options_are_typed() -> None:
    lite = backbones.get("efficientnet_lite0")
    assert lite.options_for(PackageOptions).converter == "efficientnet_lite"
    with pytest.raises(ConfigError, match="reads HubOptions"):
        lite.options_for(HubOptions)
    assert backbones.get("https://tfhub.dev/x/1").options_for(HubOptions) == HubOptions()  # defaults
    assert HubOptions(call_kwargs={"sample_rate": 16000}).call_kwargs == (("sample_rate", 16000),)  # hashable
    trill = backbones.get("trill").options_for(HubOptions)
    assert trill.per_example and trill.input_kwarg == "samples" and dict(trill.call_kwargs) == {"sample_rate": 16000}
    with pytest.raises(ConfigError, match="per_example_rank"):
        HubOptions(per_example_rank=3)
    assert backbones.get("wav2vec2_base").audio_encoder.fixed_input_samples == 246_000
    assert backbones.get("yamnet").audio_encoder.min_input_samples == 15_600
