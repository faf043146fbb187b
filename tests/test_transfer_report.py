"""Every run reports its baselines and warnings, and is calibrated by default (the temperature is
folded into the model, so exports return the calibrated probabilities)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tlkit.artifacts import load_exported_predictor
from tlkit.config import config_from_dict
from tlkit.evaluation import apply_temperature
from tlkit.export import export_run
from tlkit.predict import load_image
from tlkit.rundir import RunDir
from tlkit.run import train
from tlkit.sample_data import write_digits
from tests.conftest import write_image_folder


def _config(tmp: Path, data: Path, name: str) -> dict:
    return {
        "name": name, "output_dir": str(tmp / name),
        "data": {"path": str(data), "batch_size": 16, "val_fraction": 0.25, "test_fraction": 0.25},
        "backbone": {"name": "tiny_test"}, "augmentation": {"enabled": False},
        "schedule": {"preset": "feature_extraction", "epochs": 3},
        "training": {"verbose": 0},
    }


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Real scanned digits: a random tiny CNN's 16 pooled features lose to logistic regression on pixels.
    return write_digits(tmp_path_factory.mktemp("digits") / "digits", 24, 32, 0)


def test_negative_transfer_is_reported_and_warned(
    tmp_path: Path, registered: None, digits_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = train(config_from_dict(_config(tmp_path, digits_folder, "digits")))
    status = RunDir(result.run_dir).status()
    rows = status["transfer"]["rows"]
    assert [r["kind"] for r in rows] == ["baseline", "probe", "tlkit"]
    baseline, probe, model = rows
    assert baseline["val_accuracy"] > probe["val_accuracy"] + 0.01, rows
    assert any("NEGATIVE-TRANSFER" in w for w in status["transfer"]["warnings"])
    assert "NEGATIVE-TRANSFER" in capsys.readouterr().err
    # The solved head is the probe's fit: the model does not end below its own probe.
    assert model["val_accuracy"] >= probe["val_accuracy"] - 0.01
    assert not any("FINE-TUNING" in w for w in status["transfer"]["warnings"])


def test_no_warning_where_the_probe_wins(tmp_path: Path, registered: None, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_image_folder(tmp_path / "colours", n_per_class=12)
    result = train(config_from_dict(_config(tmp_path, data, "colour_run")))
    transfer = RunDir(result.run_dir).status()["transfer"]
    assert transfer["rows"][1]["val_accuracy"] >= transfer["rows"][0]["val_accuracy"] - 0.01
    assert transfer["warnings"] == []
    assert "WARNING" not in capsys.readouterr().err


def test_calibration_lowers_val_nll_and_exports_return_calibrated_probabilities(
    tmp_path: Path, registered: None, digits_folder: Path
) -> None:
    result = train(config_from_dict(_config(tmp_path, digits_folder, "calibrated")))
    run = RunDir(result.run_dir)
    calibration = run.status()["calibration"]
    assert calibration is not None and calibration["folded_into_model"]
    assert calibration["val_nll_after"] < calibration["val_nll_before"]
    temperature = calibration["temperature"]
    assert run.calibration()["temperature"] == pytest.approx(temperature)
    assert run.temperature() is None  # folded: nothing left to apply on top of the model
    assert abs(temperature - 1.0) > 0.05  # a real correction, so the check below can tell them apart

    report = export_run(run.path, ["savedmodel"], tmp_path / "exported")
    predictor = load_exported_predictor(report.out_dir)
    files = [e.path for e in run.split("test")[:8]]
    exported = np.stack([predictor.predict_one(load_image(f)) for f in files])
    model = run.load_model()
    calibrated = model.predict(np.stack([load_image(f) for f in files]), verbose=0)
    np.testing.assert_allclose(exported, calibrated, atol=1e-5)
    uncalibrated = apply_temperature(calibrated, 1.0 / temperature)
    assert np.abs(exported - uncalibrated).max() > 1e-3
    assert json.loads((run.path / "calibration.json").read_text())["temperature"] == pytest.approx(temperature)


def test_a_folded_temperature_is_never_applied_twice(tmp_path: Path, registered: None, digits_folder: Path) -> None:
    """After training, calibration.json records the folded temperature, RunDir.temperature() (what
    apps apply on top of the model) is None, and the evaluation report and metrics.json say the
    probabilities are calibrated; a later --calibrate keeps the folded record."""
    from tlkit.evaluation import evaluate_run

    result = train(config_from_dict(_config(tmp_path, digits_folder, "folded")))
    run = RunDir(result.run_dir)
    assert run.calibration()["folded_into_model"] is True
    assert run.temperature() is None
    report = evaluate_run(run.path, gradcam=0)
    metrics = json.loads(report.metrics_json.read_text())
    assert metrics["calibration"]["folded_temperature"] == pytest.approx(run.calibration()["temperature"])
    assert "folded in by training" in metrics["threshold_applies_to"]
    text = report.report.read_text()
    assert "folded it into the model" in text
    assert "## Against the baselines" in text and "linear probe (frozen backbone)" in text  # run.json's rows
    assert "NEGATIVE-TRANSFER" in text
    evaluate_run(run.path, gradcam=0, calibrate=True)
    again = run.calibration()
    assert again["folded"]["folded_into_model"] is True and run.temperature() == pytest.approx(again["temperature"])
