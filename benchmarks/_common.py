"""Shared helpers of the benchmark scripts: machine facts, timers, digit data, tables.

Imported as ``_common`` by the scripts beside it (``python benchmarks/<script>.py`` puts
this folder first on ``sys.path``). Nothing here is part of tlkit's API.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported anywhere

import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras


def machine() -> dict[str, Any]:
    """Cores, CPU model, load, GPUs and library versions of this machine."""
    import keras
    import tensorflow as tf

    import tlkit

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    details = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            details.append(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name))
        except Exception:  # pragma: no cover - depends on the driver
            details.append(gpu.name)
    return {
        "cpu": model,
        "cores": usable,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "gpus": details or gpus,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tlkit": tlkit.__version__,
    }


def print_machine(info: dict[str, Any]) -> None:
    gpu = ", ".join(info["gpus"]) if info["gpus"] else "none"
    print(
        f"machine: {info['cpu']}, {info['cores']} cores usable, load {info['load_avg_1m']} at start, GPU: {gpu}; "
        f"Python {info['python']}, TensorFlow {info['tensorflow']}, Keras {info['keras']}, tlkit {info['tlkit']}",
        flush=True,
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    from tlkit.text import format_table

    return format_table(headers, rows)


def backbone_and_weights(name: str, choice: str) -> tuple[Any, str | None]:
    """The backbone's spec and the ``weights`` argument for ``--weights auto|random|pretrained``
    (``auto``: pretrained when available offline, else random init)."""
    from tlkit.backbones import available_offline, get

    spec = get(name)
    if choice == "auto":
        return spec, "pretrained" if available_offline(spec) else None
    return spec, "pretrained" if choice == "pretrained" else None


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Writes the raw figures when ``--json PATH`` was given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
        say(f"raw figures written to {path}")


class StepTimer:
    """Records the start and end of every ``train_function`` call of a Keras model.

    It wraps the function ``fit`` builds (by patching ``make_train_function`` on the model
    instance), so it adds one ``perf_counter`` pair per step and, unlike a callback with
    batch hooks, does not change how Keras dispatches callbacks. On the TensorFlow
    backend a step includes fetching its batch from the ``tf.data`` iterator.
    """

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.cpu_starts: list[float] = []  # process CPU time (all threads): robust to other users' load

    def reset(self) -> None:
        self.starts.clear()
        self.ends.clear()
        self.cpu_starts.clear()

    def attach(self, model: Any) -> "StepTimer":
        original = model.make_train_function
        timer = self

        def make_train_function(force: bool = False) -> Any:
            original(force)
            inner = model.train_function
            if getattr(inner, "_bench_timed", False):
                return inner

            def timed(iterator: Any) -> Any:
                cpu, start = time.process_time(), time.perf_counter()
                logs = inner(iterator)  # raises StopIteration past the end of the data: not a step
                timer.ends.append(time.perf_counter())
                timer.starts.append(start)
                timer.cpu_starts.append(cpu)
                return logs

            timed._bench_timed = True  # type: ignore[attr-defined]
            model.train_function = timed
            return timed

        object.__setattr__(model, "make_train_function", make_train_function)
        return self

    def steady(self, steps_per_epoch: int, skip_epochs: int = 1) -> dict[str, list[float]]:
        """Per-step intervals after the first ``skip_epochs`` epochs.

        Returns ``{"interval": [...], "compute": [...], "epoch": [...]}`` in seconds:
        ``interval`` is start-to-next-start within an epoch (the step plus Keras's and the
        callbacks' per-batch work); ``compute`` is the ``train_function`` call alone;
        ``epoch`` is first-step-to-next-epoch's-first-step (all of an epoch, its end-of-epoch
        callbacks included), for every epoch that has a following one; ``gap`` is the time
        between an epoch's last step and the next epoch's first (end-of-epoch callbacks,
        logging and a new data iterator); ``cpu_interval`` is ``interval`` in process CPU
        seconds (all threads), which other processes' load disturbs much less than wall time.
        """
        n = len(self.starts)
        starts, ends = self.starts[:n], self.ends[:n]
        first = skip_epochs * steps_per_epoch
        interval, compute, epoch, gap, cpu_interval = [], [], [], [], []
        for i in range(first, n):
            compute.append(ends[i] - starts[i])
            same_epoch = (i + 1) % steps_per_epoch != 0
            if i + 1 < n and same_epoch:
                interval.append(starts[i + 1] - starts[i])
                cpu_interval.append(self.cpu_starts[i + 1] - self.cpu_starts[i])
        for e in range(skip_epochs, n // steps_per_epoch):
            nxt = (e + 1) * steps_per_epoch
            if nxt < n:
                epoch.append(starts[nxt] - starts[e * steps_per_epoch])
                gap.append(starts[nxt] - ends[nxt - 1])
        return {"interval": interval, "compute": compute, "epoch": epoch, "gap": gap, "cpu_interval": cpu_interval}

    def phases(self, run_start: float, run_end: float) -> dict[str, float]:
        """Fixed costs of one run: before the first step, the first step, after the last."""
        n = len(self.starts)
        return {
            "setup": self.starts[0] - run_start,
            "first_step": self.ends[0] - self.starts[0],
            "teardown": run_end - self.ends[n - 1],
        }


class EpochTimer(keras.callbacks.Callback):
    """Seconds per epoch, from a callback with epoch hooks only.

    Batch hooks would change how Keras dispatches callbacks (it turns asynchronous
    dispatch off for a callback that overrides ``on_train_batch_end``), so there are none.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._begin = 0.0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._begin = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.seconds.append(time.perf_counter() - self._begin)


def digits_folder(root: str | Path, per_class: int | None, size: int = 32) -> Path:
    """Real scikit-learn digits written as PNG class folders (``per_class=None``: all 1797)."""
    from tlkit.sample_data import write_digits

    return write_digits(Path(root) / "digits", per_class=per_class, size=size)


def digits_examples(root: str | Path, per_class: int | None, size: int = 32) -> tuple[list[Any], list[str]]:
    """``(examples, class_names)`` of every digit PNG written under ``root`` (no split)."""
    from tlkit.data.images import load_splits

    folder = digits_folder(root, per_class, size)
    splits = load_splits(folder, val_fraction=0.0, test_fraction=0.0, check=False)
    return splits.train, splits.class_names


def warm(dataset: Any) -> float:
    """Iterates ``dataset`` once (fills an in-memory ``cache()``); returns the seconds taken."""
    start = time.perf_counter()
    for _ in dataset:
        pass
    return time.perf_counter() - start


def scratch(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f"tlkit-bench-{prefix}-")


def alternate(reps: int, variants: Sequence[str]) -> list[list[str]]:
    """Run orders ABAB.. reversed every other repetition (A B, B A, A B, ...)."""
    return [list(variants) if r % 2 == 0 else list(reversed(variants)) for r in range(reps)]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start
