"""Multi-worker training (``[training] distribute = "multi_worker"``): two ``tlkit train`` processes on
127.0.0.1 with TF_CONFIG, MultiWorkerMirroredStrategy over CPU collectives.

Checks: both workers end with the same weights; only the chief writes the run directory (the other
worker writes its own temp folder, RunDir.for_worker); a job whose workers are both killed with
SIGKILL mid-stage resumes when both are started again and finishes with every epoch once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import write_image_folder
from tests.test_resume import SCRIPT as RESUME_SCRIPT
from tlkit.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]

# One worker is test_resume's `tlkit train` script (tiny backbone registered; KILL_AFTER=N: SIGKILL after
# the first batch of epoch N+1, counted across stages; BACKUP_EVERY_EPOCH: a resume backup every epoch),
# with TF_CONFIG from the environment. A batch of epoch N+1 needs the other worker's all-reduce, so by
# then both workers have written their epoch-N backups: both die at the same point.
SCRIPT = RESUME_SCRIPT

STAGES = [
    # "sgd": the head trains epoch by epoch with fit (on cached features), so both stages exercise
    # the collective all-reduce and the resume path; a solved head would be one host-side step.
    {"name": "head", "epochs": 2, "learning_rate": 0.02, "solver": "sgd"},
    {"name": "top", "epochs": 3, "unfreeze": 1, "learning_rate": 0.004},
]
TIMEOUT_S = 240


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}})


def _config(tmp: Path, data: Path) -> Path:
    lines = ['name = "mw"', f'output_dir = "{tmp / "mw"}"', "seed = 0", "[data]", f'path = "{data}"',
             "batch_size = 8", "val_fraction = 0.2", "test_fraction = 0.2", "[backbone]", 'name = "tiny_test"',
             "[augmentation]", "enabled = false", "[training]", 'distribute = "multi_worker"']
    for stage in STAGES:
        lines.append("[[schedule.stages]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in stage.items()]
    path = tmp / "mw.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _launch(config: Path, tmp: Path, kill_after: int | None = None) -> list[tuple[int, str]]:
    """Starts both workers (fresh ports), waits for both; returns (returncode, output) per worker."""
    ports = _free_ports(2)
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": _tf_config(ports, index), "TMPDIR": str(tmp / "tmp"),
               "KILL_AFTER": str(-1 if kill_after is None else kill_after), "BACKUP_EVERY_EPOCH": "1",
               "CUDA_VISIBLE_DEVICES": "",
               "TF_CPP_MIN_LOG_LEVEL": "2"}
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, str(config)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:  # a worker hung in a collective: end it, the test reports what it printed
                proc.kill()
                proc.communicate()
    return results


def _weights(path: Path) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


def test_multi_worker_train_agrees_writes_chief_only_and_resumes_after_sigkill(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    data = write_image_folder(tmp_path / "images", n_per_class=8)
    config = _config(tmp_path, data)
    run = RunDir(tmp_path / "mw")
    worker = _worker_dir(tmp_path, run)

    killed = _launch(config, tmp_path, kill_after=3)  # both die in the first batch of stage "top", epoch 2
    assert [rc for rc, _ in killed] == [-signal.SIGKILL] * 2, "\n\n".join(out[-3000:] for _, out in killed)
    assert not run.is_complete
    assert [r["epoch"] for r in run.live_history()] == [1, 2, 3]
    assert (worker.checkpoints("top")).is_dir(), "the non-chief worker keeps its own resume state"

    finished = _launch(config, tmp_path)
    assert [rc for rc, _ in finished] == [0, 0], "\n\n".join(out[-3000:] for _, out in finished)
    assert run.is_complete and worker.is_complete

    # Every epoch once, in order, in the chief's run directory: nobody else appended to it.
    epochs = run.history()["epochs"]
    assert [(r["stage"], r["stage_epoch"]) for r in epochs] == [
        ("head", 1), ("head", 2), ("top", 1), ("top", 2), ("top", 3)]
    assert [r["epoch"] for r in run.live_history()] == [1, 2, 3, 4, 5]
    assert worker.path != run.path and not str(worker.path).startswith(str(run.path))
    assert [r["epoch"] for r in worker.history()["epochs"]] == [1, 2, 3, 4, 5]
    assert "tiny_test" == run.status()["backbone"]
    # The host-side baselines ran on both workers on the same data and seed: the same numbers.
    for key in ("baseline", "probe"):
        ours, theirs = run.status()["transfer"][key], worker.status()["transfer"][key]
        assert _untimed(ours) == _untimed(theirs), key

    # Both workers hold the same synchronised weights at the end.
    chief, other = _weights(run.file(RunDir.WEIGHTS)), _weights(worker.file(RunDir.WEIGHTS))
    assert chief.keys() == other.keys() and chief
    for name in chief:
        np.testing.assert_allclose(chief[name], other[name], rtol=0, atol=1e-6, err_msg=name)
    assert np.isfinite(run.history()["epochs"][-1]["loss"])


def _untimed(value: object) -> object:
    """``value`` without its wall-clock entries (``seconds``), which differ between workers."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if "seconds" not in k}
    return value


def _worker_dir(tmp: Path, run: RunDir) -> RunDir:
    """Where worker 1 writes (RunDir.for_worker under the workers' TMPDIR and TF_CONFIG)."""
    saved = {k: os.environ.get(k) for k in ("TF_CONFIG", "TMPDIR")}
    os.environ.update({"TF_CONFIG": _tf_config([1, 2], 1), "TMPDIR": str(tmp / "tmp")})
    import tempfile

    tempfile.tempdir = None  # gettempdir() caches its answer; read TMPDIR again
    try:
        return RunDir.for_worker(run.path)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tempfile.tempdir = None


@pytest.mark.parametrize(("tf_config", "chief"), [
    (None, True),
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}, False),
    ({"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}, False),
    ({"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}, True),
])
def test_multi_worker_only_the_chief_gets_the_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tf_config: dict | None, chief: bool,
) -> None:
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    run = RunDir.for_worker(tmp_path / "run")
    assert (run.path == tmp_path / "run") is chief
    if not chief:
        again = RunDir.for_worker(tmp_path / "run")
        assert again.path == run.path, "a restarted worker must find its own checkpoints again"
