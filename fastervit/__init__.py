"""FasterViT: the native model family of hatplug, loading the official checkpoints exactly.

>>> import fastervit
>>> model = fastervit.create_model("faster_vit_0_224")
>>> "faster_vit_0_224" in fastervit.list_models()
True
"""

from .factory import checkpoint_filter_fn, create_model, list_models, pretrained_file
from .model import FasterViT, stage_resolutions

__all__ = [
    "FasterViT",
    "checkpoint_filter_fn",
    "create_model",
    "list_models",
    "pretrained_file",
    "stage_resolutions",
]
