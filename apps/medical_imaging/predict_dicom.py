"""Classifies DICOM (and PNG/JPEG) chest X-rays with a run or an exported model, preprocessing
each file exactly as ``prepare.py`` did for training.

    python apps/medical_imaging/predict_dicom.py runs/chest_xray scan1.dcm scan2.dcm
    python apps/medical_imaging/predict_dicom.py saved_models/chest_xray/1/model_fp32.tflite scan.dcm \
        --run runs/chest_xray
    python apps/medical_imaging/predict_dicom.py runs/chest_xray scan.dcm --window-center 2048 --window-width 4096

Per file: DICOM -> modality LUT -> window (the ``--window-*`` given, else the header's, else
percentiles; use what ``prepare.py`` used) -> MONOCHROME1 inverted -> 8-bit grey -> repeated
to RGB (``dicom_io``); PNG/JPEG files are decoded to RGB. Then the image is resized
(bilinear, as tlkit's training pipeline and the model's own Resizing layer do) to the run's
image size, and the model
(run directory, exported SavedModel or ``.tflite``) gives the probabilities; images of the
same size are scored in batches.

A file that cannot be read (not DICOM, truncated, no pixel data, an unreadable PNG) is a
row with an ``error`` and no probabilities; the other files are still classified and the
exit status is then 1.

With ``--run RUN`` (default: TARGET when it is a run directory) the run's fitted temperature
(``tlkit evaluate --calibrate``) is applied, and the decision uses the operating threshold of
its last ``tlkit evaluate`` (``metrics.json``), unless ``--threshold`` is given. The run is
read through tlkit's public API (``tlkit.RunDir``, ``tlkit.evaluation``). Not a medical
device: see the README.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from dicom_io import choose_window, is_dicom, read_dicom, to_display, to_rgb  # beside this script


def load_pixels(path: Path, center: float | None, width: float | None) -> tuple[np.ndarray, str]:
    """(H, W, 3) float32 0..255 and a note on the window used."""
    if is_dicom(path):
        image = read_dicom(path)
        window = None if image.is_colour else choose_window(image, center, width)
        note = "colour" if window is None else f"window {window.center:g}/{window.width:g} ({window.source})"
        return to_rgb(to_display(image, window)), note
    from tlkit.predict import load_image

    return load_image(path), "image file"


def image_size(target: Path, run: Path | None) -> tuple[int, int] | None:
    """The size the model was trained at: the run's input contract, else the export's metadata."""
    from tlkit import RunDir
    from tlkit.artifacts import metadata_beside

    for folder in ([run] if run else []) + [target]:
        if RunDir.is_run(folder):
            return RunDir(folder).input_contract().image_size
    size = metadata_beside(target).get("source_run", {}).get("image_size")
    return (int(size[0]), int(size[1])) if size else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", type=Path, help="run directory, exported SavedModel directory or .tflite file")
    parser.add_argument("files", type=Path, nargs="+", help="DICOM, PNG or JPEG files")
    parser.add_argument("--run", type=Path, help="the evaluated run: calibration.json and metrics.json threshold")
    parser.add_argument("--window-center", type=float)
    parser.add_argument("--window-width", type=float)
    parser.add_argument("--threshold", type=float, help="decision threshold on the positive class probability")
    parser.add_argument("--trust", action="store_true",
                        help="load a SavedModel even when its graph reads or writes files (see `tlkit inspect`)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if (args.window_center is None) != (args.window_width is None):
        parser.error("give both --window-center and --window-width, or neither")

    import tensorflow as tf

    from tlkit import RunDir
    from tlkit.errors import TlkitError
    from tlkit.evaluation import apply_temperature, read_metrics
    from tlkit.predict import load_predictor, predict_examples

    predictor = load_predictor(args.target, trust=args.trust)
    labels = list(predictor.labels)
    run = args.run or (args.target if RunDir.is_run(args.target) else None)
    temperature = RunDir(run).temperature() if run else None
    operating = read_metrics(run).get("operating_point") if run else None
    threshold, source = args.threshold, "--threshold"
    if threshold is None and isinstance(operating, dict) and "threshold" in operating:
        threshold, source = float(operating["threshold"]), f"{run}/metrics.json ({operating.get('threshold_source')})"
    size = image_size(args.target, run)
    positive = len(labels) - 1  # tlkit's default positive class: the second in sorted order
    results, decoded = [], []
    for file in args.files:
        try:
            pixels, note = load_pixels(file, args.window_center, args.window_width)
        except (ValueError, OSError, TlkitError) as exc:  # a corrupt file is reported, the others go on
            results.append({"file": str(file), "error": str(exc)})
            continue
        if size:
            pixels = tf.image.resize(pixels, size, method="bilinear").numpy()
        results.append({"file": str(file), "preprocessing": note})
        decoded.append((results[-1], pixels))
    scored = predict_examples(predictor, [pixels for _, pixels in decoded], names=[r["file"] for r, _ in decoded])
    for (row, _), prediction in zip(decoded, scored):
        if prediction.probabilities is None:
            row["error"] = prediction.error
            continue
        p = np.asarray(prediction.probabilities, np.float64)
        if temperature:
            p = apply_temperature(p[None], float(temperature))[0]
        row["probabilities"] = dict(zip(labels, map(float, p)))
        if len(labels) == 2 and threshold is not None:
            row["decision"] = labels[positive] if p[positive] >= threshold else labels[1 - positive]
        else:
            row["decision"] = labels[int(np.argmax(p))]
        row["error"] = None
    failed = [row for row in results if row.get("error")]
    if args.json:
        print(json.dumps({"threshold": threshold, "threshold_source": source if threshold is not None else None,
                          "temperature": temperature, "results": results}, indent=1, allow_nan=False))
    else:
        for row in results:
            if row.get("error"):
                print(f"{row['file']}: error: {row['error']}")
                continue
            probs = ", ".join(f"{k} {v:.3f}" for k, v in row["probabilities"].items())
            print(f"{row['file']}: {row['decision']}  ({probs}; {row['preprocessing']})")
        if threshold is not None and len(labels) == 2:
            print(f"decision: {labels[positive]} when p >= {threshold:.3f} ({source})"
                  + (f"; probabilities calibrated with T = {temperature:.3f}" if temperature else ""))
    if failed:
        print(f"{len(failed)} of {len(results)} file(s) could not be classified; see their error rows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
