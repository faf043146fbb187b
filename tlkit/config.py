"""Run configs: a TOML or YAML file -> typed dataclasses, with errors that name the key.

Example (TOML)::

    name = "flowers"
    output_dir = "runs/flowers"     # relative paths are relative to the config file
    seed = 0

    [data]
    path = "data/flowers"           # class sub-folders; or manifest = "labels.csv"
    val_fraction = 0.15
    test_fraction = 0.15
    batch_size = 32

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
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tlkit.audio_augment import AudioAugmentation
from tlkit.errors import ConfigError
from tlkit.finetune import Schedule
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

    def __post_init__(self) -> None:
        if (self.path is None) == (self.manifest is None):
            raise ConfigError("[data] needs exactly one of `path` (class folders) or `manifest` (CSV)")
        if self.batch_size < 1:
            raise ConfigError(f"[data] batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class BackboneConfig:
    """Which backbone, with which weights."""

    name: str = DEFAULT_IMAGE_BACKBONE
    weights: str | None = "pretrained"
    image_size: int | None = None
    sample_rate: int | None = None  # ad-hoc audio encoders (a .keras file or SavedModel): their rate


@dataclass(frozen=True)
class TrainingConfig:
    """Hardware options: mixed precision, XLA, distribution strategy."""

    mixed_precision: Literal["none", "mixed_float16", "mixed_bfloat16"] = "none"
    jit_compile: bool | Literal["auto"] = "auto"
    distribute: Literal["auto", "mirrored", "multi_worker", "one_device"] = "auto"
    feature_cache: Literal["auto", "memory", "disk", "off"] = "auto"
    verbose: int | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("none", "mixed_float16", "mixed_bfloat16"):
            raise ConfigError(
                f"[training] mixed_precision must be none, mixed_float16 or mixed_bfloat16, got {self.mixed_precision!r}"
            )
        if self.distribute not in ("auto", "mirrored", "multi_worker", "one_device"):
            raise ConfigError(
                f"[training] distribute must be auto, mirrored, multi_worker or one_device, got {self.distribute!r}"
            )


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
    seed: int = 0
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that :func:`config_from_dict` reads back to an equal config."""
        raw = dataclasses.asdict(self)
        raw["schedule"] = {"stages": [dataclasses.asdict(s) for s in self.schedule.stages]}
        raw["augmentation"] = dataclasses.asdict(self.augmentation) if self.augmentation else {"enabled": False}
        return raw


def _build(cls: type, raw: Any, section: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a table, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"[{section}] has unknown key(s) {unknown}; known keys: {sorted(known)}")
    values = dict(raw)
    for f in dataclasses.fields(cls):
        if f.name in values and isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"[{section}]: {exc}") from exc


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
        return Schedule.from_dicts(stages)
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
    allowed = {"name", "output_dir", "data", "backbone", "head", "augmentation", "schedule", "training", "seed", "source"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; known: {sorted(allowed)}")
    if "data" not in raw:
        raise ConfigError("the config needs a [data] table with `path` or `manifest`")
    data = dict(raw["data"])
    for key in ("path", "manifest"):
        if data.get(key):
            data[key] = str(_resolve(base, data[key]))
    if isinstance(data.get("cache"), str):
        data["cache"] = str(_resolve(base, data["cache"]))
    backbone = dict(raw.get("backbone") or {})
    name_value = str(backbone.get("name", ""))
    if name_value and not name_value.startswith(("http://", "https://", "gs://")) and (
        "/" in name_value or name_value.endswith(".keras")
    ):
        backbone["name"] = str(_resolve(base, name_value))  # a local .keras file or SavedModel dir
    if isinstance(backbone.get("weights"), str) and backbone["weights"].lower() in ("none", "random"):
        backbone["weights"] = None
    elif isinstance(backbone.get("weights"), str) and backbone["weights"] != "pretrained":
        backbone["weights"] = str(_resolve(base, backbone["weights"]))
    name = str(raw.get("name") or Path(source or "run").stem)
    output_dir = str(_resolve(base, raw.get("output_dir") or f"runs/{name}"))
    return RunConfig(
        name=name,
        output_dir=output_dir,
        data=_build(DataConfig, data, "data"),
        backbone=_build(BackboneConfig, backbone, "backbone"),
        head=_build(HeadConfig, raw.get("head"), "head"),
        augmentation=_augmentation(raw.get("augmentation")),
        schedule=_schedule(raw.get("schedule")),
        training=_build(TrainingConfig, raw.get("training"), "training"),
        seed=int(raw.get("seed", 0)),
        source=source,
    )


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
