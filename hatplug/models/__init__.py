"""Models that no other package ships, registered with timm on import (EdgeViT)."""

from . import edgevit
from .edgevit import EdgeViT

__all__ = ["EdgeViT", "edgevit"]
