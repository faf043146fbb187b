"""Calibration by default: a temperature fitted on validation and folded into the model itself.

Dividing the logits by a temperature ``T`` is the same as dividing the ``logits`` Dense layer's
kernel and bias by ``T``, for softmax and sigmoid heads alike. tlkit therefore calibrates a
trained model by rescaling that layer: ``model.keras``, ``tlkit predict``, ``tlkit evaluate``
and every export then return the calibrated probabilities with no side file to apply, and the
arg-max (the predicted class) and the ranking of scores are unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import keras
import numpy as np

from tlkit.evaluation.calibration import apply_temperature, at_search_edge, fit_temperature, nll
from tlkit.evaluation.metrics import indicator


@dataclass
class Calibration:
    """A fitted temperature and what it did on the validation split it was fitted on."""

    temperature: float
    val_nll_before: float
    val_nll_after: float
    examples: int
    folded_into_model: bool = True
    method: str = "temperature scaling"
    fitted_on: str = "validation split"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fold_temperature(model: keras.Model, temperature: float, layer_name: str = "logits") -> None:
    """Divides the ``layer_name`` Dense layer's kernel and bias by ``temperature`` (in place); a
    multi-task model has one per task, ``<task>_logits``."""
    layer = model.get_layer(layer_name)
    layer.set_weights([np.asarray(w) / temperature for w in layer.get_weights()])


def calibrate_model(
    model: keras.Model, y_true: np.ndarray, probabilities: np.ndarray, *, multi_label: bool = False,
    layer_name: str = "logits",
) -> Calibration | None:
    """Fits a temperature on validation predictions of ``model`` and folds it into the model.

    Args:
        layer_name: the Dense layer whose output the probabilities are computed from (a
            multi-task model: ``<task>_logits``, with that task's labelled validation rows).
        y_true: (N,) indices or (N, C) one-/multi-hot targets of the validation split.
        probabilities: (N, C) the model's validation probabilities (as the run scores them,
            e.g. averaged over audio crops).

    Returns:
        The :class:`Calibration`, or ``None`` (model unchanged) when the fit is not meaningful:
        fewer than 2 examples, or the temperature at the edge of its search range (a split
        that is perfectly separated or too small).
    """
    probs = np.asarray(probabilities, np.float64)
    if len(probs) < 2:
        return None
    temperature = fit_temperature(y_true, probs, multi_label)
    if at_search_edge(temperature):
        return None
    truth = indicator(y_true, probs.shape[1], multi_label)
    before = nll(truth, probs, multi_label)
    after = nll(truth, apply_temperature(probs, temperature, multi_label).astype(np.float64), multi_label)
    if not after < before:
        return None
    fold_temperature(model, temperature, layer_name)
    return Calibration(float(temperature), float(before), float(after), int(len(probs)))
