"""``model_card.md`` beside every export: what the model is, what it was measured on, and how well.

The card follows the layout Hugging Face Hub and Kaggle Models users expect: a YAML
front-matter block (``license``, ``library_name: keras``, ``tags``, ``metrics``) and then
Markdown sections:

- **Intended use** and **Limitations**: the run config's ``[card]`` table
  (:class:`tlkit.config.CardConfig`), plus the limits tlkit can state itself (test-set size,
  the baseline warnings);
- **Model**: backbone, its source and the licence of its weights (the backbone spec's
  ``licence``), the input contract and the classes;
- **Data**: the examples per split and class (``splits.json``);
- **Evaluation**: ``run.json`` ``"test_metrics"``; accuracy with its 95% Wilson interval on the
  test count (:func:`tlkit.evaluation.metrics.wilson_interval`);
- **Calibration**: the fitted temperature (``run.json`` ``"calibration"``);
- **Baselines**: the no-transfer baseline and linear probe rows of the run and its warnings,
  verbatim (``run.json`` ``"transfer"``, :mod:`tlkit.transfer_report`);
- **Export**: the parity of each artifact with the Keras model (the :class:`ExportReport`).

A multi-task run's card (:mod:`tlkit.task_outputs`) has the same sections with one table per
task: its classes, its examples per split and class (and the rows without a label for it), its
test metrics (``metrics.json`` of ``tlkit evaluate`` when the run has one, else ``run.json``),
its temperature and its baselines.

Everything is read from the run (through :class:`tlkit.rundir.RunDir`, via the
:class:`~tlkit.export.source.ExportSource`) and the report; the card adds no measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tlkit.backbones.registry import get as get_backbone
from tlkit.errors import TlkitError
from tlkit.evaluation.metrics import wilson_interval
from tlkit.evaluation.report import read_metrics
from tlkit.export.report import ExportReport
from tlkit.export.source import ExportSource
from tlkit.fileio import atomic_write_text
from tlkit.text import human_size

MODEL_CARD_FILE = "model_card.md"

#: Licence texts that start with one of these SPDX ids get it as the Hub ``license``; others are ``other``.
_SPDX = ("Apache-2.0", "MIT", "BSD-3-Clause", "BSD-2-Clause", "CC-BY-4.0", "CC-BY-SA-4.0", "CC-BY-NC-4.0",
         "GPL-3.0", "LGPL-3.0", "OpenRAIL")

#: Metrics whose value is a proportion of test examples (a Wilson interval applies).
_PROPORTIONS = ("accuracy", "top3_accuracy")


def write_model_card(source: ExportSource, report: ExportReport, directory: str | Path) -> Path:
    """Writes ``model_card.md`` into ``directory`` (the export's version folder) and returns its path.

    Args:
        source: the exported run (its ``run.json``, ``config.json``, labels and splits).
        report: the export's report; its verified ``results`` give the parity table.
        directory: where the card goes (beside ``metadata.json``).
    """
    path = Path(directory) / MODEL_CARD_FILE
    atomic_write_text(path, model_card_markdown(source, report))
    return path


def model_card_markdown(source: ExportSource, report: ExportReport) -> str:
    """The card's text: YAML front matter, then the sections listed in the module docstring."""
    status, config = source.status, source.config
    backbone = str(status.get("backbone") or config.get("backbone", {}).get("name") or "unknown")
    licence = _licence(backbone)
    counts = {name: len(source.run.split(name)) for name in ("train", "val", "test")}
    card = config.get("card") or {}
    transfer = status.get("transfer") or {}
    if source.tasks is not None:
        return _multitask_card(source, report, backbone, licence, counts, card, transfer)
    sections = [
        _front_matter(source, report, licence),
        f"# {source.name}\n\n{_summary(source, backbone, counts)}",
        "## Intended use\n\n" + (card.get("intended_use") or
                                 "_Not declared: add `intended_use` to the run config's `[card]` table._"),
        "## Limitations\n\n" + "\n".join(_limitations(card.get("limitations"), counts["test"], transfer)),
        _model_section(source, backbone, licence),
        _data_section(source, counts),
        _evaluation_section(status.get("test_metrics") or {}, counts["test"], source.multi_label),
        _calibration_section(status.get("calibration")),
        _baseline_section(transfer),
        _export_section(report),
        _versions_section(status.get("versions") or {}, report.versions),
    ]
    return "\n\n".join(sections).rstrip() + "\n"


def _multitask_card(source: ExportSource, report: ExportReport, backbone: str, licence: str,
                    counts: dict[str, int], card: dict[str, Any], transfer: dict[str, Any]) -> str:
    """The card of a multi-task run: the single-task sections, per task where they differ."""
    assert source.tasks is not None
    heads = source.tasks.heads
    described = ", ".join(f"`{h.name}` ({len(h.labels)} classes{', multi-label' if h.multi_label else ''})"
                          for h in heads)
    warnings = [f"task {t}: {w}" for t, r in (transfer.get("tasks") or {}).items() for w in r.get("warnings") or []]
    sections = [
        _front_matter(source, report, licence),
        f"# {source.name}\n\nA {len(heads)}-task {source.modality} classifier (one head per task: {described}) "
        f"fine-tuned from `{backbone}` with tlkit on {sum(counts.values())} examples, each labelled for one or "
        f"more of the tasks. Source run: `{source.run.path.name}`.",
        "## Intended use\n\n" + (card.get("intended_use") or
                                 "_Not declared: add `intended_use` to the run config's `[card]` table._"),
        "## Limitations\n\n" + "\n".join(_limitations(card.get("limitations"), counts["test"], {"warnings": warnings})),
        _model_section(source, backbone, licence),
        _data_section(source, counts),
        _task_evaluation_section(source, counts["test"]),
        _task_calibration_section(source.status.get("calibration")),
        *(_baseline_section(transfer["tasks"][h.name]).replace("## Baselines", f"## Baselines: task `{h.name}`", 1)
          for h in heads if (transfer.get("tasks") or {}).get(h.name)),
        *([] if transfer.get("tasks") else [_baseline_section({})]),
        _export_section(report),
        _versions_section(source.status.get("versions") or {}, report.versions),
    ]
    return "\n\n".join(sections).rstrip() + "\n"


def _task_evaluation_section(source: ExportSource, test_count: int) -> str:
    """Per task: accuracy with its Wilson interval on the task's labelled test rows (``tlkit evaluate``'s
    ``metrics.json`` when there is one), and ``run.json``'s test metrics as they are."""
    assert source.tasks is not None
    evaluated = read_metrics(source.run.path).get("tasks") or {}
    labelled = {str(e.get("name")): (e.get("labelled") or {}).get("test") for e in source.status.get("tasks") or []}
    flat = source.status.get("test_metrics") or {}
    rows = []
    for h in source.tasks.heads:
        m = evaluated.get(h.name) or {}
        count = (m.get("data") or {}).get("count", labelled.get(h.name))
        accuracy = m.get("accuracy", flat.get(f"{h.name}_accuracy"))
        interval = "-"
        if accuracy is not None and count and not h.multi_label:
            low, high = wilson_interval(int(round(float(accuracy) * count)), int(count))
            interval = f"{low:.3f}-{high:.3f}"
        f1 = (m.get("macro_avg") or {}).get("f1")
        rows.append((f"`{h.name}`", "-" if count is None else count, "-" if accuracy is None else f"{float(accuracy):.4f}",
                     interval, "-" if f1 is None else f"{float(f1):.4f}"))
    where = "`tlkit evaluate` (metrics.json)" if evaluated else "`tlkit train` (run.json)"
    lines = ["## Evaluation", "", f"On the held-out test split ({test_count} examples); each task is scored on the "
             f"test rows labelled for it only. Measured by {where}.", "",
             _md_table(("task", "labelled test rows", "accuracy", "95% interval", "macro F1"), rows), "",
             "Intervals: 95% Wilson score interval over the task's labelled test rows (none for multi-label tasks, "
             "whose accuracy counts labels that are not independent trials)."]
    if flat:
        lines += ["", "All test metrics of `tlkit train`:", "",
                  _md_table(("metric", "value"), [(k, f"{float(v):.4g}") for k, v in flat.items()])]
    return "\n".join(lines)


def _task_calibration_section(calibration: dict[str, Any] | None) -> str:
    tasks = (calibration or {}).get("tasks") or {}
    if not tasks:
        return "## Calibration\n\nNo task was calibrated: probabilities are the model's own."
    rows = [(f"`{t}`", f"{float(c['temperature']):.4g}", c.get("examples", "?"),
             f"{float(c['val_nll_before']):.4g} -> {float(c['val_nll_after']):.4g}" if "val_nll_before" in c else "-",
             "yes" if c.get("folded_into_model", True) else "no") for t, c in tasks.items()]
    return "\n".join(["## Calibration", "", "Temperature scaling per task, fitted on the task's labelled validation "
                       "rows and folded into its `<task>_logits` layer (every artifact returns calibrated "
                       "probabilities); tasks not listed are uncalibrated.", "",
                       _md_table(("task", "temperature", "examples", "validation log-loss", "folded"), rows)])


def _licence(backbone: str) -> str:
    """The licence of the backbone's weights, from its spec (a free-text field)."""
    try:
        text = get_backbone(backbone).licence
    except TlkitError:
        return f"unknown (backbone {backbone!r} is not in this installation's registry)"
    return text or "not stated by the backbone spec"


def _hub_licence(licence: str) -> str:
    """The Hub's ``license`` value: the SPDX id the licence text starts with, else ``other``."""
    for spdx in _SPDX:
        if licence.lower().startswith(spdx.lower()):
            return spdx.lower()
    return "other"


def _front_matter(source: ExportSource, report: ExportReport, licence: str) -> str:
    task = "audio-classification" if source.modality == "audio" else "image-classification"
    if source.multi_label:
        task = "multi-label-" + task
    extra = ["multi-task"] if source.tasks is not None else []
    tags = ["keras", "tlkit", "transfer-learning", task, *extra, *sorted({_format_tag(r.format) for r in report.results})]
    metrics = sorted((source.status.get("test_metrics") or {}).keys())
    lines = ["---", f"license: {_hub_licence(licence)}", "library_name: keras", "tags:"]
    lines += [f"- {tag}" for tag in dict.fromkeys(tags)]
    if metrics:
        lines += ["metrics:", *(f"- {m}" for m in metrics)]
    lines.append("---")
    return "\n".join(lines)


def _format_tag(fmt: str) -> str:
    """``tflite-int8`` -> ``tflite``; ``savedmodel`` -> ``tensorflow``; others as they are."""
    head = fmt.split("-")[0]
    return {"savedmodel": "tensorflow", "keras": "keras"}.get(head, head)


def _summary(source: ExportSource, backbone: str, counts: dict[str, int]) -> str:
    kind = "multi-label classifier" if source.multi_label else "classifier"
    return (f"A {len(source.labels)}-class {source.modality} {kind} fine-tuned from `{backbone}` with tlkit "
            f"on {sum(counts.values())} labelled examples. Source run: `{source.run.path.name}`.")


def _limitations(declared: str | None, test_count: int, transfer: dict[str, Any]) -> list[str]:
    lines = [declared] if declared else [
        "_Not declared: add `limitations` to the run config's `[card]` table._"]
    if test_count:
        low, high = wilson_interval(test_count // 2, test_count)
        assert low is not None and high is not None
        lines.append(f"\n- The test split holds {test_count} examples: a measured accuracy near 50% is uncertain "
                     f"by about ±{(high - low) / 2:.0%} (95% Wilson interval).")
    else:
        lines.append("\n- The run has no test split: no held-out measurement backs this model.")
    lines += [f"- Baseline warning: {w}" for w in transfer.get("warnings") or []]
    lines.append("- Measured only on data drawn like the training data; other cameras, microphones, places or "
                 "populations may score lower.")
    return lines


def _model_section(source: ExportSource, backbone: str, licence: str) -> str:
    contract = source.contract
    if contract.is_audio:
        takes = f"mono waveform, float32 in [-1, 1] at {contract.sample_rate} Hz ({contract.clip_seconds:g} s crops)"
    else:
        size = "x".join(str(s) for s in contract.image_size or ())
        takes = f"RGB image, float32 pixels 0..255, any size (resized to {size} inside the model)"
    output = "independent sigmoid per class" if source.multi_label else "softmax over the classes"
    rows: list[tuple[Any, ...]] = [(index, name) for index, name in enumerate(source.labels)]
    headers: tuple[str, ...] = ("index", "class")
    if source.tasks is not None:
        output = "one head per task: " + ", ".join(
            f"`{h.name}` ({'independent sigmoid per class' if h.multi_label else 'softmax'})" for h in source.tasks.heads)
        rows = [(f"`{h.name}`", index, name) for h in source.tasks.heads for index, name in enumerate(h.labels)]
        headers = ("task", "index", "class")
    return "\n".join([
        "## Model", "",
        f"- Backbone: `{backbone}` (source: {source.status.get('backbone_source') or 'unknown'})",
        f"- Backbone licence: {licence}",
        f"- Input: {takes}",
        f"- Output: {output}",
        "", f"Classes ({len(rows)}, in output order{', per task' if source.tasks is not None else ''}):", "",
        _md_table(headers, rows),
    ])


def _class_counts(source: ExportSource, counts: dict[str, int]) -> dict[str, dict[str, int]]:
    """Examples per split of each class (``task:class`` and ``task:(missing)`` for multi-task runs)."""
    names = source.labels if source.tasks is None else [
        name for h in source.tasks.heads for name in (*(f"{h.name}:{c}" for c in h.labels), f"{h.name}:(missing)")]
    per_class: dict[str, dict[str, int]] = {name: {"train": 0, "val": 0, "test": 0} for name in names}
    for split in counts:
        for example in source.run.split(split):
            if source.tasks is None:
                keys = [str(label) for label in example.labels]
            else:
                keys = [f"{t}:{label}" for t, labels in example.tasks for label in labels]
                keys += [f"{t}:(missing)" for t, labels in example.tasks if not labels]
            for key in keys:
                per_class.setdefault(key, {"train": 0, "val": 0, "test": 0})[split] += 1
    return per_class


def _data_section(source: ExportSource, counts: dict[str, int]) -> str:
    per_class = _class_counts(source, counts)
    rows = [(name, c["train"], c["val"], c["test"]) for name, c in per_class.items()]
    rows.append(("**total**", counts["train"], counts["val"], counts["test"]))
    data = source.config.get("data") or {}
    where = data.get("path") or data.get("manifest") or "unknown"
    return "\n".join([
        "## Data", "",
        f"Examples: {counts['train']} train, {counts['val']} validation, {counts['test']} test "
        f"(from `{Path(str(where)).name}`; split seed {source.config.get('seed', 0)}).",
        "", _md_table(("task:class" if source.tasks is not None else "class", "train", "val", "test"), rows),
    ])


def _evaluation_section(metrics: dict[str, Any], test_count: int, multi_label: bool) -> str:
    if not metrics:
        return "## Evaluation\n\nNo test metrics: the run has no test split."
    rows = []
    for name, value in metrics.items():
        interval = "-"
        if name in _PROPORTIONS and not multi_label and test_count:
            low, high = wilson_interval(int(round(float(value) * test_count)), test_count)
            interval = f"{low:.3f}-{high:.3f}"
        rows.append((name, f"{float(value):.4f}" if name in _PROPORTIONS else f"{float(value):.4g}", interval))
    note = ("Intervals: 95% Wilson score interval over the test examples."
            + (" Multi-label accuracy counts every label of every example, which are not independent trials; "
               "no interval is given." if multi_label else ""))
    return "\n".join([f"## Evaluation\n\nOn the held-out test split ({test_count} examples).", "",
                      _md_table(("metric", "value", "95% interval"), rows), "", note])


def _calibration_section(calibration: dict[str, Any] | None) -> str:
    if not calibration:
        return ("## Calibration\n\nNot calibrated (no validation split, or a temperature did not lower the "
                "validation log-loss): probabilities are the model's own.")
    return "\n".join([
        "## Calibration", "",
        f"- Temperature: {float(calibration['temperature']):.4g} ({calibration.get('method', 'temperature scaling')}, "
        f"fitted on the {calibration.get('fitted_on', 'validation split')}, {calibration.get('examples', '?')} examples)",
        f"- Validation log-loss: {float(calibration['val_nll_before']):.4g} -> {float(calibration['val_nll_after']):.4g}",
        "- Folded into the model: " + ("yes, every artifact returns calibrated probabilities"
                                       if calibration.get("folded_into_model", True) else "no"),
    ])


def _baseline_section(transfer: dict[str, Any]) -> str:
    if not transfer:
        return "## Baselines\n\nNot measured (the run was trained without baselines)."

    def score(value: Any) -> str:
        return "-" if value is None else f"{float(value):.3f}"

    rows = [(r["model"], r["kind"], score(r.get("val_accuracy")), score(r.get("test_accuracy")),
             "-" if r.get("seconds") is None else f"{float(r['seconds']):.1f}s") for r in transfer.get("rows") or []]
    lines = ["## Baselines", "", "Measured on this run's own split (the no-transfer baseline and the linear probe "
             "of the frozen backbone beside the fine-tuned model):", "",
             _md_table(("model", "kind", "val accuracy", "test accuracy", "time"), rows)]
    warnings = transfer.get("warnings") or []
    lines += ["", "Warnings:", "", *(f"> {w}" for w in warnings)] if warnings else ["", "No warnings."]
    return "\n".join(lines)


def _export_section(report: ExportReport) -> str:
    rows = [(r.format, f"`{r.path}`", human_size(r.size_bytes), f"{r.max_abs_diff:.2e}", f"{r.top1_agreement:.3f}",
             f"{r.min_agreement:.2f}", r.samples, f"{r.latency_ms:.2f}") for r in report.results if r.passed]
    lines = ["## Export", "",
             f"Version {report.version}, created {report.created}. Each artifact was reloaded and compared with "
             f"the Keras model on {report.parity_split or 'held-out'} examples:", "",
             _md_table(("format", "file", "size", "max abs diff", "top-1 agreement", "threshold", "examples",
                        "latency ms"), rows)]
    lines += [f"- skipped {fmt}: {why}" for fmt, why in report.skipped.items()]
    lines += [f"- failed {fmt}: {why}" for fmt, why in report.failed.items()]
    lines += ["", "Load: `tlkit.artifacts.load_exported_predictor(path)` (or `tlkit predict`); class names are "
              "in `labels.txt`, input contracts in `metadata.json`."]
    return "\n".join(lines)


def _versions_section(trained: dict[str, Any], exported: dict[str, Any]) -> str:
    rows = [(name, trained.get(name, "-"), exported.get(name, "-")) for name in dict.fromkeys([*trained, *exported])]
    return "## Versions\n\n" + _md_table(("package", "trained with", "exported with"), rows)


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown pipe table (``|`` in cells escaped)."""
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(row) for row in rows)])
