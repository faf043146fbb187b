"""Reading a multi-task manifest: a CSV with one label column per task -> :class:`~tlkit.data.listing.Example` rows.

The one reader of multi-task manifests, for image and audio runs alike (which columns are tasks
is decided by :func:`tlkit.multitask.manifest.resolve_tasks`). Each example carries every task's
labels in task order; an empty cell (or a missing value written out: ``nan``, ``None``...) means
the row has no label for that task: it is masked in training, never guessed. A row with no label
for any task is an error, and so is a task with fewer than two classes among its labelled rows
(one for a multi-label task). A ``group`` (or ``speaker``) column keeps groups in one split.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from tlkit.data.listing import (
    MISSING_LABELS,
    Example,
    Listing,
    TaskColumn,
    refuse_case_variants,
)
from tlkit.errors import DataError

log = logging.getLogger("tlkit.data")

#: Between the labels of a multi-label task's cell (``weather|sport``).
SEPARATOR = "|"
_SHOWN = 8


def list_task_manifest(path: str | Path, tasks: Sequence[TaskColumn], separator: str = SEPARATOR) -> Listing:
    """The examples of a multi-task manifest, each with ``tasks`` filled in (missing: empty labels).

    Relative paths resolve against the manifest's folder; a ``group`` (or ``speaker``) column keeps
    groups in one split. A file listed twice with identical cells is used once; with different cells,
    it is an error.

    Raises:
        DataError: rows without a path or without any task's label, several labels in a single-label
            task's cell, a file listed with different labels, class spellings that differ only in case,
            or a task with too few classes.
    """
    manifest = Path(path).expanduser()
    where = f"manifest {str(manifest)!r}"
    header, raw_rows = read_rows(manifest)
    if "path" not in header:
        raise DataError(f"{where} needs a 'path' column, found {header}")
    missing_columns = [t.column for t in tasks if t.column not in header]
    if missing_columns:
        raise DataError(f"{where} lacks the task column(s) {missing_columns} (its columns: {header})")
    group_field = "group" if "group" in header else "speaker" if "speaker" in header else None
    problems: list[str] = []
    rows: list[tuple[int, str, tuple[tuple[str, tuple[str, ...]], ...], str | None]] = []
    written_missing = 0
    for line, row in raw_rows:
        file_path = (row.get("path") or "").strip()
        cells = []
        for task in tasks:
            labels, problem, written = _cell(row.get(task.column) or "", task, separator)
            written_missing += written
            if problem:
                problems.append(f"line {line}: {problem}")
            cells.append((task.name, labels))
        if not file_path:
            problems.append(f"line {line}: empty path")
        elif not any(labels for _, labels in cells):
            problems.append(f"line {line}: no label for any task ({', '.join(t.column for t in tasks)})")
        group = ((row.get(group_field) or "").strip() or None) if group_field else None
        rows.append((line, file_path, tuple(cells), group))
    if problems:
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise DataError(f"{where} has {len(problems)} unusable row(s): {'; '.join(problems[:_SHOWN])}{more}. "
                        "Fill in or remove those rows")
    if not rows:
        raise DataError(f"{where} lists no files")
    for task in tasks:
        refuse_case_variants([(line, p, dict(cells)[task.name], g) for line, p, cells, g in rows],
                             f"{where} (column {task.column!r})")
    examples, notes = _merge(rows, manifest, where)
    if written_missing:
        notes.append(f"{written_missing} cell(s) of {where} hold a missing value written out (nan, None...); "
                     "read as missing labels")
    for note in notes:
        log.warning("%s", note)
    require_task_classes(examples, tasks, where)
    return Listing(examples, [], notes)


def require_task_classes(examples: Sequence[Example], tasks: Sequence[TaskColumn], where: str) -> None:
    """Raises :class:`DataError` unless every task has two classes among its labelled rows (one
    for a multi-label task)."""
    for task in tasks:
        classes = {label for e in examples for label in e.task_labels(task.name)}
        if len(classes) < (1 if task.multi_label else 2):
            raise DataError(f"{where}: task {task.name!r} (column {task.column!r}) has the class(es) "
                            f"{sorted(classes)} among its labelled rows; a single-label task needs at least two")


def with_classes(examples: Sequence[Example], tasks: Sequence[TaskColumn]) -> tuple[TaskColumn, ...]:
    """``tasks`` with their class names (sorted) as found in ``examples``."""
    return tuple(dataclasses.replace(t, classes=tuple(sorted(
        {label for e in examples for label in e.task_labels(t.name)}))) for t in tasks)


def _cell(value: str, task: TaskColumn, separator: str) -> tuple[tuple[str, ...], str | None, int]:
    """``(labels, problem, 1 when a missing value was written out)`` of one task's cell."""
    text = value.strip()
    if not text:
        return (), None, 0
    if text.casefold() in MISSING_LABELS:
        return (), None, 1
    parts = tuple(sorted({p.strip() for p in text.split(separator)} - {""}))
    if len(parts) > 1 and not task.multi_label:
        return (), (f"task {task.name!r} is single-label but the cell holds {text!r}; set "
                    f"`[tasks.{task.name}] multi_label = true` or keep one label"), 0
    bad = [p for p in parts if p.casefold() in MISSING_LABELS]
    if bad:
        return (), f"task {task.name!r}: label {bad[0]!r} is a missing value, not a class", 0
    return parts, None, 0


def _merge(rows: list[tuple[int, str, tuple[tuple[str, tuple[str, ...]], ...], str | None]], manifest: Path,
           where: str) -> tuple[list[Example], list[str]]:
    folder = os.path.abspath(manifest.parent)
    merged: dict[str, tuple[int, Example]] = {}
    conflicts: list[str] = []
    repeats = 0
    for line, file_path, cells, group in rows:
        resolved = os.path.normpath(os.path.join(folder, os.path.expanduser(file_path)))
        first = next((labels for _, labels in cells if labels), ())
        example = Example(resolved, first, group, cells)
        earlier = merged.get(resolved)
        if earlier is None:
            merged[resolved] = (line, example)
        elif earlier[1] == example:
            repeats += 1
        else:
            conflicts.append(f"{file_path!r} on lines {earlier[0]} and {line}")
    if conflicts:
        raise DataError(f"{where} lists the same file with different labels or groups ({len(conflicts)}): "
                        f"{'; '.join(conflicts[:_SHOWN])}. List each file once, with all its tasks' labels on one row")
    examples = [example for _, example in merged.values()]
    notes = [f"{repeats} row(s) of {where} repeat a file with the same labels; each file is used once"] if repeats else []
    outside = [e.path for e in examples if os.path.commonpath([folder, e.path]) != folder]
    if outside:
        notes.append(f"{len(outside)} of {len(examples)} file(s) listed in {where} lie outside its folder "
                     f"{folder} (first: {outside[0]}); they are used as listed")
    return examples, notes


def read_rows(manifest: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and ``(line, row)`` pairs of a CSV manifest."""
    if not manifest.is_file():
        raise DataError(f"manifest {str(manifest)!r} does not exist; check `data.manifest`")
    try:
        with open(manifest, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = [str(name).strip() for name in reader.fieldnames or ()]
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"manifest {str(manifest)!r} is not a readable UTF-8 CSV file: {exc}") from exc
    return header, rows
