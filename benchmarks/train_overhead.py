"""Training overhead of tlkit: ``build_classifier`` + ``fine_tune`` against hand-written Keras.

Both sides train the same backbone on the same ``tf.data`` pipeline (tlkit's
``make_batches`` over real digit PNGs), the same batch size, loss and metrics, with XLA
left at Keras's ``"auto"``. The feature cache is off, so tlkit runs every step through
the backbone exactly as the hand-written model does.

The hand-written model does the same preprocessing work inside the model (a
``Resizing`` layer and the backbone's pixel scaling), as tlkit's classifier does; the
optional ``hand_pipeline`` variant moves both into the ``tf.data`` pipeline instead, to
show what the in-model layers cost.

Stages measured (``--stages``):

* ``head``: backbone frozen, head trained (the first stage of every tlkit schedule).
* ``full``: every backbone group thawed, BatchNorm kept frozen (tlkit's default), one
  learning rate.
* ``glr``: as ``full`` but with tlkit's discriminative per-group learning rates
  (``group_lr_decay=0.5``, a ``MultiOptimizer``); compared with the same hand-written
  single-optimizer model, so the ratio shows what per-group rates cost.

Timing: every ``train_function`` call is timestamped (see ``_common.StepTimer``); the
first epoch of every run (tracing, XLA compilation, cache filling) is dropped. Variants
alternate (A B, B A, ...) over ``--reps`` repetitions; figures are medians of the pooled
steady-state steps. ``steps/s`` is from start-to-start intervals within an epoch (so it
includes Keras's and the callbacks' per-batch work); ``epoch s`` spans whole epochs,
end-of-epoch callbacks (tlkit's checkpoints) included. ``CPU ms/step`` is the same
interval in process CPU time (all threads), which other jobs' load disturbs less. Last,
the two compiled training steps (as ``fine_tune`` and ``fit`` built them) are alternated
one step at a time on the same batches (``--micro-steps``): the finest-grained
comparison of the per-step work, free of the loops around it.

Run: ``.venv/bin/python benchmarks/train_overhead.py`` (about 5.5 minutes on 2 cores) or
``--quick`` (about 1 minute).
"""

from __future__ import annotations

import _common  # noqa: I001  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)

import argparse
import sys
import tempfile
import time
from typing import Any

