"""timm Swin Transformer (v1): ``SwinTransformerBlock`` -> :class:`SwinHATBlock`.

The twin keeps the block's ``norm1``, ``attn.qkv``, ``attn.proj``, ``attn.relative_position_bias_table``
(the window part of the bias; carrier-token rows and columns get zero), ``norm2`` and ``mlp``, and the
shifted windows: odd blocks still roll the map by half a window and mask pairs of tokens from different
regions with -100, while carrier tokens are never masked. A rolled window ``k`` sees the carrier tokens of
window ``k`` of the unshifted grid (they cover its top-left part); carrier tokens are made once per stage
from the unshifted stage input and propagated back at the window positions they were made from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention, get_relative_position_index
from torch import Tensor, nn

from ..layers import CarrierWindowAttention, window_partition_nhwc, window_reverse_nhwc
from ..layers._cache import refill_buffer
from ..layers.fusion import fusion_active, mlp_hidden, passes_through, residual_linear
from .base import BlockAdapter, CarrierBlock, ConversionSettings, block_rates, padded_grid

__all__ = ["SwinAdapter", "SwinCarrierAttention", "SwinHATBlock", "shifted_window_mask"]


def shifted_window_mask(
    Hp: int, Wp: int, window_size: tuple[int, int], shift_size: tuple[int, int], like: Tensor
) -> Tensor:
    """Swin's shifted-window mask ``(nW, N, N)`` for a padded ``Hp x Wp`` map: -100 between tokens of
    different regions of the rolled map, 0 elsewhere. Same values as timm's ``get_attn_mask``, computed
    with tensor ops only, so that it traces and follows the input size.

    >>> m = shifted_window_mask(8, 8, (4, 4), (2, 2), torch.zeros(1))
    >>> tuple(m.shape), m[0].abs().sum().item(), sorted(set(m[3].flatten().tolist()))
    ((4, 16, 16), 0.0, [-100.0, 0.0])
    """
    wh, ww = window_size
    sh, sw = shift_size
    rows = torch.arange(Hp, device=like.device)
    cols = torch.arange(Wp, device=like.device)
    # regions (0, -ws), (-ws, -shift), (-shift, None) along each axis, as in timm
    label_h = (rows >= Hp - wh).long() + (rows >= Hp - sh).long()
    label_w = (cols >= Wp - ww).long() + (cols >= Wp - sw).long()
    labels = (label_h.view(-1, 1) * 3 + label_w.view(1, -1)).view(Hp // wh, wh, Wp // ww, ww)
    labels = labels.permute(0, 2, 1, 3).reshape(-1, wh * ww)  # (nW, N)
    different = labels.unsqueeze(1) != labels.unsqueeze(2)
    return torch.where(different, -100.0, 0.0).to(like.dtype)


class SwinCarrierAttention(CarrierWindowAttention):
    """timm Swin's ``WindowAttention`` over ``[CTs; window]``: scaled dot product plus the relative position
    bias table (zero for carrier tokens)."""

    def __init__(self, attn: WindowAttention, gated: bool) -> None:
        super().__init__(attn.num_heads, attn.qkv, attn.proj, attn.attn_drop.p, attn.proj_drop, gated)
        self.scale = attn.scale
        self.window_size = tuple(attn.window_size)
        self.window_area = attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the relative position index (after ``to_empty`` of a model converted on the meta device), as
        timm's ``WindowAttention`` does; timm's ``reinit_non_persistent_buffers`` calls this."""
        refill_buffer(self, "relative_position_index", get_relative_position_index(*self.window_size))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B_, L = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x).reshape(B_, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return q * self.scale, k, v

    def window_bias(self) -> Tensor:
        N = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)


