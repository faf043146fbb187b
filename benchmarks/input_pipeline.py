"""Share of training step time spent waiting for input from tlkit's image pipeline.

Data: scikit-learn's 1797 real handwritten digits written as PNG class folders by
``tlkit.sample_data.write_digits`` at ``--file-size`` pixels (upscaled, so decoding costs
about what a small photo does), read by ``tlkit.data.make_batches`` exactly as
``fine_tune`` reads them: parallel decode, resize once, in-memory cache, shuffle, batch,
prefetch (``Batches.batched()``; ``make_dataset`` is the same pipeline).

The consumer is a tlkit classifier's real training step (``build_classifier``,
``augmentation=None``; by default the head-only stage, backbone frozen: the cheapest step
and so the one most exposed to a slow pipeline), compiled by Keras as ``fit`` compiles it.

Three measurements, alternated over ``--reps`` repetitions, medians reported:

1. *wait share* (the headline): a loop ``x, y = next(iterator); train_step(x, y)``; the
   time in ``next`` is time spent waiting for input. Share = wait / (wait + step), within
   epochs; the epoch boundary (destroying the previous epoch's iterator, opening a new one
   and filling its shuffle buffer for the first batch, which ``fit`` does too) is
   reported beside it, and in a second share that includes it. Reported for the first
   epoch of a fresh pipeline (every file decoded: *cold*), for later epochs (served from
   the decode cache: *warm*), and for ``cache=False`` (decoded every epoch).
2. *data only*: batches/s of the pipeline iterated alone, against the steps/s of training:
   the pipeline's headroom.
3. *fit cross-check*: steady-state step time of ``model.fit`` on the real (cached)
   pipeline against ``fit`` on one batch held in memory (no input work at all), in wall
   time and in process CPU time: ``1 - in-memory/real`` bounds the input's cost inside
   ``fit`` (waiting, plus the pipeline's own CPU work on shared cores).

Run: ``.venv/bin/python benchmarks/input_pipeline.py`` (about 5 minutes on 2 cores) or
``--quick`` (about 1 minute).
"""

from __future__ import annotations

import _common  # noqa: I001  (sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads)

import argparse
import sys
import time
from typing import Any

