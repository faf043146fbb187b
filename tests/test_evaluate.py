"""tlkit.evaluation: metrics against scikit-learn, calibration, and `tlkit evaluate` on a tiny run."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

import tlkit.backbones as backbones
from tests.conftest import tiny_spec, write_image_folder
from tlkit.errors import ConfigError, DataError
from tlkit.evaluation import (
    PlotContext,
    apply_temperature,
    compute_metrics,
    evaluate_predictions,
    expected_calibration_error,
    fit_temperature,
    list_plots,
    register_plot,
    reliability_bins,
    unregister_plot,
    youden_threshold,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _multiclass(n: int = 400, c: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax outputs of a mediocre classifier (signal on the true class)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(0, 1.0, (n, c))
    logits[np.arange(n), y] += rng.uniform(0, 2.5, n)
    return y, _softmax(logits)


def _binary(n: int = 300, seed: int = 1, rounded: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.3).astype(int)
    p1 = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.5 * y - 0.7)))
    if rounded:  # many tied scores
        p1 = np.round(p1, 1)
    return y, np.stack([1 - p1, p1], axis=1)


def _multilabel(n: int = 300, c: int = 4, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=(n, c)) < np.array([0.5, 0.3, 0.15, 0.6])[:c]).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(0, 1.2, (n, c)) + 1.8 * y - 0.9)))
    return y, p


# --- metrics vs scikit-learn -------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 3])
def test_multiclass_metrics_match_sklearn(seed: int) -> None:
    y, p = _multiclass(seed=seed)
    c = p.shape[1]
    names = [f"c{i}" for i in range(c)]
    m = compute_metrics(y, p, names)
    pred = p.argmax(1)
    labels = list(range(c))
    assert m["task"] == "multiclass" and m["count"] == len(y)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for i, name in enumerate(names):
        got = m["per_class"][name]
        assert got["precision"] == pytest.approx(precision[i])
        assert got["recall"] == pytest.approx(recall[i])
        assert got["f1"] == pytest.approx(f1[i])
        assert got["support"] == support[i]
        assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y == i, p[:, i]))
        assert got["pr_auc"] == pytest.approx(skm.average_precision_score(y == i, p[:, i]))
    for average in ("macro", "weighted"):
        expected = skm.precision_recall_fscore_support(y, pred, labels=labels, average=average, zero_division=0)
        got = m[f"{average}_avg"]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(expected[:3])
    for k in (2, 3):
        assert m["top_k_accuracy"][str(k)] == pytest.approx(skm.top_k_accuracy_score(y, p, k=k, labels=labels))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", labels=labels))
    assert np.array_equal(m["confusion_matrix"], skm.confusion_matrix(y, pred, labels=labels))
    assert m["nll"] == pytest.approx(skm.log_loss(y, p, labels=labels))
    low, high = m["accuracy_ci95"]
    assert low < m["accuracy"] < high


def test_multiclass_with_a_class_never_predicted_or_present() -> None:
    """Zero divisions give 0 like scikit-learn's zero_division=0; AUC of an absent class is None."""
    y = np.array([0, 0, 1, 1, 1, 2, 2])
    p = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.3, .6, .1], [.6, .3, .1], [.5, .4, .1], [.7, .2, .1],
                  ]) @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0.5, 0.5]])  # class 3 never true
    names = ["a", "b", "c", "d"]
    m = compute_metrics(y, p, names)
    pred = p.argmax(1)
    expected = skm.precision_recall_fscore_support(y, pred, labels=[0, 1, 2, 3], zero_division=0)
    for i, name in enumerate(names):
        assert m["per_class"][name]["precision"] == pytest.approx(expected[0][i])
        assert m["per_class"][name]["recall"] == pytest.approx(expected[1][i])
    assert m["per_class"]["d"]["roc_auc"] is None
    macro = skm.precision_recall_fscore_support(y, pred, labels=[0, 1, 2, 3], average="macro", zero_division=0)
    assert m["macro_avg"]["f1"] == pytest.approx(macro[2])


