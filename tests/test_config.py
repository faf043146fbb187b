"""Run configs: every value is held to its field's type and range when the config is read,
and the error names the key, what it must be and what it got."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tlkit.config import BackboneConfig, DataConfig, config_from_dict, load_config
from tlkit.config_check import BOUNDS, hints_of
from tlkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BASE = {"data": {"path": "data"}}


def _with(section: str, key: str, value: object) -> dict:
    raw = copy.deepcopy(BASE)
    if section:
        raw.setdefault(section, {})[key] = value
    else:
        raw[key] = value
    return raw


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("data", "batch_size", "8", "[data] batch_size must be an integer >= 1, got '8' (a string)"),
        ("data", "batch_size", True, "[data] batch_size must be an integer >= 1, got True (a boolean)"),
        ("data", "batch_size", 0, "[data] batch_size must be an integer >= 1, got 0"),
        ("data", "batch_size", 8.0, "[data] batch_size must be an integer >= 1, got 8.0 (a number)"),
        ("backbone", "image_size", 0, "[backbone] image_size must be an integer >= 8 or null, got 0"),
        ("backbone", "image_size", "64", "[backbone] image_size must be an integer >= 8 or null, got '64' (a string)"),
        ("backbone", "image_size", -5, "got -5 (an integer)"),
        ("backbone", "image_size", 64.5, "got 64.5 (a number)"),
        ("backbone", "sample_rate", 0, "[backbone] sample_rate must be an integer >= 1 or null"),
        ("backbone", "name", 5, "[backbone] name must be a string, got 5"),
        ("data", "val_fraction", "0.2", "[data] val_fraction must be a number in [0, 1), got '0.2' (a string)"),
        ("data", "test_fraction", 1.0, "[data] test_fraction must be a number in [0, 1), got 1.0"),
        ("data", "val_fraction", float("nan"), "[data] val_fraction must be a number in [0, 1), got nan"),
        ("data", "clip_seconds", 0, "[data] clip_seconds must be a number > 0, got 0"),
        ("data", "eval_crops", 0, "[data] eval_crops must be an integer >= 1, got 0"),
        ("data", "class_weights", 1, "[data] class_weights must be true or false, got 1 (an integer)"),
        ("data", "drop_unreadable_classes", "yes", "[data] drop_unreadable_classes must be true or false"),
        ("data", "cache", 5, "[data] cache must be true, false or a string, got 5"),
        ("data", "path", 5, "[data] path must be a string or null, got 5"),
        ("head", "dropout", 1.5, "[head] dropout must be a number in [0, 1), got 1.5"),
        ("head", "hidden_units", [64, 0], "[head] hidden_units must be a list of integers >= 1, got [64, 0]"),
        ("head", "multi_label", "true", "[head] multi_label must be true or false, got 'true' (a string)"),
        ("head", "pooling", "median", "[head] pooling must be 'avg', 'max' or 'attention', got 'median'"),
        ("augmentation", "zoom", 2, "[augmentation] zoom must be a number in [0, 1], got 2"),
        ("augmentation", "enabled", "no", "[augmentation] enabled must be true or false"),
        ("training", "mixed_precision", "fp16",
         "[training] mixed_precision must be 'none', 'mixed_float16' or 'mixed_bfloat16', got 'fp16'"),
        ("training", "verbose", 3, "[training] verbose must be an integer in [0, 2] or 'auto', got 3"),
        ("training", "jit_compile", "yes", "[training] jit_compile must be true, false or 'auto', got 'yes'"),
        ("", "seed", "1", "top-level key seed must be an integer >= 0, got '1' (a string)"),
        ("", "seed", -1, "top-level key seed must be an integer >= 0, got -1"),
        ("", "name", 3, "top-level key name must be a string, got 3"),
    ],
)
def test_wrong_types_and_ranges_name_the_key(section: str, key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(_with(section, key, value))
    assert message in str(info.value)


def test_a_quoted_number_says_how_to_fix_it() -> None:
    with pytest.raises(ConfigError, match="write it without quotes"):
        config_from_dict(_with("data", "batch_size", "8"))
    stages = {"stages": [{"name": "head", "epochs": 1, "learning_rate": "1e-3"}]}
    with pytest.raises(ConfigError, match=r"\[schedule.stages #1\] learning_rate must be a number > 0.*1\.0e-3"):
        config_from_dict({**BASE, "schedule": stages})


def test_toml_file_with_wrong_types_fails_when_read(tmp_path: Path) -> None:
    """The values of the issue, in a real TOML file: a ConfigError at load time, not a traceback later."""
    for line, key in (('batch_size = "8"', "batch_size"), ('val_fraction = "0.2"', "val_fraction")):
        file = tmp_path / f"{key}.toml"
        file.write_text(f'[data]\npath = "d"\n{line}\n', encoding="utf-8")
        with pytest.raises(ConfigError, match=rf"\[data\] {key} must be"):
            load_config(file)
    for value in ("0", '"64"', "-5", "64.5"):
        file = tmp_path / "size.toml"
        file.write_text(f'[data]\npath = "d"\n[backbone]\nimage_size = {value}\n', encoding="utf-8")
        with pytest.raises(ConfigError, match=r"\[backbone\] image_size must be an integer >= 8"):
            load_config(file)


def test_fractions_must_leave_training_examples() -> None:
    with pytest.raises(ConfigError, match=r"val_fraction \+ test_fraction must be below 1"):
        config_from_dict({"data": {"path": "d", "val_fraction": 0.5, "test_fraction": 0.5}})
    cfg = config_from_dict({"data": {"path": "d", "val_fraction": 0, "test_fraction": 0.4}})
    assert cfg.data.val_fraction == 0.0 and isinstance(cfg.data.val_fraction, float)


def test_schedule_stages_and_preset_options_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"\[schedule.stages #2\] unfreeze must be an integer >= 0 or 'all', got -1"):
        config_from_dict({**BASE, "schedule": {"stages": [{"name": "head", "epochs": 1},
                                                          {"name": "top", "epochs": 1, "unfreeze": -1}]}})
    with pytest.raises(ConfigError, match=r"\[schedule.stages #1\] epochs must be an integer >= 0, got '2'"):
        config_from_dict({**BASE, "schedule": {"stages": [{"name": "head", "epochs": "2"}]}})
    with pytest.raises(ConfigError, match=r"\[schedule\] head_epochs must be an integer >= 0, got -1"):
        config_from_dict({**BASE, "schedule": {"preset": "fine_tune", "head_epochs": -1}})
    with pytest.raises(ConfigError, match=r"\[schedule\] optimizer must be 'adam', 'adamw' or 'sgd'"):
        config_from_dict({**BASE, "schedule": {"preset": "feature_extraction", "optimizer": "rmsprop"}})
    with pytest.raises(ConfigError, match="list of tables"):
        config_from_dict({**BASE, "schedule": {"stages": "head"}})
    schedule = config_from_dict({**BASE, "schedule": {"preset": "fine_tune", "learning_rate": 1}}).schedule
    assert schedule.stages[0].learning_rate == 1.0 and isinstance(schedule.stages[0].learning_rate, float)


def test_the_dataclasses_check_themselves_too() -> None:
    with pytest.raises(ConfigError, match=r"\[data\] batch_size must be an integer >= 1, got '8'"):
        DataConfig(path="d", batch_size="8")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\[backbone\] image_size must be an integer >= 8"):
        BackboneConfig(image_size=0)
    assert DataConfig(path="d", clip_seconds=2).clip_seconds == 2.0


def test_good_values_are_converted_and_round_trip() -> None:
    raw = {
        "data": {"path": "d", "val_fraction": 0, "batch_size": 4, "drop_unreadable_classes": True},
        "backbone": {"image_size": 64},
        "head": {"hidden_units": [16, 8]},
        "augmentation": {"noise_snr_db": [10, 20]},
        "training": {"verbose": 0, "jit_compile": False},
        "seed": 3,
    }
    cfg = config_from_dict(raw)
    assert cfg.head.hidden_units == (16, 8) and cfg.augmentation.noise_snr_db == (10.0, 20.0)
    assert cfg.data.drop_unreadable_classes is True and cfg.backbone.image_size == 64 and cfg.seed == 3
    assert config_from_dict(cfg.to_dict()) == cfg


def test_every_bounded_key_is_a_config_field() -> None:
    """A typo in the bounds table would silently leave a key unchecked."""
    from tlkit.audio_augment import AudioAugmentation
    from tlkit.config import RunConfig, TrainingConfig
    from tlkit.model import HeadConfig, ImageAugmentation
    from tlkit.schedule import Schedule, Stage

    known: set[str] = set()
    for target in (DataConfig, BackboneConfig, TrainingConfig, RunConfig, HeadConfig, ImageAugmentation,
                   AudioAugmentation, Stage, Schedule.fine_tune, Schedule.feature_extraction):
        known |= set(hints_of(target))
    assert set(BOUNDS) <= known, sorted(set(BOUNDS) - known)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (
    *REPO.glob("apps/*/config*.toml"), *REPO.glob("examples/*.toml"))))
def test_shipped_configs_pass_the_checks(path: str) -> None:
    load_config(REPO / path)
