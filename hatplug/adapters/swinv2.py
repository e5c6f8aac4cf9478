"""timm Swin Transformer V2: ``SwinTransformerV2Block`` -> :class:`SwinV2HATBlock`.

As :mod:`hatplug.adapters.swin`, with SwinV2's own attention and skeleton: cosine attention with the
block's ``logit_scale``, the qkv bias rebuilt from ``q_bias`` / ``v_bias`` (k has none), the continuous
position bias (``cpb_mlp``, ``16 * sigmoid``) for window tokens and zero for carrier tokens, and
res-post-norm (``x + norm1(attn(x))``, ``x + norm2(mlp(x))``), applied to the carrier tokens alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.swin_transformer_v2 import SwinTransformerV2Block, WindowAttention
from torch import Tensor, nn

from ..layers import CarrierWindowAttention
from ..layers._cache import refill_buffer
from .base import BlockAdapter, ConversionSettings
from .swin import SwinHATBlock

__all__ = ["SwinV2Adapter", "SwinV2CarrierAttention", "SwinV2HATBlock"]


class SwinV2CarrierAttention(CarrierWindowAttention):
    """timm SwinV2's ``WindowAttention`` over ``[CTs; window]``: cosine similarity times the per-head logit
    scale, plus the continuous relative position bias (zero for carrier tokens)."""

    def __init__(self, attn: WindowAttention, gated: bool) -> None:
        super().__init__(attn.num_heads, attn.qkv, attn.proj, attn.attn_drop.p, attn.proj_drop, gated)
        self.window_size = tuple(attn.window_size)
        self.pretrained_window_size = tuple(attn.pretrained_window_size)
        self.qkv_bias_separate = attn.qkv_bias_separate
        self.logit_scale = attn.logit_scale
        self.cpb_mlp = attn.cpb_mlp
        self.q_bias = attn.q_bias
        self.v_bias = attn.v_bias
        self.register_buffer("k_bias", attn.k_bias, persistent=False)
        self.register_buffer("relative_coords_table", attn.relative_coords_table, persistent=False)
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)

    def init_non_persistent_buffers(self) -> None:
        """Recompute ``k_bias`` (zeros) and the position tables (after ``to_empty`` of a model converted on the
        meta device) with timm's own code for them; timm's ``reinit_non_persistent_buffers`` calls this."""
        with torch.device("cpu"):
            table, index = WindowAttention._make_pair_wise_relative_positions(self, dtype=torch.float32)
        refill_buffer(self, "relative_coords_table", table)
        refill_buffer(self, "relative_position_index", index)
        if self.k_bias is not None:
            refill_buffer(self, "k_bias", torch.zeros(self.k_bias.shape))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B_, L = x.shape[0], x.shape[1]
        if self.q_bias is None:
            qkv = self.qkv(x)
        elif self.qkv_bias_separate:
            qkv = self.qkv(x) + torch.cat((self.q_bias, self.k_bias, self.v_bias))
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(B_, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()  # (heads, 1, 1)
        return F.normalize(q, dim=-1) * logit_scale, F.normalize(k, dim=-1), v

    def window_bias(self) -> Tensor:
        N = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        return (16 * torch.sigmoid(bias)).unsqueeze(0)  # (1, heads, N, N)


class SwinV2HATBlock(SwinHATBlock):
    """A SwinV2 block with carrier tokens (res-post-norm); see :class:`~hatplug.adapters.SwinHATBlock`."""

    post_norm = True


class SwinV2Adapter(BlockAdapter):
    """timm ``SwinTransformerV2Block`` (every ``swinv2_*`` model; not ``swinv2_cr_*``, whose
    ``SwinTransformerV2CrBlock`` is another implementation)."""

    family = "timm SwinV2"
    source_types = (SwinTransformerV2Block,)
    channels_last = True

    def window_size(self, block: nn.Module) -> tuple[int, int]:
        return tuple(block.window_size)

    def build(self, block: nn.Module, settings: ConversionSettings, propagate: bool) -> nn.Module:
        return SwinV2HATBlock(block, SwinV2CarrierAttention(block.attn, settings.gated), settings, propagate)
