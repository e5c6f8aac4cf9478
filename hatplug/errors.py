"""Exceptions raised by hatplug and fastervit.

Messages name what was found, what was expected, and the fix.
"""

from __future__ import annotations

__all__ = [
    "HatplugError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "CheckpointMismatchError",
    "PretrainedWeightsNotFoundError",
]


class HatplugError(Exception):
    """Base class of every error raised on purpose by hatplug and fastervit."""


class CheckpointError(HatplugError, ValueError):
    """A checkpoint file is missing, unreadable, truncated or not a state dict."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would need to run arbitrary code to unpickle; it was refused and nothing ran."""


class CheckpointMismatchError(CheckpointError):
    """Strict loading found missing, unexpected or wrongly shaped tensors."""


class PretrainedWeightsNotFoundError(HatplugError, FileNotFoundError):
    """``pretrained=True`` but the official file is not in the local cache and cannot be downloaded."""
