"""A quiet command line: TensorFlow's native start-up log lines are filtered out of stderr.

TensorFlow's C++ runtime writes lines such as ``WARNING: All log messages before
absl::InitializeLog() is called are written to STDERR``, oneDNN and ``cudart_stub`` notices and
``E0000 ... failed call to cuInit`` straight to file descriptor 2, before (and regardless of)
``TF_CPP_MIN_LOG_LEVEL``. No Python logging setting reaches them, so the CLI routes descriptor 2
through a pipe and a thread that drops those lines and forwards everything else. Python's own
``sys.stderr`` (tlkit's error messages, warnings) bypasses the pipe and is written directly.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator

#: Native log lines dropped by default: absl-format INFO/WARNING lines, the absl pre-init notice,
#: CUDA probing errors on machines without a GPU, the CPU-feature notice's second line, and the
#: TFLite converter's and interpreter's INFO lines (XNNPACK delegate, quantizer settings).
NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IW]\d{4} \d\d:\d\d:[\d.]+ +\d+ \S+:\d+\] "
    rb"|E\d{4} \d\d:\d\d:[\d.]+ +\d+ (cuda_\w+|cuda_platform|cuda_executor|cuda_diagnostics)\.cc:\d+\] "
    rb"|E\d{4} \d\d:\d\d:[\d.]+ +\d+ util\.cc:\d+\] oneDNN supports "
    rb"|To enable the following instructions: .* in other operations, rebuild TensorFlow"
    rb"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."
    rb"|fully_quantize: \d+, inference_type: \d+, input_inference_type: )"
)


def is_noise(line: bytes) -> bool:
    """Whether ``line`` is one of TensorFlow's native start-up lines (see :data:`NOISE`)."""
    return NOISE.match(line) is not None


@contextlib.contextmanager
def native_log_filter(enabled: bool = True) -> Iterator[None]:
    """Filters TensorFlow's native log lines out of file descriptor 2 while the block runs."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        original = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. an embedded interpreter): nothing to filter
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    python_stderr = sys.stderr
    replaced = _writes_to_fd2(python_stderr)
    if replaced:  # Python's own writes skip the filter (a captured or redirected sys.stderr is left alone)
        sys.stderr = os.fdopen(os.dup(original), "w", buffering=1, encoding="utf-8", errors="replace")
    thread = threading.Thread(target=_forward, args=(read_end, original), daemon=True)
    thread.start()
    try:
        yield
    finally:
        if replaced:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = python_stderr
        os.dup2(original, 2)  # closes the pipe's last write end: the thread sees end-of-file
        thread.join(timeout=2.0)
        os.close(original)


def _writes_to_fd2(stream: object) -> bool:
    try:
        return stream.fileno() == 2  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


def _forward(read_end: int, target: int) -> None:
    with os.fdopen(read_end, "rb") as pipe:
        for line in pipe:
            if not is_noise(line):
                os.write(target, line)