@pytest.mark.parametrize("rounded", [False, True])
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_binary_metrics_match_sklearn(rounded: bool, threshold: float | None) -> None:
    y, p = _binary(rounded=rounded)
    m = compute_metrics(y, p, ["normal", "disease"], threshold=threshold)
    assert m["task"] == "binary" and m["positive_class"] == "disease"
    pred = p.argmax(1) if threshold is None else (p[:, 1] >= threshold).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
    assert m["per_class"]["disease"]["f1"] == pytest.approx(f1[1])
    assert m["per_class"]["normal"]["recall"] == pytest.approx(recall[0])
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p[:, 1]))
    assert np.array_equal(m["confusion_matrix"], skm.confusion_matrix(y, pred, labels=[0, 1]))
    op = m["operating_point"]
    if threshold is None:  # Youden's J on these data, as scikit-learn's ROC curve gives it
        fpr, tpr, thresholds = skm.roc_curve(y, p[:, 1], drop_intermediate=False)
        best = int(np.argmax(tpr - fpr))
        assert thresholds[best + 1] < op["threshold"] < thresholds[best]  # in the gap below the best score
        assert op["youden_j"] == pytest.approx(tpr[best] - fpr[best])
        assert "optimistic" in op["threshold_source"]
    else:
        assert op["threshold"] == threshold and op["threshold_source"] == "given"
    decided = (p[:, 1] >= op["threshold"]).astype(int)
    assert op["sensitivity"] == pytest.approx(skm.recall_score(y, decided, pos_label=1))
    assert op["specificity"] == pytest.approx(skm.recall_score(y, decided, pos_label=0))
    assert op["ppv"] == pytest.approx(skm.precision_score(y, decided, pos_label=1))
    tn, fp, fn, tp = skm.confusion_matrix(y, decided).ravel()
    assert (op["tn"], op["fp"], op["fn"], op["tp"]) == (tn, fp, fn, tp)


def test_binary_positive_class_can_be_the_first() -> None:
    y, p = _binary()
    m = compute_metrics(y, p, ["disease", "normal"], positive="disease", threshold=0.6)
    assert m["positive_class"] == "disease"
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y == 0, p[:, 0]))
    pred = np.where(p[:, 0] >= 0.6, 0, 1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))


@pytest.mark.parametrize("threshold", [None, 0.4, (0.3, 0.5, 0.2, 0.6)])
def test_multilabel_metrics_match_sklearn(threshold: object) -> None:
    y, p = _multilabel()
    names = ["a", "b", "c", "d"]
    m = compute_metrics(y, p, names, multi_label=True, threshold=threshold)  # type: ignore[arg-type]
    limits = np.broadcast_to(np.asarray(0.5 if threshold is None else threshold, float), (4,))
    pred = (p >= limits).astype(int)
    assert m["task"] == "multilabel"
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["hamming_loss"] == pytest.approx(skm.hamming_loss(y, pred))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred, zero_division=0)
    roc = skm.roc_auc_score(y, p, average=None)
    ap = skm.average_precision_score(y, p, average=None)
    confusion = skm.multilabel_confusion_matrix(y, pred)
    for i, name in enumerate(names):
        got = m["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((precision[i], recall[i], f1[i]))
        assert got["support"] == support[i]
        assert got["roc_auc"] == pytest.approx(roc[i])
        assert got["pr_auc"] == pytest.approx(ap[i])
        assert np.array_equal(m["confusion_matrix"][name], confusion[i])
        op = m["operating_point"][name]
        if threshold is not None:
            assert op["threshold"] == pytest.approx(limits[i])
            assert op["sensitivity"] == pytest.approx(recall[i])
    for average in ("macro", "weighted"):
        expected = skm.precision_recall_fscore_support(y, pred, average=average, zero_division=0)
        got = m[f"{average}_avg"]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(expected[:3])
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p, average="macro"))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p, average="macro"))
    assert m["nll"] == pytest.approx(np.mean([skm.log_loss(y[:, i], p[:, i]) for i in range(4)]))


def test_youden_threshold_on_separable_scores() -> None:
    y = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.35, 0.4, 0.9])
    assert youden_threshold(y, scores) == pytest.approx(0.375)  # between the last negative and first positive
    assert youden_threshold(np.zeros(3), np.array([0.1, 0.2, 0.3])) == 0.5


# --- calibration -----------------------------------------------------------------------------


def test_reliability_bins_match_sklearn_calibration_curve() -> None:
    y, p = _binary(n=500)
    for multi_label, truth, probs in ((True, y[:, None], p[:, 1:]), (False, y, p)):
        bins = reliability_bins(truth, probs, n_bins=10, multi_label=multi_label)
        if multi_label:
            outcome, confidence = y, p[:, 1]
        else:
            outcome, confidence = (p.argmax(1) == y).astype(int), p.max(1)
        prob_true, prob_pred = calibration_curve(outcome, confidence, n_bins=10, strategy="uniform")
        filled = [b for b in bins if b["count"]]
        assert [b["accuracy"] for b in filled] == pytest.approx(prob_true)
        assert [b["confidence"] for b in filled] == pytest.approx(prob_pred)
        counts = np.array([b["count"] for b in filled])
        ece = float((counts / counts.sum() * np.abs(prob_true - prob_pred)).sum())
        assert expected_calibration_error(truth, probs, n_bins=10, multi_label=multi_label) == pytest.approx(ece)


