"""HAT building blocks, written once and shared by ``fastervit`` and ``hatplug.convert``."""

from .attention import BiasedAttention, CarrierWindowAttention, gated_carrier_attention
from .carrier import CarrierTokenizer, carrier_pool_geometry
from .fusion import inference_fusion
from .hat import (
    CarrierTokenGrid,
    CarrierTokenHalf,
    HATBlock,
    HATStage,
    join_carrier_tokens,
    propagate_carrier_tokens,
    split_carrier_tokens,
    upsample_carrier_tokens,
)
from .pos_embed import AbsolutePositionMLP, CachedBias, CarrierPositionMLP, ContinuousPositionBias
from .windows import (
    ceil_to_multiple,
    grouped_to_raster_index,
    pad_to_windows,
    upsample_index,
    window_partition,
    window_partition_nhwc,
    window_reverse,
    window_reverse_nhwc,
)

__all__ = [
    "AbsolutePositionMLP",
    "BiasedAttention",
    "CachedBias",
    "CarrierPositionMLP",
    "CarrierTokenGrid",
    "CarrierTokenHalf",
    "CarrierTokenizer",
    "CarrierWindowAttention",
    "ContinuousPositionBias",
    "HATBlock",
    "HATStage",
    "carrier_pool_geometry",
    "ceil_to_multiple",
    "gated_carrier_attention",
    "grouped_to_raster_index",
    "inference_fusion",
    "join_carrier_tokens",
    "pad_to_windows",
    "propagate_carrier_tokens",
    "split_carrier_tokens",
    "upsample_carrier_tokens",
    "upsample_index",
    "window_partition",
    "window_partition_nhwc",
    "window_reverse",
    "window_reverse_nhwc",
]
