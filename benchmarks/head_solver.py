"""The head stage before and after: a few Adam epochs through the backbone vs. the head solved on cached features.

Before (tlkit 0.1's default head stage): ``epochs`` epochs of Adam with cosine decay, every
step through the frozen backbone (the default image augmentation kept the feature cache off).
After (the default now): the backbone runs once over the training and validation images, and
the head is solved to convergence (L-BFGS logistic regression, L2 strength chosen on
validation; ``tlkit/head_fit.py``). Beside them, scikit-learn's ``LogisticRegression`` on the
same frozen features, the accuracy the solved head must match within 1 point.

Same data (real scikit-learn digit scans as PNG files), same split, same backbone and seed;
the two variants alternate over ``--reps`` repetitions and the table prints medians.

Run: ``.venv/bin/python benchmarks/head_solver.py`` (about 3 minutes on 2 cores) or ``--quick``.
"""

from __future__ import annotations

import _common  # noqa: I001  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)

import argparse
import sys
import time

import numpy as np


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", choices=("auto", "random", "pretrained"), default="auto")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--per-class", type=int, default=30, help="digit images per class (10 classes)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of the before variant (its old default)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="per-class 12, 5 epochs, 1 rep")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.quick:
        args.per_class, args.epochs, args.reps = 12, 5, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = _common.machine()
    _common.print_machine(info)
    import keras
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import tlkit
    from tlkit.data.images import encode_labels, load_splits, make_batches
    from tlkit.model import split_head

    spec, weights = _common.backbone_and_weights(args.backbone, args.weights)
    size = (args.image_size, args.image_size)
    work = _common.scratch("head-solver")
    folder = _common.digits_folder(work.name, args.per_class)
    splits = load_splits(folder, val_fraction=0.25, test_fraction=0.25, seed=0)
    names = splits.class_names
    batches = {k: make_batches(getattr(splits, k), names, size, 16, training=k == "train", seed=0)
               for k in ("train", "val", "test")}
    _common.warm(batches["train"].examples)
    _common.say(f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test digit scans at "
                f"{size[0]}px; backbone {spec.name} weights={weights or 'random'}")
    variants = {
        "before: Adam epochs through the backbone": (tlkit.Stage("head", args.epochs, 0, 1e-3, solver="sgd"), "off"),
        "after: solved on cached features": (tlkit.Stage("head", args.epochs, 0, 1e-3), "auto"),
    }
    results: dict[str, dict[str, list[float]]] = {name: {"seconds": [], "test": []} for name in variants}
    truth = encode_labels(splits.test, names).argmax(axis=1)
    model = None
    for rep, order in enumerate(_common.alternate(args.reps, list(variants))):
        for name in order:
            stage, cache = variants[name]
            keras.utils.set_random_seed(0)
            model = tlkit.build_classifier(spec, len(names), weights=weights, image_size=size,
                                           augmentation=tlkit.ImageAugmentation())
            start = time.perf_counter()
            tlkit.fine_tune(model, batches["train"], batches["val"], tlkit.Schedule((stage,)),
                            feature_cache=cache, verbose=0)  # type: ignore[arg-type]
            seconds = time.perf_counter() - start
            accuracy = float((model.predict(batches["test"].batched(), verbose=0).argmax(1) == truth).mean())
            results[name]["seconds"].append(seconds)
            results[name]["test"].append(accuracy)
            _common.say(f"rep {rep + 1}/{args.reps} {name}: {seconds:.1f}s, test accuracy {accuracy:.3f}")
    assert model is not None
    extractor, _ = split_head(model)
    feats = {k: extractor.predict(b.in_order().map(lambda x, y: x), verbose=0) for k, b in batches.items()}
    labels = {k: encode_labels(getattr(splits, k), names).argmax(axis=1) for k in batches}
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(feats["train"], labels["train"])
    sk = float(reference.score(feats["test"], labels["test"]))
    rows = [(name, f"{_common.median(r['seconds']):.1f}s", f"{_common.median(r['test']):.3f}")
            for name, r in results.items()]
    rows.append(("scikit-learn LogisticRegression on the same frozen features", "-", f"{sk:.3f}"))
    print(_common.table(("head stage", "wall time", "test accuracy"), rows))
    before, after = (_common.median(r["seconds"]) for r in results.values())
    print(f"head stage wall time ratio before/after: {before / after:.2f}x")
    _common.write_json(args.json, {"machine": info, "args": vars(args), "results": results, "sklearn": sk,
                                   "speedup": before / after, "test_count": int(np.size(truth))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
