"""Exceptions raised by hatplug and fastervit.

Messages name what was found, what was expected, and the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .checkpoint import LoadReport

__all__ = [
    "HatplugError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "CheckpointMismatchError",
    "PretrainedWeightsNotFoundError",
    "UnsupportedModelError",
    "ConversionError",
    "NotScriptableError",
    "refuse_scripting",
]


class HatplugError(Exception):
    """Base class of every error raised on purpose by hatplug and fastervit."""


class CheckpointError(HatplugError, ValueError):
    """A checkpoint file is missing, unreadable, truncated or not a state dict."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would need to run arbitrary code to unpickle; it was refused and nothing ran."""


class CheckpointMismatchError(CheckpointError):
    """Strict loading found missing, unexpected or wrongly shaped tensors.

    ``report``: the :class:`~hatplug.checkpoint.LoadReport` of the attempt, with every key (the message cuts
    long lists short), or ``None`` where no report was made.
    """

    def __init__(self, message: str, report: LoadReport | None = None) -> None:
        super().__init__(message)
        self.report = report


class PretrainedWeightsNotFoundError(HatplugError, FileNotFoundError):
    """``pretrained=True`` but the official file is not in the local cache and cannot be downloaded."""


class UnsupportedModelError(HatplugError, TypeError):
    """:func:`hatplug.convert` found no block that an adapter can convert (e.g. a ResNet, or a model built on
    ``nn.MultiheadAttention``). The message lists the supported families and how to add one."""


class ConversionError(HatplugError, RuntimeError):
    """A supported model could not be converted: a stage that fails to trace, a block called twice, a
    model converted twice. The message names the module and the cause."""


class NotScriptableError(HatplugError, RuntimeError):
    """``torch.jit.script`` was called on a model that contains hatplug or FasterViT modules. They are written
    for eager mode, ``torch.compile``, ``torch.export``, ``torch.jit.trace`` and ONNX export, not for the
    TorchScript compiler (which PyTorch 2.x no longer develops)."""


def refuse_scripting(module, what: str | None = None) -> None:
    """Body of ``__prepare_scriptable__`` on our modules: ``torch.jit.script`` calls that hook on every
    submodule before compiling, so this turns TorchScript's parser error deep inside a module into one that
    names the model and the ways to export it."""
    raise NotScriptableError(
        f"torch.jit.script cannot compile {what or type(module).__name__} (hatplug / FasterViT modules use Python "
        "features outside TorchScript). Export with torch.jit.trace(model.eval(), example_input), "
        "torch.export.export(model, (example_input,)) or torch.onnx.export(model, example_input, path); "
        "torch.compile(model) compiles it for Python."
    )
