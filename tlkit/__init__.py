"""tlkit: transfer learning for vision and speech on Keras 3 / TensorFlow.

The public API (pinned by ``tests/test_public_api.py``)::

    import tlkit
    model = tlkit.build_classifier("efficientnet_lite0", num_classes=5)
    result = tlkit.fine_tune(model, train_ds, val_ds, tlkit.Schedule.fine_tune())
"""

from __future__ import annotations

import os as _os

# TensorFlow's C++ INFO/WARNING chatter (oneDNN, CUDA probing) before it is imported; a user's
# own TF_CPP_MIN_LOG_LEVEL wins.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

from tlkit.lazy import lazy_exports  # noqa: E402  (after the environment default above)

# The public names and the module each lives in. Nothing is imported until a name is used
# (PEP 562), so ``import tlkit`` and the CLI's ``--help`` start without TensorFlow.
_EXPORTS: dict[str, str] = {
    "AudioAugmentation": "tlkit.audio_augment",
    "AudioFrontend": "tlkit.backbones",
    "BackboneSpec": "tlkit.backbones",
    "ImagePreprocessing": "tlkit.backbones",
    "available_offline": "tlkit.backbones",
    "get": "tlkit.backbones",
    "list_backbones": "tlkit.backbones",
    "load_backbone": "tlkit.backbones",
    "prefetch": "tlkit.backbones",
    "register": "tlkit.backbones",
    "RunConfig": "tlkit.config",
    "TaskConfig": "tlkit.config",
    "load_config": "tlkit.config",
    "BackboneNotFoundError": "tlkit.errors",
    "ConfigError": "tlkit.errors",
    "DataError": "tlkit.errors",
    "ExportError": "tlkit.errors",
    "IntegrityError": "tlkit.errors",
    "TlkitError": "tlkit.errors",
    "UnsafeCheckpointError": "tlkit.errors",
    "WeightsUnavailableError": "tlkit.errors",
    "EvaluationReport": "tlkit.evaluation",
    "evaluate_run": "tlkit.evaluation",
    "grad_cam": "tlkit.explain",
    "decode_imagenet": "tlkit.imagenet",
    "imagenet_classifier": "tlkit.imagenet",
    "ExportReport": "tlkit.export",
    "export_run": "tlkit.export",
    "FineTuneResult": "tlkit.finetune",
    "Schedule": "tlkit.schedule",
    "Stage": "tlkit.schedule",
    "fine_tune": "tlkit.finetune",
    "ImageNormalization": "tlkit.layers",
    "HeadConfig": "tlkit.model",
    "ImageAugmentation": "tlkit.model",
    "build_classifier": "tlkit.model",
    "split_head": "tlkit.model",
    "build_multitask_classifier": "tlkit.multitask.model",
    "InputContract": "tlkit.rundir",
    "RunDir": "tlkit.rundir",
    "RunResult": "tlkit.run",
    "load_run_model": "tlkit.run",
    "train": "tlkit.run",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

__all__ = [
    "InputContract",
    "RunDir",
    "AudioAugmentation",
    "AudioFrontend",
    "BackboneNotFoundError",
    "BackboneSpec",
    "ConfigError",
    "DataError",
    "EvaluationReport",
    "ExportError",
    "ExportReport",
    "FineTuneResult",
    "HeadConfig",
    "ImageAugmentation",
    "ImageNormalization",
    "ImagePreprocessing",
    "IntegrityError",
    "RunConfig",
    "RunResult",
    "Schedule",
    "Stage",
    "TaskConfig",
    "TlkitError",
    "UnsafeCheckpointError",
    "WeightsUnavailableError",
    "__version__",
    "available_offline",
    "build_classifier",
    "build_multitask_classifier",
    "decode_imagenet",
    "evaluate_run",
    "export_run",
    "fine_tune",
    "get",
    "grad_cam",
    "imagenet_classifier",
    "list_backbones",
    "load_backbone",
    "load_config",
    "load_run_model",
    "prefetch",
    "register",
    "split_head",
    "train",
]
