"""Which columns of a manifest are tasks: a run config's ``[tasks]`` resolved against the manifest's header.

A manifest is multi-task when the config has a ``[tasks]`` table naming its columns, or when its
header holds ``task:<name>`` columns (one task per such column, plus a task ``label`` when the
``label`` column exists). Tasks are kept sorted by name, the order Keras gives a dict of model
outputs. The rows themselves are read by :mod:`tlkit.data.task_manifest` (re-exported here:
:func:`list_task_manifest`, :func:`require_task_classes`, :func:`with_classes`), the one reader
image and audio runs share.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from tlkit.config import TASK_NAME, RunConfig, TaskConfig
from tlkit.data.listing import TASK_PREFIX, TaskColumn
from tlkit.data.task_manifest import (
    SEPARATOR,
    list_task_manifest,
    read_rows,
    require_task_classes,
    with_classes,
)
from tlkit.errors import ConfigError

__all__ = ["SEPARATOR", "list_task_manifest", "require_task_classes", "resolve_tasks", "task_columns", "with_classes"]


def resolve_tasks(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its tasks resolved against the manifest's header: each column named, and for a
    manifest whose ``task:<name>`` columns make it multi-task without a ``[tasks]`` table, one task
    per column (``multi_label`` when some cell holds ``|``). Single-task configs come back unchanged.

    Raises:
        ConfigError: a task's column is not in the manifest (the message lists its columns), a
            ``task:<name>`` column whose name is not identifier-like, or tasks with class folders.
    """
    if cfg.data.manifest is None:
        if cfg.tasks:
            raise ConfigError("[tasks] needs `[data] manifest`; class folders carry a single label")
        return cfg
    if not cfg.tasks and not _has_task_columns(Path(cfg.data.manifest)):
        return cfg  # single-task: the data loader reads (and reports on) the manifest as before
    header, rows = read_rows(Path(cfg.data.manifest))
    if cfg.tasks:
        resolved = []
        for task in cfg.tasks:
            column = task.column or (f"{TASK_PREFIX}{task.name}" if f"{TASK_PREFIX}{task.name}" in header else task.name)
            if column not in header:
                raise ConfigError(f"[tasks.{task.name}] column {column!r} is not a column of manifest "
                                  f"{cfg.data.manifest!r} (its columns: {header}); set `column` to one of them")
            resolved.append(dataclasses.replace(task, column=column))
        return dataclasses.replace(cfg, tasks=tuple(resolved))
    columns = [c for c in header if c.startswith(TASK_PREFIX)]
    if not columns:
        return cfg
    found: dict[str, str] = {}
    for column in columns + (["label"] if "label" in header else []):
        name = column[len(TASK_PREFIX):] if column.startswith(TASK_PREFIX) else column
        if not TASK_NAME.fullmatch(name) or name in found:
            raise ConfigError(f"manifest {cfg.data.manifest!r}: column {column!r} does not name a task "
                              f"(`{TASK_PREFIX}<name>`, name identifier-like and unique); rename it or add a [tasks] table")
        found[name] = column
    tasks = tuple(TaskConfig(name, column, any(SEPARATOR in (row.get(column) or "") for _, row in rows))
                  for name, column in sorted(found.items()))
    return dataclasses.replace(cfg, tasks=tasks)


def task_columns(cfg: RunConfig) -> tuple[TaskColumn, ...]:
    """The resolved tasks of ``cfg`` (see :func:`resolve_tasks`) as :class:`TaskColumn`."""
    return tuple(TaskColumn(t.name, t.column or t.name, t.multi_label) for t in cfg.tasks)


def _has_task_columns(manifest: Path) -> bool:
    """Whether the manifest's header names a ``task:<name>`` column (``False`` when it cannot be read)."""
    try:
        with open(manifest, newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, csv.Error, UnicodeDecodeError):
        return False
    return any(str(name).strip().startswith(TASK_PREFIX) for name in header)
