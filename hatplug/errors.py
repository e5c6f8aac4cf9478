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
    "UnsupportedModelError",
    "ConversionError",
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


class UnsupportedModelError(HatplugError, TypeError):
    """:func:`hatplug.convert` found no block that an adapter can convert (e.g. a ResNet, or a model built on
    ``nn.MultiheadAttention``). The message lists the supported families and how to add one."""


class ConversionError(HatplugError, RuntimeError):
    """A supported model could not be converted: a stage that fails to trace, a block called twice, a
    model converted twice. The message names the module and the cause."""
