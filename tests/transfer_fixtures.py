"""Fixtures for the baseline / probe / ranking tests: two tiny image backbones with known merit.

On :func:`tests.conftest.colour_images` (the class is the dominant colour channel):

* ``informative``: a seeded random 1x1 convolution (8 linear mixes of R, G, B). Average
  pooling gives linear mixes of the channel means, which name the class.
* ``blind``: seeded random 3x3 kernels made zero-sum over space, no padding, then ReLU. A
  constant per-channel offset (what separates the classes) adds exactly nothing to its
  response, so its features carry only the noise texture, which every class shares.
"""

from __future__ import annotations

import keras
import numpy as np

from tests.conftest import TINY_SIZE, tiny_spec
from tlkit.backbones.spec import BackboneSpec


def informative_backbone(weights: str | None = "pretrained") -> keras.Model:
    inputs = keras.Input((TINY_SIZE, TINY_SIZE, 3))
    init = keras.initializers.GlorotUniform(seed=3)
    x = keras.layers.Conv2D(8, 1, kernel_initializer=init, name="stem_mix")(inputs)
    return keras.Model(inputs, x, name="informative")


def blind_backbone(weights: str | None = "pretrained") -> keras.Model:
    inputs = keras.Input((TINY_SIZE, TINY_SIZE, 3))
    conv = keras.layers.Conv2D(8, 3, padding="valid", use_bias=False, name="stem_texture")
    x = keras.layers.ReLU(name="stem_relu")(conv(inputs))
    kernel = np.random.default_rng(4).normal(size=(3, 3, 3, 8))
    conv.set_weights([kernel - kernel.mean(axis=(0, 1), keepdims=True)])  # zero-sum: blind to offsets
    return keras.Model(inputs, x, name="blind")


def informative_spec(name: str = "test_informative") -> BackboneSpec:
    return tiny_spec(name, builder=informative_backbone, feature_dim=8, layer_groups=(r"^stem_",),
                     location="tests.transfer_fixtures:informative_backbone")


def blind_spec(name: str = "test_blind") -> BackboneSpec:
    return tiny_spec(name, builder=blind_backbone, feature_dim=8, layer_groups=(r"^stem_",),
                     location="tests.transfer_fixtures:blind_backbone")
