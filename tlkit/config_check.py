"""Type and range checks of config values, driven by dataclass field annotations.

A config file holds plain TOML/YAML/JSON values; the dataclasses that receive them
(:class:`tlkit.config.DataConfig`, :class:`tlkit.model.HeadConfig`,
:class:`tlkit.schedule.Stage`, ...) say in their annotations what each key takes.
:func:`check_values` holds every value against its annotation (``int``, ``float``,
``bool``, ``str``, ``None``, ``Literal[...]``, ``tuple[X, ...]``, ``tuple[X, Y]`` and unions
of them) and against the numeric range in :data:`BOUNDS`, and raises a
:class:`~tlkit.errors.ConfigError` that names the section, the key, what it must be and
what it got::

    [data] batch_size must be an integer >= 1, got '8' (a string)

``bool`` is not an integer here (``batch_size = true`` is refused), an integer is a
number (``val_fraction = 0`` becomes ``0.0``), and lists become tuples.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

from tlkit.errors import ConfigError

__all__ = ["BOUNDS", "Bound", "check_values", "hints_of"]


@dataclass(frozen=True)
class Bound:
    """A numeric range; ``low``/``high`` are inclusive unless ``low_open``/``high_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def text(self) -> str:
        """``">= 1"``, ``"> 0"``, ``"in [0, 1)"``..."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return ""


_FRACTION = Bound(0, 1, high_open=True)
_UNIT = Bound(0, 1)
_COUNT = Bound(0)
_POSITIVE = Bound(0, low_open=True)

#: Ranges of numeric config keys. A key means the same in every section that has it.
BOUNDS: dict[str, Bound] = {
    # [data]
    "val_fraction": _FRACTION, "test_fraction": _FRACTION, "batch_size": Bound(1),
    "clip_seconds": _POSITIVE, "eval_crops": Bound(1),
    # [backbone]
    "image_size": Bound(8), "sample_rate": Bound(1),
    # [head]
    "hidden_units": Bound(1), "dropout": _FRACTION, "label_smoothing": _FRACTION,
    # [augmentation]
    "rotation": _COUNT, "zoom": _UNIT, "translation": _UNIT, "contrast": _UNIT, "brightness": _UNIT,
    "time_shift": _FRACTION, "gain_db": _COUNT, "spec_time_masks": _COUNT, "spec_time_mask_width": _COUNT,
    "spec_freq_masks": _COUNT, "spec_freq_mask_width": _COUNT,
    # [schedule] stages and presets
    "epochs": _COUNT, "head_epochs": _COUNT, "deeper_epochs": _COUNT, "unfreeze": _COUNT,
    "top_groups": _COUNT, "deeper_groups": _COUNT, "learning_rate": _POSITIVE,
    "fine_tune_learning_rate": _POSITIVE, "group_lr_decay": _POSITIVE, "warmup_epochs": _COUNT,
    "min_lr_fraction": _UNIT, "early_stopping_patience": _COUNT, "weight_decay": _COUNT,
    # [training] and the top level
    "verbose": Bound(0, 2), "seed": _COUNT,
}


def hints_of(target: type | Callable[..., Any]) -> dict[str, Any]:
    """The resolved annotations of a dataclass or a function (``return`` left out)."""
    hints = typing.get_type_hints(target)
    hints.pop("return", None)
    return hints


def check_values(hints: Mapping[str, Any], values: Mapping[str, Any], section: str) -> dict[str, Any]:
    """``values`` checked against ``hints``; returns them converted (ints to floats, lists to tuples).

    Keys without a hint pass unchanged (the caller reports unknown keys). ``section`` names
    the config table in messages (``""``: the top level).

    Raises:
        ConfigError: ``[section] key must be <what>, got <value> (<its type>)``.
    """
    checked = dict(values)
    for key, value in values.items():
        if key not in hints:
            continue
        bound = BOUNDS.get(key)
        ok, converted = _match(value, hints[key], bound)
        if not ok:
            where = f"[{section}] {key}" if section else f"top-level key {key}"
            raise ConfigError(
                f"{where} must be {_describe(hints[key], bound)}, got {value!r} ({_kind(value)})"
                + _hint(value, hints[key])
            )
        checked[key] = converted
    return checked


def _members(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)


def _match(value: Any, hint: Any, bound: Bound | None) -> tuple[bool, Any]:
    """(does ``value`` fit ``hint`` and ``bound``, the value converted)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        for member in typing.get_args(hint):
            ok, converted = _match(value, member, bound)
            if ok:
                return True, converted
        return False, value
    if hint is type(None) or hint is None:
        return value is None, None
    if typing.get_origin(hint) is Literal:
        return any(type(value) is type(choice) and value == choice for choice in typing.get_args(hint)), value
    if typing.get_origin(hint) is tuple:
        return _match_tuple(value, typing.get_args(hint), bound)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and (bound is None or bound.holds(value))
        return ok, value
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (bound is None or bound.holds(value))
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    return True, value  # Any, or a type this check does not know: left to the dataclass


def _match_tuple(value: Any, args: tuple[Any, ...], bound: Bound | None) -> tuple[bool, Any]:
    if not isinstance(value, list | tuple):
        return False, value
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    elif len(args) != len(value):
        return False, value
    items = []
    for item, member in zip(value, args):
        ok, converted = _match(item, member, bound)
        if not ok:
            return False, value
        items.append(converted)
    return True, tuple(items)


def _describe(hint: Any, bound: Bound | None, plural: bool = False) -> str:
    """What a value of ``hint`` must be, in words: ``"an integer >= 8 or null"``."""
    words = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings")}
    parts: list[str] = []
    for member in _members(hint):
        if member is type(None) or member is None:
            parts.append("null")
        elif member is bool:
            parts += ["true", "false"]
        elif typing.get_origin(member) is Literal:
            parts += [repr(choice) for choice in typing.get_args(member)]
        elif typing.get_origin(member) is tuple:
            args = typing.get_args(member)
            count = "" if len(args) == 2 and args[1] is Ellipsis else f"{len(args)} "
            parts.append(f"a list of {count}{_describe(args[0], bound, plural=True)}")
        else:
            single, many = words.get(member, (getattr(member, "__name__", str(member)),) * 2)
            text = many if plural else single
            parts.append(f"{text} {bound.text()}" if member in (int, float) and bound is not None else text)
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    for kind, words in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                        (list, "a list"), (tuple, "a list"), (dict, "a table")):
        if isinstance(value, kind):
            return words
    return type(value).__name__


def _hint(value: Any, hint: Any) -> str:
    """A fix for the commonest slip: a number written in quotes (or YAML's ``1e-3``, read as text)."""
    if not isinstance(value, str) or not {int, float} & set(_members(hint)):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    if "e" in value.lower() and "." not in value:
        return "; write it as a number (YAML reads 1e-3 as text: write 1.0e-3)"
    return "; write it without quotes"
