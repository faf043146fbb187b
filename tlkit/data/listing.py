"""Listing labelled files: class folders or CSV manifests -> :class:`Example` rows.

Nothing is lost silently. A folder listing reports every file it does not use (a suffix
that is not an image/audio suffix, a file outside the class folders) in
:attr:`Listing.ignored`. A manifest listing normalises and checks its labels and paths:

- labels are stripped of whitespace; two spellings of one class that differ only in case
  (``Cat`` / ``cat``) are an error naming both and their lines;
- a label that is a stringified missing value (``nan``, ``NaN``, ``None``, ``null``,
  ``<NA>``) or empty is an error naming the lines (the csv reader's line numbers, so
  blank lines and quoted line breaks are counted);
- one file listed under two labels is an error (it could land in train *and* val), except
  in a multi-label manifest (one that writes ``cat|dog`` on some row), where its rows are
  merged into one multi-label example; a repeated identical row is kept once, with a note;
- paths outside the manifest's folder (``../x.png``, absolute paths) are used as listed,
  with one warning that counts them.

Notes for the user travel in :attr:`Listing.notes` to :meth:`tlkit.data.Splits.summary`.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tlkit.errors import DataError

log = logging.getLogger("tlkit.data")

#: Labels that are a missing value written out as text, not a class (compared case-insensitively).
MISSING_LABELS = frozenset({"nan", "none", "null", "<na>"})
#: Errors list at most this many offending rows.
_SHOWN = 8


@dataclass(frozen=True)
class Example:
    """One labelled file. ``labels`` holds one class name, or several for multi-label data.

    Multi-task examples (a manifest with several label columns) carry ``tasks``: ``(task, labels)``
    pairs in task order, an empty ``labels`` meaning the row has no label for that task; their
    ``labels`` are those of the first task that has any (what splitting stratifies on).
    """

    path: str
    labels: tuple[str, ...]
    group: str | None = None  # e.g. a patient or speaker id; splits never separate a group
    tasks: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def task_labels(self, name: str) -> tuple[str, ...]:
        """This example's labels for task ``name`` (empty: missing).

        Raises:
            KeyError: the example has no task ``name``.
        """
        for task, labels in self.tasks:
            if task == name:
                return labels
        raise KeyError(f"example {self.path!r} has no task {name!r} (tasks: {[t for t, _ in self.tasks]})")


@dataclass(frozen=True)
class TaskColumn:
    """One task of a multi-task manifest: its name, its column, whether a cell holds several labels,
    and (once the data are read) its class names in output order."""

    name: str
    column: str
    multi_label: bool = False
    classes: tuple[str, ...] = ()


#: The header prefix that makes a manifest column a task (``task:accent``).
TASK_PREFIX = "task:"


@dataclass
class Listing:
    """What a folder or manifest lists.

    Attributes:
        examples: the files to use.
        ignored: ``(path, "ignored: <why>")`` for every file found but not used.
        notes: sentences for the run's summary (already logged as warnings).
    """

    examples: list[Example]
    ignored: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def list_folder(root: str | Path, suffixes: Sequence[str], kind: str = "image") -> Listing:
    """Examples from ``root/<class>/**/<file>`` (the sub-folder name is the label); every other
    file is in :attr:`Listing.ignored` (``kind`` names the expected files in its reasons).

    Raises:
        DataError: ``root`` is missing, has no class folders, a class folder has no file with
            one of ``suffixes``, or there is only one class.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"data folder {str(base)!r} does not exist or is not a directory; check `data.path`")
    classes = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"data folder {str(base)!r} has no class sub-folders; expected {base}/<class>/<files>")
    wanted = {s.lower() for s in suffixes}
    ignored = [(str(p), "ignored: not inside a class folder") for p in sorted(base.iterdir()) if p.is_file()]
    examples: list[Example] = []
    for folder in classes:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        used = [p for p in files if p.suffix.lower() in wanted]
        others = [p for p in files if p.suffix.lower() not in wanted]
        ignored += [(str(p), f"ignored: not {_article(kind)} {kind} suffix ({p.suffix or 'none'})") for p in others]
        if not used:
            found = f"; it holds {len(others)} other file(s) ({_suffix_counts(others)})" if others else ""
            raise DataError(
                f"class folder {str(folder)!r} holds no files ending in {', '.join(suffixes)}{found}; "
                "add examples or remove the folder"
            )
        examples.extend(Example(str(p), (folder.name,)) for p in used)
    require_two_classes(examples, str(base))
    notes = []
    if ignored:
        notes.append(
            f"ignored {len(ignored)} file(s) under {base} that are not {kind} files or not in a class folder "
            f"({_suffix_counts([Path(p) for p, _ in ignored])})"
        )
        log.warning("%s", notes[-1])
    return Listing(examples, ignored, notes)