class SwinHATBlock(CarrierBlock):
    """A Swin block with carrier tokens: ``forward(x (B, H, W, C), ct (B, nW * ct**2, C)) -> (x, ct)``.

    Per block: CT attention + MLP over all CTs of the image (new), then the block's own (shifted) window
    attention over ``[window CTs; window tokens]``, the block's MLP on tokens and CTs, and in the last block
    of a stage the propagation of the CTs into the map. Pre-norm (``post_norm=False``, Swin v1) or
    res-post-norm (SwinV2) as the original block.
    """

    post_norm = False

    def __init__(self, block: nn.Module, attn: CarrierWindowAttention, settings: ConversionSettings, propagate: bool):
        super().__init__()
        self.dim = block.dim
        self.input_resolution = block.input_resolution
        self.shift_size = tuple(block.shift_size)
        self.window_area = block.window_area
        self.dynamic_mask = getattr(block, "dynamic_mask", False)
        self.norm1 = block.norm1
        self.attn = attn
        self.drop_path1 = block.drop_path1
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.drop_path2 = block.drop_path2
        self.register_buffer("attn_mask", block.attn_mask, persistent=False)
        mlp_ratio = block.mlp.fc1.out_features / block.dim
        rates = block_rates(block.drop_path1, block.mlp, block.attn)
        self.init_carriers(
            block.dim,
            attn.num_heads,
            tuple(block.window_size),
            settings,
            mlp_ratio,
            propagate,
            block.norm1.weight,
            rates,
        )

    def init_non_persistent_buffers(self) -> None:
        """Recompute the shifted-window mask of the block's input size and the propagation index (after
        ``to_empty`` of a model converted on the meta device), as timm's block does its own mask."""
        super().init_non_persistent_buffers()
        if self.attn_mask is not None:
            Hp, Wp = padded_grid(*self.input_resolution, self.window_size)[:2]
            with torch.device("cpu"):
                mask = shifted_window_mask(Hp, Wp, self.window_size, self.shift_size, torch.zeros(()))
            refill_buffer(self, "attn_mask", mask)

    def _mask(self, Hp: int, Wp: int, like: Tensor) -> Tensor | None:
        if not any(self.shift_size):
            return None
        if self.dynamic_mask or self.attn_mask is None:
            return shifted_window_mask(Hp, Wp, self.window_size, self.shift_size, like)
        return self.attn_mask

    def forward_block(self, x: Tensor, ct: Tensor) -> tuple[Tensor, Tensor]:
        B, H, W, C = x.shape
        Hp, Wp, n_h, n_w = padded_grid(H, W, self.window_size)
        ct_windows = self.carrier_windows(ct, n_h, n_w)  # (B*nW, ct*ct, C)

        # window attention over [window CTs; window tokens] on the rolled, padded map
        tokens = x if self.post_norm else self.norm1(x)
        carriers = ct_windows if self.post_norm else self.norm1(ct_windows)
        s_h, s_w = self.shift_size
        if s_h or s_w:
            tokens = torch.roll(tokens, shifts=(-s_h, -s_w), dims=(1, 2))
        tokens = F.pad(tokens, (0, 0, 0, Wp - W, 0, Hp - H))
        windows = window_partition_nhwc(tokens, self.window_size)  # (B*nW, N, C)
        ct_out, out = self.attn(carriers, windows, self._mask(Hp, Wp, x))
        out = window_reverse_nhwc(out, self.window_size, Hp, Wp)[:, :H, :W]  # (B, H, W, C)
        if s_h or s_w:
            out = torch.roll(out, shifts=(s_h, s_w), dims=(1, 2))
        if self.post_norm:
            out, ct_out = self.norm1(out), self.norm1(ct_out)
        x = x + self.drop_path1(out)
        ct_windows = ct_windows + self.drop_path1(ct_out)

        # the carrier tokens before the map: the map's last op must be the block's last, since fx feature
        # extraction (timm's create_feature_extractor) takes a module's output from its last op
        hidden = None if self.post_norm else mlp_hidden(self.mlp)
        fused = hidden is not None and fusion_active(self, x, ct) and passes_through(self.drop_path2, self.mlp.drop2)
        ct_windows = self._mlp(ct_windows, hidden if fused else None)
        ct_out = ct_windows.reshape(B, -1, C)
        x = self._mlp(x, hidden if fused else None)
        if self.propagation_scale is not None:
            x = self.propagate_into_map(x, ct_windows, Hp, Wp)
        return x, ct_out

    def _mlp(self, x: Tensor, hidden) -> Tensor:
        """The block's MLP with its residual, on tokens or carrier tokens; ``hidden``: the folded form's MLP
        before ``fc2`` (:func:`~hatplug.layers.fusion.mlp_hidden`) where it may run, else ``None``."""
        if hidden is not None:
            # eval: the residual accumulated by fc2's GEMM, GELU in place (hatplug.layers.fusion)
            return residual_linear(x, hidden(self.norm2(x)), self.mlp.fc2.weight, self.mlp.fc2.bias)
        if self.post_norm:
            return x + self.drop_path2(self.norm2(self.mlp(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class SwinAdapter(BlockAdapter):
    """timm ``SwinTransformerBlock`` (every ``swin_*`` model, every window size)."""

    family = "timm Swin v1"
    source_types = (SwinTransformerBlock,)
    channels_last = True

    def window_size(self, block: nn.Module) -> tuple[int, int]:
        return tuple(block.window_size)

    def build(self, block: nn.Module, settings: ConversionSettings, propagate: bool) -> nn.Module:
        return SwinHATBlock(block, SwinCarrierAttention(block.attn, settings.gated), settings, propagate)
