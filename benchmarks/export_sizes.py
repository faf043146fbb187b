"""Size and single-example latency of every export format of a small trained tlkit run.

Trains a small run with ``tlkit.train`` (scikit-learn's real handwritten digits written
as PNG class folders by ``tlkit.sample_data.write_digits``; EfficientNet-Lite0 with its
ImageNet weights by default; augmentation off; one head-only stage on cached features),
then exports it with ``tlkit.export.export_run`` in every format (SavedModel, ``.keras``,
TFLite float32 / float16 / dynamic-range / full-integer int8). ``export_run`` verifies each
artifact and reports its size and a latency it measured format after format. The
agreement thresholds are set to 0 (``--strict`` keeps tlkit's defaults): this script
reports each format's top-1 agreement with the Keras model instead of failing on it.

This script then measures latency again *side by side*: it loads every artifact with
``tlkit.artifacts.load_exported_predictor`` and calls ``predict_one`` on the same held-out
raw image in rotating order, format after format, round after round, and reports
medians. Also measured, for reference: the run's Keras model called eagerly (what the
``.keras`` predictor does) and the same model inside a ``tf.function`` (graph mode).

Latency is one example, batch 1, this machine; TFLite runs on ``--tflite-threads``
threads (tlkit's predictor default: 1), TensorFlow (SavedModel, Keras) on all cores.
Sizes are bytes on disk (the SavedModel: its own files, as ``export_run`` counts them).

Run: ``.venv/bin/python benchmarks/export_sizes.py`` (about 3 minutes on 2 cores) or
``--quick`` (96x96 input, about 2 minutes).
"""

from __future__ import annotations

