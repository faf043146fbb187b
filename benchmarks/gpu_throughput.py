"""Images/s of tlkit classifiers with and without mixed precision and XLA (meant for a GPU).

For each backbone (default MobileNetV2 and ResNet50) and each combination of precision
policy (``float32``, ``mixed_float16``) and XLA (``jit_compile`` off / on, or ``auto``: what
Keras decides, printed as ``auto->on`` / ``auto->off``) it measures:

* *train*: steady-state images/s of ``tlkit.fine_tune`` running one stage with every
  backbone group thawed (BatchNorm frozen, tlkit's default), feature cache off;
* *infer*: images/s of the classifier's forward pass (``training=False``) on one batch in
  a ``tf.function`` with the same ``jit_compile``.

Input is synthetic: random 0..255 pixels at the backbone's input size held in memory, so
the figures are the model's, not the input pipeline's (see ``input_pipeline.py`` for that).
Weights are random unless pretrained ones are available offline; throughput does not
depend on them. The first epoch of every training run (tracing, XLA compilation) is
dropped; configurations run in rotating order over ``--reps`` repetitions; medians.

``--augment none,default`` also trains with tlkit's default ``ImageAugmentation()`` (flip +
zoom, XLA-compatible since ``RandomAffine``); ``--augment default --xla auto`` is what a
default ``tlkit train`` gets on a GPU (``benchmarks/augment_xla.py`` compares it with Keras's
``RandomZoom``, which kept XLA off).

On a GPU machine: ``python benchmarks/gpu_throughput.py`` (batch 64 at 224x224).
On a CPU: ``--quick`` (MobileNetV2 only, 64x64, batch 8; about 2 minutes on 2 cores: a
smoke test of the script, not a GPU figure; XLA compilation dominates it). Add
``--backbones mobilenet_v2,resnet50`` for both (about 6 minutes).
"""

from __future__ import annotations

import _common  # noqa: I001  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)

