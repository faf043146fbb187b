"""How a run's final model comes back: the two halves of :meth:`tlkit.RunDir.load_model`.

- :func:`load_saved_model`: ``model.keras`` with Keras's safe mode on, frozen flags re-applied,
  compiled from the file's own compile config with a fresh optimizer.
- :func:`rebuild_model`: runs whose backbone is a SavedModel graph (TF-Hub, a local SavedModel,
  which safe mode refuses because a graph is code) are rebuilt from their config and backbone,
  and their trained weights (``model.weights.h5``) loaded into the rebuilt model.

:class:`tlkit.RunDir` decides which applies (the backbone source's ``reloads_safely``) and is the
only caller; nothing here reads run-directory files by name.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import keras

from tlkit.audio_augment import audio_augmentation
from tlkit.backbones.registry import get as get_spec
from tlkit.config import RunConfig
from tlkit.model import build_classifier
from tlkit.model_info import model_name
from tlkit.multitask.model import build_multitask_classifier

__all__ = ["load_saved_model", "rebuild_model"]


def load_saved_model(path: Path, *, compile: bool = True) -> keras.Model:
    """``path`` (a ``.keras`` file) loaded in safe mode, frozen layers frozen, compiled as saved."""
    model = keras.saving.load_model(path, safe_mode=True, compile=False)
    _refreeze(model)
    if compile:
        _compile_as_saved(model, path)
    return model


def rebuild_model(cfg: RunConfig, status: dict[str, Any], classes: list[str] | dict[str, list[str]],
                  weights: Path) -> keras.Model:
    """The run's model built again from its config (``classes``: class names, or ``{task: class
    names}`` for a multi-task run; ``status``: its ``run.json``) with ``weights`` loaded."""
    spec = get_spec(cfg.backbone.name, image_size=cfg.backbone.image_size,
                    modality=status.get("modality", "image"), sample_rate=cfg.backbone.sample_rate)
    augmentation = audio_augmentation(cfg.augmentation) if spec.modality == "audio" else cfg.augmentation
    size = tuple(status["image_size"]) if status.get("image_size") else None
    common: dict[str, Any] = {"weights": "pretrained", "head": cfg.head, "augmentation": augmentation,
                              "image_size": size, "seed": cfg.seed, "name": model_name(cfg.name)}
    if isinstance(classes, dict):
        multi = {t["name"]: bool(t.get("multi_label")) for t in status.get("tasks", [])}
        heads = [(task, len(names), multi.get(task, False)) for task, names in classes.items()]
        model = build_multitask_classifier(spec, heads, **common)
    else:
        model = build_classifier(spec, len(classes), **common)
    model.load_weights(weights)
    return model


def _refreeze(model: keras.Model) -> None:
    """Re-applies frozen flags after loading: Keras rebuilds the sublayers of some layers
    (``MultiHeadAttention``'s query/key/value projections in Whisper's blocks) as trainable even
    when their parent was saved frozen, so a loaded run had more trainable variables than the
    saved one (and Keras warned that the saved optimizer did not fit). Runs saved since
    :class:`tlkit.backbones.layers.MultiHeadAttention` do not need it; older runs do."""
    for layer in model._flatten_layers(include_self=False):
        if not layer.trainable:
            # Called directly: on the TensorFlow backend ``layer.trainable = False`` is skipped when
            # the flag is already False (keras/src/backend/tensorflow/trackable.py), so the
            # sublayers would never hear of it. The setter propagates to every sublayer.
            keras.layers.Layer.trainable.fset(layer, False)


def _compile_as_saved(model: keras.Model, path: Path) -> None:
    """Compiles ``model`` with the loss, metrics and optimizer kind saved in the ``.keras`` file
    (a fresh optimizer: the final model's saved optimizer holds no training state worth keeping)."""
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json").decode("utf-8")).get("compile_config")
    if config:
        model.compile_from_config(config)
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
