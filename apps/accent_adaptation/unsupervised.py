"""Adapts a trained accent classifier to new speakers from their *unlabelled* clips, and reports
accuracy before and after on those speakers.

    python apps/accent_adaptation/unsupervised.py runs/accent_sample --method dann --epochs 2

The new speakers are the run's test speakers (voices it never trained or validated on), or the
speakers of ``--target MANIFEST`` (``path,label,speaker`` rows of accents the run knows; the
labels are used only to score). Each new speaker's clips are split in two halves (seeded): the
*adaptation half* is the ``[adaptation] target`` (its labels are never read), the *test half* is
scored. Three models on the same test half:

- **before**: the run's model as trained;
- **after**: the run's model fine-tuned on its own training split with ``--method`` (``dann``,
  ``coral`` or ``adabn``, docs/adaptation.md) towards the adaptation half: ``--epochs`` epochs
  with the top ``--unfreeze`` encoder groups thawed;
- **control**: the same fine-tuning with method ``none``, so ``after - control`` is what the
  unlabelled clips bought, not the extra epochs.

This is the unsupervised counterpart of ``adapt.py`` (a new accent from a few *labelled* clips).
The Whisper encoder has no BatchNorm layer, so ``adabn`` changes nothing there; ``reweight``
needs per-example weights that random audio crops cannot carry in thawed stages.

Writes ``--out`` (default ``RUN/unsupervised_adaptation``): ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapt import expand_model, open_audio_run, read_clips, score  # the labelled adaptation's helpers


def halves(examples: list, rng: np.random.Generator) -> tuple[list, list]:
    """Per speaker, a seeded half of the clips to adapt on (unlabelled) and the rest to test on."""
    adapt, test = [], []
    for speaker in sorted({e.group or e.path for e in examples}):
        own = [e for e in examples if (e.group or e.path) == speaker]
        order = rng.permutation(len(own))
        cut = len(own) // 2
        adapt += [own[i] for i in sorted(order[:cut])]
        test += [own[i] for i in sorted(order[cut:])]
    return adapt, test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished tlkit run on the accents")
    parser.add_argument("--target", type=Path, default=None,
                        help="manifest of new speakers (path,label,speaker; default: the run's test split)")
    parser.add_argument("--method", choices=("dann", "coral", "adabn"), default="dann")
    parser.add_argument("--weight", type=float, default=1.0, help="strength of the adaptation loss")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--unfreeze", type=int, default=2, help="encoder groups thawed")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--out", type=Path, help="output folder (default RUN/unsupervised_adaptation)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import keras

    import tlkit
    from tlkit.backbones.registry import get as get_spec
    from tlkit.config import AdaptationConfig
    from tlkit.data.audio import load_audio, make_audio_dataset
    from tlkit.data.images import Example

    started = time.time()
    run, cfg, base, labels, contract = open_audio_run(args.run_dir)
    rate, crops, clip = int(contract.sample_rate), contract.eval_crops, contract.clip_samples
    rng = np.random.default_rng(args.seed)
    speakers = read_clips(args.target) if args.target else run.split("test")
    unknown = sorted({e.labels[0] for e in speakers} - set(labels))
    if unknown:
        raise SystemExit(f"the new speakers' accents {unknown} are not the run's {labels}; use adapt.py for a new accent")
    adapt_half, test_half = halves(speakers, rng)
    if not adapt_half or not test_half:
        raise SystemExit("the new speakers need at least 2 clips each (half to adapt on, half to test)")
    train_split = run.split("train")
    waveforms = {e.path: load_audio(e.path, rate) for e in [*train_split, *speakers]}
    test_clips = [waveforms[e.path] for e in test_half]
    truth = [e.labels[0] for e in test_half]
    known = set(labels)
    results = {"before": score(base, labels, test_clips, truth, clip, crops, known)}

    spec = get_spec(cfg.backbone.name, modality="audio")
    schedule = tlkit.Schedule((tlkit.Stage("top", args.epochs, args.unfreeze, args.learning_rate),))
    batch = min(cfg.data.batch_size, 8)
    unlabelled = [Example(e.path, ("",)) for e in adapt_half]  # the labels are never read
    for name, method in (("after", args.method), ("control", "none")):
        keras.utils.set_random_seed(args.seed)
        model = expand_model(base, spec, labels, cfg.head, cfg.augmentation, cfg.seed, True)
        data = make_audio_dataset(train_split, labels, waveforms, clip, batch, training=True, seed=args.seed)
        target = make_audio_dataset(unlabelled, [""], waveforms, clip, batch, training=True, seed=args.seed)
        adaptation = AdaptationConfig("new speakers", method, args.weight) if method != "none" else None
        history = tlkit.fine_tune(model, data, None, schedule, head=cfg.head, adaptation=adaptation,
                                  target=target if adaptation else None, verbose=0)
        results[name] = score(model, labels, test_clips, truth, clip, crops, known)
        results[name]["train_seconds"] = round(history.seconds, 1)
        results[name]["adaptation"] = history.adaptation

    setup = {
        "run": str(args.run_dir), "method": args.method, "weight": args.weight, "epochs": args.epochs,
        "unfreeze": args.unfreeze, "learning_rate": args.learning_rate, "seed": args.seed,
        "speakers": sorted({e.group or e.path for e in speakers}), "adapt_clips": len(adapt_half),
        "test_clips": len(test_half), "target": str(args.target) if args.target else "the run's test split",
        "seconds": round(time.time() - started, 1),
    }
    out = args.out or args.run_dir / "unsupervised_adaptation"
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(setup, results)
    for name, content in (("results.json", json.dumps({"setup": setup, "results": results}, indent=1)),
                          ("results.md", text)):
        (out / name).write_text(content, encoding="utf-8")
    print(f"{text}wrote {out}/results.json and results.md")
    return 0


def markdown(setup: dict, results: dict) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    names = {"before": "before (the run's model)", "after": f"after: {setup['method']} on the unlabelled half",
             "control": "control: same fine-tuning, no adaptation"}
    lines = [
        f"# Unsupervised adaptation to {len(setup['speakers'])} new speakers ({setup['method']})", "",
        (f"Adapted on {setup['adapt_clips']} unlabelled clips (half of each new speaker's clips, from "
         f"{setup['target']}), tested on the other {setup['test_clips']}; {setup['epochs']} epochs with the top "
         f"{setup['unfreeze']} encoder groups thawed, on the run's training split."), "",
        "| model | accuracy on the new speakers' test clips |", "|---|---|",
    ]
    lines += [f"| {names[key]} | {pct(row['old_accents'])} |" for key, row in results.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
