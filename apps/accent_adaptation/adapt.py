"""Adapts a trained accent classifier to a new accent from a few labelled clips, and reports
accuracy before and after on speakers it has never heard.

    python apps/accent_adaptation/adapt.py runs/accent_sample data/accent_sample/new_accent.csv \
        --shots 3 --adapt-speakers 2 --epochs 2

Inputs: a finished ``tlkit train`` run on the base accents (``base.csv``) and the new
accent's clips (``new_accent.csv``, with a speaker column). The new accent's speakers are
split in two: ``--adapt-speakers`` speakers give ``--shots`` labelled clips each (the few
clips a user would label), every clip of the remaining speakers is the new accent's test
set. The base accents are tested on the run's own test split (speakers the run never saw).

Three models are scored on the same test clips:

- **before**: the run's model as trained (K accents). It has no class for the new accent,
  so it cannot get a new-accent clip right; the table shows which old accent it hears
  instead.
- **adapted**: K+1 classes. Encoder, pooling and the K old output rows start from the
  run's model, the new row from scratch; then the schedule (head, then the top encoder
  groups) on the few new clips plus ``--replay`` clips per old accent from the run's
  training split (so the old accents are not forgotten).
- **control** (skip with ``--no-control``): the same K+1 model, data and schedule, but the
  encoder starts from the pretrained Whisper weights instead of the accent-trained ones.
  ``adapted`` minus ``control`` is what the accent training on the base accents bought.

Writes ``--out`` (default ``RUN/adaptation``): ``results.json``, ``results.md`` and the
adapted model as ``keras_model.keras`` with ``metadata.json`` / ``labels.txt`` beside it,
so ``tlkit predict RUN/adaptation/keras_model.keras clip.wav`` works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def _accuracy(predicted: list[str], truth: list[str]) -> float | None:
    return float(np.mean([p == t for p, t in zip(predicted, truth)])) if truth else None


def read_clips(manifest: Path) -> list:
    """``path,label,speaker`` rows as tlkit Examples (relative paths against the manifest's folder).

    (``tlkit.data.read_manifest`` insists on two classes; the new accent's manifest has one.)
    """
    import csv

    from tlkit.data.images import Example

    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise SystemExit(f"{manifest} needs path,label(,speaker) columns and at least one row")
    return [Example(str(p if (p := Path(r["path"])).is_absolute() else manifest.parent / p), (r["label"].strip(),),
                    (r.get("speaker") or r.get("group") or "").strip() or None) for r in rows]


def score(model, labels: list[str], clips: list, truth: list[str], clip: int, crops: int, old: set[str]) -> dict:
    """Accuracy on old-accent clips, on new-accent clips and overall; what new clips are heard as."""
    from tlkit.data.audio import predict_clips

    probabilities = predict_clips(lambda b: model(b, training=False), clips, clip, crops=crops, batch_size=16)
    predicted = [labels[i] for i in probabilities.argmax(axis=1)]
    old_rows = [i for i, t in enumerate(truth) if t in old]
    new_rows = [i for i, t in enumerate(truth) if t not in old]
    heard = Counter(predicted[i] for i in new_rows)
    return {
        "old_accents": _accuracy([predicted[i] for i in old_rows], [truth[i] for i in old_rows]),
        "new_accent": _accuracy([predicted[i] for i in new_rows], [truth[i] for i in new_rows]),
        "all": _accuracy(predicted, truth),
        "old_clips": len(old_rows), "new_clips": len(new_rows),
        "new_accent_heard_as": dict(heard.most_common()),
    }


def expand_model(base, spec, labels: list[str], head, augmentation, seed: int, from_base: bool):
    """A K+1-class classifier; with ``from_base`` every layer of ``base`` whose weights fit is
    copied and the K old output rows are kept (the new row keeps its fresh initialisation)."""
    import tlkit

    model = tlkit.build_classifier(spec, len(labels), head=head, augmentation=augmentation, seed=seed,
                                   name="accent_classifier")
    if not from_base:
        return model
    for layer in model.layers:
        try:
            source = base.get_layer(layer.name)
        except ValueError:
            continue
        mine, theirs = layer.get_weights(), source.get_weights()
        if not mine:
            continue
        if all(a.shape == b.shape for a, b in zip(mine, theirs)) and len(mine) == len(theirs):
            layer.set_weights(theirs)
        elif layer.name == "logits":  # (D, K) -> (D, K + 1): keep the old rows
            kernel, bias = mine
            kernel[:, : theirs[0].shape[1]] = theirs[0]
            bias[: theirs[1].shape[0]] = theirs[1]
            layer.set_weights([kernel, bias])
    return model


def open_audio_run(run_path: Path) -> tuple:
    """``(RunDir, RunConfig, model, labels, InputContract)`` of a finished audio run (else SystemExit)."""
    import tlkit

    run = tlkit.RunDir(run_path)
    run.require_model()
    if run.status().get("status") != "complete":
        raise SystemExit(f"run {run_path} has not finished training; finish it with `tlkit train` first")
    base = run.load_model()
    contract = run.input_contract(base)
    if not contract.is_audio or contract.clip_samples is None:
        raise SystemExit(f"run {run_path} is not an audio run; these scripts adapt accent (audio) classifiers")
    return run, run.config(), base, run.labels(), contract


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished tlkit run on the base accents")
    parser.add_argument("new_accent", type=Path, help="manifest of the new accent: path,label,speaker")
    parser.add_argument("--shots", type=int, default=5, help="labelled clips per adaptation speaker")
    parser.add_argument("--adapt-speakers", type=int, default=2, help="new-accent speakers that give labelled clips")
    parser.add_argument("--replay", type=int, default=None,
                        help="clips per old accent from the run's training split (default: shots * adapt-speakers)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each stage (head, then top groups)")
    parser.add_argument("--unfreeze", type=int, default=2, help="encoder groups thawed in the second stage")
    parser.add_argument("--learning-rate", type=float, default=0.003, help="head stage; the top stage uses 1/10")
    parser.add_argument("--no-control", action="store_true", help="skip the pretrained-encoder control")
    parser.add_argument("--out", type=Path, help="output folder (default RUN/adaptation)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import keras

    import tlkit
    from tlkit.artifacts import KERAS_FILE, LABELS_FILE, METADATA_FILE
    from tlkit.backbones.registry import get as get_spec
    from tlkit.data.audio import check_audio, load_audio, make_audio_dataset
    from tlkit.data.images import Example

    started = time.time()
    run_path = args.run_dir
    out = args.out or run_path / "adaptation"
    run, cfg, base, old_labels, contract = open_audio_run(run_path)
    rate, crops, clip = int(contract.sample_rate), contract.eval_crops, contract.clip_samples
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    new_examples, new_waveforms, skipped = check_audio(read_clips(args.new_accent), rate)
    for path, reason in skipped:
        print(f"note: skipped {path}: {reason}")
    new_label = sorted({e.labels[0] for e in new_examples})
    if len(new_label) != 1 or new_label[0] in old_labels:
        raise SystemExit(f"{args.new_accent} must hold one accent that the run does not know; found {new_label}")
    new_label = new_label[0]
    speakers = sorted({e.group or e.path for e in new_examples})
    if len(speakers) <= args.adapt_speakers:
        raise SystemExit(f"{new_label!r} has {len(speakers)} speakers; need more than --adapt-speakers "
                         f"{args.adapt_speakers} (the rest are its test speakers)")
    adapt_speakers = set(rng.permutation(speakers)[: args.adapt_speakers].tolist())
    shots: list[Example] = []
    for speaker in sorted(adapt_speakers):
        own = [e for e in new_examples if (e.group or e.path) == speaker]
        shots += [own[i] for i in sorted(rng.permutation(len(own))[: args.shots])]
    new_test = [e for e in new_examples if (e.group or e.path) not in adapt_speakers]

    train_split, test_split = run.split("train"), run.split("test")
    if not test_split:
        raise SystemExit(f"run {run_path} has no test split to measure the old accents on")
    replay_per_class = args.replay if args.replay is not None else args.shots * args.adapt_speakers
    replay: list[Example] = []
    for label in old_labels:
        pool = [e for e in train_split if e.labels[0] == label]
        replay += [pool[i] for i in sorted(rng.permutation(len(pool))[:replay_per_class])]
    waveforms = dict(new_waveforms)
    for example in replay + test_split:
        if example.path not in waveforms:
            waveforms[example.path] = load_audio(example.path, rate)

    test = test_split + new_test
    test_clips = [waveforms[e.path] for e in test]
    truth = [e.labels[0] for e in test]
    old = set(old_labels)
    results = {"before": score(base, old_labels, test_clips, truth, clip, crops, old)}

    labels = [*old_labels, new_label]
    train_examples = replay + shots
    spec = get_spec(cfg.backbone.name, modality="audio")
    schedule = tlkit.Schedule((
        tlkit.Stage("head", args.epochs, 0, args.learning_rate),
        tlkit.Stage("top", args.epochs, args.unfreeze, args.learning_rate / 10, group_lr_decay=0.5),
    ))
    batch = min(cfg.data.batch_size, 8)
    adapted = None
    for name, from_base in (("adapted", True), ("control", False)):
        if name == "control" and args.no_control:
            continue
        keras.utils.set_random_seed(args.seed)
        model = expand_model(base, spec, labels, cfg.head, cfg.augmentation, cfg.seed, from_base)
        data = make_audio_dataset(train_examples, labels, waveforms, clip, batch, training=True, seed=args.seed)
        history = tlkit.fine_tune(model, data, None, schedule, head=cfg.head, verbose=0)
        results[name] = score(model, labels, test_clips, truth, clip, crops, old)
        results[name]["train_seconds"] = round(history.seconds, 1)
        if from_base:
            adapted = model

    out.mkdir(parents=True, exist_ok=True)
    assert adapted is not None
    adapted.save(out / KERAS_FILE)
    (out / LABELS_FILE).write_text("\n".join(labels) + "\n", encoding="utf-8")
    (out / METADATA_FILE).write_text(json.dumps({
        "labels": labels, "modality": "audio", "sample_rate": rate, "clip_seconds": clip / rate,
        "source_run": str(run_path.resolve()), "made_by": "apps/accent_adaptation/adapt.py",
    }, indent=1), encoding="utf-8")
    setup = {
        "run": str(run_path), "new_accent": new_label, "shots_per_speaker": args.shots,
        "adapt_speakers": sorted(adapt_speakers), "new_accent_train_clips": len(shots),
        "new_accent_test_speakers": sorted({e.group or e.path for e in new_test}),
        "replay_clips_per_old_accent": replay_per_class, "epochs_per_stage": args.epochs,
        "unfreeze": args.unfreeze, "learning_rate": args.learning_rate, "seed": args.seed,
        "old_accents": old_labels, "old_test_speakers": sorted({e.group or e.path for e in test_split}),
        "seconds": round(time.time() - started, 1),
    }
    (out / "results.json").write_text(json.dumps({"setup": setup, "results": results}, indent=1), encoding="utf-8")
    (out / "results.md").write_text(markdown(setup, results), encoding="utf-8")
    print(markdown(setup, results))
    print(f"wrote {out}/results.json, results.md and the adapted model keras_model.keras")
    return 0


def markdown(setup: dict, results: dict) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    first = next(iter(results.values()))
    lines = [
        f"# Adapting to `{setup['new_accent']}` with {setup['new_accent_train_clips']} labelled clips",
        "",
        f"{setup['shots_per_speaker']} clips from each of {len(setup['adapt_speakers'])} speakers "
        f"({', '.join(setup['adapt_speakers'])}), plus {setup['replay_clips_per_old_accent']} replayed clips per "
        f"old accent; {setup['epochs_per_stage']} epochs head-only, then {setup['epochs_per_stage']} with the top "
        f"{setup['unfreeze']} encoder groups thawed. Tested on {first['new_clips']} clips of unseen "
        f"{setup['new_accent']} speakers ({', '.join(setup['new_accent_test_speakers'])}) and {first['old_clips']} "
        "clips of the run's test speakers of the old accents.",
        "",
        "| model | old accents acc. | new accent acc. | all clips acc. | new-accent clips heard as |",
        "|---|---|---|---|---|",
    ]
    names = {"before": "before (run's model, no class for the new accent)",
             "adapted": "after: adapted (accent-trained encoder)",
             "control": "control: pretrained Whisper encoder, same data"}
    for key, row in results.items():
        heard = ", ".join(f"{k} {v}" for k, v in row["new_accent_heard_as"].items())
        lines.append(f"| {names.get(key, key)} | {pct(row['old_accents'])} | {pct(row['new_accent'])} | "
                     f"{pct(row['all'])} | {heard} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
