"""Evaluation a careful reviewer can check: metrics, plots, calibration, Grad-CAM, label errors.

``tlkit evaluate RUN_DIR`` (or :func:`evaluate_run`) scores a finished run and writes
``report.md``, ``metrics.json``, ``misclassified.csv`` and ``evaluation/*.png``;
:func:`evaluate_predictions` does the same for predictions made elsewhere.

Modules, one concern each:

- :mod:`~tlkit.evaluation.metrics`: :func:`compute_metrics` (scikit-learn's ROC-AUC and
  average precision), top-k accuracy, Wilson intervals, operating points, Youden's J.
- :mod:`~tlkit.evaluation.calibration`: reliability bins, ECE, temperature scaling.
- :mod:`~tlkit.evaluation.plots`: the plot registry (:func:`register_plot`, :func:`list_plots`).
- :mod:`~tlkit.evaluation.report`: :class:`EvaluationReport` and ``report.md``.
- :mod:`~tlkit.evaluation.runner`: :func:`evaluate_run`, :func:`evaluate_predictions`.
- :mod:`~tlkit.evaluation.audio`: :func:`evaluate_audio`, training's clip-level test score.
- :mod:`~tlkit.evaluation.decisions`, :mod:`~tlkit.evaluation.mistakes`,
  :mod:`~tlkit.evaluation.gradcam`: decisions, ``misclassified.csv``, Grad-CAM overlays.

Names load lazily (PEP 562): the metrics and calibration functions need no TensorFlow.
"""

from __future__ import annotations

from tlkit.lazy import lazy_exports

_EXPORTS = {
    "evaluate_audio": "tlkit.evaluation.audio",
    "apply_temperature": "tlkit.evaluation.calibration",
    "expected_calibration_error": "tlkit.evaluation.calibration",
    "fit_temperature": "tlkit.evaluation.calibration",
    "reliability_bins": "tlkit.evaluation.calibration",
    "compute_metrics": "tlkit.evaluation.metrics",
    "operating_point": "tlkit.evaluation.metrics",
    "top_k_accuracy": "tlkit.evaluation.metrics",
    "wilson_interval": "tlkit.evaluation.metrics",
    "youden_threshold": "tlkit.evaluation.metrics",
    "PLOTS": "tlkit.evaluation.plots",
    "Plot": "tlkit.evaluation.plots",
    "PlotContext": "tlkit.evaluation.plots",
    "list_plots": "tlkit.evaluation.plots",
    "register_plot": "tlkit.evaluation.plots",
    "unregister_plot": "tlkit.evaluation.plots",
    "EvaluationReport": "tlkit.evaluation.report",
    "read_metrics": "tlkit.evaluation.report",
    "evaluate_predictions": "tlkit.evaluation.runner",
    "evaluate_run": "tlkit.evaluation.runner",
}

__all__ = [
    "PLOTS",
    "EvaluationReport",
    "Plot",
    "PlotContext",
    "apply_temperature",
    "compute_metrics",
    "evaluate_audio",
    "evaluate_predictions",
    "evaluate_run",
    "expected_calibration_error",
    "fit_temperature",
    "list_plots",
    "operating_point",
    "read_metrics",
    "register_plot",
    "reliability_bins",
    "top_k_accuracy",
    "unregister_plot",
    "wilson_interval",
    "youden_threshold",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
