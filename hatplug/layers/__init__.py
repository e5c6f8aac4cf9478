"""HAT building blocks, written once and shared by ``fastervit`` and ``hatplug.convert``."""

from .attention import BiasedAttention
from .carrier import CarrierTokenizer, carrier_pool_geometry
from .hat import CarrierTokenGrid, HATBlock, HATStage
from .pos_embed import AbsolutePositionMLP, CachedBias, ContinuousPositionBias
from .windows import (
    ceil_to_multiple,
    grouped_to_raster_index,
    pad_to_windows,
    upsample_index,
    window_partition,
    window_reverse,
)

__all__ = [
    "AbsolutePositionMLP",
    "BiasedAttention",
    "CachedBias",
    "CarrierTokenGrid",
    "CarrierTokenizer",
    "ContinuousPositionBias",
    "HATBlock",
    "HATStage",
    "carrier_pool_geometry",
    "ceil_to_multiple",
    "grouped_to_raster_index",
    "pad_to_windows",
    "upsample_index",
    "window_partition",
    "window_reverse",
]
