"""Plain-text helpers shared by every module that prints or reports (bottom of the import graph).

Nothing here imports TensorFlow, Keras or any other tlkit module.
"""

from __future__ import annotations

from collections.abc import Sequence


def say(verbose: int | str, message: str) -> None:
    """Prints ``[tlkit] message`` (flushed) unless ``verbose`` is 0: the progress lines of training,
    fine-tuning and the learning-rate finder."""
    if verbose != 0:
        print(f"[tlkit] {message}", flush=True)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with a header rule, columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_size(n: float) -> str:
    """``14_300_000`` -> ``"13.6 MB"`` (binary multiples, as in the export reports)."""
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (TensorFlow errors run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def safe_name(name: str) -> str:
    """A file-system-safe version of ``name`` (letters, digits, ``-_.``; others become ``_``)."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return cleaned or "model"
