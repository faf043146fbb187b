"""The ``onnx`` export format: written by Keras's ``model.export(format="onnx")``, run by ONNX
Runtime, same top-1 as the SavedModel on held-out examples, and ``tlkit predict model.onnx``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import tlkit.backbones as backbones
from tests.conftest import TINY_SIZE, tiny_spec, write_image_folder
from tlkit.artifacts import OnnxPredictor, SavedModelPredictor, load_exported_predictor
from tlkit.cli import main
from tlkit.config import config_from_dict
from tlkit.errors import ExportError
from tlkit.export import export_run, get_format, onnx_format
from tlkit.predict import load_image
from tlkit.run import train

pytest.importorskip("onnxruntime", reason="the onnx extra: pip install -e '.[onnx]' (included in '.[test]')")


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny trained run exported as SavedModel + ONNX; returns (run_dir, version_dir)."""
    root = tmp_path_factory.mktemp("onnx")
    write_image_folder(root / "images", n_per_class=12)
    spec = backbones.register(tiny_spec(), overwrite=True)
    try:
        cfg = config_from_dict({
            "name": "onnx_tiny", "output_dir": str(root / "run"),
            "data": {"path": str(root / "images"), "batch_size": 16},
            "backbone": {"name": "tiny_test"},
            "schedule": {"stages": [{"name": "head", "epochs": 3, "learning_rate": 0.01}]},
            "training": {"verbose": 0},
        })
        run_dir = train(cfg).run_dir
        report = export_run(run_dir, formats=["savedmodel", "onnx"], out=root / "models", parity_samples=20)
    finally:
        backbones.unregister(spec.name)
    return run_dir, Path(report.out_dir)


def test_onnx_export_matches_savedmodel_top1_on_held_out(onnx_export: tuple[Path, Path]) -> None:
    run_dir, out = onnx_export
    path = out / "model.onnx"
    assert path.is_file()
    meta = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    entry = meta["artifacts"]["onnx"]
    assert entry["input"]["shape"] == [None, TINY_SIZE, TINY_SIZE, 3] and entry["input"]["range"] == [0, 255]
    assert entry["parity"]["top1_agreement"] >= 0.99 and entry["parity"]["max_abs_diff"] < 1e-4

    onnx_model = load_exported_predictor(path)
    saved = load_exported_predictor(out)
    assert isinstance(onnx_model, OnnxPredictor) and isinstance(saved, SavedModelPredictor)
    assert onnx_model.labels == saved.labels == meta["labels"]
    splits = json.loads((run_dir / "splits.json").read_text(encoding="utf-8"))
    held_out = [row["path"] for split in ("val", "test") for row in splits[split]]
    assert len(held_out) >= 5
    # Raw 40x40 files: the ONNX predictor resizes to the fixed 32x32, the SavedModel inside.
    images = [load_image(p) for p in held_out]
    ours = np.stack([onnx_model.predict_one(x) for x in images])
    theirs = np.stack([saved.predict_one(x) for x in images])
    np.testing.assert_array_equal(ours.argmax(1), theirs.argmax(1))
    np.testing.assert_allclose(ours, theirs, atol=2e-3)  # the SavedModel rounds pixels to uint8
    np.testing.assert_allclose(onnx_model.predict_batch(np.stack(images)), ours, atol=1e-5)


def test_onnx_file_alone_carries_its_labels(onnx_export: tuple[Path, Path], tmp_path: Path) -> None:
    """A .onnx copied without metadata.json / labels.txt still names its classes."""
    _, out = onnx_export
    alone = tmp_path / "copied.onnx"
    shutil.copy(out / "model.onnx", alone)
    predictor = load_exported_predictor(alone)
    assert isinstance(predictor, OnnxPredictor) and predictor.labels == ["blue", "green", "red"]


def test_cli_predict_on_onnx_file(onnx_export: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, out = onnx_export
    splits = json.loads((run_dir / "splits.json").read_text(encoding="utf-8"))
    files = [row["path"] for row in splits["test"]][:3]
    assert main(["predict", str(out / "model.onnx"), *files, "--json"]) == 0
    printed = capsys.readouterr().out
    assert all(Path(f).name in printed for f in files)


def test_onnx_missing_packages_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_format, "missing_modules", lambda: ["tf2onnx"])
    fmt = get_format("onnx")
    with pytest.raises(ExportError, match=r"tlkit\[onnx\]"):
        fmt.write(fmt, None, Path("."), None)  # type: ignore[arg-type]
    assert "tlkit[onnx]" in fmt.not_applicable
