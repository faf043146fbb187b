"""Steps/s of an augmented tlkit fit, Keras's RandomZoom (XLA off) against tlkit's RandomAffine (XLA on).

Keras's ``jit_compile="auto"`` turns XLA on only when every layer has ``supports_jit``.
``keras.layers.RandomZoom`` (like RandomRotation and RandomTranslation) does not, so the old
default augmentation (horizontal flip + zoom 0.1) kept XLA off for the whole model;
:class:`tlkit.layers.RandomAffine` does the same zoom with gathers and lets XLA in. Variants:

* ``before``: flip + ``keras.layers.RandomZoom(0.1, fill_mode="reflect")``, XLA as "auto"
  decides on a GPU (off);
* ``after, XLA off``: tlkit's default ``ImageAugmentation()`` (flip + RandomAffine), XLA off:
  the cost of the layer alone;
* ``after``: the same with XLA as "auto" decides on a GPU (on).

Each variant runs ``tlkit.fine_tune`` twice: a head stage (SGD, backbone frozen) and a stage
with every backbone group thawed (BatchNorm frozen), feature cache off, on synthetic in-memory
pixels. The first epoch of each (tracing, XLA compilation) is dropped; variants rotate over
``--reps``; medians of the per-step intervals.

On a CPU-only machine "auto" always means XLA off (Keras's rule), so the script passes what
"auto" decides on a GPU (``model_supports_jit``) explicitly. On a GPU it passes ``"auto"``
itself and prints what Keras resolved. ``python benchmarks/augment_xla.py`` (MobileNetV2,
random weights, 96x96, batch 32; about 5 minutes on 2 CPU cores, XLA on dominating); ``--quick`` 64x64, fewer
steps; on a GPU add ``--image-size 224 --batch-size 64``.
"""

from __future__ import annotations

import _common  # noqa: I001  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)

import argparse
import sys
from typing import Any

import gpu_throughput

VARIANTS = ("before", "after, XLA off", "after")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="training steps per epoch")
    p.add_argument("--epochs", type=int, default=2, help="epochs per stage; the first is dropped")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="64x64, 6 steps per epoch")
    p.add_argument("--json", help="also write the raw figures to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.steps = 64, 6
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first is dropped)")
    return args


class KerasZoomAugmentation:
    """tlkit's previous default augmentation: flip + Keras's RandomZoom (``supports_jit=False``)."""

    def build_layer(self, spec: Any, seed: int | None = None) -> Any:
        import keras

        from tlkit.layers import TrainingOnly

        return TrainingOnly([keras.layers.RandomFlip("horizontal", seed=seed),
                             keras.layers.RandomZoom(0.1, fill_mode="reflect", seed=seed)], name="augment")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    info = _common.machine()
    _common.print_machine(info)

    import keras
    from keras.src.trainers.trainer import model_supports_jit

    import tlkit

    gpu = bool(info["gpus"])
    if not gpu:
        _common.say("no GPU: passing what jit_compile='auto' decides on a GPU (model_supports_jit) explicitly")
    spec = tlkit.get(args.backbone)
    size = args.image_size
    _, train = gpu_throughput.synthetic_batches(args.steps, args.batch_size, size)

    models, jit, timers = {}, {}, {}
    for variant in VARIANTS:
        keras.utils.set_random_seed(0)
        augmentation = KerasZoomAugmentation() if variant == "before" else tlkit.ImageAugmentation()
        model = tlkit.build_classifier(spec, 10, weights=None, image_size=size, augmentation=augmentation)
        models[variant] = model
        supported = model_supports_jit(model)
        jit[variant] = False if variant == "after, XLA off" else ("auto" if gpu else supported)
        timers[variant] = _common.StepTimer().attach(model)
        _common.say(f"{variant}: every layer supports_jit = {supported}")

    stages = {"head": tlkit.Stage("head", args.epochs, 0, 1e-3, solver="sgd"),
              "thawed": tlkit.Stage("thawed", args.epochs, "all", 1e-4)}
    results: dict[str, dict[str, list[float]]] = {v: {s: [] for s in stages} for v in VARIANTS}
    resolved: dict[str, bool] = {}
    for rep in range(args.reps):
        for variant in VARIANTS[rep % 3:] + VARIANTS[: rep % 3]:
            model, timer = models[variant], timers[variant]
            for stage_name, stage in stages.items():
                timer.reset()
                tlkit.fine_tune(model, train, schedule=tlkit.Schedule((stage,)), feature_cache="off",
                                jit_compile=jit[variant], verbose=0)
                resolved[variant] = bool(model.jit_compile)
                results[variant][stage_name].extend(timer.steady(args.steps)["interval"])
            _common.say(f"rep {rep + 1}/{args.reps} {variant}: " + ", ".join(
                f"{s} {1 / _common.median(results[variant][s]):.2f} steps/s" for s in stages))

    def steps_per_s(variant: str) -> float:  # equal steps in both stages: 2 / (t_head + t_thawed)
        return 2 / sum(_common.median(results[variant][s]) for s in stages)

    rows = []
    for variant in VARIANTS:
        layer = "keras RandomZoom" if variant == "before" else "tlkit RandomAffine"
        rows.append((variant, layer, "on" if resolved[variant] else "off",
                     *(f"{1 / _common.median(results[variant][s]):.2f}" for s in stages),
                     f"{steps_per_s(variant):.2f}", f"{steps_per_s(variant) / steps_per_s('before'):.2f}x"))
    device = ", ".join(info["gpus"]) if gpu else f"CPU only ({info['cpu']}, {info['cores']} cores)"
    print()
    print(f"{args.backbone} (random weights) at {size}x{size}, batch {args.batch_size}, {device}; "
          f"flip + zoom 0.1; medians of {args.reps} reps x {args.epochs - 1} epochs x {args.steps} steps")
    print(_common.table(("variant", "zoom layer", "XLA", "head steps/s", "thawed steps/s", "head+thawed steps/s",
                         "vs before"), rows))
    _common.write_json(args.json, {"machine": info, "args": vars(args), "results": results, "xla": resolved})
    print(f"ratio {steps_per_s('after') / steps_per_s('before'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
