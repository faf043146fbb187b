"""Every tlkit module imports as a program's first tlkit import (no circular import at run time,
e.g. through a package ``__init__`` that registers built-ins)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import importlib, pathlib, sys
import tensorflow, keras  # loaded once; only tlkit's own modules are imported afresh below
root = pathlib.Path("tlkit")
names = sorted(".".join(p.with_suffix("").parts).removesuffix(".__init__") for p in root.rglob("*.py"))
failed = []
for name in names:
    for loaded in [m for m in sys.modules if m == "tlkit" or m.startswith("tlkit.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed) if failed else "ALL OK", len(names))
"""


def test_every_module_imports_first() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ALL OK"), out.stdout
