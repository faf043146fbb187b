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

from tlkit.audio_augment import AudioAugmentation
from tlkit.backbones import (
    AudioFrontend,
    BackboneSpec,
    ImagePreprocessing,
    available_offline,
    get,
    list_backbones,
    load_backbone,
    prefetch,
    register,
)
from tlkit.config import RunConfig, load_config
from tlkit.errors import (
    BackboneNotFoundError,
    ConfigError,
    DataError,
    ExportError,
    IntegrityError,
    TlkitError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
)
from tlkit.evaluate import EvaluationReport, evaluate_run
from tlkit.explain import grad_cam
from tlkit.export import ExportReport, export_run
from tlkit.finetune import FineTuneResult, Schedule, Stage, fine_tune
from tlkit.layers import ImageNormalization
from tlkit.model import HeadConfig, ImageAugmentation, build_classifier, split_head
from tlkit.run import RunResult, load_run_model, train

__all__ = [
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
    "TlkitError",
    "UnsafeCheckpointError",
    "WeightsUnavailableError",
    "__version__",
    "available_offline",
    "build_classifier",
    "evaluate_run",
    "export_run",
    "fine_tune",
    "get",
    "grad_cam",
    "list_backbones",
    "load_backbone",
    "load_config",
    "load_run_model",
    "prefetch",
    "register",
    "split_head",
    "train",
]
