"""A training run: config in, run directory out; an interrupted run resumes.

Run directory layout::

    config.json         the config as used (paths resolved)
    labels.json         class names, in output order
    splits.json         the files of the train / val / test splits
    skipped.csv         unreadable files with the reason (only when some were skipped)
    history.json        merged per-epoch history across stages (+ history.jsonl, appended live)
    logs/<stage>/       TensorBoard logs
    checkpoints/<stage>/  best and final weights of each stage, and a backup for resuming
    model.keras         the final model (loads with safe_mode=True after `import tlkit`)
    run.json            status, backbone, test metrics, timings, versions
"""

from __future__ import annotations

import csv
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from tlkit.backbones.registry import get as get_spec
from tlkit.config import RunConfig, config_from_dict, load_config
from tlkit.data.images import Example, Splits, class_weights, load_splits, make_dataset
from tlkit.errors import ConfigError
from tlkit.finetune import FineTuneResult, fine_tune
from tlkit.model import build_classifier, classification_loss, classification_metrics


@dataclass
class RunResult:
    """What :func:`train` returns."""

    run_dir: Path
    model: keras.Model
    class_names: list[str]
    history: FineTuneResult | None
    test_metrics: dict[str, float]


def make_strategy(kind: str) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy named in ``[training] distribute``."""
    if kind == "auto":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    raise ConfigError(f"unknown distribution strategy {kind!r}")


def _splits_to_json(splits: Splits) -> dict[str, Any]:
    def rows(examples: list[Example]) -> list[dict[str, Any]]:
        return [{"path": e.path, "labels": list(e.labels), "group": e.group} for e in examples]

    return {"class_names": splits.class_names, "train": rows(splits.train), "val": rows(splits.val),
            "test": rows(splits.test)}


def load_split(run_dir: str | Path, split: str = "test") -> tuple[list[Example], list[str]]:
    """The examples of one split of a finished run, and its class names."""
    raw = json.loads((Path(run_dir) / "splits.json").read_text(encoding="utf-8"))
    examples = [Example(r["path"], tuple(r["labels"]), r.get("group")) for r in raw[split]]
    return examples, raw["class_names"]


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config a run was made with."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a tlkit run directory (no config.json)")
    raw = json.loads(path.read_text(encoding="utf-8"))
    return config_from_dict(raw, Path(run_dir), source=raw.get("source"))


def load_run_model(run_dir: str | Path) -> tuple[keras.Model, list[str]]:
    """The final model of a run (safe mode on) and its class names."""
    run = Path(run_dir)
    model_path = run / "model.keras"
    if not model_path.is_file():
        raise ConfigError(f"run {str(run)!r} has no model.keras yet; finish it with `tlkit train` first")
    import tlkit.layers  # noqa: F401  (registers tlkit's layers for deserialisation)

    model = keras.saving.load_model(model_path, safe_mode=True)
    labels = json.loads((run / "labels.json").read_text(encoding="utf-8"))
    return model, labels


def train(config: RunConfig | str | Path, *, verbose: int | str | None = None) -> RunResult:
    """Trains a classifier as the config says, writing (or resuming) its run directory.

    Calling it again with the same config after an interruption resumes from the last
    finished epoch; a finished run is not retrained. A run directory made with a
    different config is refused.
    """
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    verbose = cfg.training.verbose if verbose is None else verbose
    run = Path(cfg.output_dir)
    _check_run_dir(run, cfg)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1), encoding="utf-8")
    if cfg.source and Path(cfg.source).is_file():
        (run / f"config.original{Path(cfg.source).suffix}").write_text(
            Path(cfg.source).read_text(encoding="utf-8"), encoding="utf-8"
        )
    status = _read_status(run)
    if status.get("status") == "complete" and (run / "model.keras").is_file():
        model, labels = load_run_model(run)
        _say(verbose, f"run {run} is already complete; nothing to do")
        return RunResult(run, model, labels, None, status.get("test_metrics", {}))

    keras.utils.set_random_seed(cfg.seed)
    if cfg.training.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(cfg.training.mixed_precision)
    spec = get_spec(cfg.backbone.name, image_size=cfg.backbone.image_size)
    if spec.modality != "image":
        raise ConfigError(
            f"backbone {spec.name!r} is an {spec.modality} backbone; `tlkit train` reads image data here"
        )
    splits = load_splits(
        cfg.data.path, cfg.data.manifest, val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction, seed=cfg.seed,
    )
    _say(verbose, splits.summary())
    _write_data_files(run, splits)
    size = (cfg.backbone.image_size,) * 2 if cfg.backbone.image_size else spec.image_size
    make = lambda examples, training: make_dataset(  # noqa: E731
        examples, splits.class_names, size, cfg.data.batch_size, training=training, seed=cfg.seed,
        cache=cfg.data.cache,
    )
    train_ds = make(splits.train, True)
    val_ds = make(splits.val, False) if splits.val else None
    strategy = make_strategy(cfg.training.distribute)
    with strategy.scope():
        model = build_classifier(
            spec, len(splits.class_names), weights=cfg.backbone.weights, head=cfg.head,
            augmentation=cfg.augmentation, image_size=size, seed=cfg.seed, name=_model_name(cfg.name),
        )
    weights = None
    if cfg.data.class_weights and not cfg.head.multi_label:
        weights = class_weights(splits.train, splits.class_names)
    started = time.time()
    _write_status(run, {"status": "training", "backbone": spec.name, "started": started})
    history = fine_tune(
        model, train_ds, val_ds, cfg.schedule, head=cfg.head, run_dir=run, strategy=strategy,
        class_weight=weights, jit_compile=cfg.training.jit_compile, verbose=verbose,
    )
    test_metrics: dict[str, float] = {}
    if splits.test:
        test_ds = make(splits.test, False)
        values = model.evaluate(test_ds, verbose=0, return_dict=True)
        test_metrics = {k: float(v) for k, v in values.items()}
        _say(verbose, "test: " + ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))
    with strategy.scope():  # a plain optimizer, so the saved model is a clean, fittable Keras model
        model.compile(
            optimizer="adam", loss=classification_loss(cfg.head),
            metrics=classification_metrics(cfg.head, len(splits.class_names)),
        )
        model.optimizer.build(model.trainable_variables)
    model.save(run / "model.keras")
    _write_status(run, {
        "status": "complete", "backbone": spec.name, "started": started, "finished": time.time(),
        "train_seconds": history.seconds, "test_metrics": test_metrics, "num_classes": len(splits.class_names),
        "image_size": list(size), "versions": _versions(),
    })
    _say(verbose, f"wrote {run / 'model.keras'}")
    return RunResult(run, model, splits.class_names, history, test_metrics)


def _model_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return cleaned or "tlkit_classifier"


def _check_run_dir(run: Path, cfg: RunConfig) -> None:
    previous = run / "config.json"
    if not previous.is_file():
        if run.is_dir() and any(run.iterdir()):
            raise ConfigError(f"output_dir {str(run)!r} exists and is not a tlkit run; choose another output_dir")
        return
    old = json.loads(previous.read_text(encoding="utf-8"))
    new = json.loads(json.dumps(cfg.to_dict()))
    old.pop("source", None)
    new.pop("source", None)
    old.get("training", {}).pop("verbose", None)
    new.get("training", {}).pop("verbose", None)
    if old != new:
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ConfigError(
            f"run directory {str(run)!r} was made with a different config (differs in {changed}); "
            "to resume use the same config, otherwise set another output_dir or delete the directory"
        )


def _write_data_files(run: Path, splits: Splits) -> None:
    (run / "labels.json").write_text(json.dumps(splits.class_names, indent=1), encoding="utf-8")
    (run / "splits.json").write_text(json.dumps(_splits_to_json(splits)), encoding="utf-8")
    if splits.skipped:
        with open(run / "skipped.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason"])
            writer.writerows(splits.skipped)


def _read_status(run: Path) -> dict[str, Any]:
    path = run / "run.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_status(run: Path, status: dict[str, Any]) -> None:
    tmp = run / "run.json.tmp"
    tmp.write_text(json.dumps(status, indent=1), encoding="utf-8")
    tmp.replace(run / "run.json")


def _versions() -> dict[str, str]:
    import numpy

    import tlkit

    return {"tlkit": tlkit.__version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def _say(verbose: int | str, message: str) -> None:
    if verbose != 0:
        print(f"[tlkit] {message}", flush=True)
