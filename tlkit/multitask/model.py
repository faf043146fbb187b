"""The multi-task classifier: one backbone, one head per task, one functional ``keras.Model``.

Raw input -> the trunk of :func:`tlkit.model.build_classifier` (``resize`` / ``frontend`` ->
``preprocess`` -> ``augment`` -> ``backbone`` -> ``pool``), then per task ``<task>_dropout_<i>`` ->
``<task>_hidden_<i>`` -> ``<task>_dropout`` -> ``<task>_logits`` -> ``<task>`` (softmax or
sigmoid). The model's outputs are a dict keyed by task name; Keras orders them by name, the
task order tlkit uses everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import keras

from tlkit.backbones.spec import BackboneSpec
from tlkit.config import TASK_NAME
from tlkit.errors import ConfigError
from tlkit.model import FEATURES_LAYER, Augmentation, HeadConfig, add_head, build_trunk


class TaskHead(NamedTuple):
    """One task's head: its output name, class count and activation (a tuple:
    ``name, num_classes, multi_label = head`` works)."""

    name: str
    num_classes: int
    multi_label: bool = False


def as_task_heads(tasks: Sequence[TaskHead | tuple[str, int, bool]]) -> tuple[TaskHead, ...]:
    """``tasks`` as :class:`TaskHead` records, sorted by name and checked.

    Raises:
        ConfigError: fewer than one task, a name that is not identifier-like or repeats, or too
            few classes (2 single-label, 1 multi-label).
    """
    heads = tuple(sorted((TaskHead(str(t[0]), int(t[1]), bool(t[2])) for t in tasks), key=lambda t: t.name))
    if not heads:
        raise ConfigError("a multi-task classifier needs at least one task")
    names = [t.name for t in heads]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique, got {names}")
    for task in heads:
        if not TASK_NAME.fullmatch(task.name):
            raise ConfigError(f"task name {task.name!r} must be identifier-like (letters, digits, '_')")
        if task.num_classes < (1 if task.multi_label else 2):
            raise ConfigError(f"task {task.name!r} needs at least 2 classes (1 if multi-label), got {task.num_classes}")
    return heads


def build_multitask_classifier(
    backbone: str | BackboneSpec,
    tasks: Sequence[TaskHead | tuple[str, int, bool]],
    *,
    weights: str | None = "pretrained",
    head: HeadConfig | None = None,
    augmentation: Augmentation | None = None,
    image_size: int | tuple[int, int] | None = None,
    seed: int | None = None,
    name: str = "tlkit_multitask_classifier",
) -> keras.Model:
    """Builds one backbone with one head per task (see the module docstring).

    Args:
        tasks: ``(name, num_classes, multi_label)`` tuples or :class:`TaskHead` records.
        head: hidden units, dropout, pooling and BatchNorm policy shared by every task's head
            (``head.multi_label`` is ignored: each task says its own).
        backbone / weights / augmentation / image_size / seed: as :func:`tlkit.build_classifier`.

    Returns:
        A model taking the raw input of :func:`tlkit.build_classifier` and returning
        ``{task: (B, C_task) float32 probabilities}``. Attributes (not saved): ``tlkit_spec``,
        ``tlkit_groups``, ``tlkit_head`` and ``tlkit_tasks`` (the TaskHead records, in order).
    """
    head = head or HeadConfig()
    heads = as_task_heads(tasks)
    trunk = build_trunk(backbone, weights=weights, head=head, augmentation=augmentation, image_size=image_size,
                        seed=seed)
    outputs = {task.name: add_head(trunk.features, head, task.num_classes, task.multi_label, f"{task.name}_", task.name)
               for task in heads}
    model = trunk.model(outputs, head, name)
    model.tlkit_tasks = heads  # type: ignore[attr-defined]
    return model


def task_names(model: keras.Model) -> list[str]:
    """The task names of a multi-task model, in output order (also after a reload)."""
    return list(model.output_names)


def task_head(model: keras.Model, task: str) -> keras.Model:
    """``(B, C_features) -> (B, C_task)`` probabilities of one task, sharing the model's layers
    (training it trains the full model's head of that task)."""
    features = model.get_layer(FEATURES_LAYER).output
    head_input = keras.Input(shape=features.shape[1:], dtype=features.dtype, name="features")
    x = head_input
    for layer in model.layers:
        if layer.name.startswith(f"{task}_") and _is_head_layer(layer.name, task):
            x = layer(x)
    return keras.Model(head_input, model.get_layer(task)(x), name=f"{task}_head")


def _is_head_layer(name: str, task: str) -> bool:
    rest = name[len(task) + 1:]
    return rest in ("dropout", "logits") or rest.startswith(("dropout_", "hidden_"))


def is_multitask_model(model: keras.Model) -> bool:
    """Whether ``model`` returns a dict of task outputs (built here, or reloaded from a ``.keras`` file)."""
    return isinstance(model.output, dict) or len(model.outputs) > 1


def task_heads_of(model: keras.Model) -> tuple[TaskHead, ...]:
    """The :class:`TaskHead` records of a multi-task model (from its layers after a reload)."""
    known = getattr(model, "tlkit_tasks", None)
    if known is not None:
        return tuple(known)
    heads = []
    for name in task_names(model):
        layer = model.get_layer(name)
        activation = getattr(getattr(layer, "activation", None), "__name__", "softmax")
        heads.append(TaskHead(name, int(model.get_layer(f"{name}_logits").units), activation == "sigmoid"))
    return tuple(heads)


def predict_tasks(model: keras.Model, data: Any) -> dict[str, Any]:
    """``model.predict`` of a multi-task model as ``{task: (N, C_task) float32}``."""
    values = model.predict(data, verbose=0)
    return dict(values) if isinstance(values, dict) else dict(zip(task_names(model), values))
