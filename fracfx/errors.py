"""The exceptions fracfx raises. Each message names the problem and the way out."""

from __future__ import annotations


class FracfxError(Exception):
    """Base class of every error fracfx raises on purpose."""


class ConfigError(FracfxError, ValueError):
    """A configuration value is out of range, unknown, or inconsistent."""


class UnsupportedGraphError(FracfxError):
    """The model cannot be traced or contains something a pass cannot handle."""


class PassError(FracfxError):
    """A graph pass failed; the message names the pass and the one before it."""


class CheckpointError(FracfxError):
    """A checkpoint is missing, truncated, corrupt or not a fracfx checkpoint."""


class ExportError(FracfxError):
    """The model cannot be exported in the requested format."""


class FormatError(ExportError):
    """An op of the model has no form in the chosen (fast) format; another format can write it."""


class DistributedError(FracfxError):
    """A multi-process (torchrun) run is misconfigured, or lost a rank; the message says how to resume."""
