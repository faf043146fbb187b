"""`tlkit demo`: the transfer gain on real digits, in a shortened form that runs in the suite."""

from __future__ import annotations

import pytest

from tlkit.demo import DemoConfig, digits_split, run_demo


def test_digits_split_is_per_class_and_disjoint() -> None:
    cfg = DemoConfig(labels_per_class=4, val_per_class=2, test_size=50)
    data = digits_split(cfg)
    assert data["train"][0].shape == (40, 8, 8, 3)
    assert sorted(set(data["train"][1].tolist())) == list(range(10))
    assert data["val"][0].shape[0] == 20 and data["test"][0].shape[0] == 50
    assert data["train"][0].max() <= 255.0


@pytest.mark.slow
def test_pretrained_beats_random_init_at_equal_epochs(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = DemoConfig(labels_per_class=8, test_size=200, image_size=64, head_epochs=5, fine_tune_epochs=2)
    rows = run_demo(cfg, verbose=True)
    pretrained, random_init = rows
    assert pretrained["epochs"] == random_init["epochs"] == 7
    assert pretrained["test_accuracy"] > random_init["test_accuracy"] + 0.25, rows
    out = capsys.readouterr().out
    assert "transfer gain" in out and "test accuracy" in out
