"""Domain shift: the domain AUC, the MMD test, `tlkit shift`, and the shift section of `tlkit evaluate`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_image_folder
from tlkit.cli import main
from tlkit.shift import domain_auc, mmd_test, shift_from_features


def test_domain_auc_is_unbiased_under_no_shift_and_one_under_a_clear_shift() -> None:
    values = []
    for seed in range(12):  # more features than rows per fold: the regime where pooled CV AUCs sink
        x = np.random.default_rng(seed).normal(size=(80, 64))
        values.append(domain_auc(x[:40], x[40:], seed=seed)[0])
    assert abs(float(np.mean(values)) - 0.5) < 0.05, values
    x = np.random.default_rng(0).normal(size=(80, 8))
    auc, probs, folds = domain_auc(x[:40], x[40:] + 3.0)
    assert auc > 0.99 and folds == 5 and probs.shape == (80,)
    assert probs[40:].mean() > 0.9 and probs[:40].mean() < 0.1


def test_mmd_permutation_test() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 5)), rng.normal(size=(50, 5))
    mmd, p_value, bandwidth = mmd_test(a, b, permutations=200)
    assert p_value > 0.05 and abs(mmd) < 0.05 and bandwidth > 0
    shifted, p_shifted, _ = mmd_test(a, b + 1.0, permutations=200)
    assert shifted > 0.1 and p_shifted == pytest.approx(1 / 201)


def test_report_lists_the_most_shifted_classes_and_examples() -> None:
    rng = np.random.default_rng(0)
    source = rng.normal(size=(60, 4))
    target = rng.normal(size=(60, 4))
    target[:20] += 4.0  # only class "b" moved
    labels = ["b"] * 20 + ["a"] * 40
    report = shift_from_features(source, target, source_labels=["b"] * 20 + ["a"] * 40, target_labels=labels,
                                 target_paths=[f"t{i}" for i in range(60)], top=5, permutations=100)
    assert [c["class"] for c in report.classes] == ["b", "a"]
    assert report.classes[0]["auc"] > 0.95 and report.classes[1]["auc"] < 0.75
    assert all(int(e["path"][1:]) < 20 for e in report.examples)
    assert "shift" in report.verdict and set(json.loads(json.dumps(report.to_dict()))) >= {
        "auc", "mmd", "p_value", "n_source", "n_target", "verdict", "classes", "examples"}


def _halves_and_inverted(root: Path) -> tuple[Path, Path, Path, Path]:
    """A class folder, two random halves of it, and its colour-inverted copy."""
    source = write_image_folder(root / "all", n_per_class=20)
    files = sorted(source.rglob("*.png"))
    order = np.random.default_rng(0).permutation(len(files))
    for rank, index in enumerate(order):
        file = files[index]
        half = root / ("a" if rank % 2 else "b") / file.parent.name / file.name
        half.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, half)
        inverted = root / "inverted" / file.parent.name / file.name
        inverted.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - np.asarray(Image.open(file))).save(inverted)
    return source, root / "a", root / "b", root / "inverted"


def _shift_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    assert main(["shift", *args, "--backbone", "tiny_test", "--json", "--permutations", "200"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_shift_halves_of_one_folder_against_an_inverted_copy(
    tmp_path: Path, tiny_backbone: object, capsys: pytest.CaptureFixture[str]
) -> None:
    source, half_a, half_b, inverted = _halves_and_inverted(tmp_path)
    same = _shift_json(capsys, str(half_a), str(half_b))
    assert same["n_source"] == same["n_target"] == 30
    assert abs(same["auc"] - 0.5) < 0.2 and same["p_value"] > 0.05, same
    assert same["verdict"].startswith("no detectable shift")
    shifted = _shift_json(capsys, str(source), str(inverted))
    assert shifted["auc"] > 0.95 and shifted["p_value"] < 0.01, shifted
    assert shifted["verdict"].startswith("strong shift")
    assert {c["class"] for c in shifted["classes"]} == {"red", "green", "blue"}
    # A flat folder is read unlabelled: no class table, examples still ranked.
    flat = tmp_path / "flat"
    flat.mkdir()
    for index, file in enumerate(sorted(inverted.rglob("*.png"))[:12]):
        shutil.copy(file, flat / f"{index}.png")
    unlabelled = _shift_json(capsys, str(source), str(flat))
    assert unlabelled["n_target"] == 12 and unlabelled["classes"] == [] and len(unlabelled["examples"]) == 10
    assert main(["shift", str(source), str(tmp_path / "missing"), "--backbone", "tiny_test"]) == 2


def test_evaluate_with_other_data_reports_the_shift_from_training(tmp_path: Path, tiny_backbone: object) -> None:
    from tlkit.evaluation import evaluate_run
    from tlkit.run import train

    source, _, _, inverted = _halves_and_inverted(tmp_path)
    config = tmp_path / "run.toml"
    config.write_text(
        f'name = "shifted"\noutput_dir = "{tmp_path / "run"}"\n[data]\npath = "{source}"\nbatch_size = 8\n'
        '[backbone]\nname = "tiny_test"\n[augmentation]\nenabled = false\n'
        '[schedule]\npreset = "feature_extraction"\nepochs = 1\n'
    )
    train(config, verbose=0, baselines=False)
    report = evaluate_run(tmp_path / "run", inverted, out=tmp_path / "eval", gradcam=0)
    shift = report.metrics["shift"]
    assert shift["auc"] > 0.9 and shift["n_target"] == 60
    text = report.report.read_text()
    assert "## Shift from the training data" in text and "strong shift" in text
    same = evaluate_run(tmp_path / "run", source, out=tmp_path / "eval_same", gradcam=0)
    assert same.metrics["shift"]["auc"] < 0.8
