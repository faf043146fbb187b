"""Run configs: a TOML or YAML file -> typed dataclasses, with errors that name the key.

Every value is checked against its field's type and range when the config is read
(:mod:`tlkit.config_check`): ``batch_size = "8"`` or ``image_size = 0`` is a
:class:`~tlkit.errors.ConfigError` naming the key, not a traceback later.

Example (TOML)::

    name = "flowers"
    output_dir = "runs/flowers"     # relative paths are relative to the config file
    seed = 0

    [data]
    path = "data/flowers"           # class sub-folders; or manifest = "labels.csv"
    val_fraction = 0.15
    test_fraction = 0.15
    batch_size = 32
    drop_unreadable_classes = false # true: train without a class none of whose files decode

    [backbone]
    name = "efficientnet_lite0"     # registry name, TF-Hub handle, SavedModel dir or .keras file
    weights = "pretrained"          # or "none" (random init) or a weights file

    [head]
    dropout = 0.2

    [augmentation]
    horizontal_flip = true
    zoom = 0.1

    [schedule]
    preset = "fine_tune"            # or [[schedule.stages]] tables
    head_epochs = 5
    epochs = 5

    [training]
    mixed_precision = "none"        # "mixed_float16" / "mixed_bfloat16" on GPUs
    distribute = "auto"             # "auto", "mirrored", "multi_worker", "one_device"

    [adaptation]                    # optional: unlabelled target domain (docs/adaptation.md)
    target = "data/hospital_b"
    method = "dann"                 # "coral", "dann", "reweight", "adabn" or "none"
    weight = 1.0

    [tasks.accent]                  # optional: several label columns of a manifest (docs/multitask.md)
    column = "accent"               # default "task:<name>", then "<name>"
    multi_label = false             # cells split on "|" when true
    loss_weight = 1.0

    [card]                          # optional: what the exported model_card.md says the model is for
    intended_use = "Sorting flower photos for a garden app; not for identifying toxic plants."
    limitations = "Trained on daylight photos of 5 species; other species get one of the 5 labels."
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tlkit.audio_augment import AudioAugmentation
from tlkit.backbones.hub import is_hub_handle
from tlkit.config_check import check_values, hints_of
from tlkit.errors import ConfigError
from tlkit.schedule import Schedule, Stage
from tlkit.model import HeadConfig, ImageAugmentation

DEFAULT_IMAGE_BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class DataConfig:
    """Where the labelled examples are and how they are split and batched."""

    path: str | None = None
    manifest: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    batch_size: int = 32
    cache: bool | str = True
    class_weights: bool = False
    # Audio only: training crop length, and crops averaged per clip at evaluation.
    clip_seconds: float = 5.0
    eval_crops: int = 3
    # A class whose every file is unreadable is an error; true drops it (reported in the summary).
    drop_unreadable_classes: bool = False

    def __post_init__(self) -> None:
        _check_fields(self, "data")
        if (self.path is None) == (self.manifest is None):
            raise ConfigError("[data] needs exactly one of `path` (class folders) or `manifest` (CSV)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"[data] val_fraction + test_fraction must be below 1 (some examples must train), got "
                f"{self.val_fraction} + {self.test_fraction}"
            )


@dataclass(frozen=True)
class BackboneConfig:
    """Which backbone, with which weights."""

    name: str = DEFAULT_IMAGE_BACKBONE
    weights: str | None = "pretrained"
    image_size: int | None = None
    sample_rate: int | None = None  # ad-hoc audio encoders (a .keras file or SavedModel): their rate

    def __post_init__(self) -> None:
        _check_fields(self, "backbone")


@dataclass(frozen=True)
class TrainingConfig:
    """Hardware options: mixed precision, XLA, distribution strategy."""

    mixed_precision: Literal["none", "mixed_float16", "mixed_bfloat16"] = "none"
    jit_compile: bool | Literal["auto"] = "auto"
    distribute: Literal["auto", "mirrored", "multi_worker", "one_device"] = "auto"
    feature_cache: Literal["auto", "memory", "disk", "off"] = "auto"
    verbose: int | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        _check_fields(self, "training")  # the Literal annotations name the allowed values


@dataclass(frozen=True)
class AdaptationConfig:
    """``[adaptation]``: adapt to an unlabelled target domain during training (docs/adaptation.md).

    Attributes:
        target: a folder or CSV manifest of target images/audio (labels ignored if present);
            relative to the config file.
        method: ``"dann"`` (domain-adversarial, gradient reversal), ``"coral"`` (Deep CORAL),
            ``"reweight"`` (importance-weighted source examples), ``"adabn"`` (BatchNorm
            statistics re-estimated on the target) or ``"none"``.
        weight: strength of the adaptation loss (dann, coral).
    """

    target: str | None = None
    method: Literal["coral", "dann", "reweight", "adabn", "none"] = "none"
    weight: float = 1.0

    def __post_init__(self) -> None:
        _check_fields(self, "adaptation")
        if self.weight < 0:
            raise ConfigError(f"[adaptation] weight must be >= 0, got {self.weight}")
        if self.method != "none" and not self.target:
            raise ConfigError(f"[adaptation] method = {self.method!r} needs `target` (a folder or CSV manifest of "
                              "unlabelled target examples)")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclass(frozen=True)
class CardConfig:
    """``[card]``: the intended use and the limitations the exported model card states
    (``model_card.md``, :mod:`tlkit.export.model_card`); free text, ``None`` when not declared."""

    intended_use: str | None = None
    limitations: str | None = None

    def __post_init__(self) -> None:
        _check_fields(self, "card")


#: What a task name may be: it names model outputs and layers (``<task>_logits``) and files.
TASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class TaskConfig:
    """``[tasks.<name>]``: one label column of a manifest, predicted by its own head.

    Attributes:
        name: identifier-like (``[A-Za-z_][A-Za-z0-9_]*``); the model's output of this task.
        column: the manifest column; ``None``: ``task:<name>`` when the manifest has it, else ``<name>``.
        multi_label: the column's cells hold several labels split on ``|`` (sigmoid head).
        loss_weight: this task's share of the training loss (>= 0).
    """

    name: str
    column: str | None = None
    multi_label: bool = False
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _check_fields(self, f"tasks.{self.name}")
        if not TASK_NAME.fullmatch(self.name):
            raise ConfigError(f"[tasks] task name {self.name!r} must be identifier-like (letters, digits, '_', "
                              "not starting with a digit); rename the [tasks.<name>] table")
        if self.loss_weight < 0:
            raise ConfigError(f"[tasks.{self.name}] loss_weight must be >= 0, got {self.loss_weight}")
        if self.column is not None and not self.column.strip():
            raise ConfigError(f"[tasks.{self.name}] column must name a manifest column, got {self.column!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything ``tlkit train`` needs. ``source`` is the config file it came from."""

    name: str
    output_dir: str
    data: DataConfig
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    augmentation: ImageAugmentation | AudioAugmentation | None = field(default_factory=ImageAugmentation)
    schedule: Schedule = field(default_factory=Schedule.fine_tune)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    card: CardConfig = field(default_factory=CardConfig)
    seed: int = 0
    source: str | None = None
    tasks: tuple[TaskConfig, ...] = ()  # several label columns (sorted by name); empty: one label

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that :func:`config_from_dict` reads back to an equal config."""
        raw = dataclasses.asdict(self)
        raw["schedule"] = {"stages": [dataclasses.asdict(s) for s in self.schedule.stages]}
        raw["augmentation"] = dataclasses.asdict(self.augmentation) if self.augmentation else {"enabled": False}
        raw.pop("tasks")
        if self.tasks:  # the [tasks] table's own shape; single-task configs stay as they were
            raw["tasks"] = {t.name: {k: v for k, v in dataclasses.asdict(t).items() if k != "name"} for t in self.tasks}
        return raw


def _table(raw: Any, section: str) -> dict[str, Any]:
    """A config table as a dict (absent: empty)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a table, got {type(raw).__name__}")
    return dict(raw)


