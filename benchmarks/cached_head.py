"""Head-only stage: epoch time with and without tlkit's feature (embedding) cache.

Data: scikit-learn's 1797 real handwritten digits, written as 32x32 PNG class folders by
``tlkit.sample_data.write_digits`` (``--per-class 0`` = all of them), split 85/15 into
train/validation, decoded and resized once by ``tlkit.data.make_batches`` (in-memory
decode cache, filled before timing).

Both variants run ``tlkit.fine_tune`` with the same one-stage head-only schedule on the
same classifier (``augmentation=None``), rebuilt from the same seed for every run:

* ``uncached``: ``feature_cache="off"``: every epoch runs every image through the frozen
  backbone.
* ``cached``: ``feature_cache="memory"``: the backbone runs once over train and
  validation (the *feature computation*, reported separately from
  ``FineTuneResult.feature_seconds``), then each epoch trains the head on the stored
  feature vectors.

An epoch is timed by a callback with epoch hooks only, so it covers training, the
validation pass and tlkit's end-of-epoch checkpoints. The first epoch of every run
(tracing) is dropped; runs alternate (A B, B A, ...) and figures are medians.
Break-even: the cache pays for itself after ``feature seconds / (uncached - cached epoch)``
epochs.

Run: ``.venv/bin/python benchmarks/cached_head.py`` (about 3.5 minutes on 2 cores) or
``--quick`` (about 1 minute).
"""

from __future__ import annotations

import _common  # noqa: I001  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)

import argparse
import math
import sys
import time
from typing import Any

