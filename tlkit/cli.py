"""The ``tlkit`` command line: train, evaluate, predict, export, backbones, fetch, demo.

Each command module that is bigger than a few lines registers its own sub-command via
an ``add_cli(subparsers)`` function; this module only wires them and turns tlkit errors
into a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with a header rule (used by every command that prints one)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_backbones(args: argparse.Namespace) -> int:
    from tlkit.backbones import available_offline, list_backbones

    rows = []
    for spec in list_backbones(args.modality):
        if spec.modality == "image":
            size = "x".join(str(v) for v in spec.input_shape[:2])
        else:
            size = f"{spec.sample_rate or '?'} Hz"
        params = f"{spec.params / 1e6:.1f}M" if spec.params else "-"
        rows.append((spec.name, spec.modality, size, params, spec.source, "yes" if available_offline(spec) else "no"))
    print(format_table(("name", "modality", "input", "params", "source", "offline"), rows))
    print("\noffline = pretrained weights are on this machine now (or ship inside an installed package).")
    print("Fetch others on a connected machine with `tlkit fetch NAME` and copy the cache over.")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from tlkit.backbones import prefetch

    for name in args.names:
        where = prefetch(name)
        print(f"{name}: cached at {where}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from tlkit.run import train

    result = train(args.config, verbose=0 if args.quiet else "auto")
    print(f"run directory: {result.run_dir}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from tlkit.predict import load_predictor, predict_file, top_k

    predictor = load_predictor(args.target)
    results = []
    for file in args.files:
        probabilities = predict_file(predictor, file, target=args.target, crops=args.crops)
        results.append({"file": file, "top": top_k(probabilities, predictor.labels, args.top_k)})
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        rows = [(r["file"], *(f"{label} {p:.3f}" for label, p in r["top"])) for r in results]
        headers = ("file", *(f"top {i + 1}" for i in range(min(args.top_k, len(predictor.labels)))))
        print(format_table(headers, rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlkit", description="Transfer learning for vision and speech with Keras.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a classifier in stages from a TOML/YAML config")
    p.add_argument("config", help="run config (.toml, .yaml or .json)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("predict", help="classify files with a run directory or an exported model")
    p.add_argument("target", help="run directory, exported SavedModel directory or .tflite file")
    p.add_argument("files", nargs="+", help="image or audio files (wav, flac, ogg, mp3)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--crops", type=int, default=None,
                   help="audio: crops averaged per file (default: the run's eval_crops)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("backbones", help="list the backbone registry")
    p.add_argument("--modality", choices=("image", "audio"))
    p.set_defaults(func=_cmd_backbones)

    p = sub.add_parser("fetch", help="download or convert pretrained weights into the local cache")
    p.add_argument("names", nargs="+", help="backbone names or hub handles")
    p.set_defaults(func=_cmd_fetch)

    from tlkit import demo, evaluate, sample_data

    evaluate.add_cli(sub)
    demo.add_cli(sub)
    sample_data.add_cli(sub)
    try:
        from tlkit import export
    except ImportError:  # pragma: no cover - export lands separately
        export = None  # type: ignore[assignment]
    if export is not None and hasattr(export, "add_cli"):
        export.add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tlkit`` console script."""
    from tlkit.errors import TlkitError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TlkitError as exc:
        print(f"tlkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tlkit: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
