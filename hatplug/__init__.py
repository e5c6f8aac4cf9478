"""hatplug: FasterViT's Hierarchical Attention (HAT) as reusable modules.

>>> import hatplug
>>> hatplug.layers.HATStage  # doctest: +ELLIPSIS
<class 'hatplug.layers.hat.HATStage'>
"""

from . import layers, models
from .checkpoint import LoadReport, load_checkpoint
from .errors import (
    CheckpointError,
    CheckpointMismatchError,
    HatplugError,
    PretrainedWeightsNotFoundError,
    UnsafeCheckpointError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "HatplugError",
    "LoadReport",
    "PretrainedWeightsNotFoundError",
    "UnsafeCheckpointError",
    "layers",
    "models",
    "load_checkpoint",
]
