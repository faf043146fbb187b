"""Domain adaptation on shifts built from data that ships: target accuracy of every method.

Shifts (all offline):

- ``digits -> inverted``: scikit-learn's real handwritten digit scans, white on black (source)
  against black on white (target).
- ``digits -> noisy, rotated``: the same scans rotated by up to +-30 degrees, with Gaussian
  pixel noise (sd 40) and a random grey background level (target).
- ``leaves -> warm, dim light``: the plant app's synthetic leaves
  (``apps/plant_disease/synthetic_leaves.py``) as drawn (source) and under warm, dim light:
  gamma 1.6, an orange colour cast and a vignette (target).

Protocol, per shift and seed: four disjoint sets of the same classes: source train (labelled),
source test, target pool (unlabelled, the adaptation's ``target``) and target test (labelled,
used only to score). EfficientNet-Lite0 with its real ImageNet weights at ``--image-size`` px;
the same schedule for every method: the head solved on cached features, then ``--epochs``
epochs with the top 2 of its 9 layer groups thawed (Adam, 3e-4, cosine decay). Methods:
source-only (``method = "none"``), ``adabn``, ``coral`` (weight ``--coral-weight``), ``dann``
(weight 1) and ``reweight``. Scores: target and source test accuracy, and the domain
classifier's AUC between source test and target test features (``tlkit.shift.domain_auc``)
of the pretrained backbone (before) and of each trained model (after).

Intervals: mean +- t(0.975, n-1) * sd / sqrt(n) over n seeds (Student t).

Run: ``.venv/bin/python benchmarks/adaptation.py`` (about 21 minutes on 2 shared cores) or ``--quick``
(2 seeds, two shifts, fewer examples and epochs: about 10 minutes, most of it model building and
tracing); ``--markdown FILE`` writes the tables.
"""

from __future__ import annotations