def _build(cls: type, raw: Any, section: str) -> Any:
    raw = _table(raw, section)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"[{section}] has unknown key(s) {unknown}; known keys: {sorted(known)}")
    values = check_values(hints_of(cls), raw, section)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"[{section}]: {exc}") from exc


def _check_fields(config: Any, section: str) -> None:
    """Holds a config dataclass's own fields to their annotations and ranges
    (:mod:`tlkit.config_check`), converting in place (ints to floats, lists to tuples)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for name, value in check_values(hints_of(type(config)), values, section).items():
        object.__setattr__(config, name, value)


def _schedule(raw: Any) -> Schedule:
    if raw is None:
        return Schedule.fine_tune()
    if not isinstance(raw, dict):
        raise ConfigError("[schedule] must be a table with `preset` or `stages`")
    raw = dict(raw)
    stages = raw.pop("stages", None)
    preset = raw.pop("preset", None)
    if stages is not None:
        if preset is not None or raw:
            raise ConfigError("[schedule] takes either `stages` or `preset` with its options, not both")
        if not isinstance(stages, list) or not all(isinstance(stage, dict) for stage in stages):
            raise ConfigError("[schedule] stages must be a list of tables ([[schedule.stages]] in TOML)")
        hints = hints_of(Stage)
        return Schedule.from_dicts(
            [check_values(hints, stage, f"schedule.stages #{n + 1}") for n, stage in enumerate(stages)]
        )
    if not isinstance(preset or "", str):
        raise ConfigError(f"[schedule] preset must be a string, got {preset!r}")
    builder = getattr(Schedule, preset or "fine_tune", None)
    if callable(builder):  # a preset's keyword options, or Stage fields it passes on
        raw = check_values({**hints_of(Stage), **hints_of(builder)}, raw, "schedule")
    return Schedule.preset(preset or "fine_tune", **raw)


def _augmentation(raw: Any) -> ImageAugmentation | AudioAugmentation | None:
    """``[augmentation]``: image keys build an ImageAugmentation, audio keys (``time_shift``,
    ``gain_db``, ``noise_snr_db``, ``spec_*``) an AudioAugmentation; ``kind = "audio"`` forces
    audio; ``enabled = false`` disables augmentation. Audio runs given image defaults use the
    audio defaults."""
    if raw is None:
        return ImageAugmentation()
    if not isinstance(raw, dict):
        raise ConfigError("[augmentation] must be a table")
    if not isinstance(raw.get("enabled", True), bool):
        raise ConfigError(f"[augmentation] enabled must be true or false, got {raw['enabled']!r}")
    if raw.get("enabled", True) is False:
        return None
    raw = {k: v for k, v in raw.items() if k != "enabled"}
    kind = raw.pop("kind", None)
    audio_keys = {f.name for f in dataclasses.fields(AudioAugmentation)} - {
        f.name for f in dataclasses.fields(ImageAugmentation)}
    if kind == "audio" or (kind is None and set(raw) & audio_keys):
        return _build(AudioAugmentation, raw, "augmentation")
    if kind not in (None, "image"):
        raise ConfigError(f"[augmentation] kind must be 'image' or 'audio', got {kind!r}")
    return _build(ImageAugmentation, raw, "augmentation")


def config_from_dict(raw: dict[str, Any], base_dir: str | Path = ".", source: str | None = None) -> RunConfig:
    """Builds a :class:`RunConfig`; relative paths are resolved against ``base_dir``."""
    raw = dict(raw)
    base = Path(base_dir)
    allowed = {"name", "output_dir", "data", "backbone", "head", "augmentation", "schedule", "training", "adaptation", "card",
               "seed", "source", "tasks"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; known: {sorted(allowed)}")
    if "data" not in raw:
        raise ConfigError("the config needs a [data] table with `path` or `manifest`")
    top = check_values(hints_of(RunConfig), {k: raw[k] for k in ("name", "output_dir", "seed") if k in raw}, "")
    # Types first, so that paths are strings before they are resolved.
    data = check_values(hints_of(DataConfig), _table(raw["data"], "data"), "data")
    for key in ("path", "manifest"):
        if data.get(key):
            data[key] = str(_resolve(base, data[key]))
    if isinstance(data.get("cache"), str):
        data["cache"] = str(_resolve(base, data["cache"]))
    backbone = check_values(hints_of(BackboneConfig), _table(raw.get("backbone"), "backbone"), "backbone")
    name_value = str(backbone.get("name", ""))
    if name_value and not is_hub_handle(name_value) and (
        "/" in name_value or name_value.endswith(".keras")
    ):
        backbone["name"] = str(_resolve(base, name_value))  # a local .keras file or SavedModel dir
    if isinstance(backbone.get("weights"), str) and backbone["weights"].lower() in ("none", "random"):
        backbone["weights"] = None
    elif isinstance(backbone.get("weights"), str) and backbone["weights"] != "pretrained":
        backbone["weights"] = str(_resolve(base, backbone["weights"]))
    tasks = _tasks(raw.get("tasks"))
    if tasks and not data.get("manifest"):
        raise ConfigError("[tasks] needs `[data] manifest` (a CSV with one column per task); class folders "
                          "carry a single label. Remove [tasks] or list the files in a manifest")
    name = top.get("name") or Path(source or "run").stem
    output_dir = str(_resolve(base, top.get("output_dir") or f"runs/{name}"))
    return RunConfig(
        name=name,
        output_dir=output_dir,
        data=_build(DataConfig, data, "data"),
        backbone=_build(BackboneConfig, backbone, "backbone"),
        head=_build(HeadConfig, raw.get("head"), "head"),
        augmentation=_augmentation(raw.get("augmentation")),
        schedule=_schedule(raw.get("schedule")),
        training=_build(TrainingConfig, raw.get("training"), "training"),
        adaptation=_build(AdaptationConfig, _adaptation(raw.get("adaptation"), base), "adaptation"),
        card=_build(CardConfig, raw.get("card"), "card"),
        seed=top.get("seed", 0),
        source=source,
        tasks=tasks,
    )


def _tasks(raw: Any) -> tuple[TaskConfig, ...]:
    """``[tasks]``: a table of ``[tasks.<name>]`` tables -> TaskConfigs sorted by name (Keras orders
    a dict of model outputs by key, so tlkit's task order is the sorted one everywhere)."""
    table = _table(raw, "tasks")
    built = []
    for name in sorted(table):
        if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
            raise ConfigError(f"[tasks] task name {name!r} must be identifier-like (letters, digits, '_', not "
                              "starting with a digit); rename the [tasks.<name>] table")
        body = _table(table[name], f"tasks.{name}")
        if "name" in body and body.pop("name") != name:
            raise ConfigError(f"[tasks.{name}] name must match its table name {name!r}")
        built.append(_build(TaskConfig, {"name": name, **body}, f"tasks.{name}"))
    return tuple(built)


def _adaptation(raw: Any, base: Path) -> dict[str, Any]:
    """``[adaptation]`` with its types checked and ``target`` resolved against the config's folder."""
    table = check_values(hints_of(AdaptationConfig), _table(raw, "adaptation"), "adaptation")
    if isinstance(table.get("target"), str) and table["target"]:
        table["target"] = str(_resolve(base, table["target"]))
    return table


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def load_config(path: str | Path) -> RunConfig:
    """Reads a ``.toml``, ``.yaml``/``.yml`` or ``.json`` run config."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"config file {str(file)!r} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix == ".toml":
            raw = tomllib.loads(text)
        elif file.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        elif file.suffix == ".json":
            raw = json.loads(text)
        else:
            raise ConfigError(f"config {str(file)!r}: use a .toml, .yaml or .json file")
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"config {str(file)!r} is not valid {file.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config {str(file)!r} must hold a table/mapping at the top level")
    return config_from_dict(raw, file.parent, source=str(file.resolve()))
