"""Multi-task against single-task on one fixed split: each task alone, then both tasks together.

Question: does one backbone trained on two related tasks (``[tasks]``, :mod:`tlkit.multitask`)
do better on each task than a model trained on that task alone, with the same backbone, schedule,
seed and split? Three runs per data set, all through ``tlkit.multitask.train.train_multitask``:
(a) task A alone, (b) task B alone, (c) A and B together. Beside each task: the no-transfer
baseline and the linear probe on the frozen backbone (measured by the runs themselves, on the rows
labelled for that task), and the fine-tuned test accuracy alone and together, with 95% Wilson
intervals (:func:`tlkit.baselines.wilson_interval`).

The split is made ONCE (``load_task_splits`` / ``load_audio_splits`` with both tasks, seeded) and
handed to every run as explicit splits (the Python API's ``splits=``): a config's own split
stratifies on each row's first labelled task *among the configured tasks*, so a one-task config
over the same manifest would split differently (and refuses rows that lack its one label). A
one-task run keeps the rows labelled for its task, so every run scores a task on the same test rows.

Data, built offline:

- ``images``: scikit-learn's 1797 handwritten digits written as PNGs; task A ``digit`` (10 classes),
  task B ``loop`` (``closed``: 0, 6, 8, 9 have a closed loop; else ``open``), B's label kept on only
  ``--b-labelled`` of the training rows (the rest are missing, masked in training). Backbone
  EfficientNet-Lite0 with its real ImageNet weights (offline pip package) at ``--image-size``.
- ``audio``: the eSpeak NG accent corpus of ``benchmarks/cross_lingual.py`` (English sentences read
  with eight L1 voices; synthetic speech, not human); task A ``accent`` (the L1, 8 classes), task B
  ``gender`` (the voice variant's ``m``/``f``), B missing for all clips of ``1 - --b-labelled`` of the
  training speakers. Backbone ``whisper_tiny_en_encoder`` (real weights), speakers kept whole.

Schedule (every run): the heads solved on cached features, then ``--epochs`` (3) epochs with the top
backbone group thawed at the ``fine_tune`` preset's rate (1e-4 after one warm-up epoch). Run: ``.venv/bin/python benchmarks/multitask.py`` (about 8 minutes on 2
shared cores), ``--quick`` (smaller, about 3), ``--data images|audio``, ``--json FILE``,
``--markdown FILE``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import _common

TASKS = {"images": ("digit", "loop"), "audio": ("accent", "gender")}
BACKBONES = {"images": "efficientnet_lite0", "audio": "whisper_tiny_en_encoder"}
LOOPS = {"0", "6", "8", "9"}


def write_digit_manifest(root: Path, per_class: int | None, size: int, seed: int) -> Path:
    """Digits as PNGs plus ``labels.csv`` (``path,task:digit,task:loop``, every row fully labelled)."""
    from tlkit.sample_data import write_digits

    folder = write_digits(root / "digits", per_class=per_class, size=size, seed=seed)
    manifest = root / "labels.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "task:digit", "task:loop"])
        for file in sorted(folder.glob("*/*.png")):
            digit = file.parent.name
            writer.writerow([file.relative_to(root).as_posix(), digit, "closed" if digit in LOOPS else "open"])
    return manifest


def write_accent_manifest(root: Path, speakers: int, clips: int, seed: int) -> Path:
    """The accent corpus of ``cross_lingual.py`` (English sentences, eight L1 voices) as 16 kHz WAVs
    plus ``labels.csv`` (``path,task:accent,task:gender,speaker``). Speakers alternate between a male
    and a female voice variant within each L1, so both genders occur in every accent."""
    import soundfile as sf
    from cross_lingual import L1_VOICES, RATE, _speak
    from synthetic_accents import SENTENCES

    rng = np.random.default_rng(seed)
    voices = {"m": ("m1", "m2", "m3", "m5"), "f": ("f1", "f2", "f3", "f4")}
    manifest = root / "labels.csv"
    (root / "clips").mkdir(parents=True, exist_ok=True)
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "task:accent", "task:gender", "speaker"])
        for accent, voice in L1_VOICES.items():
            for s in range(speakers):
                gender = "mf"[s % 2]
                variant = voices[gender][int(rng.integers(len(voices[gender])))]
                speed, pitch = int(rng.integers(140, 186)), int(rng.integers(30, 71))
                for index in rng.permutation(len(SENTENCES))[:clips]:
                    path = root / "clips" / f"{accent}_{s:02d}_{index:02d}.wav"
                    sf.write(str(path), _speak(SENTENCES[index], f"{voice}+{variant}", speed, pitch), RATE,
                             subtype="PCM_16")
                    writer.writerow([path.relative_to(root).as_posix(), accent, gender, f"{accent}_{s:02d}"])
    return manifest


def fixed_split(data: str, manifest: Path, b_labelled: float, seed: int) -> Any:
    """The one split every run uses (both tasks), with task B's label removed from training rows
    (images: a seeded share of rows; audio: every clip of a seeded share of speakers)."""
    from tlkit.data.audio import load_audio_splits
    from tlkit.data.listing import TaskColumn
    from tlkit.multitask.data import load_task_splits

    a, b = TASKS[data]
    tasks = (TaskColumn(a, f"task:{a}"), TaskColumn(b, f"task:{b}"))
    if data == "images":
        splits = load_task_splits(manifest, tasks, val_fraction=0.15, test_fraction=0.3, seed=seed)
    else:
        splits = load_audio_splits(manifest=manifest, sample_rate=16000, val_fraction=0.2, test_fraction=0.3,
                                   seed=seed, tasks=tasks)

    def unit(example: Any) -> str:
        return example.path if data == "images" else str(example.group)

    rng = np.random.default_rng(seed + 7)
    kept: set[str] = set()
    for label in sorted({e.task_labels(b)[0] for e in splits.train}):  # per class of B, so each keeps some
        units = sorted({unit(e) for e in splits.train if e.task_labels(b)[0] == label})
        kept |= set(rng.permutation(units)[: max(1, int(round(b_labelled * len(units))))].tolist())

    def drop_b(example: Any) -> Any:
        if unit(example) in kept:
            return example
        return dataclasses.replace(example, tasks=tuple((t, () if t == b else labels) for t, labels in example.tasks))

    return dataclasses.replace(splits, train=[drop_b(e) for e in splits.train])


def only(splits: Any, names: tuple[str, ...]) -> Any:
    """``splits`` for a run of the tasks ``names``: each example keeps those tasks' labels, and
    examples with none of them are left out."""
    def keep(examples: list[Any]) -> list[Any]:
        out = []
        for e in examples:
            tasks = tuple((t, labels) for t, labels in e.tasks if t in names)
            first = next((labels for _, labels in tasks if labels), ())
            if first:
                out.append(dataclasses.replace(e, labels=first, tasks=tasks))
        return out

    return dataclasses.replace(splits, train=keep(splits.train), val=keep(splits.val), test=keep(splits.test),
                               tasks=tuple(t for t in splits.tasks if t.name in names))


def run_config(data: str, names: tuple[str, ...], manifest: Path, out: Path, args: argparse.Namespace) -> Any:
    from tlkit.config import config_from_dict
    from tlkit.multitask.manifest import resolve_tasks

    raw: dict[str, Any] = {
        "name": f"mt_{data}_{'_'.join(names)}", "output_dir": str(out), "seed": args.seed,
        "data": {"manifest": str(manifest), "batch_size": 32},
        "backbone": {"name": BACKBONES[data]},
        "head": {"pooling": "avg", "dropout": 0.1},
        "augmentation": {"enabled": False},
        "tasks": {name: {"column": f"task:{name}"} for name in names},
        "schedule": {"stages": [{"name": "head", "epochs": 1},
                                {"name": "top", "epochs": args.epochs, "unfreeze": 1,
                                 "learning_rate": args.learning_rate, "warmup_epochs": 1.0}]},
        "training": {"verbose": 0},
    }
    if data == "images":
        raw["backbone"]["image_size"] = args.image_size
    else:
        raw["data"].update({"clip_seconds": args.clip_seconds, "eval_crops": 2})
    return resolve_tasks(config_from_dict(raw))


def train_one(data: str, names: tuple[str, ...], splits: Any, manifest: Path, workdir: Path,
              args: argparse.Namespace) -> dict[str, Any]:
    """One run of the tasks ``names`` on ``splits``; per task its labelled counts and the
    baseline / probe / fine-tuned test accuracy the run measured."""
    from tlkit.multitask.train import train_multitask
    from tlkit.run import make_strategy
    from tlkit.rundir import RunDir

    cfg = run_config(data, names, manifest, workdir / f"run_{data}_{'_'.join(names)}", args)
    started = time.monotonic()
    train_multitask(cfg, make_strategy("auto"), verbose=0, splits=only(splits, names))
    seconds = time.monotonic() - started
    status = RunDir(cfg.output_dir).status()
    out = {}
    for task in status["tasks"]:
        report = status["transfer"]["tasks"][task["name"]]
        rows = {r["kind"]: r for r in report["rows"]}
        out[task["name"]] = {"labelled": task["labelled"], "baseline": rows["baseline"]["test_accuracy"],
                             "probe": rows["probe"]["test_accuracy"], "tuned": rows["tlkit"]["test_accuracy"],
                             "baseline_name": rows["baseline"]["model"], "warnings": report["warnings"]}
    return {"tasks": names, "seconds": round(seconds, 1), "per_task": out}


def measure(data: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    root = workdir / data
    root.mkdir(parents=True)
    started = time.monotonic()
    if data == "images":
        manifest = write_digit_manifest(root, 40 if args.quick else None, 32, args.seed)
    else:
        manifest = write_accent_manifest(root, 4 if args.quick else 6, 3, args.seed)
    splits = fixed_split(data, manifest, args.b_labelled, args.seed)
    prepared = time.monotonic() - started
    a, b = TASKS[data]
    runs = [train_one(data, names, splits, manifest, workdir, args) for names in ((a,), (b,), (a, b))]
    return {"data": data, "backbone": BACKBONES[data], "prepare_seconds": round(prepared, 1),
            "split": {k: len(getattr(splits, k)) for k in ("train", "val", "test")}, "runs": runs}


def rows_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: its alone run against the together run."""
    from tlkit.baselines import wilson_interval

    alone = {run["tasks"][0]: run for run in result["runs"] if len(run["tasks"]) == 1}
    together = next(run for run in result["runs"] if len(run["tasks"]) > 1)
    rows = []
    for task, run in alone.items():
        mine, both = run["per_task"][task], together["per_task"][task]
        n = int(mine["labelled"]["test"])

        def cell(value: float | None) -> dict[str, Any]:
            if value is None:
                return {"accuracy": None}
            low, high = wilson_interval(float(value), n)
            return {"accuracy": float(value), "low": low, "high": high}

        rows.append({"data": result["data"], "backbone": result["backbone"], "task": task,
                     "train_labelled": {"alone": mine["labelled"]["train"], "together": both["labelled"]["train"]},
                     "test_count": n, "baseline": cell(mine["baseline"]), "probe": cell(mine["probe"]),
                     "alone": cell(mine["tuned"]), "together": cell(both["tuned"]),
                     "probe_same": mine["probe"] == both["probe"] and mine["baseline"] == both["baseline"],
                     "seconds": {"alone": run["seconds"], "together": together["seconds"]}})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(cell: dict[str, Any]) -> str:
        if cell.get("accuracy") is None:
            return "-"
        return f"{cell['accuracy']:.3f} [{cell['low']:.2f}, {cell['high']:.2f}]"

    body = []
    for r in rows:
        delta = (r["together"]["accuracy"] - r["alone"]["accuracy"]
                 if r["together"].get("accuracy") is not None and r["alone"].get("accuracy") is not None else None)
        body.append([r["data"], r["task"], f"{r['train_labelled']['alone']}", str(r["test_count"]), fmt(r["baseline"]),
                     fmt(r["probe"]), fmt(r["alone"]), fmt(r["together"]),
                     "-" if delta is None else f"{delta:+.3f}",
                     f"{r['seconds']['alone']:.0f}s / {r['seconds']['together']:.0f}s"])
    return _common.table(["data", "task", "labelled train", "test n", "no-transfer baseline", "linear probe",
                          "fine-tuned alone", "fine-tuned together", "together - alone", "time alone / together"],
                         body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer digits and speakers (about 3 minutes)")
    parser.add_argument("--data", choices=("all", "images", "audio"), default="all")
    parser.add_argument("--b-labelled", type=float, default=0.3,
                        help="share of training rows (images) / speakers (audio) that keep task B's label")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs with the top group thawed")
    parser.add_argument("--learning-rate", type=float, default=1e-4,
                        help="peak fine-tuning rate (1 warm-up epoch), as the fine_tune preset")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--clip-seconds", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    args = parser.parse_args(argv)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # Keras's retracing notes: each run builds its own predict functions
    info = _common.machine()
    _common.print_machine(info)
    kinds = ("images", "audio") if args.data == "all" else (args.data,)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for data in kinds:
            result = measure(data, Path(workdir), args)
            results.append(result)
            print(f"{data}: backbone {result['backbone']}, split {result['split']} (fixed, shared by the three "
                  f"runs), data prepared in {result['prepare_seconds']:.0f}s", flush=True)
    rows = [row for result in results for row in rows_of(result)]
    text = table(rows)
    print(text)
    for r in rows:
        if not r["probe_same"]:
            print(f"note: {r['data']}/{r['task']}: the baseline or probe differ between the alone and together runs",
                  flush=True)
    for result in results:  # the runs print the full warnings as they finish
        for run in result["runs"]:
            for task, entry in run["per_task"].items():
                kinds = sorted({w.split(":", 1)[0] for w in entry["warnings"]})
                if kinds:
                    print(f"tlkit warned: {result['data']}, run {'+'.join(run['tasks'])}, task {task}: {', '.join(kinds)}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "rows": rows}, indent=1))
    if args.markdown:
        args.markdown.write_text(f"```\n{text}\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
