"""Fine-tuning schedules as data: a :class:`Schedule` is an ordered list of :class:`Stage`.

Each stage says which backbone layer groups train (counted from the output end), at what
learning rate, with optional per-group (discriminative) rates, warm-up and decay, and how a
head-only stage is solved. :func:`tlkit.finetune.fine_tune` runs a schedule with ``model.fit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tlkit.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    """One stage of a fine-tuning schedule.

    Attributes:
        name: used for checkpoint and log folders (letters, digits, ``_``, ``-``).
        epochs: number of epochs (0 skips the stage).
        unfreeze: backbone groups thawed, counted from the output end; 0 trains the head
            only; ``"all"`` thaws the whole backbone.
        learning_rate: peak learning rate of the head.
        group_lr_decay: discriminative learning rates: the thawed group ``d`` places below
            the output end (``d = 0`` is the top group) trains at
            ``learning_rate * group_lr_decay ** (d + 1)``. 1.0 gives every group the head's rate.
        warmup_epochs: linear warm-up from 0 to the peak rate over this many epochs.
        decay: ``"cosine"`` decays to ``min_lr_fraction * peak`` by the stage's end;
            ``"constant"`` keeps the peak.
        min_lr_fraction: floor of the cosine decay, as a fraction of the peak.
        early_stopping_patience: stop the stage after this many epochs without a better
            validation loss (``None``: never).
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        weight_decay: for ``"adamw"``.
        solver: how a head-only stage (``unfreeze = 0``) trains. ``"auto"`` (default) solves
            the head to convergence on backbone features computed once (logistic regression
            with its L2 strength chosen on validation, see :mod:`tlkit.head_fit`) whenever the
            features are fixed, and otherwise trains ``epochs`` epochs, saying why;
            ``"converge"`` insists on the solve (an error names what prevents it); ``"sgd"``
            always trains ``epochs`` epochs at ``learning_rate`` with ``optimizer``. Stages that
            thaw backbone groups always train epoch by epoch.
    """

    name: str
    epochs: int
    unfreeze: int | Literal["all"] = 0
    learning_rate: float = 1e-3
    group_lr_decay: float = 1.0
    warmup_epochs: float = 0.0
    decay: Literal["cosine", "constant"] = "cosine"
    min_lr_fraction: float = 0.0
    early_stopping_patience: int | None = None
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0
    solver: Literal["auto", "converge", "sgd"] = "auto"

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"stage name {self.name!r} must be letters, digits, '_' or '-'")
        if self.epochs < 0:
            raise ConfigError(f"stage {self.name!r}: epochs must be >= 0, got {self.epochs}")
        if self.learning_rate <= 0:
            raise ConfigError(f"stage {self.name!r}: learning_rate must be > 0, got {self.learning_rate}")
        if self.unfreeze != "all" and (not isinstance(self.unfreeze, int) or self.unfreeze < 0):
            raise ConfigError(f"stage {self.name!r}: unfreeze must be a count >= 0 or 'all', got {self.unfreeze!r}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ConfigError(f"stage {self.name!r}: unknown optimizer {self.optimizer!r} (adam, adamw, sgd)")
        if self.solver not in ("auto", "converge", "sgd"):
            raise ConfigError(f"stage {self.name!r}: solver must be 'auto', 'converge' or 'sgd', got {self.solver!r}")
        if self.decay not in ("cosine", "constant"):
            raise ConfigError(f"stage {self.name!r}: decay must be 'cosine' or 'constant', got {self.decay!r}")


@dataclass(frozen=True)
class Schedule:
    """An ordered list of stages."""

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("a schedule needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}")

    @classmethod
    def feature_extraction(cls, epochs: int = 10, learning_rate: float = 1e-3, **stage: Any) -> "Schedule":
        """Head only, backbone frozen throughout."""
        return cls((Stage("head", epochs, 0, learning_rate, **stage),))

    @classmethod
    def fine_tune(
        cls,
        head_epochs: int = 5,
        epochs: int = 5,
        top_groups: int = 2,
        deeper_epochs: int = 0,
        deeper_groups: int | Literal["all"] = "all",
        learning_rate: float = 1e-3,
        fine_tune_learning_rate: float = 1e-4,
        group_lr_decay: float = 0.5,
        warmup_epochs: float = 1.0,
        early_stopping_patience: int | None = None,
    ) -> "Schedule":
        """Head first; then the top ``top_groups`` groups at a lower rate; then, optionally, deeper."""
        stages = [Stage("head", head_epochs, 0, learning_rate, early_stopping_patience=early_stopping_patience)]
        stages.append(
            Stage("top", epochs, top_groups, fine_tune_learning_rate, group_lr_decay, warmup_epochs,
                  early_stopping_patience=early_stopping_patience)
        )
        if deeper_epochs:
            stages.append(
                Stage("deeper", deeper_epochs, deeper_groups, fine_tune_learning_rate / 2, group_lr_decay,
                      warmup_epochs, early_stopping_patience=early_stopping_patience)
            )
        return cls(tuple(stages))

    @classmethod
    def preset(cls, name: str, **kwargs: Any) -> "Schedule":
        """``"feature_extraction"`` or ``"fine_tune"`` with keyword overrides."""
        presets = {"feature_extraction": cls.feature_extraction, "fine_tune": cls.fine_tune}
        if name not in presets:
            raise ConfigError(f"unknown schedule preset {name!r}; choose from {sorted(presets)}")
        try:
            return presets[name](**kwargs)
        except TypeError as exc:
            raise ConfigError(f"schedule preset {name!r}: {exc}") from exc

    @classmethod
    def from_dicts(cls, stages: Sequence[dict[str, Any]]) -> "Schedule":
        """A schedule from plain dicts (e.g. ``[[schedule.stages]]`` tables of a TOML config)."""
        built = []
        for index, raw in enumerate(stages):
            try:
                built.append(Stage(**raw))
            except TypeError as exc:
                raise ConfigError(f"schedule stage #{index + 1}: {exc}") from exc
        return cls(tuple(built))