TARGET = 0.97


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mobilenet_v2", help="registry name (default mobilenet_v2)")
    p.add_argument("--weights", choices=("auto", "random", "pretrained"), default="auto",
                   help="auto: pretrained when available offline, else random init (timing does not depend on it)")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--per-class", type=int, default=32, help="digit images per class (10 classes)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is dropped")
    p.add_argument("--reps", type=int, default=5, help="alternating repetitions")
    p.add_argument("--stages", default="head,full", help="comma list of head, full, glr")
    p.add_argument("--variants", default="tlkit,hand",
                   help="comma list of tlkit, hand, tlkit_model_fit (tlkit's model, plain fit), hand_pipeline")
    p.add_argument("--micro-steps", type=int, default=60,
                   help="after the last repetition of each stage, alternate this many single compiled steps of "
                        "tlkit and hand (0: skip)")
    p.add_argument("--quick", action="store_true", help="fewer images, epochs and repetitions; head and full stages")
    p.add_argument("--json", help="also write the raw figures to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.per_class, args.epochs, args.reps, args.stages, args.micro_steps = 16, 3, 3, "head,full", 30
    if args.epochs < 3:
        p.error("--epochs must be >= 3 (the first is dropped; whole-epoch times need a following epoch)")
    return args


def hand_model(spec: Any, weights: Any, size: int, num_classes: int, preprocess_in_model: bool) -> tuple[Any, Any]:
    """A plain functional Keras classifier on the same backbone network; ``(model, base)``."""
    import keras

    from tlkit.backbones.loading import load_backbone

    if spec.source == "keras_applications":
        constructor = getattr(keras.applications, spec.location)
        base = constructor(include_top=False, weights="imagenet" if weights == "pretrained" else None,
                           input_shape=(size, size, 3))
    else:  # weights converted from a package etc.: the network itself comes from tlkit's adapter
        _, base = load_backbone(spec, weights, input_shape=(size, size, 3))
    inputs = keras.Input((None, None, 3) if preprocess_in_model else (size, size, 3), name="image")
    x = inputs
    if preprocess_in_model:
        x = keras.layers.Resizing(size, size)(x)
        x = preprocessing_layers(spec)(x)
    x = base(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    x = keras.layers.Dense(num_classes)(x)
    outputs = keras.layers.Activation("softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="hand_written"), base


def preprocessing_layers(spec: Any) -> Any:
    """The spec's pixel scaling as stock Keras layers: ``Rescaling`` (+ a channel flip for BGR)."""
    import keras
    import numpy as np

    pre = spec.preprocessing
    std = np.asarray(pre.std, "float32")
    scale = pre.scale / std
    offset = (pre.offset - np.asarray(pre.mean, "float32")) / std
    layers = []
    if pre.channel_order == "bgr":
        layers.append(keras.layers.Lambda(lambda t: t[..., ::-1]))
    same = bool(np.all(scale == scale[0]) and np.all(offset == offset[0]))
    layers.append(keras.layers.Rescaling(float(scale[0]) if same else scale, float(offset[0]) if same else offset))
    return keras.Sequential(layers, name="pixel_scaling")


def configure_hand(base: Any, stage: str) -> None:
    """Freezes as tlkit does: ``head`` freezes the backbone; ``full``/``glr`` thaw it, BatchNorm frozen."""
    import keras

    if stage == "head":
        base.trainable = False
        return
    base.trainable = True
    for layer in base._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = _common.machine()
    _common.print_machine(info)

    import keras
    import numpy as np
    import tensorflow as tf

    import tlkit
    from tlkit.data.images import make_batches

    spec, weights = _common.backbone_and_weights(args.backbone, args.weights)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    size = (args.image_size, args.image_size)

    work = _common.scratch("overhead")
    examples, class_names = _common.digits_examples(work.name, args.per_class)
    train = make_batches(examples, class_names, size, args.batch_size, training=True, seed=0)
    steps = train.steps
    _common.say(
        f"{len(examples)} digit PNGs (scikit-learn digits, 32x32 files) decoded and resized to {size[0]}x{size[1]} "
        f"by tlkit.data.make_batches (cached in memory, shuffled, prefetched); batch {args.batch_size}, "
        f"{steps} steps/epoch; backbone {spec.name} weights={weights or 'random'}"
    )
    _common.say(f"filling the decode cache: {_common.warm(train.examples):.1f}s")

    # The pipeline variant: the same batches, preprocessed in tf.data instead of in the model.
    pixel_scaling = preprocessing_layers(spec)
    pipeline_ds = train.batched().map(lambda x, y: (pixel_scaling(x), y), num_parallel_calls=tf.data.AUTOTUNE)

    keras.utils.set_random_seed(0)
    tl_model = tlkit.build_classifier(spec, len(class_names), weights=weights, image_size=size, augmentation=None)
    hands: dict[str, tuple[Any, Any]] = {}
    if "hand" in variants:
        hands["hand"] = hand_model(spec, weights, args.image_size, len(class_names), True)
    if "hand_pipeline" in variants:
        hands["hand_pipeline"] = hand_model(spec, weights, args.image_size, len(class_names), False)
    tl_timer = _common.StepTimer().attach(tl_model)
    timers = {"tlkit": tl_timer, "tlkit_model_fit": tl_timer}
    for name, (model, _) in hands.items():
        timers[name] = _common.StepTimer().attach(model)

    learning_rates = {"head": 1e-3, "full": 1e-4, "glr": 1e-4}
    samples: dict[tuple[str, str], dict[str, list[float]]] = {}
    micro: dict[str, dict[str, Any]] = {}
    jit: dict[tuple[str, str], Any] = {}
    for rep, order in enumerate(_common.alternate(args.reps, variants)):
        for stage in stages:
            for variant in order:
                timer = timers[variant]
                timer.reset()
                lr = learning_rates[stage]
                run_start = time.perf_counter()
                run_variant(variant, stage, lr, args.epochs, tl_model, hands, train, pipeline_ds)
                run_end = time.perf_counter()
                seconds = run_end - run_start
                got = timer.steady(steps)
                key = (stage, variant)
                for field, values in got.items():
                    samples.setdefault(key, {}).setdefault(field, []).extend(values)
                for field, value in timer.phases(run_start, run_end).items():
                    samples[key].setdefault(field, []).append(value)
                samples[key].setdefault("run", []).append(seconds)
                samples[key].setdefault("rep_step", []).append(_common.median(got["interval"]))
                model = hands[variant][0] if variant in hands else tl_model
                jit[key] = model.jit_compile
                _common.say(
                    f"rep {rep + 1}/{args.reps} stage {stage:<4} {variant:<13} run {seconds:5.1f}s, "
                    f"steady step {1e3 * _common.median(got['interval']):.1f} ms, "
                    f"epoch gap {1e3 * _common.median(got['gap']):.0f} ms"
                )
            if rep == args.reps - 1 and args.micro_steps and "tlkit" in variants and "hand" in variants:
                micro[stage] = interleaved_steps(tl_model, hands["hand"][0], train, args.micro_steps)
                _common.say(f"stage {stage}: {args.micro_steps} step pairs interleaved one by one: tlkit/hand "
                            f"{micro[stage]['ratio']:.3f}")

    rows, ratios, fixed = [], {}, []
    images = args.batch_size
    for stage in stages:
        reference = samples.get((stage, "hand"))
        for variant in variants:
            s = samples[(stage, variant)]
            step = _common.median(s["interval"])
            compute = _common.median(s["compute"])
            epoch = _common.median(s["epoch"])
            ratio = ""
            if reference and variant != "hand":
                r = _common.median(reference["interval"]) / step
                paired = [h / t for h, t in zip(reference["rep_step"], s["rep_step"])]
                ratios[f"{stage}/{variant}"] = {
                    "steps_per_s": r,
                    "paired": paired,
                    "cpu": _common.median(reference["cpu_interval"]) / _common.median(s["cpu_interval"]),
                    "train_function": _common.median(reference["compute"]) / compute,
                    "epoch": _common.median(reference["epoch"]) / epoch,
                }
                ratio = f"{r:.3f}"
            rows.append((
                stage, variant, "on" if jit[(stage, variant)] else "off", len(s["interval"]),
                f"{1e3 * step:.1f}", f"{1 / step:.2f}", f"{images / step:.0f}", f"{1e3 * compute:.1f}",
                f"{1e3 * _common.median(s['cpu_interval']):.0f}", f"{epoch:.2f}", "1 (ref)" if variant == "hand" else ratio,
                "1 (ref)" if variant == "hand" else (f"{ratios[f'{stage}/{variant}']['cpu']:.3f}" if reference else ""),
            ))
            fixed.append((
                stage, variant, f"{_common.median(s['setup']):.2f}", f"{_common.median(s['first_step']):.2f}",
                f"{1e3 * _common.median(s['gap']):.0f} / {1e3 * min(s['gap']):.0f}", f"{_common.median(s['teardown']):.2f}",
                f"{_common.median(s['run']):.1f}",
            ))
    print()
    print(f"Training throughput, {spec.name} at {size[0]}x{size[1]}, batch {args.batch_size}, "
          f"{len(examples)} images, {args.epochs - 1} steady epochs x {args.reps} reps per variant (medians)")
    print(_common.table(
        ("stage", "variant", "XLA", "steps", "step ms", "steps/s", "img/s", "train_fn ms", "CPU ms/step", "epoch s",
         "steps/s ratio", "CPU-time ratio"),
        rows,
    ))
    print()
    print("Per-run fixed costs (medians, seconds; 'epoch gap': last step of an epoch to the first of the next, "
          "median / lowest, ms)")
    print(_common.table(
        ("stage", "variant", "setup+compile", "first step (trace)", "epoch gap ms", "after last step",
         f"run ({args.epochs} epochs)"),
        fixed,
    ))
    print()
    ok = True
    for key, r in ratios.items():
        if not key.endswith("/tlkit"):
            continue
        verdict = "meets" if r["steps_per_s"] >= TARGET else "MISSES"
        ok &= r["steps_per_s"] >= TARGET
        paired = r["paired"]
        print(
            f"{key.split('/')[0]}: tlkit/hand steps/s ratio {r['steps_per_s']:.3f} ({verdict} the {TARGET} target); "
            f"per repetition {_common.median(paired):.3f} median, {min(paired):.3f}..{max(paired):.3f}; "
            f"on CPU time per step {r['cpu']:.3f}; "
            f"train_function alone {r['train_function']:.3f}; whole epochs incl. end-of-epoch callbacks {r['epoch']:.3f}"
        )
    for stage, m in micro.items():
        print(f"{stage}: the compiled training steps alone (the ones fine_tune and fit built, alternated step by step "
              f"on the same {len(m['tlkit'])} batches): tlkit {1e3 * _common.median(m['tlkit']):.1f} ms, hand "
              f"{1e3 * _common.median(m['hand']):.1f} ms, ratio {m['ratio']:.3f}")
    for key, r in ratios.items():
        if key.endswith("/tlkit_model_fit"):
            stage = key.split("/")[0]
            loop = ratios.get(f"{stage}/tlkit", {}).get("steps_per_s", float("nan")) / r["steps_per_s"]
            print(f"{stage}: tlkit's model in a plain compile+fit vs hand: steps/s x{r['steps_per_s']:.3f} (the model); "
                  f"fine_tune vs plain fit of the same model: x{loop:.3f} (the loop)")
        if key.endswith("/hand_pipeline"):
            print(f"{key.split('/')[0]}: preprocessing in tf.data instead of in the model: steps/s x{r['steps_per_s']:.3f} "
                  "vs the hand-written model that preprocesses in the model")
    # What one checkpoint costs: fine_tune keeps the best epoch in memory and writes its resume
    # backup on a time budget (at most 1/20 of the time between backups) and at the stage's end.
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        saves = []
        for _ in range(3):
            start = time.perf_counter()
            tl_model.save_weights(Path(folder) / "probe.weights.h5")
            saves.append(time.perf_counter() - start)
        size_mb = (Path(folder) / "probe.weights.h5").stat().st_size / 1e6
    save_ms = 1e3 * _common.median(saves)
    print(f"one full-model save_weights ({size_mb:.1f} MB): {save_ms:.0f} ms; fine_tune writes a resume backup at most "
          "every 20x that time and at each stage's end, none without a run directory")
    _common.write_json(args.json, {
        "save_weights_ms": save_ms, "interleaved": micro,
        "machine": info, "args": vars(args), "steps_per_epoch": steps, "images": len(examples),
        "ratios": ratios, "samples": {f"{k[0]}/{k[1]}": v for k, v in samples.items()},
        "jit": {f"{k[0]}/{k[1]}": bool(v) for k, v in jit.items()},
    })
    work.cleanup()
    return 0 if ok else 1


def interleaved_steps(tl_model: Any, hand: Any, train: Any, pairs: int) -> dict[str, Any]:
    """Alternates the two models' compiled training steps one by one on the same full batches.

    Uses the functions the last ``fine_tune`` / ``fit`` calls compiled (so the same
    trainable state, optimizer and metrics); the order inside a pair alternates too.
    Seconds per step for each, and the ratio hand/tlkit of the medians (> 1: tlkit faster).
    """
    full = [b for b in train.batched().take(train.steps) if int(b[0].shape[0]) == train.batch_size]
    functions = {"tlkit": tl_model.train_function, "hand": hand.train_function}
    for fn in functions.values():
        fn(iter([full[0]]))  # warm up
    times: dict[str, list[float]] = {"tlkit": [], "hand": []}
    for i in range(pairs):
        batch = full[i % len(full)]
        for name in (("tlkit", "hand") if i % 2 == 0 else ("hand", "tlkit")):
            start = time.perf_counter()
            functions[name](iter([batch]))
            times[name].append(time.perf_counter() - start)
    return {**times, "ratio": _common.median(times["hand"]) / _common.median(times["tlkit"])}


def run_variant(variant: str, stage: str, lr: float, epochs: int, tl_model: Any, hands: dict[str, Any],
                train: Any, pipeline_ds: Any) -> None:
    import keras

    import tlkit

    if variant == "tlkit":
        unfreeze = 0 if stage == "head" else "all"
        decay = 0.5 if stage == "glr" else 1.0
        # solver="sgd": the head trains epoch by epoch like the hand-written fit (by default tlkit
        # solves a head-only stage on cached features instead; benchmarks/cached_head.py measures that).
        schedule = tlkit.Schedule((tlkit.Stage(stage, epochs, unfreeze, lr, group_lr_decay=decay, solver="sgd"),))
        with tempfile.TemporaryDirectory(prefix="tlkit-bench-run-") as run_dir:  # a real run directory
            tlkit.fine_tune(tl_model, train, schedule=schedule, feature_cache="off", run_dir=run_dir, verbose=0)
        return
    if variant == "tlkit_model_fit":  # tlkit's classifier, trained by a plain compile + fit
        model = tl_model
        tl_model.tlkit_groups.set_trainable(0 if stage == "head" else "all", freeze_batchnorm=True)
    else:
        model, base = hands[variant]
        configure_hand(base, stage)
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if int(model.output.shape[-1]) > 3:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(k=3, name="top3_accuracy"))
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=keras.losses.CategoricalCrossentropy(), metrics=metrics)
    data = pipeline_ds if variant == "hand_pipeline" else train.batched()
    model.fit(data, epochs=epochs, verbose=0)


if __name__ == "__main__":
    sys.exit(main())
