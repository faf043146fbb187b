"""The plots of an evaluation: one registry of records, every plot drawn by the same signature.

A plot is a :class:`Plot` record: its name, the PNG file it writes under ``evaluation/``,
when it applies, and ``draw(ctx, path)``, which draws from a :class:`PlotContext` (the
metrics, the labels and probabilities, the training history). Adding a plot is one
:func:`register_plot` call; ``report.md`` links every plot that was drawn::

    def draw_scores(ctx: PlotContext, path: Path) -> None:
        fig = figure(6, 4)
        fig.add_subplot().hist(ctx.probabilities.max(1), bins=20)
        save(fig, path)

    register_plot("scores", draw_scores, title="histogram of top probabilities")

Figures are drawn on matplotlib's Agg canvas, with no pyplot state. ROC and
precision-recall curves are scikit-learn's (:func:`sklearn.metrics.roc_curve`,
:func:`sklearn.metrics.precision_recall_curve`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import precision_recall_curve, roc_curve

from tlkit.errors import ConfigError
from tlkit.evaluation.calibration import DEFAULT_BINS, ece_from_bins, reliability_bins
from tlkit.evaluation.metrics import operating_points


@dataclass(frozen=True)
class PlotContext:
    """What a plot draws from.

    Attributes:
        metrics: :func:`~tlkit.evaluation.compute_metrics` output (of ``probabilities``).
        truth: (N, C) 0/1 indicators of the true labels.
        probabilities: (N, C) the probabilities the metrics are of (calibrated when
            ``temperature`` is set).
        raw_probabilities: (N, C) the model's own probabilities.
        temperature: the fitted temperature, or ``None``.
        history: the run's training history (``{"epochs": [...], "stages": [...]}``) or ``None``.
    """

    metrics: dict[str, Any]
    truth: np.ndarray
    probabilities: np.ndarray
    raw_probabilities: np.ndarray
    temperature: float | None = None
    history: dict[str, Any] | None = None

    @property
    def multi_label(self) -> bool:
        return self.metrics["task"] == "multilabel"


Draw = Callable[[PlotContext, Path], None]


def _always(ctx: PlotContext) -> bool:
    return True


@dataclass(frozen=True)
class Plot:
    """One plot: ``draw(ctx, path)`` writes ``evaluation/<file>`` when ``applies(ctx)``.

    ``title`` is its caption (the alt text in ``report.md``).
    """

    name: str
    file: str
    draw: Draw
    applies: Callable[[PlotContext], bool] = _always
    title: str = ""


#: The registry, in drawing order: plot name -> record.
PLOTS: dict[str, Plot] = {}


def register_plot(
    name: str,
    draw: Draw,
    *,
    file: str | None = None,
    applies: Callable[[PlotContext], bool] | None = None,
    title: str | None = None,
    overwrite: bool = False,
) -> Plot:
    """Adds a plot to every evaluation and returns its record.

    Args:
        name: lower-case letters, digits, ``_`` and ``-``; the key in ``EvaluationReport.plots``.
        draw: ``draw(ctx: PlotContext, path: Path) -> None`` writes a PNG to ``path``.
        file: the file name under ``evaluation/`` (default ``<name>.png``).
        applies: ``applies(ctx) -> bool``; the plot is skipped when false (default: always).
        title: the caption in ``report.md`` (default the name).
        overwrite: replace a plot of the same name instead of refusing.

    Raises:
        ConfigError: an invalid or (without ``overwrite``) already registered name.
    """
    if not re.fullmatch(r"[a-z0-9_\-]+", name):
        raise ConfigError(f"plot name {name!r} is not valid: use lower-case letters, digits, '_' and '-'")
    if name in PLOTS and not overwrite:
        raise ConfigError(f"a plot named {name!r} is already registered; pass overwrite=True to replace it")
    plot = Plot(name, file or f"{name}.png", draw, applies or _always, title or name.replace("_", " "))
    PLOTS[name] = plot
    return plot


def unregister_plot(name: str) -> None:
    """Removes a plot from the registry (no error if absent)."""
    PLOTS.pop(name, None)


def list_plots() -> list[Plot]:
    """The registered plots, in drawing order."""
    return list(PLOTS.values())


def draw_plots(ctx: PlotContext, folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Draws every registered plot that applies into ``folder``.

    Returns:
        ``({name: PNG path}, notes)``; a plot whose data are malformed is skipped with a note.
    """
    written: dict[str, Path] = {}
    notes: list[str] = []
    for plot in list_plots():
        if not plot.applies(ctx):
            continue
        path = folder / plot.file
        try:
            plot.draw(ctx, path)
        except (ValueError, KeyError, TypeError) as exc:
            notes.append(f"plot {plot.name!r} skipped: {exc}")
            continue
        written[plot.name] = path
    return written, notes


