"""The LR range test: ``tlkit lr-find`` writes its plot and suggests a rate at which a stage's loss
falls; the sweep leaves the model as it was; a diverging sweep stops early."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import colour_images, write_image_folder
from tlkit.cli import main
from tlkit.config import load_config
from tlkit.errors import ConfigError
from tlkit.finetune import fine_tune
from tlkit.lr_find import HEAD_ONLY_NOTE, lr_find, pick_stage, suggest
from tlkit.model import HeadConfig, build_classifier
from tlkit.schedule import Schedule, Stage

CONFIG = """
name = "tiny"
output_dir = "run"
seed = 0

[data]
path = "images"
batch_size = 8
val_fraction = 0.2
test_fraction = 0.0

[backbone]
name = "tiny_test"

[augmentation]
enabled = false

[[schedule.stages]]
name = "head"
epochs = 2

[[schedule.stages]]
name = "top"
epochs = 3
unfreeze = 1
optimizer = "sgd"
learning_rate = 0.001

[training]
verbose = 0
"""


def _data(batch: int = 8) -> tf.data.Dataset:
    x, y = colour_images(8)
    return tf.data.Dataset.from_tensor_slices((x, keras.utils.to_categorical(y, 3))).batch(batch)


def _model(**head: object) -> keras.Model:
    keras.utils.set_random_seed(0)
    config = HeadConfig(dropout=0.0, **head)  # type: ignore[arg-type]
    return build_classifier("tiny_test", 3, augmentation=None, head=config)


def _loss_after_stage(rate: float) -> tuple[float, float]:
    """Training loss of a fresh model before and after a 3-epoch thawed SGD stage at ``rate``."""
    model = _model()
    ds = _data()
    model.compile(loss="categorical_crossentropy")
    before = model.evaluate(ds, verbose=0, return_dict=True)["loss"]
    fine_tune(model, ds, None, Schedule((Stage("top", 3, 1, rate, optimizer="sgd", decay="constant"),)),
              verbose=0)
    return before, model.evaluate(ds, verbose=0, return_dict=True)["loss"]


def _state(model: keras.Model) -> tuple[list[np.ndarray], list[bool], list[bool]]:
    layers = [model, *model.get_layer("backbone").layers, *model.layers]
    return ([np.array(v.numpy(), copy=True) for v in model.variables], [layer.trainable for layer in layers],
            [v.trainable for v in model.variables])


def test_cli_writes_plot_and_suggests_a_rate_where_the_loss_falls(
    tmp_path: Path, tiny_backbone: object, capsys: pytest.CaptureFixture[str]
) -> None:
    write_image_folder(tmp_path / "images", n_per_class=8)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    code = main(["lr-find", str(config), "--steps", "100", "--min-lr", "1e-5", "--max-lr", "100", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["stage"] == "top"  # the first stage that thaws groups
    png, written = tmp_path / "lr_find_top.png", tmp_path / "lr_find_top.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert json.loads(written.read_text())["suggestion"] == printed["suggestion"]
    assert not (tmp_path / "run").exists(), "lr-find must not write the run directory"
    suggestion, rates = printed["suggestion"], printed["rates"]
    assert 1e-5 < suggestion < rates[-1]
    assert printed["toml_line"] == f"learning_rate = {suggestion:.1e}"

    before, after = _loss_after_stage(suggestion)
    assert after < before - 0.2, (suggestion, before, after)
    # The check can fail: at the sweep's first (too small) rate the same stage does not lower the loss.
    before_slow, after_slow = _loss_after_stage(rates[0])
    assert after_slow > before_slow - 0.2, (rates[0], before_slow, after_slow)

    out = tmp_path / "elsewhere"
    assert main(["lr-find", str(config), "--stage", "head", "--steps", "20", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "learning_rate = " in text and 'name = "head"' in text and "solved to convergence" in text
    assert (out / "lr_find_head.png").is_file() and (out / "lr_find_head.json").is_file()


def test_sweep_leaves_the_model_untouched(tiny_backbone: object) -> None:
    model = _model(bn_inference=False)  # thawed BatchNorm: its statistics move during the sweep
    ds = _data()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    model.fit(ds, epochs=1, verbose=0, shuffle=False)
    optimizer = model.optimizer
    values, layer_flags, variable_flags = _state(model)
    assert all(layer_flags), "the model should start fully trainable, so that the sweep's freezing shows"
    stage = Stage("two", 1, 2, group_lr_decay=0.5)  # the stem is frozen; per-group rates: a MultiOptimizer
    result = lr_find(model, ds, stage, steps=30, min_lr=1e-4, max_lr=1.0, verbose=0)
    assert len(result.rates) > 2 and result.losses[-1] != result.losses[0], "the sweep did not train"
    after_values, after_layers, after_variables = _state(model)
    assert all(np.array_equal(a, b) for a, b in zip(values, after_values)), "the sweep changed weights"
    assert layer_flags == after_layers and variable_flags == after_variables
    assert model.optimizer is optimizer, "the model's own compile state was not restored"
    model.fit(ds, epochs=1, verbose=0, shuffle=False)  # still trains as compiled


def test_diverging_sweep_stops_early(tiny_backbone: object) -> None:
    ds = _data()
    # label smoothing keeps a floor under the loss (this data is separable, and a saturated softmax
    # without it has no gradient left to diverge with)
    steep = lr_find(_model(label_smoothing=0.1), ds, Stage("top", 1, 1, optimizer="sgd"), steps=60,
                    min_lr=1e-2, max_lr=1e4, verbose=0)
    assert steep.stopped_early and len(steep.rates) < 60, len(steep.rates)
    assert steep.suggestion is not None and steep.suggestion < steep.rates[-1]
    # A sweep at rates too small to diverge runs to the end (the stop rule does not always fire).
    gentle = lr_find(_model(), ds, Stage("head", 1), steps=20, min_lr=1e-7, max_lr=1e-5, verbose=0)
    assert not gentle.stopped_early and len(gentle.rates) == 20
    assert HEAD_ONLY_NOTE in gentle.notes


def test_suggestion_rule_on_a_known_curve() -> None:
    rates = list(np.geomspace(1e-6, 1.0, 121))
    # the loss falls fastest at 1e-3 (a logistic drop in log10(rate)), then diverges past 0.1
    logs = np.log10(rates)
    curve = 1.0 / (1.0 + np.exp(4.0 * (logs + 3.0))) + np.where(logs > -1.0, 10.0 * (logs + 1.0), 0.0)
    found = suggest(rates, list(curve))
    assert found["steepest"] == pytest.approx(1e-3, rel=0.15)
    assert found["minimum_over_10"] == pytest.approx(rates[int(np.argmin(curve))] / 10)
    assert suggest(rates, list(np.linspace(1.0, 2.0, 121)))["steepest"] is None  # never falls


def test_stage_choice(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    cfg = load_config(config)
    assert pick_stage(cfg, None).name == "top" and pick_stage(cfg, "head").name == "head"
    with pytest.raises(ConfigError, match=r"no stage 'middle'.*\['head', 'top'\]"):
        pick_stage(cfg, "middle")