import argparse
import sys
import time
from typing import Any


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default=None, help="comma list (default mobilenet_v2,resnet50; --quick: mobilenet_v2)")
    p.add_argument("--precisions", default="float32,mixed_float16",
                   help="comma list of Keras dtype policies (mixed_bfloat16 also works)")
    p.add_argument("--xla", default="off,on", help="comma list of off, on, auto")
    p.add_argument("--augment", default="none", help="comma list of none, default (tlkit's ImageAugmentation())")
    p.add_argument("--image-size", type=int, default=0, help="default: the backbone's own (224)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="training steps per epoch")
    p.add_argument("--epochs", type=int, default=3, help="training epochs per run; the first is dropped")
    p.add_argument("--infer-calls", type=int, default=30)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--quick", action="store_true", help="64x64, batch 8, few steps, 1 repetition (CPU smoke test)")
    p.add_argument("--json", help="also write the raw figures to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.batch_size, args.steps, args.epochs, args.infer_calls, args.reps = 64, 8, 4, 2, 5, 1
        args.backbones = args.backbones or "mobilenet_v2"
    args.backbones = args.backbones or "mobilenet_v2,resnet50"
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first is dropped)")
    if not {x.strip() for x in args.xla.split(",")} <= {"off", "on", "auto"}:
        p.error(f"--xla takes a comma list of off, on, auto; got {args.xla!r}")
    if not {a.strip() for a in args.augment.split(",")} <= {"none", "default"}:
        p.error(f"--augment takes a comma list of none, default; got {args.augment!r}")
    return args


def build(spec: Any, policy: str, size: int, augment: str = "none") -> Any:
    import keras

    import tlkit
    from tlkit.backbones.loading import available_offline

    keras.mixed_precision.set_global_policy(policy)
    try:
        weights = "pretrained" if available_offline(spec) else None
        keras.utils.set_random_seed(0)
        augmentation = tlkit.ImageAugmentation() if augment == "default" else None
        return tlkit.build_classifier(spec, 10, weights=weights, image_size=size, augmentation=augmentation)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def synthetic_batches(steps: int, batch_size: int, size: int, classes: int = 10) -> tuple[Any, Any]:
    """``(pixels, Batches)``: ``steps * batch_size`` random 0..255 images (size, size, 3) with
    one-hot labels of ``classes`` classes, cached in memory and iterated once (warm)."""
    import numpy as np
    import tensorflow as tf

    from tlkit.data.batches import Batches

    rng = np.random.default_rng(0)
    count = steps * batch_size
    pixels = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8).astype(np.float32)
    labels = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, count)]
    train = Batches(tf.data.Dataset.from_tensor_slices((pixels, labels)).cache(), count, batch_size)
    _common.warm(train.examples)
    return pixels, train


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = _common.machine()
    _common.print_machine(info)
    if not info["gpus"]:
        _common.say("no GPU found: these are CPU figures (fine for checking the script, not GPU throughput)")

    import tensorflow as tf

    import tlkit

    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    xla_modes: list[bool | str] = [{"on": True, "off": False}.get(x.strip(), x.strip())
                                   for x in args.xla.split(",") if x.strip()]
    augments = [a.strip() for a in args.augment.split(",") if a.strip()]
    resolved: dict[str, str] = {}  # what "auto" became, per configuration
    results: dict[str, dict[str, list[float]]] = {}
    rows = []
    for name in backbones:
        spec = tlkit.get(name)
        size = args.image_size or spec.image_size[0]
        pixels, train = synthetic_batches(args.steps, args.batch_size, size)
        batch = tf.constant(pixels[: args.batch_size])
        models = {(policy, aug): build(spec, policy, size, aug) for policy in precisions for aug in augments}
        timers = {key: _common.StepTimer().attach(model) for key, model in models.items()}
        configs = [(policy, aug, xla) for policy in precisions for aug in augments for xla in xla_modes]
        for rep in range(args.reps):
            shift = rep % len(configs)
            for policy, aug, xla in configs[shift:] + configs[:shift]:
                key = _key(name, policy, aug, xla)
                record = results.setdefault(key, {"train": [], "infer": []})
                model = models[(policy, aug)]
                if not args.skip_train:
                    timer = timers[(policy, aug)]
                    timer.reset()
                    stage = tlkit.Stage("all", args.epochs, "all", 1e-4)
                    tlkit.fine_tune(model, train, schedule=tlkit.Schedule((stage,)), feature_cache="off",
                                    jit_compile=xla, verbose=0)
                    record["train"].extend(timer.steady(args.steps)["interval"])
                    resolved[key] = "on" if model.jit_compile else "off"
                infer_xla = bool(model.jit_compile) if xla == "auto" else xla  # never compiled: resolves now
                resolved.setdefault(key, "on" if infer_xla else "off")
                forward = tf.function(lambda x, m=model: m(x, training=False), jit_compile=infer_xla)
                for _ in range(3):
                    forward(batch).numpy()  # trace, compile, warm up
                for _ in range(args.infer_calls):
                    start = time.perf_counter()
                    forward(batch).numpy()
                    record["infer"].append(time.perf_counter() - start)
                _common.say(
                    f"rep {rep + 1}/{args.reps} {key}: train "
                    f"{args.batch_size / _common.median(record['train']) if record['train'] else float('nan'):.1f} img/s, "
                    f"infer {args.batch_size / _common.median(record['infer']):.1f} img/s"
                )
        base = results[_key(name, *configs[0])]
        for policy, aug, xla in configs:
            key = _key(name, policy, aug, xla)
            r = results[key]
            train_ips = args.batch_size / _common.median(r["train"]) if r["train"] else float("nan")
            infer_ips = args.batch_size / _common.median(r["infer"])
            base_train = args.batch_size / _common.median(base["train"]) if base["train"] else float("nan")
            base_infer = args.batch_size / _common.median(base["infer"])
            rows.append((
                name, f"{size}x{size}", policy, aug, _xla_label(xla, resolved.get(key)), f"{train_ips:.1f}", f"{train_ips / base_train:.2f}x",
                f"{infer_ips:.1f}", f"{infer_ips / base_infer:.2f}x",
            ))
    device = ", ".join(info["gpus"]) if info["gpus"] else f"CPU only ({info['cpu']}, {info['cores']} cores)"
    print()
    print(f"Throughput on {device}, batch {args.batch_size}, synthetic in-memory input, medians of {args.reps} reps; "
          f"speed-ups against {precisions[0]}, augmentation {augments[0]}, XLA {_xla_label(xla_modes[0], None)}")
    print(_common.table(
        ("backbone", "input", "precision", "augment", "XLA", "train img/s", "train speed-up", "infer img/s", "infer speed-up"),
        rows,
    ))
    _common.write_json(args.json, {"machine": info, "args": vars(args), "results": results, "xla": resolved})
    return 0


def _xla_label(xla: bool | str, resolved: str | None) -> str:
    if xla == "auto":
        return f"auto->{resolved}" if resolved else "auto"
    return "on" if xla else "off"


def _key(name: str, policy: str, aug: str, xla: bool | str) -> str:
    return f"{name}/{policy}/augment={aug}/xla={_xla_label(xla, None)}"


if __name__ == "__main__":
    sys.exit(main())