TARGET = 10.0


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0", help="registry name (default efficientnet_lite0)")
    p.add_argument("--weights", choices=("auto", "random", "pretrained"), default="auto",
                   help="auto: pretrained when available offline (EfficientNet-Lite0 is), else random init")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--per-class", type=int, default=0, help="digit images per class, 0 = all (1797 in total)")
    p.add_argument("--val-fraction", type=float, default=0.15, help="0 trains without a validation set")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is dropped")
    p.add_argument("--reps", type=int, default=2, help="alternating repetitions")
    p.add_argument("--quick", action="store_true", help="500 images at 96x96, 2 repetitions")
    p.add_argument("--json", help="also write the raw figures to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.per_class, args.image_size, args.reps = 50, 96, 2
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first is dropped)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = _common.machine()
    _common.print_machine(info)

    import keras

    import tlkit
    from tlkit.data.images import load_splits, make_batches

    spec, weights = _common.backbone_and_weights(args.backbone, args.weights)
    size = (args.image_size, args.image_size)
    work = _common.scratch("cached")
    folder = _common.digits_folder(work.name, args.per_class or None)
    splits = load_splits(folder, val_fraction=args.val_fraction, test_fraction=0.0, check=False)
    train = make_batches(splits.train, splits.class_names, size, args.batch_size, training=True, seed=0)
    val = make_batches(splits.val, splits.class_names, size, args.batch_size) if splits.val else None
    decode = _common.warm(train.examples) + (_common.warm(val.examples) if val else 0.0)
    _common.say(
        f"{len(splits.train)} train + {len(splits.val)} validation digit PNGs (scikit-learn digits, 32x32 files), "
        f"resized to {size[0]}x{size[1]}; decode cache filled in {decode:.1f}s; batch {args.batch_size}, "
        f"{train.steps} steps/epoch; backbone {spec.name} weights={weights or 'random'}"
    )

    # Epoch by epoch on both sides (the default solver="auto" solves the head instead: benchmarks/head_solver.py).
    schedule = tlkit.Schedule.feature_extraction(epochs=args.epochs, solver="sgd")
    modes = {"uncached": "off", "cached": "memory"}
    results: dict[str, dict[str, list[float]]] = {name: {} for name in modes}
    for rep, order in enumerate(_common.alternate(args.reps, list(modes))):
        for name in order:
            # A fresh model from the same seed each run, so both variants start from the same
            # weights and random state (their losses should then agree, as tlkit promises).
            keras.utils.set_random_seed(0)
            model = tlkit.build_classifier(spec, len(splits.class_names), weights=weights, image_size=size,
                                           augmentation=None)
            timer = _common.EpochTimer()
            start = time.perf_counter()
            result = tlkit.fine_tune(model, train, val, schedule, feature_cache=modes[name],  # type: ignore[arg-type]
                                     callbacks=[timer], verbose=0)
            total = time.perf_counter() - start
            record = results[name]
            record.setdefault("epoch", []).extend(timer.seconds[1:])
            record.setdefault("first_epoch", []).append(timer.seconds[0])
            record.setdefault("features", []).append(result.feature_seconds)
            record.setdefault("run", []).append(total)
            record.setdefault("loss", []).append(result.history[-1]["loss"])
            if "val_accuracy" in result.history[-1]:
                record.setdefault("val_accuracy", []).append(result.history[-1]["val_accuracy"])
            _common.say(
                f"rep {rep + 1}/{args.reps} {name:<8} run {total:5.1f}s: features {result.feature_seconds:5.1f}s, "
                f"epochs {', '.join(f'{s:.2f}' for s in timer.seconds)} s"
            )

    unc, cac = results["uncached"], results["cached"]
    t_u, t_c = _common.median(unc["epoch"]), _common.median(cac["epoch"])
    features = _common.median(cac["features"])
    speedup = t_u / t_c
    break_even = features / (t_u - t_c) if t_u > t_c else math.inf
    rows = []
    for name, r in results.items():
        rows.append((
            name, len(r["epoch"]), f"{_common.median(r['epoch']):.3f}",
            f"{len(splits.train) / _common.median(r['epoch']):.0f}",
            f"{_common.median(r['first_epoch']):.2f}", f"{_common.median(r['features']):.2f}" if name == "cached" else "-",
            f"{_common.median(r['run']):.1f}", f"{_common.median(r['loss']):.4f}",
            f"{_common.median(r['val_accuracy']):.3f}" if r.get("val_accuracy") else "-",
            f"{speedup:.1f}x" if name == "cached" else "1x (ref)",
        ))
    print()
    print(f"Head-only stage, {spec.name} at {size[0]}x{size[1]}, {len(splits.train)} train / {len(splits.val)} val "
          f"images, batch {args.batch_size}, {args.epochs - 1} steady epochs x {args.reps} reps per variant (medians)")
    print(_common.table(
        ("variant", "epochs", "epoch s", "train img/s", "first epoch s", "feature s", f"run s ({args.epochs} ep)",
         "final loss", "val acc", "epoch speed-up"),
        rows,
    ))
    print()
    print(f"feature computation (one-off, train + validation): {features:.2f}s "
          f"= {features / t_u:.2f} uncached epochs")
    print(f"break-even: the cache is ahead after {break_even:.2f} epochs "
          f"(feature s / (uncached - cached epoch s)); i.e. from epoch {math.floor(break_even) + 1} on")
    from tlkit.layers import StochasticDepth  # inactive while frozen, so it does not split the paths

    dropouts = [layer.name for layer in model.get_layer("backbone")._flatten_layers(include_self=False)
                if isinstance(layer, keras.layers.Dropout) and not isinstance(layer, StochasticDepth)]
    if dropouts:
        print(f"note: the backbone holds {len(dropouts)} Dropout layers (e.g. {dropouts[0]!r}); in the uncached path "
              "they stay active while the frozen backbone runs inside training steps (Keras 3 passes the outer "
              "training=True down), the cached features are computed with training=False, so the two paths' "
              "losses differ")
    verdict = "meets" if speedup >= TARGET else "MISSES"
    print(f"epoch time speed-up with the cache: {speedup:.1f}x ({verdict} the {TARGET:.0f}x target)")
    _common.write_json(args.json, {
        "machine": info, "args": vars(args), "train": len(splits.train), "val": len(splits.val),
        "speedup": speedup, "break_even_epochs": break_even, "feature_seconds": features, "results": results,
    })
    work.cleanup()
    return 0 if speedup >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
