"""The backbone spec: one frozen dataclass per backbone, and everything hangs off it.

Staging, model assembly, export and ``tlkit backbones`` read these specs; none of
them keeps its own table of per-model facts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from tlkit.errors import ConfigError

Modality = Literal["image", "audio"]
#: The built-in weight sources; :data:`tlkit.backbones.sources.SOURCES` is the table (and may hold more).
SourceKind = Literal["keras_applications", "tfhub", "savedmodel", "keras_file", "package", "builder"]
OutputKind = Literal["spatial", "pooled", "sequence"]
_Options = TypeVar("_Options")


@dataclass(frozen=True)
class ImagePreprocessing:
    """Maps raw RGB pixels (float, 0..255) to what an image backbone expects.

    ``y = (x * scale + offset - mean) / std`` per channel, after an optional
    RGB->BGR flip. The defaults are the identity (a backbone that takes 0..255).
    """

    scale: float = 1.0
    offset: float = 0.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: Literal["rgb", "bgr"] = "rgb"

    @property
    def is_identity(self) -> bool:
        return (
            self.scale == 1.0
            and self.offset == 0.0
            and self.mean == (0.0, 0.0, 0.0)
            and self.std == (1.0, 1.0, 1.0)
            and self.channel_order == "rgb"
        )


@dataclass(frozen=True)
class AudioFrontend:
    """Maps a raw mono waveform (float32 in -1..1 at ``sample_rate``) to the encoder's input.

    ``kind="waveform"``: the encoder takes the waveform itself (Wav2Vec-style); with
    ``normalize=True`` each clip is first scaled to zero mean and unit variance.
    ``kind="log_mel"``: a log-mel spectrogram computed with TF ops inside the model.
    ``log_style`` selects the scaling after the mel projection: ``"natural"``
    (``log(mel + offset)``) or ``"whisper"`` (log10, clip at max-8, ``(m + 4) / 4``).
    """

    kind: Literal["waveform", "log_mel"] = "waveform"
    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float | None = None
    log_style: Literal["natural", "whisper"] = "natural"
    log_offset: float = 1e-6
    normalize: bool = False  # waveform encoders trained on per-clip zero-mean unit-variance input


Preprocessing = ImagePreprocessing | AudioFrontend


@dataclass(frozen=True)
class KerasAppOptions:
    """Options of the ``keras_applications`` source.

    ``weights_file``: the file name Keras caches the ImageNet weights under
    (``$KERAS_HOME/models/<weights_file>``), so tlkit can tell whether they are offline.
    """

    weights_file: str = ""


@dataclass(frozen=True)
class HubOptions:
    """A SavedModel's call contract beyond "batch in, tensor out" (``tfhub`` and ``savedmodel`` sources).

    Attributes:
        endpoint: the function to call (default: the first of ``serve``, ``__call__``,
            ``serving_default``, ``default`` the SavedModel has).
        output_key: a dict output: the key to keep (default: the first in sorted order).
        output_index: a tuple/list output: the index to keep.
        per_example: the module takes one example, not a batch: it is called per example
            and the ``(T, C)`` outputs are stacked.
        per_example_rank: ``2``: each example is given as a batch of one.
        input_kwarg: call as ``fn(**{input_kwarg: x, **call_kwargs})``.
        call_kwargs: extra keyword arguments, e.g. ``{"sample_rate": 16000}`` (kept as
            sorted ``(key, value)`` pairs so the spec stays hashable).
        saved_model_tags: TF1 Hub format modules: the MetaGraph tags to load.
    """

    endpoint: str | None = None
    output_key: str | None = None
    output_index: int = 0
    per_example: bool = False
    per_example_rank: int = 1
    input_kwarg: str | None = None
    call_kwargs: tuple[tuple[str, Any], ...] = ()
    saved_model_tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        kwargs = self.call_kwargs
        pairs = kwargs.items() if isinstance(kwargs, Mapping) else kwargs
        object.__setattr__(self, "call_kwargs", tuple(sorted(((str(k), v) for k, v in pairs), key=lambda kv: kv[0])))
        object.__setattr__(self, "saved_model_tags", tuple(self.saved_model_tags))
        if self.per_example_rank not in (1, 2):
            raise ConfigError(f"HubOptions.per_example_rank must be 1 or 2, got {self.per_example_rank!r}")


@dataclass(frozen=True)
class PackageOptions:
    """Options of the ``package`` source (weights shipped inside a pip package).

    Attributes:
        converter: the module that knows the architecture: a short name under
            ``tlkit.backbones`` (``"efficientnet_lite"``, ``"whisper"``) or a dotted path.
        sha256: the expected sha256 of the shipped file (``None``: trusted with a warning);
            for a file shipped in parts (``location`` joins them with ``+``), of the joined file.
        pip_package: what to ``pip install``: one or more space-separated requirements
            (default: each import name, ``_`` -> ``-``).
        variant: the architecture variant the converter builds (e.g. ``"lite0"``), if it has several.
        extra: the tlkit extra that installs the package(s) (e.g. ``"speech-multilingual"``),
            named in the message when they are missing; ``None``: a core dependency.
    """

    converter: str = ""
    sha256: str | None = None
    pip_package: str | None = None
    variant: str | None = None
    extra: str | None = None


@dataclass(frozen=True)
class AudioEncoderOptions:
    """Input-length limits of an audio encoder (read by training to size its crops).

    Attributes:
        fixed_input_samples: the encoder only accepts exactly this many samples (traced
            for one input size, e.g. ``wav2vec2_base``).
        min_input_samples: shorter inputs yield no frame at all.
    """

    fixed_input_samples: int | None = None
    min_input_samples: int | None = None


#: The typed options of the built-in sources (a source's record names the type it reads).
SourceOptions = KerasAppOptions | HubOptions | PackageOptions


@dataclass(frozen=True)
class BackboneSpec:
    """Everything tlkit knows about one backbone.

    Attributes:
        name: registry name, e.g. ``"mobilenet_v2"``.
        modality: ``"image"`` or ``"audio"``.
        source: where the network and its weights come from: a key of
            :data:`tlkit.backbones.sources.SOURCES` (see :data:`SourceKind` for the built-ins).
        location: source-specific: a ``keras.applications`` class name, a TF-Hub
            handle, a SavedModel directory, a ``.keras`` file, or
            ``"package:relative/path"`` for weights shipped inside a pip package.
        input_shape: the shape the backbone was trained on, without batch:
            ``(H, W, 3)`` for images, ``(num_samples,)`` for audio.
        preprocessing: how raw input becomes the backbone's input (lives in the model).
        feature_dim: channels of the backbone's output (``None``: found when built).
        output: ``"spatial"`` (B, h, w, C), ``"sequence"`` (B, T, C) or ``"pooled"`` (B, C).
        layer_groups: regular expressions, ordered input -> output. Each names the
            layers (Keras backbones, matched against layer names) or variables
            (SavedModel backbones, matched against variable paths) of one group.
            A layer or variable belongs to the first group whose pattern matches it
            (``re.search``). Staged unfreezing thaws groups from the last one back.
            Empty: tlkit splits the weights into four groups by depth.
        group_boundaries: layer names that end each group but the last, for Keras
            backbones whose layer names are auto-numbered (cuts groups by position).
        sample_rate: audio only, the rate the encoder expects.
        licence: the licence of the pretrained weights.
        params: parameter count, for listings (``None`` when unknown until built).
        builder: for ``source="builder"``: ``builder(weights) -> keras.Model``.
        source_options: the typed options the source reads (:class:`KerasAppOptions`,
            :class:`HubOptions`, :class:`PackageOptions`, or a custom source's type);
            ``None``: that type's defaults.
        audio_encoder: input-length limits of an audio encoder.
    """

    name: str
    modality: Modality
    source: str
    location: str
    input_shape: tuple[int, ...]
    preprocessing: Preprocessing
    feature_dim: int | None
    output: OutputKind = "spatial"
    layer_groups: tuple[str, ...] = ()
    sample_rate: int | None = None
    licence: str = ""
    description: str = ""
    params: int | None = None
    builder: Callable[[str | None], Any] | None = field(default=None, compare=False, repr=False)
    group_boundaries: tuple[str, ...] = ()
    source_options: object | None = None
    audio_encoder: AudioEncoderOptions = AudioEncoderOptions()

    def options_for(self, kind: type[_Options]) -> _Options:
        """This spec's source options as ``kind`` (``kind()``'s defaults when it gives none).

        Raises:
            ConfigError: the spec carries options of another type.
        """
        if self.source_options is None:
            return kind()
        if not isinstance(self.source_options, kind):
            raise ConfigError(
                f"backbone {self.name!r}: source_options is a {type(self.source_options).__name__}, but its "
                f"{self.source!r} source reads {kind.__name__}; pass source_options={kind.__name__}(...)"
            )
        return self.source_options

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of an image backbone."""
        if self.modality != "image":
            raise AttributeError(f"backbone {self.name!r} is not an image backbone")
        return int(self.input_shape[0]), int(self.input_shape[1])
