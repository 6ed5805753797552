"""galkeras: Gradient Agreement Learning (Yan et al., 2023) in Keras 3."""

import importlib

__version__ = "0.1.0"

# Public names, imported on first use so that `python -m galkeras.train` can reject
# bad flags before TensorFlow loads.
_EXPORTS = {
    "GAL": "galkeras.model",
    "TrainingSet": "galkeras.training_set",
    "PseudoLabelDistillation": "galkeras.distill",
    "ImageFiles": "galkeras.image_files",
}
_SUBMODULES = (
    "agreement",
    "augment",
    "backbones",
    "calibration",
    "checkpointing",
    "datasets",
    "distill",
    "export",
    "image_files",
    "label_issues",
    "model",
    "noise",
    "optimizers",
    "predict",
    "report",
    "reproduce",
    "run_logging",
    "sampling",
    "train",
    "training_set",
)
__all__ = [*_EXPORTS, *_SUBMODULES]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"galkeras.{name}")
    raise AttributeError(f"module 'galkeras' has no attribute {name!r}")
