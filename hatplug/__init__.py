"""hatplug: FasterViT's Hierarchical Attention (HAT) as reusable modules.

>>> import hatplug
>>> hatplug.layers.HATStage  # doctest: +ELLIPSIS
<class 'hatplug.layers.hat.HATStage'>
"""

from . import adapters, layers, models
from .adapters import BlockAdapter, register_adapter
from .checkpoint import LoadReport, load_checkpoint
from .conversion import ConversionReport, convert, load, report, save
from .errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConversionError,
    HatplugError,
    NotScriptableError,
    PretrainedWeightsNotFoundError,
    UnsafeCheckpointError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "BlockAdapter",
    "CheckpointError",
    "CheckpointMismatchError",
    "ConversionError",
    "ConversionReport",
    "HatplugError",
    "LoadReport",
    "NotScriptableError",
    "PretrainedWeightsNotFoundError",
    "UnsafeCheckpointError",
    "UnsupportedModelError",
    "adapters",
    "convert",
    "layers",
    "load",
    "load_checkpoint",
    "models",
    "register_adapter",
    "report",
    "save",
]