import _common  # noqa: I001  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", choices=("auto", "random", "pretrained"), default="auto")
    p.add_argument("--image-size", type=int, default=224, help="the run's (and so the TFLite models') input size")
    p.add_argument("--per-class", type=int, default=30, help="digit images per class (10 classes)")
    p.add_argument("--formats", default=None, help="comma list of export formats (default: all)")
    p.add_argument("--rounds", type=int, default=30, help="side-by-side latency rounds")
    p.add_argument("--tflite-threads", type=int, default=1)
    p.add_argument("--strict", action="store_true",
                   help="keep export_run's top-1 agreement thresholds (default: 0, report agreement instead)")
    p.add_argument("--quick", action="store_true", help="96x96 input, 20 images per class, 15 rounds")
    p.add_argument("--keep", help="keep the run and the exported models in this folder")
    p.add_argument("--json", help="also write the raw figures to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.per_class, args.rounds = 96, 20, 15
    return args


def train_run(root: Path, args: argparse.Namespace, weights: str | None) -> Path:
    from tlkit.config import config_from_dict
    from tlkit.run import train

    folder = _common.digits_folder(root, args.per_class)
    cfg = config_from_dict({
        "name": "bench_digits",
        "output_dir": str(root / "run"),
        "data": {"path": str(folder), "batch_size": 32},
        "backbone": {"name": args.backbone, "weights": weights or "none", "image_size": args.image_size},
        "augmentation": {"enabled": False},
        "schedule": {"stages": [{"name": "head", "epochs": 5, "learning_rate": 0.01}]},
        "training": {"verbose": 0},
    })
    return train(cfg).run_dir


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = _common.machine()
    _common.print_machine(info)

    import numpy as np
    import tensorflow as tf

    import tlkit

    try:
        from tlkit.artifacts import load_exported_predictor
        from tlkit.export import export_run, list_formats
    except ImportError as exc:
        print(f"tlkit.export is not available ({exc}); this script needs tlkit.export.export_run", file=sys.stderr)
        return 2

    spec, weights = _common.backbone_and_weights(args.backbone, args.weights)
    work = _common.scratch("export")
    root = Path(args.keep) if args.keep else Path(work.name)
    root.mkdir(parents=True, exist_ok=True)

    run_dir, train_s = _common.timed(lambda: train_run(root, args, weights))
    _common.say(f"trained {spec.name} (weights={weights or 'random'}) at {args.image_size}x{args.image_size} "
                f"on digits, {args.per_class} per class, in {train_s:.1f}s: {run_dir}")
    formats = args.formats.split(",") if args.formats else None
    # This script reports agreement rather than gating on it: --strict keeps export_run's thresholds.
    min_agreement = None if args.strict else 0.0
    report, export_s = _common.timed(
        lambda: export_run(run_dir, formats, out=root / "models", min_agreement=min_agreement)
    )
    _common.say(f"export_run wrote {len(report.results)} formats in {export_s:.1f}s to {report.out_dir}")
    print()
    print("export_run's own report (its latency column is measured one format after another):")
    print(report.table())

    # Side-by-side latency: every artifact loaded, called in rotating order on the same input.
    out = Path(report.out_dir)
    predictors: dict[str, Any] = {}
    for result in report.results:
        path = out if result.path == "." else out / result.path
        predictor = load_exported_predictor(path)
        if predictor is None:
            continue
        if hasattr(predictor, "num_threads") and args.tflite_threads != predictor.num_threads:
            predictor = type(predictor)(str(path), predictor.labels, num_threads=args.tflite_threads)
        predictors[result.format] = predictor
    model, _ = tlkit.load_run_model(run_dir)
    graph = tf.function(lambda x: model(x, training=False))
    calls: dict[str, Any] = {
        "keras model, eager": lambda x: np.asarray(model(x[None], training=False))[0],
        "keras model, tf.function": lambda x: np.asarray(graph(tf.constant(x[None])))[0],
        **{fmt: p.predict_one for fmt, p in predictors.items()},
    }
    test = tlkit.RunDir(run_dir).split("test")
    from PIL import Image

    images = [np.asarray(Image.open(e.path).convert("RGB"), np.float32) for e in test[:8]]
    for fn in calls.values():
        for image in images[:2]:
            fn(image)  # warm-up (tracing, allocation)
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(args.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            image = images[r % len(images)]
            start = time.perf_counter()
            calls[name](image)
            times[name].append(time.perf_counter() - start)

    sizes = {r.format: r.size_bytes for r in report.results}
    fp32 = sizes.get("tflite-fp32")
    reference = "savedmodel" if "savedmodel" in times else names[0]
    ref_ms = 1e3 * _common.median(times[reference])
    rows = []
    for name in names:
        ms = 1e3 * _common.median(times[name])
        size = sizes.get(name)
        result = next((r for r in report.results if r.format == name), None)
        rows.append((
            name,
            f"{size / 2**20:.2f}" if size is not None else "-",
            f"{size / fp32:.2f}" if size is not None and fp32 else "-",
            f"{ms:.2f}", f"{ms / ref_ms:.2f}",
            f"{result.latency_ms:.2f}" if result else "-",
            f"{result.top1_agreement:.3f}" if result else "-",
            f"{result.max_abs_diff:.1e}" if result else "-",
        ))
    print()
    print(f"Export formats of the {spec.name} classifier at {args.image_size}x{args.image_size} ({int(model.output.shape[-1])} classes); "
          f"latency: median of {args.rounds} side-by-side rounds, batch 1, TFLite on {args.tflite_threads} thread(s), "
          f"runtime {report.tflite_runtime or '-'}")
    print(_common.table(
        ("format", "size MiB", "size vs tflite-fp32", "latency ms", f"latency vs {reference}",
         "export_run latency ms", "top-1 agree", "max |dp|"),
        rows,
    ))
    _common.write_json(args.json, {
        "machine": info, "args": vars(args), "report": report.to_dict(), "times": times,
        "train_seconds": train_s, "export_seconds": export_s, "formats": [fmt.name for fmt in list_formats()],
    })
    if not args.keep:
        work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
