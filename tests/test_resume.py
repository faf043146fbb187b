"""Resume after kill -9: every stage runs all its epochs, the learning-rate schedule matches an
uninterrupted run, and so do the final weights (each epoch reads the same batches in the same order,
whether or not the run was interrupted before it). Each run is a real ``tlkit train`` process, killed
with SIGKILL mid-epoch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.audio_fixtures import write_speaker_dataset
from tests.conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]

# Runs `tlkit train CONFIG` with the tiny test backbone; with KILL_AFTER=N it sends itself SIGKILL
# during the first batch of epoch N+1 (counted across stages), i.e. mid-epoch, as a crash would.
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import tlkit.backbones as backbones
    from tests.audio_fixtures import tiny_wave_spec
    from tests.conftest import tiny_spec
    backbones.register(tiny_spec(), overwrite=True)
    backbones.register(tiny_wave_spec(), overwrite=True)
    import tlkit.finetune as finetune
    from tlkit.cli import main
    kill_after = int(os.environ.get("KILL_AFTER", "-1"))
    if os.environ.get("BACKUP_EVERY_EPOCH"):  # resume from a mid-stage backup, not the stage's start
        import tlkit.checkpointing
        tlkit.checkpointing.MIN_BUDGET_SECONDS = 0.0
    finished = [0]
    original = finetune._HistoryRecorder.on_epoch_end
    def on_epoch_end(self, epoch, logs=None):
        original(self, epoch, logs)
        finished[0] += 1
    def on_train_batch_end(self, batch, logs=None):
        if finished[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    finetune._HistoryRecorder.on_epoch_end = on_epoch_end
    finetune._HistoryRecorder.on_train_batch_end = on_train_batch_end
    sys.exit(main(["train", sys.argv[1], "--quiet"]))
""")

THREE_STAGES = [
    {"name": "head", "epochs": 2, "learning_rate": 0.02, "solver": "sgd"},
    {"name": "top", "epochs": 3, "unfreeze": 1, "learning_rate": 0.004, "warmup_epochs": 1},
    {"name": "deeper", "epochs": 3, "unfreeze": "all", "learning_rate": 0.002},
]
TWO_STAGES = [
    {"name": "head", "epochs": 3, "learning_rate": 0.02, "solver": "sgd"},
    {"name": "top", "epochs": 3, "unfreeze": 1, "learning_rate": 0.004},
]