def read_manifest(path: str | Path, label_separator: str = "|") -> list[Example]:
    """Examples from a CSV with a header holding ``path`` and ``label`` (optional ``group``/``speaker``).

    Relative paths are resolved against the manifest's folder. A label holding
    ``label_separator`` is a multi-label example (``"cat|dog"``). See the module
    docstring for the checks; :func:`list_manifest` also returns the notes.
    """
    return list_manifest(path, label_separator).examples


def list_manifest(path: str | Path, label_separator: str = "|") -> Listing:
    """:func:`read_manifest` with its notes (outside paths, merged or repeated rows).

    Raises:
        DataError: the manifest is missing or unreadable, lacks ``path``/``label`` columns, has
            rows with an empty path or a missing label, labels that differ only in case, a
            file under two labels (single-label manifests), or a single class.
    """
    manifest = Path(path).expanduser()
    if not manifest.is_file():
        raise DataError(f"manifest {str(manifest)!r} does not exist; check `data.manifest`")
    where = f"manifest {str(manifest)!r}"
    rows = _manifest_rows(manifest, where, label_separator)
    if not rows:
        raise DataError(f"{where} lists no files")
    refuse_case_variants(rows, where)
    multi_label = any(len(labels) > 1 for _, _, labels, _ in rows)
    folder = os.path.abspath(manifest.parent)
    first_line: dict[str, int] = {}
    merged: dict[str, Example] = {}
    conflicts: list[str] = []
    repeats = joined = 0
    for line, file_path, labels, group in rows:
        resolved = os.path.normpath(os.path.join(folder, os.path.expanduser(file_path)))
        earlier = merged.get(resolved)
        if earlier is None:
            first_line[resolved] = line
            merged[resolved] = Example(resolved, labels, group)
            continue
        seen = f"line {first_line[resolved]}"
        if earlier.group != group:
            conflicts.append(f"{file_path!r} has group {earlier.group!r} on {seen} and {group!r} on line {line}")
        elif set(earlier.labels) == set(labels):
            repeats += 1
        elif multi_label:
            merged[resolved] = Example(resolved, tuple(sorted({*earlier.labels, *labels})), group)
            joined += 1
        else:
            conflicts.append(f"{file_path!r} is {'|'.join(earlier.labels)!r} on {seen} and {'|'.join(labels)!r} "
                             f"on line {line}")
    if conflicts:
        raise DataError(
            f"{where} lists the same file with different labels or groups ({len(conflicts)}): "
            f"{'; '.join(conflicts[:_SHOWN])}. A file may appear once, or it could land in two splits; "
            f"for a multi-label example write its labels on one row ('cat{label_separator}dog')"
        )
    examples = list(merged.values())
    notes = []
    if repeats:
        notes.append(f"{repeats} row(s) of {where} repeat a file with the same label; each file is used once")
    if joined:
        notes.append(f"{joined} row(s) of the multi-label {where} add labels to a file listed earlier; merged")
    outside = [e.path for e in examples if os.path.commonpath([folder, e.path]) != folder]
    if outside:
        notes.append(f"{len(outside)} of {len(examples)} file(s) listed in {where} lie outside its folder "
                     f"{folder} (first: {outside[0]}); they are used as listed")
    for note in notes:
        log.warning("%s", note)
    require_two_classes(examples, str(manifest))
    return Listing(examples, [], notes)


