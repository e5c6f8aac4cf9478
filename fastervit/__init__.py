"""FasterViT: the native model family of hatplug, loading the official checkpoints exactly.

>>> import fastervit
>>> model = fastervit.create_model("faster_vit_0_224")
>>> "faster_vit_0_224" in fastervit.list_models()
True
"""

from . import resize
from .factory import checkpoint_filter_fn, create_model, list_models, pretrained_file
from .model import FasterViT, stage_resolutions
from .resize import AdaptReport, adapt_checkpoint, load_adapted

__all__ = [
    "AdaptReport",
    "FasterViT",
    "adapt_checkpoint",
    "checkpoint_filter_fn",
    "create_model",
    "list_models",
    "load_adapted",
    "pretrained_file",
    "resize",
    "stage_resolutions",
]
