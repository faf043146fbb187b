"""Multi-worker training (``[training] distribute = "multi_worker"``): two ``tlkit train`` processes on
127.0.0.1 with TF_CONFIG, MultiWorkerMirroredStrategy over CPU collectives.

Checks: both workers end with the same weights; only the chief writes the run directory (the other
worker writes its own temp folder, RunDir.for_worker); a job whose workers are both killed with
SIGKILL mid-stage resumes when both are started again and finishes with every epoch once; every metric
the job reports (history, run.json) is the whole split's: it equals a one-process run's on the same
data and seed and what the chief's saved model scores on the test split; the workers back up at the
chief's epochs whatever their own clocks say, and refuse to resume from checkpoints that disagree.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import write_image_folder
from tests.test_resume import SCRIPT as RESUME_SCRIPT
from tlkit.checkpointing import BACKUP_STATE
from tlkit.data.images import encode_labels, make_batches
from tlkit.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]

# One worker is test_resume's `tlkit train` script (tiny backbone registered; KILL_AFTER=N: SIGKILL after
# the first batch of epoch N+1, counted across stages; BACKUP_EVERY_EPOCH: a resume backup every epoch),
# with TF_CONFIG from the environment. A batch of epoch N+1 needs the other worker's all-reduce, so by
# then both workers have written their epoch-N backups: both die at the same point. Only the chief
# gets BACKUP_EVERY_EPOCH: worker 1's own clock (30 s budget) would never back up in a stage this short,
# so its backups are the chief's decisions.
#
# The kill waits a second first: a worker that returns from a step's all-reduce may still owe its peer data
# that the peer pulls from it (collectives over gRPC), and dying at once ends the peer with "Socket closed"
# instead of at its own kill point. The waiting worker blocks no one: the peer reaches the same point.
KILL = "os.kill(os.getpid(), signal.SIGKILL)"
assert KILL in RESUME_SCRIPT
SCRIPT = RESUME_SCRIPT.replace(KILL, "__import__('time').sleep(1.0); " + KILL)
BATCH = 8

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


def _config(tmp: Path, data: Path, name: str = "mw", distribute: str = "multi_worker") -> Path:
    # No dropout: its masks are drawn per replica's share of a batch, so with dropout a two-worker run is a
    # different random draw from a one-process run, and the two could not be compared number for number.
    lines = [f'name = "{name}"', f'output_dir = "{tmp / name}"', "seed = 0", "[data]", f'path = "{data}"',
             f"batch_size = {BATCH}", "val_fraction = 0.2", "test_fraction = 0.2", "[backbone]", 'name = "tiny_test"',
             "[head]", "dropout = 0.0", "[augmentation]", "enabled = false", "[training]",
             f'distribute = "{distribute}"']
    for stage in STAGES:
        lines.append("[[schedule.stages]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in stage.items()]
    path = tmp / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _launch(
    config: Path, tmp: Path, kill_after: int | None = None, script: str = SCRIPT, reference: Path | None = None,
) -> list[tuple[int, str]]:
    """Starts both workers (fresh ports) running ``script config``, and with ``reference`` the same script on
    that config as one process (no TF_CONFIG, killed at the same point) alongside them; waits for all and
    returns (returncode, output) per worker, then the reference's."""
    ports = _free_ports(2)
    base = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    base.update({"TMPDIR": str(tmp / "tmp"), "KILL_AFTER": str(-1 if kill_after is None else kill_after),
                 "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"})
    runs = [(config, {**base, "TF_CONFIG": _tf_config(ports, index), "BACKUP_EVERY_EPOCH": "1" if index == 0 else ""})
            for index in range(2)]
    if reference is not None:
        runs.append((reference, {**base, "BACKUP_EVERY_EPOCH": "1"}))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for path, env in runs]
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


def test_multi_worker_train_agrees_writes_chief_only_and_resumes_after_sigkill(
    tmp_path: Path, registered: None,
) -> None:
    (tmp_path / "tmp").mkdir()
    data = write_image_folder(tmp_path / "images", n_per_class=8)
    config = _config(tmp_path, data)
    run = RunDir(tmp_path / "mw")
    worker = _worker_dir(tmp_path, run)

    # The one-process reference run (see _assert_metrics_are_the_whole_splits) runs alongside the workers.
    reference = _config(tmp_path, data, "one", "mirrored")
    killed = _launch(config, tmp_path, kill_after=3, reference=reference)  # all die in stage "top", epoch 2
    assert [rc for rc, _ in killed] == [-signal.SIGKILL] * 3, "\n\n".join(out[-3000:] for _, out in killed)
    assert not run.is_complete
    assert [r["epoch"] for r in run.live_history()] == [1, 2, 3]
    assert (worker.checkpoints("top")).is_dir(), "the non-chief worker keeps its own resume state"
    # Worker 1's clock never asked for a backup: it followed the chief's, so both resume after the same epoch.
    backups = [json.loads((r.checkpoints("top") / BACKUP_STATE).read_text())["epoch"] for r in (run, worker)]
    assert backups == [1, 1]

    finished = _launch(config, tmp_path, reference=reference)
    assert [rc for rc, _ in finished] == [0, 0, 0], "\n\n".join(out[-3000:] for _, out in finished)
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
    _assert_metrics_are_the_whole_splits(run, RunDir(tmp_path / "one"))