def _manifest_rows(
    manifest: Path, where: str, separator: str
) -> list[tuple[int, str, tuple[str, ...], str | None]]:
    """``(line, path, labels, group)`` per row; bad rows are collected and raised together."""
    rows = []
    problems: list[str] = []
    try:
        with open(manifest, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields = set(reader.fieldnames or ())
            if not {"path", "label"} <= fields:
                raise DataError(f"{where} needs a header with 'path' and 'label' columns, found {sorted(fields)}")
            group_field = "group" if "group" in fields else "speaker" if "speaker" in fields else None
            for row in reader:
                line = reader.line_num  # the file's line, blank lines and quoted newlines included
                file_path = (row.get("path") or "").strip()
                labels = tuple(sorted({p.strip() for p in (row.get("label") or "").split(separator)} - {""}))
                missing = [label for label in labels if label.casefold() in MISSING_LABELS]
                if not file_path:
                    problems.append(f"line {line}: empty path")
                elif not labels:
                    problems.append(f"line {line}: empty label")
                elif missing:
                    problems.append(f"line {line}: label {missing[0]!r} is a missing value, not a class")
                else:
                    group = (row.get(group_field) or "").strip() or None if group_field else None
                    rows.append((line, file_path, labels, group))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{where} is not a readable UTF-8 CSV file: {exc}") from exc
    if problems:
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise DataError(
            f"{where} has {len(problems)} row(s) without a usable path or label: "
            f"{'; '.join(problems[:_SHOWN])}{more}. Fill in or remove those rows"
        )
    return rows


def refuse_case_variants(rows: Sequence[tuple[int, str, tuple[str, ...], str | None]], where: str) -> None:
    """Labels that differ only in case are one class spelt two ways (``Cat`` and ``cat``)."""
    spellings: dict[str, dict[str, int]] = {}
    for line, _, labels, _ in rows:
        for label in labels:
            spellings.setdefault(label.casefold(), {}).setdefault(label, line)
    clashes = [
        " and ".join(f"{spelling!r} (line {line})" for spelling, line in variants.items())
        for variants in spellings.values() if len(variants) > 1
    ]
    if clashes:
        raise DataError(
            f"{where} spells a class in several ways that differ only in case: {'; '.join(clashes[:_SHOWN])}. "
            "Use one spelling per class"
        )


def require_two_classes(examples: Sequence[Example], where: str) -> None:
    """Raises :class:`DataError` unless ``examples`` hold at least two classes."""
    classes = {label for e in examples for label in e.labels}
    if len(classes) < 2:
        raise DataError(
            f"{where} has a single class {sorted(classes)}; a classifier needs at least two classes of examples"
        )


def keep_readable_classes(
    listed: Sequence[Example], kept: list[Example], bad: Sequence[tuple[str, str]], where: str, drop: bool
) -> list[str]:
    """The classes of ``listed`` that no ``kept`` example has (every file of them failed a check).

    Raises:
        DataError: such a class exists and ``drop`` is false; the message names each class,
            its file count and one file with its reason.
    """
    lost = sorted({label for e in listed for label in e.labels} - {label for e in kept for label in e.labels})
    if not lost:
        return []
    reasons = dict(bad)
    details = []
    for name in lost:
        files = [e.path for e in listed if name in e.labels]
        details.append(f"{name!r} ({len(files)} file(s); e.g. {files[0]}: {reasons.get(files[0], 'unusable')})")
    if not drop:
        raise DataError(
            f"{where}: every file of class(es) {', '.join(details)} could not be used, so the model would "
            "silently lack that class. Fix or replace those files, or set `[data] drop_unreadable_classes = true` "
            "to train without it"
        )
    log.warning("dropping class(es) %s: %s", lost, "; ".join(details))
    return lost


def single_example_classes(examples: Sequence[Example]) -> list[str]:
    """Classes with exactly one example, warned about: they can only be in one split."""
    counts = Counter(label for e in examples for label in e.labels)
    single = sorted(name for name, count in counts.items() if count == 1)
    if single:
        log.warning("class(es) %s have a single example; validation and test never see them", single)
    return single


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _suffix_counts(files: Sequence[Path]) -> str:
    counts = Counter(p.suffix.lower() or p.name for p in files)
    return ", ".join(f"{suffix} {count}" for suffix, count in counts.most_common(5)) + (
        ", ..." if len(counts) > 5 else "")
