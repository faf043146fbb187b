"""The command line starts fast and quietly: no TensorFlow for --help, no native log lines, no ANSI in logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tlkit.quiet import is_noise
from tests.conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]
TLKIT = [sys.executable, "-m", "tlkit.cli"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TLKIT_VERBOSE")}
    return env


def test_building_the_parser_imports_no_tensorflow() -> None:
    script = ("import sys, tlkit.cli as c; p = c.build_parser(); p.parse_args(['backbones']);"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["backbones", "--help"], ["train", "--help"]])
def test_help_is_fast(argv: list[str]) -> None:
    started = time.monotonic()
    out = subprocess.run([*TLKIT, *argv], cwd=REPO, capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 2.0
    assert "usage: tlkit" in out.stdout


def test_noise_patterns_match_the_lines_tensorflow_prints() -> None:
    noise = [
        b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
        b"I0000 00:00:1796108376.207365    3465 port.cc:153] oneDNN custom operations are on.\n",
        b"I0000 00:00:1796108376.207664    3465 cudart_stub.cc:31] Could not find cuda drivers on your machine.\n",
        b"E0000 00:00:1796109227.798703   30113 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n",
        b"To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with "
        b"the appropriate compiler flags.\n",
        b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n",
        b"E0000 00:00:1796115660.324559   11241 util.cc:131] oneDNN supports DT_INT64 only on platforms with "
        b"AVX-512. Falling back to the default Eigen-based implementation if present.\n",
        b"fully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32, output_inference_type: FLOAT32\n",
    ]
    assert all(is_noise(line) for line in noise)
    kept = [b"tlkit: error: unknown backbone 'x'\n", b"Traceback (most recent call last):\n",
            b"E0000 00:00:1.5 12 bfc_allocator.cc:10] Out of memory\n"]
    assert not any(is_noise(line) for line in kept)


def test_backbones_stderr_has_no_tensorflow_start_up_lines() -> None:
    out = subprocess.run([*TLKIT, "backbones"], cwd=REPO, capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 0, out.stderr
    assert "efficientnet_lite0" in out.stdout
    assert out.stderr == "", out.stderr
    verbose = subprocess.run([*TLKIT, "--verbose", "backbones"], cwd=REPO, capture_output=True, text=True,
                             timeout=120, env=_env())
    assert "absl::InitializeLog" in verbose.stderr or "I0000" in verbose.stderr  # the switch shows them


def test_train_log_file_has_no_ansi_escapes(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", n_per_class=6)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({
        "name": "log", "output_dir": str(tmp_path / "run"),
        "data": {"path": str(data), "batch_size": 8, "val_fraction": 0.2, "test_fraction": 0.2},
        "backbone": {"name": "tiny_test"}, "augmentation": {"enabled": False},
        "schedule": {"stages": [{"name": "head", "epochs": 1, "learning_rate": 0.02},
                                {"name": "top", "epochs": 2, "unfreeze": 1, "learning_rate": 0.002}]},
    }))
    script = ("import sys; import tlkit.backbones as b; from tests.conftest import tiny_spec;"
              "b.register(tiny_spec(), overwrite=True); from tlkit.cli import main; sys.exit(main(sys.argv[1:]))")
    log = tmp_path / "train.log"
    with open(log, "w") as handle:
        out = subprocess.run([sys.executable, "-c", script, "train", str(config)], cwd=REPO, stdout=handle,
                             stderr=subprocess.PIPE, text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    text = log.read_text()
    assert "\x1b[" not in text and "\r" not in text
    assert "Epoch 2/2" in text  # plain per-epoch lines of the thawed stage
    assert "run directory:" in text