def _config(tmp: Path, data: Path, name: str, stages: list[dict], audio: bool = False,
            augmentation: bool = False) -> Path:
    source = [f'manifest = "{data}"', "clip_seconds = 0.5"] if audio else [f'path = "{data}"']
    lines = [f'name = "{name}"', f'output_dir = "{tmp / name}"', "seed = 0", "[data]", *source,
             "batch_size = 8", "val_fraction = 0.2", "test_fraction = 0.2", "[backbone]",
             f'name = "{"tiny_audio_test" if audio else "tiny_test"}"', "[head]", "dropout = 0.0",
             *([] if augmentation else ["[augmentation]", "enabled = false"])]
    for stage in stages:
        lines.append("[[schedule.stages]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in stage.items()]
    path = tmp / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(config: Path, kill_after: int | None = None, every_epoch: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KILL_AFTER": str(kill_after if kill_after is not None else -1)}
    if every_epoch:
        env["BACKUP_EVERY_EPOCH"] = "1"
    return subprocess.run([sys.executable, "-c", SCRIPT, str(config)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def _history(run: Path) -> list[dict]:
    return json.loads((run / "history.json").read_text())["epochs"]


def _weights(run: Path) -> dict[str, np.ndarray]:
    """Every array of the run's final ``model.weights.h5``, by its path in the file."""
    arrays: dict[str, np.ndarray] = {}
    with h5py.File(run / "model.weights.h5", "r") as f:
        f.visititems(lambda name, item: arrays.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
    return arrays


@pytest.mark.parametrize(("stages", "kill_after", "every_epoch"),
                         [(THREE_STAGES, 3, True), (TWO_STAGES, 1, True), (THREE_STAGES, 4, False)],
                         ids=["killed-in-top-epoch-2-of-3-stages", "killed-in-head-epoch-2",
                              "killed-in-top-epoch-3-default-backup-budget"])
def test_kill_9_resume_runs_every_epoch_of_every_stage(
    tmp_path: Path, stages: list[dict], kill_after: int, every_epoch: bool
) -> None:
    data = write_image_folder(tmp_path / "data", n_per_class=10)
    killed = _train(_config(tmp_path, data, "killed", stages), kill_after, every_epoch)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["status"] == "training"
    stage_dir = tmp_path / "killed" / "checkpoints" / ("top" if kill_after >= 2 else "head")
    # Backups every epoch: the interrupted stage has one to resume from (a head stage on cached features
    # names its files head_*); with the default 30 s budget a stage this short has none and restarts.
    assert bool(list(stage_dir.glob("*backup.json"))) == every_epoch

    resumed = _train(_config(tmp_path, data, "killed", stages), every_epoch=every_epoch)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = _train(_config(tmp_path, data, "whole", stages))
    assert whole.returncode == 0, whole.stderr[-3000:]

    got, want = _history(tmp_path / "killed"), _history(tmp_path / "whole")
    for stage in stages:
        epochs = [r["stage_epoch"] for r in got if r["stage"] == stage["name"]]
        assert epochs == list(range(1, stage["epochs"] + 1)), (stage["name"], epochs)
    assert [r["epoch"] for r in got] == list(range(1, sum(s["epochs"] for s in stages) + 1))
    assert [(r["stage"], r["stage_epoch"]) for r in got] == [(r["stage"], r["stage_epoch"]) for r in want]
    np.testing.assert_allclose([r["lr"] for r in got], [r["lr"] for r in want], rtol=1e-6)
    # Same batches in the same order in every epoch (also those after the resume point): same weights.
    resumed_weights, whole_weights = _weights(tmp_path / "killed"), _weights(tmp_path / "whole")
    assert resumed_weights.keys() == whole_weights.keys() and resumed_weights
    for name, value in whole_weights.items():
        np.testing.assert_allclose(resumed_weights[name], value, atol=1e-5, err_msg=name)
    status = json.loads((tmp_path / "killed" / "run.json").read_text())
    assert status["status"] == "complete"


AUDIO_STAGES = [
    {"name": "head", "epochs": 1, "learning_rate": 0.02, "solver": "sgd"},
    {"name": "thawed", "epochs": 3, "unfreeze": "all", "learning_rate": 0.003},
]


@pytest.mark.parametrize("augmentation", [False, True], ids=["cached-head", "augmented"])
def test_kill_9_resume_of_an_audio_run_reads_the_same_crops(tmp_path: Path, augmentation: bool) -> None:
    """Raw audio: one random crop per clip and epoch. Killed in epoch 2 of the thawed stage, the resumed run
    trains epochs 2 and 3 on the crops and order of an uninterrupted run's, so it ends with its weights. The
    uninterrupted run read the training pipeline before that epoch: four passes for the head stage's feature
    cache, or (augmentation on: no cache) the head stage's epoch and the thawed stage's first."""
    data = write_speaker_dataset(tmp_path / "data", speakers_per_class=3, clips_per_speaker=4)

    def config(name: str) -> Path:
        return _config(tmp_path, data, name, AUDIO_STAGES, audio=True, augmentation=augmentation)

    for name, kill_after in (("killed", 2), ("killed", None), ("whole", None)):  # killed in thawed epoch 2, resumed
        done = _train(config(name), kill_after, every_epoch=name == "killed")
        assert done.returncode == (-signal.SIGKILL if kill_after else 0), done.stderr[-3000:]
        if kill_after:
            assert list((tmp_path / "killed" / "checkpoints" / "thawed").glob("*backup.json"))

    epochs = [[(r["stage"], r["stage_epoch"]) for r in _history(tmp_path / name)] for name in ("killed", "whole")]
    assert epochs[0] == epochs[1] == [("head", 1), ("thawed", 1), ("thawed", 2), ("thawed", 3)]
    resumed_weights, whole_weights = _weights(tmp_path / "killed"), _weights(tmp_path / "whole")
    assert resumed_weights.keys() == whole_weights.keys() and resumed_weights
    difference = max(float(np.max(np.abs(resumed_weights[k] - v))) for k, v in whole_weights.items())
    assert difference <= 1e-5, f"the resumed audio run's weights differ from the uninterrupted run's by {difference}"
    for name, value in whole_weights.items():
        np.testing.assert_allclose(resumed_weights[name], value, atol=1e-5, err_msg=name)


def test_audio_training_epochs_depend_on_the_seed_and_epoch_only() -> None:
    """The audio training set read by epoch: epoch e is the same batches whether reading starts at epoch 0
    or 1, after the dataset itself was read, or in a new dataset; epochs differ (order and crops)."""
    from tlkit.data.audio import make_audio_dataset
    from tlkit.data.batches import epoch_addressed
    from tlkit.data.images import Example

    rng = np.random.default_rng(0)
    waves = {f"clip{i}.wav": rng.normal(0, 0.1, 800 + 37 * i).astype(np.float32) for i in range(10)}
    examples = [Example(path, ("a" if i % 2 else "b",)) for i, path in enumerate(waves)]

    def epochs(first: int, end: int, read_first: bool = False) -> list[np.ndarray]:
        ds = make_audio_dataset(examples, ["a", "b"], waves, 400, batch_size=4, training=True, seed=3)
        if read_first:  # e.g. the feature cache's passes
            for _ in range(3):
                list(ds)
        addressed = epoch_addressed(ds)
        assert addressed is not None and addressed.steps == 3
        return [x.numpy() for x, _ in addressed.epochs(first, end)]

    whole = epochs(0, 3)
    assert len(whole) == 9
    for got, want in zip(epochs(1, 3, read_first=True), whole[3:]):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(np.concatenate(whole[:3]), np.concatenate(whole[3:6]))
    mapped = make_audio_dataset(examples, ["a", "b"], waves, 400, training=True).map(lambda x, y: (x, y))
    assert epoch_addressed(mapped) is None  # a transformed copy is a plain pipeline