def figure(width: float, height: float) -> Figure:
    """A matplotlib figure on its own Agg canvas (inches)."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png", bbox_inches="tight")


# --- the built-in plots --------------------------------------------------------------------


def draw_confusion(ctx: PlotContext, path: Path, normalised: bool = False) -> None:
    """Confusion matrix (counts, or rows normalised); one 2x2 panel per label for multi-label."""
    metrics = ctx.metrics
    if metrics["task"] == "multilabel":
        _multilabel_confusion(metrics, path, normalised)
        return
    names = metrics["class_names"]
    counts = np.asarray(metrics["confusion_matrix"], np.float64)
    c = len(names)
    values = _row_normalised(counts) if normalised else counts
    side = min(max(4.5, 0.45 * c + 2.5), 26.0)
    fig = figure(side + 1.0, side)
    ax = fig.add_subplot()
    top = 1.0 if normalised else max(float(values.max()), 1.0)
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=top)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fontsize = 10 if c <= 10 else 8 if c <= 25 else 6
    ax.set_xticks(range(c), labels=names, rotation=45 if c <= 25 else 90, ha="right", fontsize=fontsize)
    ax.set_yticks(range(c), labels=names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix, rows normalised (diagonal = recall)"
                 if normalised else "confusion matrix (counts)", fontsize=10)
    if c <= 30:
        _annotate(ax, values, top, normalised, fontsize)
    save(fig, path)


def _multilabel_confusion(metrics: dict[str, Any], path: Path, normalised: bool) -> None:
    names = metrics["class_names"][:36]
    columns = min(len(names), 6)
    rows = math.ceil(len(names) / columns)
    fig = figure(2.4 * columns, 2.4 * rows + 0.4)
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, columns, k + 1)
        counts = np.asarray(metrics["confusion_matrix"][name], np.float64)
        values = _row_normalised(counts) if normalised else counts
        top = 1.0 if normalised else max(float(values.max()), 1.0)
        ax.imshow(values, cmap="Blues", vmin=0.0, vmax=top)
        _annotate(ax, values, top, normalised, None)
        ax.set_xticks([0, 1], labels=["no", "yes"], fontsize=8)
        ax.set_yticks([0, 1], labels=["no", "yes"], fontsize=8)
        ax.set_title(name, fontsize=9)
        if k % columns == 0:
            ax.set_ylabel("true", fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
    extra = " (first 36 labels)" if len(metrics["class_names"]) > 36 else ""
    fig.suptitle(("per-label confusion, rows normalised" if normalised else "per-label confusion (counts)") + extra,
                 fontsize=10)
    fig.tight_layout()
    save(fig, path)


def _row_normalised(counts: np.ndarray) -> np.ndarray:
    rows = counts.sum(1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)


def _annotate(ax: Any, values: np.ndarray, top: float, normalised: bool, fontsize: int | None) -> None:
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            text = f"{values[i, j]:.2f}" if normalised else f"{int(values[i, j])}"
            colour = "white" if values[i, j] > top / 2 else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=fontsize)


def _curve_columns(metrics: dict[str, Any]) -> list[int]:
    """The columns with a curve: the positive class of a binary model, else every class."""
    names = metrics["class_names"]
    if metrics["task"] == "binary":
        return [names.index(metrics["positive_class"])]
    return list(range(len(names)))


def _defined_curves(ctx: PlotContext, key: str) -> Iterator[tuple[int, str, float, float]]:
    """``(column, class name, its AUC / AP, line width)`` of every curve whose ``key`` is defined."""
    names = ctx.metrics["class_names"]
    columns = _curve_columns(ctx.metrics)
    width = 1.5 if len(columns) <= 12 else 0.8
    for i in columns:
        value = ctx.metrics["per_class"][names[i]][key]
        if value is not None:
            yield i, names[i], value, width


def draw_roc(ctx: PlotContext, path: Path) -> None:
    """ROC curves (one-vs-rest / per label), with each operating point as a dot."""
    points = operating_points(ctx.metrics)
    fig = figure(6.5, 6.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    drawn = 0
    for i, name, auc, width in _defined_curves(ctx, "roc_auc"):
        fpr, tpr, _ = roc_curve(ctx.truth[:, i], ctx.probabilities[:, i])
        line = ax.plot(fpr, tpr, linewidth=width, label=f"{name} (AUC {auc:.3f})")
        point = points.get(name)
        if point and point["sensitivity"] is not None and point["specificity"] is not None:
            ax.plot([1 - point["specificity"]], [point["sensitivity"]], marker="o", color=line[0].get_color())
        drawn += 1
    _unit_axes(ax, "false positive rate (1 - specificity)", "true positive rate (sensitivity)")
    kind = {"binary": "", "multiclass": ", one-vs-rest", "multilabel": ", per label"}[ctx.metrics["task"]]
    ax.set_title(f"ROC curves{kind}" + ("; dots = operating point" if points else ""), fontsize=10)
    if drawn == 0:
        ax.text(0.5, 0.5, "undefined: every class needs positive and negative examples", ha="center")
    if drawn <= 12:
        ax.legend(loc="lower right", fontsize=8)
    save(fig, path)


def draw_precision_recall(ctx: PlotContext, path: Path) -> None:
    """Precision-recall curves, as steps (the area under them is the average precision)."""
    single = len(_curve_columns(ctx.metrics)) == 1
    fig = figure(6.5, 6.0)
    ax = fig.add_subplot()
    drawn = 0
    for i, name, ap, width in _defined_curves(ctx, "pr_auc"):
        precision, recall, _ = precision_recall_curve(ctx.truth[:, i], ctx.probabilities[:, i])
        line = ax.step(recall, precision, where="post", linewidth=width, label=f"{name} (AP {ap:.3f})")
        if single:
            prevalence = ctx.truth[:, i].mean()
            ax.axhline(prevalence, color=line[0].get_color(), linestyle=":", linewidth=1,
                       label=f"prevalence {prevalence:.3f}")
        drawn += 1
    _unit_axes(ax, "recall (sensitivity)", "precision (PPV)")
    ax.set_title("precision-recall curves", fontsize=10)
    if drawn and drawn <= 12:
        ax.legend(loc="lower left", fontsize=8)
    save(fig, path)


def _unit_axes(ax: Any, xlabel: str, ylabel: str) -> None:
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def draw_reliability(ctx: PlotContext, path: Path) -> None:
    """Reliability diagram of the raw probabilities (and the calibrated ones) over a count histogram."""
    multi_label = ctx.multi_label
    fig = figure(6.0, 7.0)
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    ax = fig.add_subplot(grid[0])
    hist = fig.add_subplot(grid[1], sharex=ax)
    before = reliability_bins(ctx.truth, ctx.raw_probabilities, DEFAULT_BINS, multi_label)
    width = 1.0 / DEFAULT_BINS
    centres = np.array([(b["lower"] + b["upper"]) / 2 for b in before])
    accuracy = np.array([b["accuracy"] if b["count"] else 0.0 for b in before])
    ax.bar(centres, accuracy, width=width * 0.95, color="tab:blue", alpha=0.7, edgecolor="black", linewidth=0.5,
           label=f"model (ECE {ece_from_bins(before):.3f})")
    confidence = np.array([b["confidence"] if b["count"] else np.nan for b in before])
    ax.bar(centres, confidence - accuracy, bottom=accuracy, width=width * 0.95, color="none", edgecolor="tab:red",
           hatch="//", linewidth=0.8, label="gap to the mean confidence of the bin")
    if ctx.temperature is not None:
        after = reliability_bins(ctx.truth, ctx.probabilities, DEFAULT_BINS, multi_label)
        xs = [b["confidence"] for b in after if b["count"]]
        ys = [b["accuracy"] for b in after if b["count"]]
        ax.plot(xs, ys, marker="o", color="tab:green",
                label=f"after temperature scaling, T = {ctx.temperature:.2f} (ECE {ece_from_bins(after):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed frequency of the label" if multi_label else "accuracy")
    ax.set_title("reliability diagram", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.tick_params(labelbottom=False)
    hist.bar(centres, [b["count"] for b in before], width=width * 0.95, color="grey")
    hist.set_ylabel("count")
    hist.set_xlabel("predicted probability of each label" if multi_label else "confidence (top probability)")
    save(fig, path)


def draw_training(ctx: PlotContext, path: Path) -> None:
    """Loss, accuracy and learning rate per epoch across stages; dashed lines at stage boundaries."""
    history = ctx.history or {}
    records = history["epochs"]
    epochs = np.array([r["epoch"] for r in records], np.float64)
    stages = history.get("stages") or []
    panels = [("loss", ("loss", "val_loss")), ("accuracy", ("accuracy", "val_accuracy")), ("learning rate", ("lr",))]
    panels = [(title, keys) for title, keys in panels if any(k in r for r in records for k in keys)]
    fig = figure(8.0, 2.6 * len(panels) + 0.6)
    axes = [fig.add_subplot(len(panels), 1, k + 1) for k in range(len(panels))]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            xs = [e for e, r in zip(epochs, records) if r.get(key) is not None and math.isfinite(float(r[key]))]
            ys = [float(r[key]) for r in records if r.get(key) is not None and math.isfinite(float(r[key]))]
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
        if title == "learning rate" and all(float(r.get("lr", 0)) > 0 for r in records if "lr" in r):
            ax.set_yscale("log")
        ax.set_ylabel(title)
        for stage in stages[1:]:
            ax.axvline(stage["first_epoch"] - 0.5, color="black", linestyle="--", linewidth=1, alpha=0.6)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if title != "learning rate":
            ax.legend(fontsize=8, loc="best")
    for stage in stages:
        middle = (stage["first_epoch"] + stage["last_epoch"]) / 2
        axes[0].text(middle, 1.02, f"stage {stage['name']}", transform=axes[0].get_xaxis_transform(),
                     ha="center", va="bottom", fontsize=9)
    axes[-1].set_xlabel("epoch (across stages; dashed lines = stage boundaries)")
    fig.tight_layout()
    save(fig, path)


def _has_epochs(ctx: PlotContext) -> bool:
    return bool(ctx.history and ctx.history.get("epochs"))


register_plot("confusion_matrix", draw_confusion, title="confusion matrix, counts")
register_plot("confusion_matrix_normalized", lambda ctx, path: draw_confusion(ctx, path, normalised=True),
              title="confusion matrix, normalised")
register_plot("roc", draw_roc, title="ROC curves")
register_plot("precision_recall", draw_precision_recall, title="precision-recall curves")
register_plot("reliability", draw_reliability, title="reliability diagram")
register_plot("training_curves", draw_training, applies=_has_epochs, title="training curves")
