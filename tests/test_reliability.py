"""Disk and run-directory faults: a full disk, a read-only output, a config typo, interrupted writes."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import h5py
import keras
import pytest

from tlkit.cli import main
from tlkit.config import config_from_dict
from tlkit.errors import ConfigError, TlkitError
from tlkit.fileio import DiskFullError, atomic_save, atomic_write_text
from tlkit.run import train
from tests.conftest import write_image_folder


def _config(tmp: Path, data: Path, **overrides: object) -> dict:
    raw: dict = {
        "name": "faults",
        "output_dir": str(tmp / "run"),
        "data": {"path": str(data), "batch_size": 8, "val_fraction": 0.2, "test_fraction": 0.2},
        "backbone": {"name": "tiny_test"},
        "augmentation": {"enabled": False},
        "schedule": {"stages": [
            {"name": "head", "epochs": 2, "learning_rate": 0.02, "solver": "sgd"},
            {"name": "top", "epochs": 2, "unfreeze": 1, "learning_rate": 0.002},
        ]},
        "training": {"verbose": 0},
    }
    raw.update(overrides)
    return raw


def test_atomic_save_keeps_the_old_file_when_the_disk_fills(tmp_path: Path) -> None:
    target = tmp_path / "best.weights.h5"
    target.write_bytes(b"good")

    def full(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match="no space left"):
        atomic_save(target, full)
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["best.weights.h5"]  # no partial file left behind


def test_full_disk_mid_run_stops_with_a_tlkit_error_and_resumes(
    tmp_path: Path, registered: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_image_folder(tmp_path / "data", n_per_class=8)
    config = tmp_path / "faults.json"
    config.write_text(json.dumps(_config(tmp_path, data)))
    original = keras.Model.save_weights
    calls = {"n": 0}

    def filling(self: keras.Model, filepath: str, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second stage's final weights: the disk is full while they are written
            Path(filepath).write_bytes(b"\x89HDF truncated")
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save_weights", filling)
    assert main(["train", str(config)]) == 2
    assert "no space left on the device" in capsys.readouterr().err
    run = tmp_path / "run"
    weights = sorted(run.rglob("*.h5"))
    assert weights, "the checkpoints written before the disk filled are kept"
    for file in weights:  # every checkpoint that exists is complete: HDF5 opens it
        assert ".partial" not in file.name
        with h5py.File(file, "r") as handle:
            assert len(handle.keys()) > 0
    monkeypatch.setattr(keras.Model, "save_weights", original)
    result = train(tmp_path / "faults.json")  # space freed: the same command finishes the run
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert [r["stage_epoch"] for r in result.history.history] == [1, 2, 1, 2]


def test_unwritable_output_dir_is_refused_before_training(tmp_path: Path, registered: None) -> None:
    data = write_image_folder(tmp_path / "data", n_per_class=4)
    # /sys refuses new folders even to root, like a read-only mount.
    cfg = config_from_dict(_config(tmp_path, data, output_dir="/sys/tlkit-run"))
    with pytest.raises(ConfigError, match="not writable"):
        train(cfg)


def test_config_typo_does_not_lock_the_run_dir(tmp_path: Path, registered: None) -> None:
    data = write_image_folder(tmp_path / "data", n_per_class=6)
    typo = _config(tmp_path, data, backbone={"name": "tiny_tset"})
    with pytest.raises(TlkitError, match="tiny_tset"):
        train(config_from_dict(typo))
    assert not (tmp_path / "run" / "config.json").exists()
    fixed = train(config_from_dict(_config(tmp_path, data)))
    assert json.loads((fixed.run_dir / "run.json").read_text())["status"] == "complete"


def test_changed_config_restarts_a_run_that_never_finished_an_epoch(tmp_path: Path, registered: None) -> None:
    data = write_image_folder(tmp_path / "data", n_per_class=6)
    run = tmp_path / "run"
    run.mkdir()
    stale = _config(tmp_path, data)
    stale["data"] = {**stale["data"], "batch_size": 4}
    (run / "config.json").write_text(json.dumps(config_from_dict(stale).to_dict()))
    (run / "run.json").write_text(json.dumps({"status": "training"}))
    result = train(config_from_dict(_config(tmp_path, data)))
    assert json.loads((result.run_dir / "config.json").read_text())["data"]["batch_size"] == 8
    # Once an epoch has finished, a changed config is refused (it would mix two runs).
    changed = _config(tmp_path, data)
    changed["data"] = {**changed["data"], "batch_size": 4}
    with pytest.raises(ConfigError, match="different config"):
        train(config_from_dict(changed))


def test_atomic_text_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
