"""The public surface is a decision: this list changes only on purpose."""

from __future__ import annotations

import tlkit

PUBLIC = {
    "AudioAugmentation", "AudioFrontend", "BackboneNotFoundError", "BackboneSpec", "ConfigError", "DataError", "EvaluationReport", "ExportError",
    "ExportReport", "FineTuneResult", "HeadConfig", "ImageAugmentation", "ImageNormalization",
    "ImagePreprocessing", "IntegrityError", "RunConfig", "RunResult", "Schedule", "Stage", "TlkitError",
    "UnsafeCheckpointError", "WeightsUnavailableError", "__version__", "available_offline", "build_classifier",
    "evaluate_run", "export_run", "fine_tune", "get", "grad_cam", "list_backbones", "load_backbone", "load_config", "load_run_model",
    "prefetch", "register", "split_head", "train",
    # The run directory and its input contract (tlkit.rundir), public since the architecture step.
    "RunDir", "InputContract",
    # Pretrained ImageNet classifiers with preprocessing inside (tlkit.imagenet), issue 15.
    "imagenet_classifier", "decode_imagenet",
    # Multi-task runs (tlkit.multitask, issue 19): one backbone, one head per task; [tasks] entries.
    "build_multitask_classifier", "TaskConfig",
}


def test_public_api_is_pinned() -> None:
    assert set(tlkit.__all__) == PUBLIC
    for name in PUBLIC:
        assert hasattr(tlkit, name), name


def test_every_error_is_a_tlkit_error() -> None:
    for name in PUBLIC:
        obj = getattr(tlkit, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, tlkit.TlkitError), name
