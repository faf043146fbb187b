"""Evaluation of a finished run on its test split (or another folder / manifest)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.data.images import load_splits, make_dataset
from tlkit.errors import DataError


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Accuracy of a run's model on its test split, or on ``data`` (class folder or CSV manifest).

    Returns a dict with ``accuracy``, ``count`` and ``per_class`` accuracy, and writes it
    to ``<run_dir>/metrics.json``.
    """
    from tlkit.run import load_run_model, load_split

    run = Path(run_dir)
    model, labels = load_run_model(run)
    if data is None:
        examples, _ = load_split(run, "test")
    else:
        source = Path(data)
        splits = load_splits(manifest=source, val_fraction=0, test_fraction=0) if source.suffix == ".csv" else \
            load_splits(source, val_fraction=0, test_fraction=0)
        unknown = sorted(set(splits.class_names) - set(labels))
        if unknown:
            raise DataError(f"{str(source)!r} has classes the model does not know: {unknown}")
        examples = splits.train
    if not examples:
        raise DataError(f"run {str(run)!r} has an empty test split; pass --data")
    status = json.loads((run / "run.json").read_text(encoding="utf-8"))
    size = tuple(status["image_size"])
    ds = make_dataset(examples, labels, size, batch_size, cache=False)  # type: ignore[arg-type]
    probabilities = model.predict(ds, verbose=0)
    targets = np.concatenate([y for _, y in ds.as_numpy_iterator()])
    truth = targets.argmax(1)
    predicted = probabilities.argmax(1)
    per_class = {
        name: float((predicted[truth == i] == i).mean()) if (truth == i).any() else None
        for i, name in enumerate(labels)
    }
    metrics = {"accuracy": float((predicted == truth).mean()), "count": int(len(truth)), "per_class": per_class}
    (run / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return metrics


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from tlkit.cli import format_table

    metrics = evaluate_run(args.run_dir, args.data)
    rows = [(name, "-" if acc is None else f"{acc:.3f}") for name, acc in metrics["per_class"].items()]
    print(format_table(("class", "accuracy"), rows))
    print(f"\naccuracy {metrics['accuracy']:.4f} on {metrics['count']} examples")
    return 0


def add_cli(sub: Any) -> None:
    """Registers ``tlkit evaluate``."""
    p = sub.add_parser("evaluate", help="evaluate a run on its test split or another dataset")
    p.add_argument("run_dir")
    p.add_argument("--data", help="a class folder or CSV manifest instead of the run's test split")
    p.set_defaults(func=_cmd_evaluate)
