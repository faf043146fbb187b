"""Domain adaptation during training: close the gap to an unlabelled target domain.

``[adaptation]`` in a run config (or ``tlkit.fine_tune(..., adaptation=..., target=...)``)
picks one method; docs/adaptation.md compares them on measured shifts.

- :mod:`~tlkit.adaptation.layers`: :class:`GradientReversal`, :func:`coral_loss`, the layers of
  the training model.
- :mod:`~tlkit.adaptation.training`: :class:`Adapter` (what ``fine_tune`` asks), the training
  model of ``dann`` / ``coral`` and its paired source/target data.
- :mod:`~tlkit.adaptation.reweight`: importance weights from a domain classifier.
- :mod:`~tlkit.adaptation.adabn`: BatchNorm statistics re-estimated on other data.
- :mod:`~tlkit.adaptation.target`: loading a run's target data, the shift before/after.

Names load lazily (PEP 562).
"""

from __future__ import annotations

from tlkit.lazy import lazy_exports

_EXPORTS = {
    "AdaBNResult": "tlkit.adaptation.adabn",
    "adapt_batchnorm": "tlkit.adaptation.adabn",
    "GradientReversal": "tlkit.adaptation.layers",
    "coral_loss": "tlkit.adaptation.layers",
    "ganin_lambda": "tlkit.adaptation.layers",
    "ImportanceWeights": "tlkit.adaptation.reweight",
    "fit_importance_weights": "tlkit.adaptation.reweight",
    "Adapter": "tlkit.adaptation.training",
    "training_model": "tlkit.adaptation.training",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
__all__ = [
    "AdaBNResult",
    "Adapter",
    "GradientReversal",
    "ImportanceWeights",
    "adapt_batchnorm",
    "coral_loss",
    "fit_importance_weights",
    "ganin_lambda",
    "training_model",
]
