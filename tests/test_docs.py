"""The architecture page names every module, and every app follows the "how to add an app" recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlkit.config import load_config

REPO = Path(__file__).resolve().parents[1]
APPS = sorted(p for p in (REPO / "apps").iterdir() if p.is_dir())


def test_architecture_page_mentions_every_module() -> None:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = sorted(p.relative_to(REPO / "tlkit").as_posix() for p in (REPO / "tlkit").rglob("*.py"))
    missing = [m for m in modules if m not in text]
    assert not missing, f"docs/architecture.md does not mention {missing}"


@pytest.mark.parametrize("app", APPS, ids=[p.name for p in APPS])
def test_every_app_follows_the_recipe(app: Path) -> None:
    """docs/architecture.md, "Adding an app": README.md, prepare.py, config.toml and an offline
    config.sample.toml that tlkit reads; the app is listed in apps/README.md."""
    for name in ("README.md", "prepare.py", "config.toml", "config.sample.toml"):
        assert (app / name).is_file(), f"{app.name} lacks {name}"
    for config in ("config.toml", "config.sample.toml"):
        cfg = load_config(app / config)  # parses and type-checks every key
        assert cfg.name and cfg.output_dir
    assert f"[{app.name}]({app.name}/)" in (REPO / "apps" / "README.md").read_text(encoding="utf-8")