def test_fit_temperature_recovers_overconfidence() -> None:
    rng = np.random.default_rng(0)
    n, c = 4000, 4
    logits = rng.normal(0, 1.5, (n, c))
    true_p = _softmax(logits)
    y = np.array([rng.choice(c, p=row) for row in true_p])
    overconfident = _softmax(3.0 * logits)  # the "model" is three times too sharp
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(3.0, rel=0.1)
    calibrated = apply_temperature(overconfident, t)
    assert np.array_equal(calibrated.argmax(1), overconfident.argmax(1))
    assert expected_calibration_error(y, calibrated) < 0.5 * expected_calibration_error(y, overconfident)
    assert skm.log_loss(y, calibrated) < skm.log_loss(y, overconfident)


def test_fit_temperature_multilabel() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (3000, 3))
    y = (rng.uniform(size=z.shape) < 1 / (1 + np.exp(-z))).astype(int)
    underconfident = 1 / (1 + np.exp(-z / 2.0))
    t = fit_temperature(y, underconfident, multi_label=True)
    assert t == pytest.approx(0.5, rel=0.1)


# --- writing reports from predictions ---------------------------------------------------------


def _check_report(out: Path) -> dict:
    report = (out / "report.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert links
    for link in links:
        assert (out / link).is_file(), link
    pngs = sorted((out / "evaluation").rglob("*.png"))
    assert pngs
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
        assert png.relative_to(out).as_posix() in links, f"{png} is not linked from report.md"
    with open(out / "misclassified.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    confidences = [float(r["confidence"]) for r in rows]
    assert confidences == sorted(confidences, reverse=True)
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def test_evaluate_predictions_binary_with_validation(tmp_path: Path) -> None:
    y, p = _binary(n=200)
    val_y, val_p = _binary(n=120, seed=7)
    report = evaluate_predictions(y, p, ["normal", "disease"], out=tmp_path, validation=(val_y, val_p),
                                  calibrate=True)
    metrics = _check_report(tmp_path)
    assert metrics["operating_point"]["threshold_source"] == "Youden's J on the validation split"
    assert metrics["operating_point"]["threshold"] == pytest.approx(youden_threshold(
        val_y, apply_temperature(val_p, metrics["calibration"]["temperature"])[:, 1]))
    assert json.loads((tmp_path / "calibration.json").read_text())["temperature"] == pytest.approx(
        report.metrics["calibration"]["temperature"])
    assert set(report.plots) >= {"confusion_matrix", "confusion_matrix_normalized", "roc", "precision_recall",
                                 "reliability"}
    assert "no history.json" in " ".join(report.notes)
    with open(report.misclassified_csv, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == metrics["misclassified"] > 0


def test_evaluate_predictions_multilabel(tmp_path: Path) -> None:
    y, p = _multilabel(n=150)
    report = evaluate_predictions(y, p, ["a", "b", "c", "d"], out=tmp_path, multi_label=True, threshold=0.5,
                                  paths=[f"img{i}.png" for i in range(150)])
    metrics = _check_report(tmp_path)
    assert set(metrics["operating_point"]) == {"a", "b", "c", "d"}
    with open(report.misclassified_csv, newline="") as handle:
        first = next(csv.DictReader(handle))
    assert set(first) == {"path", "true_label", "predicted_label", "confidence", "worst_label"}


def test_evaluation_never_overwrites_files_tlkit_did_not_write(tmp_path: Path) -> None:
    """--out folders: a user's report.md / evaluation/ file is refused, tlkit's own are replaced."""
    y, p = _binary(n=60)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own notes", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"report\.md.*not written by tlkit.*new or empty --out"):
        evaluate_predictions(y, p, ["normal", "disease"], out=mine)
    assert (mine / "report.md").read_text(encoding="utf-8") == "my own notes"
    assert sorted(f.name for f in mine.iterdir()) == ["report.md"]  # nothing written before refusing

    figures = tmp_path / "figures"
    (figures / "evaluation").mkdir(parents=True)
    (figures / "evaluation" / "roc.png").write_bytes(b"my plot")
    with pytest.raises(ConfigError, match="roc.png"):
        evaluate_predictions(y, p, ["normal", "disease"], out=figures)
    assert (figures / "evaluation" / "roc.png").read_bytes() == b"my plot"

    # A fresh folder is claimed (the marker lists what tlkit writes), and tlkit may replace its own files
    # there later; a file of the user's beside them is left alone.
    fresh = tmp_path / "fresh"
    evaluate_predictions(y, p, ["normal", "disease"], out=fresh)
    marker = json.loads((fresh / ".tlkit-evaluation").read_text(encoding="utf-8"))
    assert set(marker["files"]) == {"report.md", "metrics.json", "misclassified.csv"}
    assert marker["folders"] == ["evaluation"]
    (fresh / "notes.txt").write_text("keep me", encoding="utf-8")
    before = (fresh / "metrics.json").stat().st_mtime_ns
    evaluate_predictions(y, p, ["normal", "disease"], out=fresh)
    assert (fresh / "metrics.json").stat().st_mtime_ns >= before and _check_report(fresh)["count"] == 60
    assert (fresh / "notes.txt").read_text(encoding="utf-8") == "keep me"


@pytest.fixture
def toy_plots() -> Iterator[list[str]]:
    """Two plots registered through the public registry (one that never applies), removed afterwards."""
    from tlkit.evaluation.plots import figure, save

    seen: list[str] = []

    def draw(ctx: PlotContext, path: Path) -> None:
        seen.append(ctx.metrics["task"])
        fig = figure(3, 3)
        fig.add_subplot().hist(ctx.probabilities.max(1), bins=10)
        save(fig, path)

    register_plot("toy_scores", draw, file="toy.png", title="toy score histogram")
    register_plot("toy_never", draw, applies=lambda ctx: False)
    try:
        yield seen
    finally:
        unregister_plot("toy_scores")
        unregister_plot("toy_never")


def test_a_registered_plot_is_drawn_and_linked(tmp_path: Path, toy_plots: list[str]) -> None:
    assert [p.name for p in list_plots()][-2:] == ["toy_scores", "toy_never"]
    with pytest.raises(ConfigError, match="already registered"):
        register_plot("toy_scores", lambda ctx, path: None)
    y, p = _multiclass(n=60)
    report = evaluate_predictions(y, p, [f"c{i}" for i in range(5)], out=tmp_path)
    assert toy_plots == ["multiclass"]  # drawn once, from the same context as the built-in plots
    assert report.plots["toy_scores"] == tmp_path / "evaluation" / "toy.png"
    assert "toy_never" not in report.plots and not (tmp_path / "evaluation" / "toy_never.png").exists()
    _check_report(tmp_path)  # every PNG, the toy one included, is linked from report.md
    assert "![toy score histogram](evaluation/toy.png)" in report.report.read_text(encoding="utf-8")


def test_unregistered_plot_is_gone(tmp_path: Path) -> None:
    """After the fixture above, the registry holds only the built-in plots again."""
    names = [p.name for p in list_plots()]
    assert names == ["confusion_matrix", "confusion_matrix_normalized", "roc", "precision_recall", "reliability",
                     "training_curves"]
    y, p = _binary(n=80)
    report = evaluate_predictions(y, p, ["normal", "disease"], out=tmp_path)
    assert set(report.plots) == set(names) - {"training_curves"}  # no history here


def test_single_class_columns_have_no_auc() -> None:
    """A label that is always (or never) present has no ROC-AUC or AP; the macro means skip it."""
    y, p = _multilabel(n=120)
    y[:, 1] = 1
    y[:, 2] = 0
    m = compute_metrics(y, p, ["a", "b", "c", "d"], multi_label=True)
    for name in ("b", "c"):
        assert m["per_class"][name]["roc_auc"] is None and m["per_class"][name]["pr_auc"] is None
    kept = [0, 3]
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y[:, kept], p[:, kept], average="macro"))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y[:, kept], p[:, kept], average="macro"))


