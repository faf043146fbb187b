"""Runs and the command line: tlkit train writes a run directory, resumes, predicts, refuses bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tlkit.cli import main
from tlkit.config import config_from_dict, load_config
from tlkit.errors import ConfigError
from tlkit.run import load_run_model, train
from tlkit.rundir import RunDir
from tests.conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]


def _config(tmp: Path, data: Path, **overrides: object) -> dict:
    raw: dict = {
        "name": "tiny",
        "output_dir": str(tmp / "run"),
        "data": {"path": str(data), "batch_size": 8, "val_fraction": 0.2, "test_fraction": 0.2},
        "backbone": {"name": "tiny_test"},
        "augmentation": {"enabled": False},
        "schedule": {"stages": [
            {"name": "head", "epochs": 3, "learning_rate": 0.02},
            {"name": "top", "epochs": 1, "unfreeze": 1, "learning_rate": 0.002},
        ]},
        "training": {"verbose": 0},
    }
    raw.update(overrides)
    return raw


def test_train_writes_a_complete_run_dir(tmp_path: Path, registered: None) -> None:
    data = write_image_folder(tmp_path / "data", n_per_class=10)
    (data / "red" / "corrupt.png").write_bytes(b"not an image")
    result = train(config_from_dict(_config(tmp_path, data)))
    run = result.run_dir
    for name in ("config.json", "labels.json", "splits.json", "history.json", "model.keras", "run.json",
                 "skipped.csv"):
        assert (run / name).is_file(), name
    assert json.loads((run / "labels.json").read_text()) == ["blue", "green", "red"]
    assert "corrupt.png" in (run / "skipped.csv").read_text()
    history = json.loads((run / "history.json").read_text())
    assert [s["name"] for s in history["stages"]] == ["head", "top"]
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "complete" and "accuracy" in status["test_metrics"]
    model, labels = load_run_model(run)
    x = np.random.default_rng(0).uniform(0, 255, (2, 40, 40, 3)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x, verbose=0), result.model.predict(x, verbose=0))
    # Same command again: already complete, nothing retrained.
    again = train(config_from_dict(_config(tmp_path, data)))
    assert again.history is None


def test_interrupted_run_resumes_from_checkpoint(tmp_path: Path, registered: None) -> None:
    """Ctrl-C after head epoch 2: the same command resumes; every head epoch is in the history once.
    (tests/test_resume.py kills real `tlkit train` processes with SIGKILL across stage boundaries.)"""
    data = write_image_folder(tmp_path / "data", n_per_class=6)
    raw = _config(tmp_path, data)
    raw["schedule"]["stages"][0]["solver"] = "sgd"  # the head trains epoch by epoch here
    cfg = config_from_dict(raw)

    import tlkit.finetune as finetune

    original = finetune._HistoryRecorder.on_epoch_end

    def interrupt(self: object, epoch: int, logs: dict | None = None) -> None:
        original(self, epoch, logs)  # type: ignore[arg-type]
        if epoch == 1:
            raise KeyboardInterrupt

    finetune._HistoryRecorder.on_epoch_end = interrupt  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    finally:
        finetune._HistoryRecorder.on_epoch_end = original  # type: ignore[method-assign]
    run = Path(cfg.output_dir)
    assert json.loads((run / "run.json").read_text())["status"] == "training"
    epochs_before = [r["epoch"] for r in RunDir(run).live_history()]
    assert epochs_before == [1, 2]
    result = train(cfg)
    head_epochs = [r["stage_epoch"] for r in result.history.history if r["stage"] == "head"]
    assert head_epochs == [1, 2, 3]
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


def test_changed_config_refuses_the_old_run_dir(tmp_path: Path, registered: None) -> None:
    data = write_image_folder(tmp_path / "data", n_per_class=4)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"name": "other"}))
    # A finished epoch is progress: the other config's run is not thrown away (a run without progress
    # restarts instead, see tests/test_reliability.py).
    (tmp_path / "run" / "history.jsonl").write_text(json.dumps({"stage": "head", "stage_epoch": 1, "epoch": 1}) + "\n")
    with pytest.raises(ConfigError, match="different config"):
        train(config_from_dict(_config(tmp_path, data)))


def test_cli_train_predict_evaluate(tmp_path: Path, registered: None, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_image_folder(tmp_path / "data", n_per_class=8)
    config = tmp_path / "run.toml"
    config.write_text(f"""
name = "cli"
output_dir = "out"
[data]
path = "{data}"
batch_size = 8
[backbone]
name = "tiny_test"
[augmentation]
enabled = false
[schedule]
preset = "fine_tune"
head_epochs = 2
epochs = 1
top_groups = 1
learning_rate = 0.02
[training]
verbose = 0
""")
    assert main(["train", str(config), "--quiet"]) == 0
    run = tmp_path / "out"
    assert (run / "model.keras").is_file()
    image = next((data / "red").glob("*.png"))
    capsys.readouterr()
    assert main(["predict", str(run), str(image), "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert predictions[0]["top"][0][0] in ("red", "green", "blue")
    assert main(["evaluate", str(run)]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_cli_reports_user_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[data]\npath = "nowhere"\n[backbone]\nname = "no_such_net"\n')
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tlkit: error:") and "no_such_net" in err


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict({"data": {"path": "x", "bogus": 1}})
    with pytest.raises(ConfigError, match="exactly one"):
        config_from_dict({"data": {}})
    example = load_config(REPO / "examples" / "digits.toml")
    assert example.backbone.name == "efficientnet_lite0"
    assert [s.name for s in example.schedule.stages] == ["head", "top"]
    yaml_cfg = tmp_path / "c.yaml"
    yaml_cfg.write_text("data:\n  path: d\nschedule:\n  stages:\n    - {name: a, epochs: 1}\n")
    assert load_config(yaml_cfg).schedule.stages[0].name == "a"


@pytest.mark.slow
def test_readme_example_config_trains_offline(tmp_path: Path) -> None:
    """The README's `tlkit train examples/digits.toml` on real digits with EfficientNet-Lite0
    (pretrained, offline), shortened to one epoch per stage."""
    from dataclasses import replace

    from tlkit.finetune import Schedule
    from tlkit.sample_data import write_digits

    data = write_digits(tmp_path / "digits", per_class=6)
    example = load_config(REPO / "examples" / "digits.toml")
    cfg = replace(
        example,
        output_dir=str(tmp_path / "run"),
        data=replace(example.data, path=str(data)),
        schedule=Schedule(tuple(replace(s, epochs=1) for s in example.schedule.stages)),
        training=replace(example.training, verbose=0),
    )
    result = train(cfg)
    assert (result.run_dir / "model.keras").is_file()
    assert json.loads((result.run_dir / "run.json").read_text())["backbone"] == "efficientnet_lite0"
    assert len(json.loads((result.run_dir / "labels.json").read_text())) == 10


def test_run_with_a_savedmodel_backbone_reloads_and_predicts(tmp_path: Path) -> None:
    """Safe mode refuses SavedModel layers; such runs are rebuilt from config + weights."""
    from tests.conftest import tiny_cnn

    tiny_cnn().export(str(tmp_path / "tiny_sm"), verbose=False)
    data = write_image_folder(tmp_path / "data", n_per_class=6)
    raw = _config(tmp_path, data, backbone={"name": str(tmp_path / "tiny_sm"), "image_size": 32})
    result = train(config_from_dict(raw))
    model, labels = load_run_model(result.run_dir)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x, verbose=0), result.model.predict(x, verbose=0), atol=1e-6)
    assert train(config_from_dict(raw)).history is None  # the "already complete" path reloads too
