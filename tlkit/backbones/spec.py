"""The backbone spec: one frozen dataclass per backbone, and everything hangs off it.

Staging, model assembly, export and ``tlkit backbones`` read these specs; none of
them keeps its own table of per-model facts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Modality = Literal["image", "audio"]
SourceKind = Literal["keras_applications", "tfhub", "savedmodel", "keras_file", "package", "builder"]
OutputKind = Literal["spatial", "pooled", "sequence"]


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
class BackboneSpec:
    """Everything tlkit knows about one backbone.

    Attributes:
        name: registry name, e.g. ``"mobilenet_v2"``.
        modality: ``"image"`` or ``"audio"``.
        source: where the network and its weights come from.
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
        sample_rate: audio only, the rate the encoder expects.
        licence: the licence of the pretrained weights.
        params: parameter count, for listings (``None`` when unknown until built).
        builder: for ``source="builder"``: ``builder(weights) -> keras.Model``.
        options: source-specific extras (e.g. the converter of a package source).
    """

    name: str
    modality: Modality
    source: SourceKind
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
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, key: str, default: Any = None) -> Any:
        """The value of a source-specific option, or ``default``."""
        return dict(self.options).get(key, default)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of an image backbone."""
        if self.modality != "image":
            raise AttributeError(f"backbone {self.name!r} is not an image backbone")
        return int(self.input_shape[0]), int(self.input_shape[1])
