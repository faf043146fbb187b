"""Small data files shipped with tlkit (see ``LICENSES.md`` in this folder)."""

from __future__ import annotations

from importlib import resources

from tlkit.errors import TlkitError

__all__ = ["imagenet_class_names"]


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names; index ``i`` is class ``i`` (e.g. 285 "Egyptian cat").

    Read from the bundled ``imagenet_classes.txt`` (Apache-2.0, from the npm package
    ``@tensorflow-models/mobilenet``); no network access.
    """
    text = resources.files(__name__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = text.splitlines()
    if len(names) != 1000:  # pragma: no cover - guards a damaged installation
        raise TlkitError(
            f"tlkit/resources/imagenet_classes.txt has {len(names)} lines, expected 1000; reinstall tlkit"
        )
    return names
