"""The one table of backbone weight sources: one :class:`BackboneSource` record per source.

A spec's ``source`` is a key of :data:`SOURCES`; loading, the offline check, pre-fetching,
the resolution of ad-hoc names (hub handles, SavedModel directories, ``.keras`` files) and
the run directory's reload policy all ask the record, and none keeps its own list of
source names.

How to add a backbone source (one record + its test; ``tests/test_backbone_sources.py``
does it once, end to end):

1. Write the adapter, a small module under ``tlkit/backbones/``: a loader
   ``load(spec, weights, input_shape) -> keras layer`` taking the spec's preprocessed
   input and returning features shaped as ``spec.output`` says, plus ``available_offline``
   and ``prefetch``. If the source needs per-spec settings, give it a frozen dataclass of
   options (all fields defaulted) and read it with ``spec.options_for(MyOptions)``.
2. Add its record: ``register_source(BackboneSource(name="mine", load=..., ...,
   options=MyOptions))`` (or a line in :func:`_builtin_sources` for a built-in one).
   Give it ``claims`` (and ``locate``) if names that are not in the registry, e.g. a URL
   scheme, should resolve to it; set ``reloads_safely=False`` if a model holding its
   layer cannot be loaded from ``.keras`` in safe mode.
3. Register specs with ``source="mine"`` (:func:`tlkit.backbones.register` checks that
   the source is in the table and that ``source_options`` is of its type).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras

from tlkit.backbones import hub, keras_apps, keras_file, keras_hub_source, package
from tlkit.backbones.spec import BackboneSpec, HubOptions, KerasAppOptions, PackageOptions
from tlkit.errors import BackboneNotFoundError, ConfigError

Weights = str | None
#: ``load(spec, weights, input_shape) -> layer``; ``input_shape`` is the size to build an
#: image backbone for (``None``: the spec's), ignored by sources with a fixed input size.
Loader = Callable[[BackboneSpec, Weights, tuple[int, ...] | None], keras.layers.Layer]


def _name_is_location(name: str) -> tuple[str, str]:
    return name, name


@dataclass(frozen=True)
class BackboneSource:
    """Where a backbone's network and weights come from, and how to get them.

    Attributes:
        name: the key specs name in ``spec.source``, e.g. ``"tfhub"``.
        load: ``load(spec, weights, input_shape) -> keras layer`` (see :data:`Loader`);
            ``weights`` is ``"pretrained"``, ``None`` (random init) or a weights file.
        available_offline: ``available_offline(spec) -> bool``: the pretrained weights
            load without a network.
        prefetch: ``prefetch(spec) -> Path``: fetches (or converts) the pretrained
            weights into the local cache and returns where they are.
        claims: for names that are not in the registry: ``claims(name) -> bool`` says
            whether ``name`` (a hub URL, a local path...) belongs to this source.
            ``None``: the source takes no ad-hoc names.
        locate: for a claimed name: ``locate(name) -> (ad-hoc spec name, location)``;
            it raises a tlkit error when the name is claimed but unusable.
        options: the type of ``spec.source_options`` this source reads (``None``: none).
        reloads_safely: ``False`` when a model holding this source's layer cannot be
            loaded from ``.keras`` with Keras's safe mode (a SavedModel's graph is code);
            such runs are rebuilt from their config and ``model.weights.h5``.
        describe: for claimed names whose spec the source can read from the files
            themselves (input size, preprocessing, groups): ``describe(name, image_size) ->
            spec``, used by :func:`tlkit.backbones.get` instead of the generic ad-hoc spec.
    """

    name: str
    load: Loader
    available_offline: Callable[[BackboneSpec], bool]
    prefetch: Callable[[BackboneSpec], Path]
    claims: Callable[[str], bool] | None = None
    locate: Callable[[str], tuple[str, str]] = _name_is_location
    options: type | None = None
    reloads_safely: bool = True
    describe: Callable[[str, int | None], BackboneSpec] | None = None


#: The table: source name -> record, in the order :func:`claiming_source` asks them.
SOURCES: dict[str, BackboneSource] = {}


def register_source(source: BackboneSource, *, overwrite: bool = False) -> BackboneSource:
    """Adds ``source`` to :data:`SOURCES` under ``source.name`` and returns it.

    Raises:
        ConfigError: a source of that name exists and ``overwrite`` is false.
    """
    if source.name in SOURCES and not overwrite:
        raise ConfigError(
            f"a backbone source named {source.name!r} is already registered; pass overwrite=True to replace it"
        )
    SOURCES[source.name] = source
    return source


def unregister_source(name: str) -> None:
    """Removes the source ``name`` from :data:`SOURCES` (no error if absent)."""
    SOURCES.pop(name, None)


def source_for(spec_or_name: BackboneSpec | str) -> BackboneSource:
    """The record of a spec's source, or of a source name.

    Raises:
        BackboneNotFoundError: no such source; the message lists the known ones.
    """
    name = spec_or_name.source if isinstance(spec_or_name, BackboneSpec) else str(spec_or_name)
    if name not in SOURCES:
        owner = f"backbone {spec_or_name.name!r} has " if isinstance(spec_or_name, BackboneSpec) else ""
        raise BackboneNotFoundError(
            f"{owner}unknown backbone source {name!r}; known sources: {', '.join(SOURCES)} "
            "(a new one is added with tlkit.backbones.register_source)"
        )
    return SOURCES[name]


def claiming_source(name: str) -> BackboneSource | None:
    """The first source whose ``claims`` accepts the ad-hoc ``name``, or ``None``."""
    for source in SOURCES.values():
        if source.claims is not None and source.claims(name):
            return source
    return None


def check_spec(spec: BackboneSpec) -> None:
    """Checks that ``spec``'s source is in the table and its ``source_options`` of that source's type.

    Raises:
        BackboneNotFoundError: unknown source.
        ConfigError: options of the wrong type.
    """
    source = source_for(spec)
    given = spec.source_options
    if given is None:
        return
    if source.options is None:
        raise ConfigError(
            f"backbone {spec.name!r}: source {source.name!r} takes no source_options, got {type(given).__name__}"
        )
    if not isinstance(given, source.options):
        raise ConfigError(
            f"backbone {spec.name!r}: source {source.name!r} reads {source.options.__name__} options, "
            f"got {type(given).__name__}; pass source_options={source.options.__name__}(...)"
        )


# --------------------------------------------------------------------------- the built-in records


def _load_keras_app(spec: BackboneSpec, weights: Weights, input_shape: tuple[int, ...] | None) -> keras.Model:
    return keras_apps.load(spec, weights, input_shape)


def _load_tfhub(spec: BackboneSpec, weights: Weights, input_shape: tuple[int, ...] | None) -> keras.layers.Layer:
    return hub.load(spec, weights, hub.fetch_handle(spec))


def _load_savedmodel(spec: BackboneSpec, weights: Weights, input_shape: tuple[int, ...] | None) -> keras.layers.Layer:
    return hub.load(spec, weights, hub.local_dir(spec))


def _savedmodel_present(spec: BackboneSpec) -> bool:
    return hub.is_saved_model_dir(spec.location)


def _locate_savedmodel(name: str) -> tuple[str, str]:
    path = Path(name).expanduser()
    return path.name, str(path.resolve())


def _load_keras_file(spec: BackboneSpec, weights: Weights, input_shape: tuple[int, ...] | None) -> keras.Model:
    return keras_file.load(spec, weights)


def _load_package(spec: BackboneSpec, weights: Weights, input_shape: tuple[int, ...] | None) -> keras.Model:
    return package.load_package_backbone(spec, weights)


def _load_builder(spec: BackboneSpec, weights: Weights, input_shape: tuple[int, ...] | None) -> keras.layers.Layer:
    if spec.builder is None:
        raise BackboneNotFoundError(f"backbone {spec.name!r} has source 'builder' but no builder function")
    return spec.builder(weights)


def _always(spec: BackboneSpec) -> bool:
    return True


def _location(spec: BackboneSpec) -> Path:
    return Path(spec.location)


def _builtin_sources() -> tuple[BackboneSource, ...]:
    return (
        BackboneSource("keras_applications", _load_keras_app, keras_apps.available_offline, keras_apps.prefetch,
                       options=KerasAppOptions),
        BackboneSource("tfhub", _load_tfhub, hub.handle_cached, hub.fetch_handle,
                       claims=hub.is_hub_handle, options=HubOptions, reloads_safely=False),
        BackboneSource("savedmodel", _load_savedmodel, _savedmodel_present, hub.local_dir, claims=hub.is_saved_model_dir, locate=_locate_savedmodel,
                       options=HubOptions, reloads_safely=False),
        BackboneSource("keras_file", _load_keras_file, keras_file.available_offline, _location,
                       claims=keras_file.claims, locate=keras_file.locate),
        BackboneSource("package", _load_package, package.package_backbone_available,
                       package.prefetch_package_backbone, options=PackageOptions),
        BackboneSource("builder", _load_builder, _always, _location),
        # keras-hub presets (optional extra; imported only on load). Its layers are
        # keras-hub classes, so runs are rebuilt from config + weights like SavedModel ones.
        BackboneSource("keras_hub", keras_hub_source.load, keras_hub_source.available_offline,
                       keras_hub_source.prefetch, claims=keras_hub_source.claims, locate=keras_hub_source.locate,
                       options=keras_hub_source.KerasHubOptions, reloads_safely=False,
                       describe=keras_hub_source.describe),
    )


for _source in _builtin_sources():
    register_source(_source)
