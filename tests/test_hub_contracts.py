"""SavedModel call contracts of TF-Hub modules, on SavedModels the tests build themselves.

Real hub modules cannot be downloaded here; these modules reproduce their calling
conventions (one clip per call, keyword inputs with extra arguments, dict and tuple
outputs) so the adapter's handling of each is tested for real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

import tlkit.backbones as backbones
from tlkit.backbones.spec import AudioFrontend, BackboneSpec, HubOptions
from tlkit.finetune import Schedule, Stage, fine_tune
from tlkit.model import build_classifier


class _FrameEncoder(tf.Module):
    """Frames a 1-D waveform into 400-sample hops and projects each to 8 features (like YAMNet/TRILL)."""

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(0)
        self.kernel = tf.Variable(rng.normal(0, 0.05, (400, 8)).astype(np.float32), name="frames/kernel")
        self.scale = tf.Variable(np.ones(8, np.float32), name="norm/scale")
        self.mean = tf.Variable(np.zeros(8, np.float32), trainable=False, name="norm/moving_mean")

    def encode(self, waveform: tf.Tensor) -> tf.Tensor:
        frames = tf.signal.frame(waveform, 400, 400)
        return tf.nn.relu((tf.matmul(frames, self.kernel) - self.mean) * self.scale)


def _save_per_clip_tuple(path: Path) -> None:
    module = _FrameEncoder()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def call(waveform: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        features = module.encode(waveform)
        return tf.reduce_mean(features, axis=1, keepdims=True), features  # (scores, embeddings)

    module.__call__ = call
    tf.saved_model.save(module, str(path))


def _save_keyword_signature(path: Path) -> None:
    module = _FrameEncoder()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32), tf.TensorSpec([], tf.int32)])
    def embed(samples: tf.Tensor, sample_rate: tf.Tensor) -> dict[str, tf.Tensor]:
        tf.debugging.assert_equal(sample_rate, 16000)
        features = module.encode(samples)
        return {"embedding": features, "layer19": features * 2.0}

    tf.saved_model.save(module, str(path), signatures={"serving_default": embed})


def _spec(name: str, path: Path, **options: Any) -> BackboneSpec:
    return BackboneSpec(
        name=name, modality="audio", source="savedmodel", location=str(path), input_shape=(4000,),
        preprocessing=AudioFrontend(kind="waveform"), feature_dim=8, output="sequence", sample_rate=16000,
        licence="test fixture", source_options=HubOptions(**options),
    )


def _waves() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    t = np.arange(4000) / 16000
    x = np.stack([np.sin(2 * np.pi * (300 if i % 2 else 1200) * t) * 0.5 + rng.normal(0, 0.01, 4000)
                  for i in range(16)]).astype(np.float32)
    return x, np.arange(16) % 2


@pytest.mark.parametrize("contract", ["per_clip_tuple", "keyword_dict"])
def test_hub_call_contracts_train_in_stages(tmp_path: Path, contract: str) -> None:
    if contract == "per_clip_tuple":
        _save_per_clip_tuple(tmp_path / "m")
        spec = _spec("contract_a", tmp_path / "m", per_example=True, output_index=1, endpoint="__call__")
    else:
        _save_keyword_signature(tmp_path / "m")
        spec = _spec("contract_b", tmp_path / "m", per_example=True, input_kwarg="samples",
                     call_kwargs=(("sample_rate", 16000),), output_key="embedding", endpoint="serving_default")
    keras.utils.set_random_seed(0)
    model = build_classifier(spec, 2, augmentation=None)
    x, y = _waves()
    out = model.predict(x[:3], verbose=0)
    assert out.shape == (3, 2)
    base = model.get_layer("backbone")
    assert len(model.tlkit_groups) == 2  # two trainable variables -> two depth groups
    before = {v.path: v.numpy().copy() for v in base.weights}
    ds = tf.data.Dataset.from_tensor_slices((x, keras.utils.to_categorical(y, 2))).batch(4)
    result = fine_tune(model, ds, None, Schedule((Stage("head", 3, 0, 0.05, solver="sgd"), Stage("top", 1, 1, 0.01))), verbose=0)
    changed = {v.path for v in base.weights if not np.array_equal(before[v.path], v.numpy())}
    assert result.metric("loss")[2] < result.metric("loss")[0]
    # Only the top depth group (norm/scale) moved; the frozen kernel and the statistics did not.
    assert changed == {next(v.path for v in base.weights if "scale" in v.path)}


def test_by_depth_groups_skip_non_trainable_variables(tmp_path: Path) -> None:
    _save_per_clip_tuple(tmp_path / "m")
    spec = _spec("contract_c", tmp_path / "m", per_example=True, output_index=1, endpoint="__call__")
    _, layer = backbones.load_backbone(spec)
    groups = backbones.resolve_groups(spec, layer)
    top = groups.members[-1]
    assert any(v.trainable for v in top)
    assert sum(len(g) for g in groups.members) == len(layer.weights)
