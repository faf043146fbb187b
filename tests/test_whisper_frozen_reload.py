"""A partly frozen Whisper-layout classifier keeps its frozen flags through plain ``keras.saving.load_model``.

Keras builds ``MultiHeadAttention``'s query / key / value / output projections in ``build()``,
after a deserialised layer's ``trainable=False`` is set, so a frozen attention block came back
with trainable projections: measured on a Whisper tiny.en run, 52 trainable variables after
loading against 36 saved. :class:`tlkit.backbones.layers.MultiHeadAttention`, which the
Whisper encoder uses, passes the flag on to them. The encoder here is the real Whisper layout
(:func:`tlkit.backbones.whisper.whisper_encoder`) at a tiny size with random weights, frozen
as ``fine_tune`` freezes a stage (``LayerGroups.set_trainable``), and reloaded in a fresh
process that imports tlkit, as a user's program would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from tlkit.backbones import whisper
from tlkit.backbones.layers import MultiHeadAttention
from tlkit.backbones.spec import AudioFrontend, BackboneSpec
from tlkit.backbones.whisper import WhisperEncoderConfig, whisper_encoder
from tlkit.config import HeadConfig
from tlkit.model import build_classifier
from tlkit.registration import SERIALIZABLES

RATE = 8000
TINY = WhisperEncoderConfig(n_mels=16, n_ctx=64, width=16, heads=2, layers=2, ffn=32)
ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: plain Keras loading (safe mode) with tlkit imported, then a
# user's own fit. Prints the trainable paths and which attention kernels the fit moved.
RELOAD_AND_FIT = """
import json, sys
import numpy as np
import keras
import tlkit.registration  # registers tlkit's layers; a bare `import tlkit` is lazy and registers none

model = keras.saving.load_model(sys.argv[1])
trainable = sorted(v.path for v in model.trainable_variables)
attention = {v.path: v.numpy().copy() for v in model.variables if "_attn/" in v.path}
x = np.random.default_rng(0).uniform(-0.5, 0.5, (8, %(samples)d)).astype("float32")
y = keras.utils.to_categorical(np.arange(8) %% 2, 2)
model.compile(optimizer=keras.optimizers.SGD(0.5), loss="categorical_crossentropy")
model.fit(x, y, epochs=2, batch_size=4, verbose=0)
moved = sorted(p for p, v in attention.items()
               if not np.array_equal(v, next(w for w in model.variables if w.path == p).numpy()))
print(json.dumps({"trainable": trainable, "moved": moved}))
"""


def _spec() -> BackboneSpec:
    return BackboneSpec(
        name="tiny_whisper_layout", modality="audio", source="builder", location="tests.test_whisper_frozen_reload",
        input_shape=(RATE,), sample_rate=RATE, feature_dim=TINY.width, output="sequence",
        preprocessing=AudioFrontend(kind="log_mel", sample_rate=RATE, n_fft=200, hop_length=80, n_mels=TINY.n_mels,
                                    log_style="whisper"),
        layer_groups=("^(conv[12]|position_embedding)", "^block0_", "^(block1_|encoder_norm)"),
        licence="test fixture", builder=lambda weights: whisper_encoder(TINY, name="tiny_whisper"),
    )


def _frozen_classifier(compile: bool = True) -> keras.Model:
    """The classifier with only its last group (block1, encoder_norm) and head trainable."""
    model = build_classifier(_spec(), 2, weights=None, head=HeadConfig(dropout=0.0), seed=0)
    model.tlkit_groups.set_trainable(1)  # what a fine_tune stage with unfreeze=1 does
    if compile:
        model.compile(optimizer="adam", loss="categorical_crossentropy")
    return model


def _attention_layers(model: keras.Model) -> dict[str, keras.layers.Layer]:
    return {layer.name: layer for layer in model.get_layer("backbone").layers
            if isinstance(layer, keras.layers.MultiHeadAttention)}


def test_the_whisper_encoder_uses_the_freezing_attention_layer() -> None:
    layers = _attention_layers(_frozen_classifier())
    assert sorted(layers) == ["block0_attn", "block1_attn"]
    assert all(type(layer) is MultiHeadAttention for layer in layers.values())
    assert not layers["block0_attn"].trainable and layers["block1_attn"].trainable
    assert MultiHeadAttention in SERIALIZABLES
    assert keras.saving.get_registered_name(MultiHeadAttention) == "tlkit>MultiHeadAttention"


def test_plain_keras_reload_keeps_frozen_attention_frozen(tmp_path: Path) -> None:
    model = _frozen_classifier()
    saved = sorted(v.path for v in model.trainable_variables)
    frozen = {v.path for v in _attention_layers(model)["block0_attn"].weights}
    thawed = {v.path for v in _attention_layers(model)["block1_attn"].weights}
    assert len(frozen) == 8 and not frozen & set(saved) and thawed <= set(saved)  # q, k, v, out: kernel + bias
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (4, RATE)).astype(np.float32)
    model.fit(x, keras.utils.to_categorical(np.arange(4) % 2, 2), epochs=1, verbose=0)  # optimizer state saved
    path = tmp_path / "model.keras"
    model.save(path)

    done = subprocess.run([sys.executable, "-c", RELOAD_AND_FIT % {"samples": RATE}, str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["trainable"] == saved
    assert "Skipping variable loading for optimizer" not in done.stderr  # its slots match the variables again
    moved = set(result["moved"])
    assert not moved & frozen, sorted(moved & frozen)  # the user's fit left the frozen block alone
    assert moved & thawed  # and it did train the thawed one (the check can see a change)


def test_reloaded_model_computes_what_was_saved(tmp_path: Path) -> None:
    model = _frozen_classifier(compile=False)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    x = np.random.default_rng(1).uniform(-0.5, 0.5, (2, RATE)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)


def test_weights_saved_with_keras_attention_load_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's weights file written before the change (built-in class) loads into today's model."""
    with monkeypatch.context() as patch:
        patch.setattr(whisper, "MultiHeadAttention", keras.layers.MultiHeadAttention)
        old = build_classifier(_spec(), 2, weights=None, head=HeadConfig(dropout=0.0), seed=0)
    assert all(type(layer) is keras.layers.MultiHeadAttention for layer in _attention_layers(old).values())
    rng = np.random.default_rng(2)
    for variable in old.weights:  # weights no initialiser would give, so a skipped load shows
        variable.assign(rng.normal(0, 0.2, variable.shape).astype(variable.dtype))
    old.save_weights(tmp_path / "model.weights.h5")
    new = build_classifier(_spec(), 2, weights=None, head=HeadConfig(dropout=0.0), seed=0)
    assert [v.path for v in new.weights] == [v.path for v in old.weights]
    new.load_weights(tmp_path / "model.weights.h5")
    for a, b in zip(old.weights, new.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    x = rng.uniform(-0.5, 0.5, (2, RATE)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(new(x)), np.asarray(old(x)), atol=1e-6)
