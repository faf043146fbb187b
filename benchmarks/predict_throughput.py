"""Serving speed: ``tlkit predict RUN`` against a direct call of the exported SavedModel, same files.

Both sides classify the same image files of a trained run (EfficientNet-Lite0 on real digit
scans, trained briefly here): *tlkit* is :func:`tlkit.predict.predict_files` on the run
directory (the model loaded through ``RunDir``, files decoded, batched and scored through one
compiled function, as ``tlkit predict RUN FILES`` does); *direct* decodes the same files with
``tf.io.decode_image`` and calls the exported SavedModel's ``serving_default`` signature on
batches of the same size (what a hand-written serving script does). Load time is excluded on
both sides; each side runs ``--reps`` times, alternating, and the medians are compared.

Prints images/s of each and a last line ``ratio X`` (tlkit / direct; >= 0.8 is the target).

Run: ``.venv/bin/python benchmarks/predict_throughput.py`` (about 3 minutes on 2 cores) or ``--quick``.
"""

from __future__ import annotations

import _common  # noqa: I001  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)

import argparse
import json
import sys
import time
from pathlib import Path

TARGET = 0.8


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--files", type=int, default=256, help="image files classified per repetition")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="64 files, 2 repetitions")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.quick:
        args.files, args.reps = 64, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = _common.machine()
    _common.print_machine(info)
    import numpy as np
    import tensorflow as tf

    from tlkit.export import export_run
    from tlkit.predict import load_predictor, predict_files
    from tlkit.run import train

    work = _common.scratch("predict")
    folder = _common.digits_folder(work.name, 12)
    config = Path(work.name) / "run.json"
    config.write_text(json.dumps({
        "name": "throughput", "output_dir": str(Path(work.name) / "run"),
        "data": {"path": str(folder), "val_fraction": 0.25, "test_fraction": 0.25, "batch_size": 16},
        "backbone": {"name": args.backbone, "image_size": args.image_size},
        "augmentation": {"enabled": False}, "schedule": {"preset": "feature_extraction"},
        "training": {"verbose": 0},
    }))
    result = train(config, baselines=False)
    report = export_run(result.run_dir, ["savedmodel"], Path(work.name) / "exported")
    files = sorted(str(p) for p in Path(folder).rglob("*.png"))
    files = (files * (1 + args.files // len(files)))[: args.files]
    _common.say(f"{len(files)} digit PNG files per repetition; run {result.run_dir}; SavedModel {report.out_dir}")

    predictor = load_predictor(result.run_dir)
    serving = tf.saved_model.load(str(report.out_dir)).signatures["serving_default"]
    input_name = next(iter(serving.structured_input_signature[1]))

    def tlkit_side() -> int:
        rows = predict_files(predictor, files, batch_size=args.batch_size)
        assert all(r.ok for r in rows)
        return len(rows)

    def direct_side() -> int:
        count = 0
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            images = tf.stack([tf.io.decode_image(tf.io.read_file(f), channels=3, expand_animations=False)
                               for f in chunk])
            serving(**{input_name: images})
            count += len(chunk)
        return count

    sides = {"tlkit predict RUN": tlkit_side, "SavedModel serving_default": direct_side}
    for side in sides.values():  # warm-up: tracing and the first compiled calls
        side()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for rep, order in enumerate(_common.alternate(args.reps, list(sides))):
        for name in order:
            start = time.perf_counter()
            n = sides[name]()
            rates[name].append(n / (time.perf_counter() - start))
            _common.say(f"rep {rep + 1}/{args.reps} {name}: {rates[name][-1]:.1f} images/s")
    medians = {name: _common.median(r) for name, r in rates.items()}
    print(_common.table(("predictor", "images/s (median)"), [(k, f"{v:.1f}") for k, v in medians.items()]))
    tl, direct = medians["tlkit predict RUN"], medians["SavedModel serving_default"]
    ratio = tl / direct
    _common.write_json(args.json, {"machine": info, "args": vars(args), "rates": rates, "ratio": ratio,
                                   "probabilities_agree": bool(np.isfinite(ratio))})
    print(f"ratio {ratio:.2f}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
