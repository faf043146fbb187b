"""tlkit.transferability (LogME) and tlkit.rank / `tlkit rank`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import multivariate_normal

import tlkit
from tests.audio_fixtures import tiny_wave_spec, write_speaker_dataset
from tests.conftest import tiny_spec, write_image_folder
from tests.transfer_fixtures import blind_spec, informative_spec
from tlkit import backbones
from tlkit.cli import main
from tlkit.errors import DataError, WeightsUnavailableError
from tlkit.rank import BASELINE_NAME, format_rank_table, rank_backbones
from tlkit.transferability import logme

# --------------------------------------------------------------------------- LogME


def labelled(n: int = 120, d: int = 16, seed: int = 0, signal: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return rng.normal(size=(n, d)) + signal * np.eye(3)[y] @ rng.normal(size=(3, d)), y


def brute_force_logme(features: np.ndarray, labels: np.ndarray) -> float:
    """The definition itself: max over (alpha, beta) of log N(y_k; 0, F F^T / alpha + I / beta), per class."""
    n = len(features)
    evidences = []
    for k in np.unique(labels):
        target = (labels == k).astype(float)

        def negative(log_ab: np.ndarray, target: np.ndarray = target) -> float:
            alpha, beta = np.exp(log_ab)
            cov = features @ features.T / alpha + np.eye(n) / beta
            return -multivariate_normal(np.zeros(n), cov).logpdf(target)

        best = minimize(negative, np.zeros(2), method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12})
        evidences.append(-best.fun / n)
    return float(np.mean(evidences))


@pytest.mark.parametrize("shape", [(14, 3), (15, 30)])  # more examples than features, and fewer
def test_logme_is_the_maximum_evidence(shape: tuple[int, int]) -> None:
    features, labels = labelled(*shape, seed=0)
    assert logme(features, labels) == pytest.approx(brute_force_logme(features, labels), abs=1e-6)


def test_logme_when_the_features_fit_the_labels_exactly() -> None:
    """N <= D, full rank: the evidence grows towards beta -> infinity, where it is
    max over alpha of log N(y; 0, F F^T / alpha), with alpha = N / (y^T (F F^T)^-1 y)."""
    features, labels = labelled(10, 25, seed=1)
    gram, n, limits = features @ features.T, len(features), []
    for k in np.unique(labels):
        target = (labels == k).astype(float)
        alpha = n / (target @ np.linalg.solve(gram, target))
        limits.append(multivariate_normal(np.zeros(n), gram / alpha).logpdf(target) / n)
    assert logme(features, labels) == pytest.approx(float(np.mean(limits)), abs=1e-8)


def test_logme_higher_for_informative_than_random_features() -> None:
    features, labels = labelled()
    noise = np.random.default_rng(5).normal(size=features.shape)
    weak, _ = labelled(signal=0.5)
    assert logme(features, labels) > logme(weak, labels) > logme(noise, labels)


def test_logme_invariances() -> None:
    features, labels = labelled()
    score = logme(features, labels)
    rotation, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(16, 16)))
    assert logme(features @ rotation, labels) == pytest.approx(score, rel=1e-6)
    assert logme(7.5 * features, labels) == pytest.approx(score, rel=1e-6)
    assert logme(np.hstack([features, features]), labels) == pytest.approx(score, rel=1e-6)
    assert logme(features[:, ::-1], labels) == pytest.approx(score, rel=1e-6)
    # Class indices, their one-hot matrix and renamed classes are the same targets.
    assert logme(features, np.eye(3)[labels]) == pytest.approx(score, rel=1e-9)
    assert logme(features, labels * 10 + 3) == pytest.approx(score, rel=1e-9)


def test_logme_rejects_bad_input() -> None:
    with pytest.raises(DataError, match=r"\(N, D\)"):
        logme(np.zeros(5), np.zeros(5))
    with pytest.raises(DataError, match="labels for"):
        logme(np.zeros((5, 2)), np.zeros(4))
    with pytest.raises(DataError, match="NaN"):
        logme(np.full((3, 2), np.nan), np.arange(3))


# --------------------------------------------------------------------------- ranking


@pytest.fixture
def ranked_backbones():
    """``test_informative`` and ``test_blind`` registered (public ``tlkit.register``), removed afterwards."""
    specs = [tlkit.register(informative_spec(), overwrite=True), tlkit.register(blind_spec(), overwrite=True)]
    yield specs
    for spec in specs:
        backbones.unregister(spec.name)


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("rank") / "images", n_per_class=20)


def test_rank_backbones_puts_baseline_first_and_informative_above_random(ranked_backbones, colour_folder,
                                                                         capsys) -> None:
    rows = rank_backbones(colour_folder, ["test_blind", "test_informative"], seed=0)
    assert [r.name for r in rows] == [BASELINE_NAME, "test_informative", "test_blind"]
    baseline, informative, blind = rows
    assert baseline.kind == "baseline" and baseline.logme is None and baseline.feature_dim == 16 * 16 * 3
    assert informative.val_accuracy > blind.val_accuracy and informative.logme > blind.logme
    assert informative.feature_dim == 8 and informative.seconds > 0
    progress = capsys.readouterr().err
    assert "rank 1/3 no-transfer baseline" in progress and "rank 3/3 test_" in progress
    table = format_rank_table(rows)
    assert table.splitlines()[2].split()[:2] == ["-", "no-transfer"]
    assert "NEGATIVE-TRANSFER" not in table  # the best backbone matches the baseline


def test_rank_cli_json_and_table(ranked_backbones, colour_folder, capsys) -> None:
    code = main(["rank", str(colour_folder), "--backbones", "test_blind,test_informative", "--json",
                 "--max-per-class", "10"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [BASELINE_NAME, "test_informative", "test_blind"]
    assert rows[0]["kind"] == "baseline" and rows[1]["val_accuracy"] > rows[2]["val_accuracy"]
    assert rows[1]["logme"] > rows[2]["logme"]
    assert all(r["val_count"] <= 3 * 10 for r in rows)
    # Only the blind backbone: the table says transfer loses to pixels.
    assert main(["rank", str(colour_folder), "--backbones", "test_blind"]) == 0
    out = capsys.readouterr().out
    assert "NEGATIVE-TRANSFER" in out and "no-transfer baseline" in out.splitlines()[2]


def test_rank_defaults_to_offline_backbones_of_the_modality_and_reports_failures(ranked_backbones,
                                                                                  colour_folder) -> None:
    def unavailable(weights: str | None = "pretrained"):
        raise WeightsUnavailableError("weights for test_missing are not cached; run `tlkit fetch test_missing`")

    tlkit.register(tiny_spec("test_missing", builder=unavailable), overwrite=True)
    try:
        rows = rank_backbones(colour_folder, ["test_missing", "test_informative"], max_per_class=8, verbose=False)
        assert [r.name for r in rows] == [BASELINE_NAME, "test_informative", "test_missing"]
        assert rows[-1].val_accuracy is None and "not cached" in rows[-1].error
        assert "not cached" in format_rank_table(rows)
    finally:
        backbones.unregister("test_missing")
    offline = [s.name for s in backbones.list_backbones("image") if backbones.available_offline(s)]
    assert {"test_informative", "test_blind"} <= set(offline)


def test_rank_rejects_what_is_not_data(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="neither a class folder nor a .csv manifest"):
        rank_backbones(tmp_path / "notes.txt")


def test_rank_audio_backbone_beside_the_log_mel_baseline(tmp_path: Path) -> None:
    manifest = write_speaker_dataset(tmp_path, sample_rate=8000)
    rows = rank_backbones(manifest, [tiny_wave_spec()], clip_seconds=0.5, crops=2, val_fraction=0.25, verbose=False)
    assert [r.kind for r in rows] == ["baseline", "backbone"]
    assert rows[0].method.startswith("log-mel statistics") and rows[0].val_accuracy >= 0.9
    assert rows[1].error is None and rows[1].feature_dim == 16 and rows[1].logme is not None
