"""A tqdm progress bar over training steps, as a Keras callback."""

from __future__ import annotations

from typing import Any

import keras
from tqdm.auto import tqdm


class ProgressBar(keras.callbacks.Callback):
    """One bar over all epochs x steps of one or several ``fit`` calls; shows the latest loss and accuracy."""

    def __init__(self, epochs: int, steps_per_epoch: int, description: str = "training") -> None:
        super().__init__()
        self.total = epochs * steps_per_epoch
        self.description = description
        self.bar: Any = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        # One bar across the stages of a schedule (each stage is its own `fit`).
        if self.bar is None:
            self.bar = tqdm(total=self.total, desc=self.description, unit="step", leave=True, dynamic_ncols=True)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.bar.update(1)
        if logs:
            shown = {k: f"{float(v):.3f}" for k, v in logs.items() if k in ("loss", "accuracy")}
            self.bar.set_postfix(shown, refresh=False)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs and "val_accuracy" in logs:
            self.bar.set_postfix(
                {"loss": f"{float(logs['loss']):.3f}", "val_acc": f"{float(logs['val_accuracy']):.3f}"}, refresh=True
            )

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.bar is not None and self.bar.n >= self.total:
            self.bar.close()

    def close(self) -> None:
        """Closes the bar (e.g. when early stopping ended training before the last step)."""
        if self.bar is not None:
            self.bar.close()