def _assert_metrics_are_the_whole_splits(run: RunDir, one: RunDir) -> None:
    """The multi-worker run's reported metrics against (1) ``one``, a one-process run on the same data and
    seed, killed and resumed at the same point, and (2) what the chief's saved model scores on the splits.

    The reference is ``distribute = "mirrored"`` (one replica), the same strategy code path as the
    workers'. (Training sets are now epoch-addressed, see :meth:`tlkit.data.batches.Batches.epochs`, so
    Keras's opening read no longer moves the shuffle; "mirrored" is kept as the closest reference.)
    """
    ours, theirs = run.history()["epochs"], one.history()["epochs"]
    assert len(ours) == len(theirs) == 5
    for mine, reference in zip(ours, theirs):
        for key in ("accuracy", "val_accuracy"):  # 6 validation examples: a shard-only value is off by 1/6+
            assert mine[key] == pytest.approx(reference[key], abs=1e-6), (key, mine, reference)
        for key in ("loss", "val_loss"):
            assert mine[key] == pytest.approx(reference[key], rel=1e-4), (key, mine, reference)
    test, reference_test = run.status()["test_metrics"], one.status()["test_metrics"]
    assert test.keys() == reference_test.keys() == {"accuracy", "loss"}
    assert test["accuracy"] == pytest.approx(reference_test["accuracy"], abs=1e-6)
    assert test["loss"] == pytest.approx(reference_test["loss"], rel=1e-4)

    # The chief's saved model, scored here in one process on the whole test and validation splits.
    model, labels = run.load_model(), run.labels()
    size = run.input_contract(model).image_size
    scores = {}
    for split in ("val", "test"):
        examples = run.split(split)
        assert 0 < len(examples) <= BATCH  # one batch: the chief's shard is its first half
        probabilities = model.predict(make_batches(examples, labels, size, BATCH).batched(), verbose=0)
        targets = encode_labels(examples, labels).argmax(1)
        correct = probabilities.argmax(1) == targets
        chief_half = correct[: (len(examples) + 1) // 2].mean()
        assert chief_half != correct.mean(), "data where the chief's shard scores like the split cannot test this"
        loss = float(-np.log(np.clip(probabilities[np.arange(len(targets)), targets], 1e-7, 1.0)).mean())
        scores[split] = (float(correct.mean()), loss)
    assert test["accuracy"] == pytest.approx(scores["test"][0], abs=1e-6)
    assert test["loss"] == pytest.approx(scores["test"][1], rel=1e-4)
    fine_tuned = next(r for r in run.status()["transfer"]["rows"] if r["kind"] == "tlkit")
    assert fine_tuned["test_accuracy"] == pytest.approx(scores["test"][0], abs=1e-6)
    # The final weights are the last stage's best epoch (lowest val_loss); temperature scaling, folded in
    # afterwards, keeps the argmax, so that epoch's reported val_accuracy is the saved model's.
    best = min((r for r in ours if r["stage"] == "top"), key=lambda r: r["val_loss"])
    assert best["val_accuracy"] == pytest.approx(scores["val"][0], abs=1e-6)


# Two workers fit a tiny model with StageCheckpoint: the chief's budget says "back up every epoch", worker
# 1's "never"; then check_workers_agree on an equal value (passes) and on each worker's index (must refuse).
CHECKPOINT_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from tlkit.run import make_strategy
    strategy = make_strategy("multi_worker")
    import keras, numpy as np, tensorflow as tf
    from tlkit.checkpointing import StageCheckpoint, check_workers_agree
    from tlkit.errors import ConfigError
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile("sgd", "mse")
    data = tf.data.Dataset.from_tensor_slices((np.zeros((8, 4), "float32"), np.zeros((8, 2), "float32"))).batch(4)
    folder = Path(sys.argv[1]) / f"worker{task}"
    checkpoint = StageCheckpoint(folder, "loss", 4, budget_seconds=0.0 if task == 0 else 1e9)
    model.fit(data, epochs=4, verbose=0, callbacks=[checkpoint])
    check_workers_agree(strategy, 3, "the resume epoch", folder)
    try:
        check_workers_agree(strategy, task, "the resume epoch", folder)
        verdict = "agreed"
    except ConfigError as error:
        verdict = str(error)
    print("RESULT " + json.dumps({"backups": checkpoint.backups_written, "verdict": verdict}), flush=True)
""")


def test_multi_worker_checkpoint_decisions_are_the_chiefs_and_disagreeing_resumes_are_refused(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    results = _launch(tmp_path, tmp_path, script=CHECKPOINT_SCRIPT)
    assert [rc for rc, _ in results] == [0, 0], "\n\n".join(out[-3000:] for _, out in results)
    reports = [json.loads(out.split("RESULT ", 1)[1].splitlines()[0]) for _, out in results]
    # Epochs 1-3 back up on both (the 4th is the stage's end, which writes its final weights instead).
    assert [r["backups"] for r in reports] == [3, 3]
    for index, report in enumerate(reports):
        assert report["verdict"].startswith("multi-worker resume: the workers' checkpoints disagree on the resume "
                                            "epoch")
        assert f"this worker: {index}" in report["verdict"] and "the chief: 0" in report["verdict"]


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
