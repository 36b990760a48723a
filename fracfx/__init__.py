"""fracfx: FracTrain (NeurIPS 2020) as torch.fx graph passes.

Importing fracfx has no side effects; the ONNX machinery is imported only when used.
"""

from __future__ import annotations

import importlib

from fracfx import _moved

__version__ = "0.1.0"

_EXPORTS = {
    # transform and inspect
    "transform": "fracfx.api",
    "set_bits": "fracfx.api",
    "cost_report": "fracfx.api",
    "fp32_report": "fracfx.api",
    "seed_rounding": "fracfx.api",
    # freeze and export (ONNX imported only when used)
    "freeze": "fracfx.export",
    "export_onnx": "fracfx.export",
    # training, data and checkpoints (fracfx.train, fracfx.data, fracfx.runtime.checkpoint)
    "TrainConfig": "fracfx.train",
    "build_loaders": "fracfx.data",
    "build_text_loaders": "fracfx.data.text",
    "save_checkpoint": "fracfx.runtime.checkpoint",
    "load_checkpoint": "fracfx.runtime.checkpoint",
    # configs
    "QuantConfig": "fracfx.config",
    "DFQConfig": "fracfx.config",
    "config_from_dict": "fracfx.config",
    # errors
    "FracfxError": "fracfx.errors",
    "ConfigError": "fracfx.errors",
    "UnsupportedGraphError": "fracfx.errors",
    "PassError": "fracfx.errors",
    "CheckpointError": "fracfx.errors",
    "ExportError": "fracfx.errors",
}

_SUBMODULES = ("passes", "runtime", "models", "nn", "export", "train", "data", "cli", "bench")
__all__ = sorted(_EXPORTS) + list(_SUBMODULES)

_moved.install()


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"fracfx.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fracfx' has no attribute {name!r}")