import _common  # noqa: I001  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("none", "adabn", "coral", "dann", "reweight")
TITLES = {"none": "source-only", "adabn": "adabn", "coral": "coral", "dann": "dann", "reweight": "reweight"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--per-class", type=int, default=20, help="examples per class in each of the four sets")
    p.add_argument("--epochs", type=int, default=5, help="epochs of the thawed stage")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--coral-weight", type=float, default=30.0)
    p.add_argument("--shifts", default="digits-inverted,digits-noisy,leaves-light")
    p.add_argument("--quick", action="store_true", help="2 seeds, 10 per class, 3 epochs, two shifts")
    p.add_argument("--json", default=None, help="also write the raw figures here")
    p.add_argument("--markdown", default=None, help="also write the tables here")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.per_class, args.epochs = 2, 10, 3
        args.shifts = "digits-inverted,leaves-light"
    return args


# --------------------------------------------------------------------------- the shifts


def _digits(seed: int, per_class: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``4 * per_class`` real digit scans per class as (N, size, size, 3) pixels 0..255, their labels."""
    import tensorflow as tf
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    index = np.concatenate([rng.permutation(np.flatnonzero(digits.target == c))[: 4 * per_class] for c in range(10)])
    pixels = np.repeat((digits.images[index] / 16.0 * 255.0)[..., None], 3, axis=-1).astype(np.float32)
    return tf.image.resize(pixels, (size, size)).numpy(), digits.target[index]


def _invert(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255.0 - x


def _noisy_rotated(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import rotate

    out = np.stack([rotate(img, rng.uniform(-30, 30), axes=(0, 1), reshape=False, order=1, mode="constant")
                    for img in x])
    background = rng.uniform(40, 120, size=(len(x), 1, 1, 1))
    out = np.maximum(out, background) + rng.normal(0, 40, size=out.shape)
    return np.clip(out, 0, 255).astype(np.float32)


def _leaves(seed: int, per_class: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    sys.path.insert(0, str(ROOT / "apps" / "plant_disease"))
    from synthetic_leaves import CLASSES, draw_leaf

    images, labels = [], []
    for c, label in enumerate(CLASSES):
        for i in range(4 * per_class):
            images.append(draw_leaf(label, size, seed=seed * 1_000_003 + c * 10_007 + i))
            labels.append(c)
    return np.asarray(images, np.float32), np.asarray(labels)


def _warm_dim_light(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = x.shape[1]
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    vignette = 1.0 - 0.9 * (xx ** 2 + yy ** 2)
    light = (x / 255.0) ** 1.6 * np.array([1.05, 0.8, 0.5]) * vignette[None, :, :, None]
    return np.clip(light * 255.0 * rng.uniform(0.8, 1.0, size=(len(x), 1, 1, 1)), 0, 255).astype(np.float32)


SHIFTS: dict[str, tuple[str, Callable[..., tuple[np.ndarray, np.ndarray]], Callable[..., np.ndarray]]] = {
    "digits-inverted": ("digits -> colour-inverted digits", _digits, _invert),
    "digits-noisy": ("digits -> noisy, rotated digits on grey", _digits, _noisy_rotated),
    "leaves-light": ("synthetic leaves -> warm, dim light", _leaves, _warm_dim_light),
}


def _sets(shift: str, seed: int, per_class: int, size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Four disjoint, class-balanced sets; the target sets carry the shift."""
    _, load, transform = SHIFTS[shift]
    x, y = load(seed, per_class, size)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"source_train": [], "source_test": [], "target_pool": [], "target_test": []}
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        for k, name in enumerate(parts):
            parts[name] += members[k * per_class:(k + 1) * per_class].tolist()
    sets = {name: (x[idx], y[idx]) for name, idx in parts.items()}
    for name in ("target_pool", "target_test"):
        sets[name] = (transform(sets[name][0], rng), sets[name][1])
    return sets


# --------------------------------------------------------------------------- one run


def _run(method: str, sets: dict[str, Any], args: argparse.Namespace, seed: int, classes: int) -> dict[str, float]:
    import keras
    import tensorflow as tf

    from tlkit.baselines import feature_extractor
    from tlkit.config import AdaptationConfig
    from tlkit.data.batches import Batches
    from tlkit.finetune import fine_tune
    from tlkit.model import HeadConfig, build_classifier
    from tlkit.schedule import Schedule, Stage
    from tlkit.shift import domain_auc

    keras.utils.set_random_seed(seed)
    xs, ys = sets["source_train"]
    train = Batches(tf.data.Dataset.from_tensor_slices((xs, keras.utils.to_categorical(ys, classes))), len(xs), 32,
                    shuffle=True, seed=seed)
    pool = sets["target_pool"][0]
    target = Batches(tf.data.Dataset.from_tensor_slices(pool), len(pool), 32, shuffle=True, seed=seed)
    model = build_classifier("efficientnet_lite0", classes, augmentation=None, image_size=args.image_size,
                             head=HeadConfig(dropout=0.0))
    schedule = Schedule((Stage("head", 1, 0, 1e-3), Stage("top", args.epochs, 2, 3e-4)))
    weight = args.coral_weight if method == "coral" else 1.0
    adaptation = AdaptationConfig("pool", method, weight) if method != "none" else None
    started = time.monotonic()
    fine_tune(model, train, None, schedule, adaptation=adaptation, target=target, jit_compile=False, verbose=0)
    seconds = time.monotonic() - started
    model.jit_compile = False  # XLA compiles cost more than these few predictions on a CPU

    def accuracy(name: str) -> float:
        x, y = sets[name]
        return float((model.predict(x, batch_size=64, verbose=0).argmax(axis=1) == y).mean())

    features = _features(feature_extractor(model), sets)
    return {"target_accuracy": accuracy("target_test"), "source_accuracy": accuracy("source_test"),
            "auc_after": domain_auc(*features, seed=seed)[0], "seconds": seconds}


def _auc_before(sets: dict[str, Any], args: argparse.Namespace, seed: int) -> float:
    from tlkit.baselines import feature_extractor
    from tlkit.shift import domain_auc

    features = _features(feature_extractor("efficientnet_lite0", image_size=args.image_size), sets)
    return domain_auc(*features, seed=seed)[0]


def _features(extractor: Any, sets: dict[str, Any]) -> list[np.ndarray]:
    """Pooled features of the source and target test sets (no XLA: compiling costs more than these)."""
    extractor.jit_compile = False
    return [np.asarray(extractor.predict(sets[name][0], batch_size=64, verbose=0)) for name in
            ("source_test", "target_test")]


# --------------------------------------------------------------------------- tables


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for one value)."""
    from scipy.stats import t

    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, 0.0
    return mean, float(t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))


def _cell(values: list[float]) -> str:
    mean, half = interval(values)
    return f"{mean:.3f} ± {half:.3f}"


def tables(results: dict[str, Any], seeds: int) -> str:
    lines = []
    for shift, block in results.items():
        runs = block["runs"]
        gain = [("target gain over source-only (paired)", "-",
                 *(_cell([r[m]["target_accuracy"] - r["none"]["target_accuracy"] for r in runs]) for m in METHODS[1:]))]
        rows = [("target test accuracy", *(_cell([r[m]["target_accuracy"] for r in runs]) for m in METHODS)), *gain,
                ("source test accuracy", *(_cell([r[m]["source_accuracy"] for r in runs]) for m in METHODS)),
                ("shift AUC after", *(_cell([r[m]["auc_after"] for r in runs]) for m in METHODS)),
                ("train seconds", *(f"{np.mean([r[m]['seconds'] for r in runs]):.0f}" for m in METHODS))]
        before = _cell([r["auc_before"] for r in runs])
        lines += [f"### {SHIFTS[shift][0]}", "",
                  (f"Shift AUC before (pretrained features, source test vs target test): {before}. "
                   f"Mean ± 95% t-interval over {seeds} seeds."), "",
                  "| method | " + " | ".join(TITLES[m] for m in METHODS) + " |",
                  "|---" * (len(METHODS) + 1) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = _common.machine()
    _common.print_machine(info)
    started = time.monotonic()
    results: dict[str, Any] = {}
    for shift in [s.strip() for s in args.shifts.split(",") if s.strip()]:
        runs = []
        for seed in range(args.seeds):
            sets = _sets(shift, seed, args.per_class, args.image_size)
            classes = int(max(sets["source_train"][1]) + 1)
            run: dict[str, Any] = {"seed": seed, "auc_before": _auc_before(sets, args, seed)}
            for method in METHODS:
                run[method] = _run(method, sets, args, seed, classes)
                print(f"{shift} seed {seed} {TITLES[method]:>11}: target {run[method]['target_accuracy']:.3f}, "
                      f"source {run[method]['source_accuracy']:.3f}, AUC {run['auc_before']:.3f} -> "
                      f"{run[method]['auc_after']:.3f} ({run[method]['seconds']:.0f}s)", flush=True)
            runs.append(run)
        results[shift] = {"title": SHIFTS[shift][0], "runs": runs}
    text = tables(results, args.seeds)
    print("\n" + text)
    print(f"total {time.monotonic() - started:.0f}s")
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "settings": settings, "results": results}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