TARGET = 0.05


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", choices=("auto", "random", "pretrained"), default="auto")
    p.add_argument("--image-size", type=int, default=96, help="training resolution")
    p.add_argument("--file-size", type=int, default=160, help="side of the PNG files written")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--per-class", type=int, default=0, help="digit images per class, 0 = all (1797)")
    p.add_argument("--unfreeze", default="0", help="backbone groups trained: 0 (head only, default) or 'all'")
    p.add_argument("--epochs", type=int, default=3, help="epochs per loop run (the first is the cold one)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="500 images, 2 repetitions")
    p.add_argument("--json", help="also write the raw figures to this file")
    p.add_argument("--memory", action="store_true",
                   help="only measure peak RSS of the cached, shuffled pipeline: 2,000 images at 224 px, "
                        "float32 storage (tlkit 0.1) against uint8 (now), each in a fresh process")
    p.add_argument("--memory-variant", choices=("float32", "uint8"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.per_class, args.reps = 50, 2
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is the cold one)")
    return args


def timed_loop(batches: Any, train_function: Any, epochs: int) -> list[dict[str, float]]:
    """One record per epoch, in seconds: ``wait`` (in ``next`` for batches 2..n), ``open``
    (a new iterator and its first batch: shuffle buffer filling), ``release`` (destroying
    the previous epoch's iterator, as ``fit`` does at every epoch boundary), ``step`` (in
    the train step), and ``steps``."""
    records = []
    iterator = None
    for _ in range(epochs):
        start = time.perf_counter()
        iterator = None  # the previous epoch's iterator is destroyed here
        released = time.perf_counter()
        iterator = iter(batches)
        wait = step = opened = 0.0
        steps = 0
        before = released
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                wait += time.perf_counter() - before
                break
            got = time.perf_counter()
            if steps == 0:
                opened = got - released
            else:
                wait += got - before
            train_function(iter([batch]))  # the same compiled step fit runs, fed one batch
            before = time.perf_counter()
            step += before - got
            steps += 1
        records.append({"wait": wait, "open": opened, "release": released - start, "step": step, "steps": steps})
    return records


def data_only(batches: Any) -> tuple[float, int]:
    start = time.perf_counter()
    count = sum(1 for _ in batches)
    return time.perf_counter() - start, count


def memory_variant(variant: str, folder: str) -> None:
    """One epoch through the cached, shuffled pipeline (2,000 images at 224 px), then peak RSS."""
    import resource

    import tensorflow as tf

    from tlkit.data.batches import Batches
    from tlkit.data.images import decode_and_resize, make_batches

    from tlkit.data.images import load_splits

    listed = load_splits(folder, val_fraction=0.0, test_fraction=0.0)
    examples, class_names = (listed.train * 2)[:2000], listed.class_names  # 1,797 real scans, the first 203 listed twice
    size = (224, 224)
    batches = make_batches(examples, class_names, size, 32, training=True, seed=0)
    if variant == "float32":  # tlkit 0.1: the resized float32 pixels cached and shuffled
        paths = tf.constant([e.path for e in examples])
        targets = next(iter(batches.examples.batch(len(examples))))[1]
        ds = tf.data.Dataset.from_tensor_slices((paths, targets)).map(
            lambda p, t: (decode_and_resize(p, size), t), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        batches = Batches(ds.cache(), len(examples), 32, shuffle=True, seed=0)
    for _ in batches.batched():
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(f"MEMORY {variant} {peak:.0f}")


def measure_memory() -> int:
    import subprocess

    work = _common.scratch("memory")
    folder = _common.digits_folder(work.name, None, size=160)  # written once, outside the measured processes
    peaks = {}
    for variant in ("float32", "uint8"):
        out = subprocess.run([sys.executable, __file__, "--memory-variant", variant, "--json", str(folder)],
                             capture_output=True, text=True, check=True)
        peaks[variant] = float(next(line.split()[2] for line in out.stdout.splitlines() if line.startswith("MEMORY")))
    print(_common.table(("pixel storage", "peak RSS, 2,000 images at 224 px, one epoch"),
                        [(k, f"{v:.0f} MiB") for k, v in peaks.items()]))
    print(f"peak RSS ratio float32/uint8: {peaks['float32'] / peaks['uint8']:.2f}x "
          f"(raw pixels: {2000 * 224 * 224 * 3 * 4 / 2**20:.0f} MiB float32, {2000 * 224 * 224 * 3 / 2**20:.0f} MiB uint8)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.memory_variant:
        memory_variant(args.memory_variant, args.json)
        return 0
    info = _common.machine()
    _common.print_machine(info)
    if args.memory:
        return measure_memory()

    import keras
    import tensorflow as tf

    import tlkit
    from tlkit.data.images import make_batches
    from tlkit.model import classification_loss, classification_metrics

    spec, weights = _common.backbone_and_weights(args.backbone, args.weights)
    size = (args.image_size, args.image_size)
    work = _common.scratch("input")
    examples, class_names = _common.digits_examples(work.name, args.per_class or None, size=args.file_size)

    def pipeline(cache: bool) -> Any:
        return make_batches(examples, class_names, size, args.batch_size, training=True, seed=0, cache=cache)

    steps = pipeline(True).steps
    _common.say(
        f"{len(examples)} digit PNGs written at {args.file_size}x{args.file_size}, decoded and resized to "
        f"{size[0]}x{size[1]} by tlkit.data.make_batches; batch {args.batch_size}, {steps} steps/epoch; "
        f"consumer: {spec.name} (weights={weights or 'random'}) training step, unfreeze={args.unfreeze}"
    )
    keras.utils.set_random_seed(0)
    model = tlkit.build_classifier(spec, len(class_names), weights=weights, image_size=size, augmentation=None)
    unfreeze: int | str = args.unfreeze if args.unfreeze == "all" else int(args.unfreeze)
    model.tlkit_groups.set_trainable(unfreeze)
    head = model.tlkit_head
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=classification_loss(head),
                  metrics=classification_metrics(head, len(class_names)))
    model.make_train_function()
    train_function = model.train_function
    warm_batch = next(iter(pipeline(False).batched()))
    for _ in range(2):
        train_function(iter([warm_batch]))  # trace and warm up outside the timing

    loops: dict[str, list[dict[str, float]]] = {"cold": [], "warm": [], "no cache": []}
    data: dict[str, list[float]] = {"cold": [], "warm": [], "no cache": []}
    fit: dict[str, list[float]] = {"pipeline": [], "in memory": []}
    fit_cpu: dict[str, list[float]] = {"pipeline": [], "in memory": []}
    timer = _common.StepTimer().attach(model)
    memory = tf.data.Dataset.from_tensors(warm_batch).repeat(steps)
    for rep, order in enumerate(_common.alternate(args.reps, ["cached", "no cache"])):
        for variant in order:
            batches = pipeline(variant == "cached").batched()
            epochs = timed_loop(batches, train_function, args.epochs)
            if variant == "cached":
                loops["cold"].append(epochs[0])
                loops["warm"].extend(epochs[1:])
            else:
                loops["no cache"].extend(epochs)
            fresh = pipeline(variant == "cached").batched()
            seconds, count = data_only(fresh)
            if variant == "cached":
                data["cold"].append(seconds / count)
                seconds, count = data_only(fresh)
                data["warm"].append(seconds / count)
            else:
                data["no cache"].append(seconds / count)
            _common.say(f"rep {rep + 1}/{args.reps} {variant}: per epoch wait share (start ms, release ms) "
                        + ", ".join(f"{e['wait'] / (e['wait'] + e['step']):.1%} ({1e3 * e['open']:.0f}, "
                                    f"{1e3 * e['release']:.0f})" for e in epochs))
        # fit cross-check, alternating the two inputs; the first epoch of each fit is dropped
        cached_pipeline = pipeline(True)
        _common.warm(cached_pipeline.examples)
        for variant in (["pipeline", "in memory", "pipeline", "in memory"] if rep % 2 == 0
                        else ["in memory", "pipeline", "in memory", "pipeline"]):
            timer.reset()
            ds = cached_pipeline.batched() if variant == "pipeline" else memory
            model.fit(ds, epochs=3, verbose=0)
            got = timer.steady(steps)
            fit[variant].extend(got["interval"])
            fit_cpu[variant].extend(got["cpu_interval"])

    def share(records: list[dict[str, float]], boundaries: bool = False) -> float:
        def one(r: dict[str, float]) -> float:
            waited = r["wait"] + (r["open"] + r["release"] if boundaries else 0.0)
            return waited / (waited + r["step"])

        return _common.median([one(r) for r in records])

    def per_step(records: list[dict[str, float]], key: str) -> float:
        return _common.median([r[key] / r["steps"] for r in records])

    def per_epoch(records: list[dict[str, float]], key: str) -> float:
        return _common.median([r[key] for r in records])

    rows = []
    for name, records in loops.items():
        step = per_step(records, "step")
        batch = _common.median(data[name])
        rows.append((
            name, len(records), f"{1e3 * per_step(records, 'wait'):.2f}", f"{1e3 * step:.1f}",
            f"{share(records):.2%}", f"{1e3 * per_epoch(records, 'open'):.0f}",
            f"{1e3 * per_epoch(records, 'release'):.0f}", f"{share(records, True):.2%}",
            f"{1e3 * batch:.2f}", f"{step / batch:.1f}x",
        ))
    print()
    print(f"Input wait, tlkit make_batches -> {spec.name} training step at {size[0]}x{size[1]}, batch {args.batch_size}, "
          f"{len(examples)} PNGs of {args.file_size}x{args.file_size}, {args.reps} reps (medians per epoch)")
    print(_common.table(
        ("pipeline epoch", "epochs", "wait ms/step", "step ms", "wait share", "epoch start ms",
         "old iterator release ms", "share incl. epoch boundaries", "data-only ms/batch", "pipeline headroom"),
        rows,
    ))
    real, mem = _common.median(fit["pipeline"]), _common.median(fit["in memory"])
    fit_share = 1 - mem / real
    print()
    cpu_real, cpu_mem = _common.median(fit_cpu["pipeline"]), _common.median(fit_cpu["in memory"])
    print(f"fit cross-check (steady epochs, cached pipeline): {1e3 * real:.1f} ms/step on the pipeline vs "
          f"{1e3 * mem:.1f} ms/step on one in-memory batch: {fit_share:+.1%} of wall time "
          f"(process CPU time per step {1e3 * cpu_real:.1f} vs {1e3 * cpu_mem:.1f} ms: {1 - cpu_mem / cpu_real:+.1%}; "
          "a gap that shows in CPU time too is work, e.g. tf.data threads sharing the 2 cores, not waiting)")
    warm_share = share(loops["warm"])
    verdict = "meets" if warm_share <= TARGET else "MISSES"
    print(f"steady-state (warm cache) wait share within epochs {warm_share:.2%} ({verdict} the <= {TARGET:.0%} target); "
          f"with epoch boundaries {share(loops['warm'], True):.2%}; first epoch (decoding every file) "
          f"{share(loops['cold']):.2%} / {share(loops['cold'], True):.2%}; without the cache "
          f"{share(loops['no cache']):.2%} / {share(loops['no cache'], True):.2%}")
    _common.write_json(args.json, {
        "machine": info, "args": vars(args), "images": len(examples), "loops": loops, "data_only": data,
        "fit": fit, "fit_cpu": fit_cpu, "warm_share": warm_share, "fit_share": fit_share,
    })
    work.cleanup()
    return 0 if warm_share <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