def test_compute_metrics_rejects_mismatched_shapes() -> None:
    with pytest.raises(DataError, match="expected"):
        compute_metrics(np.zeros(3, int), np.full((3, 2), 0.5), ["a", "b", "c"])


# --- `tlkit evaluate` on a tiny finished run ---------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tlkit.config import config_from_dict
    from tlkit.run import train

    spec = backbones.register(tiny_spec(), overwrite=True)
    root = tmp_path_factory.mktemp("evaluate")
    data = write_image_folder(root / "images", n_per_class=10)
    config = config_from_dict({
        "name": "tiny", "output_dir": str(root / "run"), "seed": 0,
        "data": {"path": str(data), "batch_size": 8, "val_fraction": 0.2, "test_fraction": 0.3},
        "backbone": {"name": "tiny_test"},
        "augmentation": {"enabled": False},
        "schedule": {"stages": [
            {"name": "head", "epochs": 2, "unfreeze": 0, "learning_rate": 0.01},
            {"name": "all", "epochs": 2, "unfreeze": "all", "learning_rate": 0.003},
        ]},
        "training": {"verbose": 0},
    })
    train(config)
    yield root / "run"
    backbones.unregister(spec.name)


def test_cli_evaluate_writes_report(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tlkit.cli import main

    assert main(["evaluate", str(finished_run), "--calibrate", "--gradcam", "2"]) == 0
    printed = capsys.readouterr().out
    assert "macro avg" in printed and "accuracy" in printed and "report.md" in printed
    metrics = _check_report(finished_run)
    assert metrics["task"] == "multiclass" and metrics["count"] == 9
    assert metrics["data"]["source"] == "the run's test split"
    for name in ("confusion_matrix", "confusion_matrix_normalized", "training_curves", "reliability", "roc",
                 "precision_recall"):
        assert (finished_run / "evaluation" / f"{name}.png").is_file()
    assert (finished_run / "evaluation" / "gradcam_right.png").is_file()
    assert metrics["explanations"]["method"] == "grad-cam"
    assert metrics["explanations"]["layer"] == "block2_relu"
    calibration = json.loads((finished_run / "calibration.json").read_text())
    assert calibration["temperature"] > 0
    report = (finished_run / "report.md").read_text()
    for heading in ("## Per-class metrics", "## Calibration", "## Training curves", "## Misclassified examples"):
        assert heading in report


def test_evaluate_other_data_into_out(finished_run: Path, tmp_path: Path) -> None:
    from tlkit.evaluation import evaluate_run

    data = write_image_folder(tmp_path / "more", n_per_class=4, seed=5)
    report = evaluate_run(finished_run, data, out=tmp_path / "report", gradcam=0)
    assert report.out_dir == tmp_path / "report"
    metrics = _check_report(tmp_path / "report")
    assert metrics["count"] == 12 and metrics["data"]["source"] == str(data)
    assert not list((tmp_path / "report" / "evaluation").glob("gradcam*"))
    assert "Where the model looks" not in report.report.read_text()


def test_evaluate_refuses_unknown_classes(finished_run: Path, tmp_path: Path) -> None:
    from tlkit.evaluation import evaluate_run

    data = write_image_folder(tmp_path / "more", n_per_class=2)
    (data / "red").rename(data / "purple")
    with pytest.raises(DataError, match="purple"):
        evaluate_run(finished_run, data, out=tmp_path / "out", gradcam=0)


def test_cli_evaluate_out_refuses_a_users_metrics_json(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tlkit.cli import main

    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.json").write_text('{"mine": true}', encoding="utf-8")
    assert main(["evaluate", str(finished_run), "--out", str(out), "--gradcam", "0"]) == 2
    err = capsys.readouterr().err
    assert "metrics.json" in err and "does not overwrite" in err
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8")) == {"mine": True}
    # The run directory is tlkit's own: it never gets a marker, and evaluating into it is always allowed.
    assert not (finished_run / ".tlkit-evaluation").exists()


def test_evaluate_an_audio_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Audio runs: whole clips scored as the mean of eval_crops crops; no Grad-CAM, said so."""
    fixtures = pytest.importorskip("tests.audio_fixtures")
    from tlkit.cli import main
    from tlkit.config import config_from_dict
    from tlkit.run import train

    spec = backbones.register(fixtures.tiny_logmel_spec(), overwrite=True)
    try:
        manifest = fixtures.write_speaker_dataset(tmp_path / "data", speakers_per_class=4, clips_per_speaker=3,
                                                  sample_rate=8000)
        train(config_from_dict({
            "name": "audio", "output_dir": str(tmp_path / "run"),
            "data": {"manifest": str(manifest), "val_fraction": 0.25, "test_fraction": 0.25, "batch_size": 8,
                     "clip_seconds": 0.5, "eval_crops": 2},
            "backbone": {"name": spec.name},
            "schedule": {"stages": [{"name": "head", "epochs": 2, "learning_rate": 0.03},
                                    {"name": "top", "epochs": 1, "unfreeze": 1, "learning_rate": 0.003}]},
            "training": {"verbose": 0},
        }))
    finally:
        backbones.unregister(spec.name)
    assert main(["evaluate", str(tmp_path / "run")]) == 0
    metrics = _check_report(tmp_path / "run")
    assert metrics["task"] == "binary" and metrics["count"] > 0
    assert "operating_point" in metrics and "audio_saliency" in " ".join(metrics["notes"])
    assert not list((tmp_path / "run" / "evaluation").glob("gradcam*"))
