"""Source adapter: a backbone saved as a ``.keras`` file (loaded with Keras's safe mode on)."""

from __future__ import annotations

from pathlib import Path

import keras

from tlkit.backbones.spec import BackboneSpec
from tlkit.errors import BackboneNotFoundError


def claims(name: str) -> bool:
    """True for a path ending in ``.keras`` (whether or not it exists: :func:`locate` says)."""
    return Path(name).suffix == ".keras"


def locate(name: str) -> tuple[str, str]:
    """``(ad-hoc backbone name, absolute path)`` of the ``.keras`` file ``name``.

    Raises:
        BackboneNotFoundError: the file does not exist.
    """
    path = Path(name).expanduser()
    if not path.is_file():
        raise BackboneNotFoundError(f"backbone file {str(path)!r} does not exist; check the path")
    return path.stem, str(path.resolve())


def available_offline(spec: BackboneSpec) -> bool:
    """True when the file is there (it is the whole backbone)."""
    return Path(spec.location).is_file()


def load(spec: BackboneSpec, weights: str | None = "pretrained") -> keras.Model:
    """The model saved in ``spec.location``.

    Args:
        spec: a ``keras_file`` spec.
        weights: ``"pretrained"`` (the file's own weights), ``None`` (same architecture,
            fresh initial weights) or a weights file to load into it.

    Raises:
        BackboneNotFoundError: the file does not exist.
    """
    path = Path(spec.location)
    if not path.is_file():
        raise BackboneNotFoundError(f"backbone file {str(path)!r} does not exist; check the path")
    model = keras.saving.load_model(path, compile=False, safe_mode=True)
    if weights is None:
        return keras.models.clone_model(model)  # same architecture, new initial weights
    if weights != "pretrained":
        model.load_weights(weights)
    return model
