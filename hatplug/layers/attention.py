"""Multi-head self-attention with an additive position bias, through fused SDPA."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .pos_embed import ContinuousPositionBias

__all__ = ["BiasedAttention"]


class BiasedAttention(nn.Module):
    """Self-attention over a token sequence with a learned additive bias (FasterViT's ``WindowAttention``).

    ``softmax(q k^T * scale + bias) v`` runs in ``F.scaled_dot_product_attention``; the bias comes from
    ``pos_emb_funct`` (a :class:`ContinuousPositionBias`, cached in eval mode).

    Args:
        dim: token width.
        num_heads: attention heads; ``dim`` must be divisible by it.
        window_size: ``(h, w)`` grid that the relative bias covers.
        num_prefix_tokens: leading tokens (carrier tokens) that get no relative bias.
        qkv_bias: bias in the qkv projection.
        qk_scale: override of ``head_dim ** -0.5``.
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout after the output projection.
        token_order: permutation of the sequence relative to raster order (see the bias).

    Input and output: ``(B_, N, C)`` with ``N = num_prefix_tokens + h * w``.

    >>> import torch
    >>> attn = BiasedAttention(64, num_heads=2, window_size=(7, 7), num_prefix_tokens=4)
    >>> attn(torch.randn(3, 53, 64)).shape
    torch.Size([3, 53, 64])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int],
        num_prefix_tokens: int = 0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        token_order: Tensor | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pos_emb_funct = ContinuousPositionBias(num_heads, window_size, num_prefix_tokens, token_order)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B_, heads, N, hd)
        bias = self.pos_emb_funct().to(q.dtype)  # (1, heads, N, N)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))
