"""Token mixers that can stand in for FasterViT's stage 3, for the attention-type and HAT-component ablations.

Every mixer maps an NCHW map to an NCHW map of the same shape and is built like
:class:`~hatplug.layers.HATStage`::

    Mixer(dim, depth, num_heads, input_resolution, window_size, drop_path=..., **block_kwargs)

where ``block_kwargs`` are the :class:`~hatplug.layers.HATBlock` options (``mlp_ratio``, ``qkv_bias``,
``qk_scale``, ``drop``, ``attn_drop``, ``layer_scale``). All of them keep FasterViT's block shell (pre-norm,
MLP, drop path, layer scale) and, where they attend inside windows, FasterViT's position embeddings, so the
ablation varies *how tokens talk across windows* and little else. A map that the window does not divide is
padded once per stage, as FasterViT's HAT stage does (timm's Swin and Twins pad again in every block, with zeros,
and run Twins' global attention on the unpadded map); the attention-type ablation uses maps the window divides:

========== ===================================================================================
``window`` window attention only: :class:`~hatplug.layers.HATStage` with ``hat=False``
``swin``   Swin: window attention whose grid is shifted by ``window_size // 2`` every other block
``twins``  Twins: locally-grouped (window) attention alternating with global sub-sampled attention
``edgevit`` EdgeViT LGL blocks: local aggregation, attention among delegates sampled with stride
           ``window_size``, depthwise transposed-conv propagation back to every token
``hat``    FasterViT's HAT, with the switches of the HAT-component ablation (:class:`HATAblationStage`)
========== ===================================================================================

>>> import torch
>>> x = torch.randn(2, 32, 8, 8)
>>> all(create_mixer(name, dim=32, depth=2, num_heads=2, input_resolution=(8, 8), window_size=4)(x).shape
...     == x.shape for name in MIXERS)
True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from .adapters.swin import shifted_window_mask
from .layers import AbsolutePositionMLP, BiasedAttention, HATBlock, HATStage
from .layers._cache import refill_buffer
from .layers.hat import _drop_path_rates as _rates
from .layers.hat import _layer_scale, _resolution, _scale, check_positive_ints, check_stage_input
from .layers.windows import ceil_to_multiple, pad_to_windows, window_partition, window_reverse
from .models.edgevit import LGLBlock

__all__ = [
    "MIXERS",
    "EdgeViTStage",
    "GlobalSubsampledAttention",
    "HATAblationStage",
    "ShiftedWindowAttention",
    "SwinStage",
    "TwinsStage",
    "WindowStage",
    "create_mixer",
    "shift_attention_mask",
]


class _PaddedStage(nn.Module):
    """Shared frame: check the input size, pad to whole windows, run ``forward_padded``, crop."""

    def __init__(self, input_resolution: int | tuple[int, int], window_size: int, dim: int, depth: int) -> None:
        super().__init__()
        check_positive_ints(window_size=window_size, depth=depth)
        H, W = _resolution(input_resolution)
        self.input_resolution = (H, W)
        self.window_size, self.dim = int(window_size), dim  # a NumPy int too
        self.padded_resolution = (ceil_to_multiple(H, window_size), ceil_to_multiple(W, window_size))

    def forward_padded(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        H, W = self.input_resolution
        Hp, Wp = self.padded_resolution
        check_stage_input(self, x, self.dim, self.input_resolution)
        torch._assert(x.shape[2] == H and x.shape[3] == W, f"{type(self).__name__} was built for {H}x{W} maps")
        x = self.forward_padded(pad_to_windows(x, Hp - H, Wp - W))
        return x[:, :, :H, :W].contiguous() if (Hp, Wp) != (H, W) else x


# ---- window only --------------------------------------------------------------------------------------


class WindowStage(HATStage):
    """Window attention only: FasterViT's HAT stage without carrier tokens (``HATStage(hat=False)``).

    >>> WindowStage(32, depth=1, num_heads=2, input_resolution=(8, 8), window_size=4)(torch.randn(1, 32, 8, 8)).shape
    torch.Size([1, 32, 8, 8])
    """

    def __init__(
        self, dim: int, depth: int, num_heads: int, input_resolution: tuple[int, int], window_size: int, **kwargs
    ) -> None:
        super().__init__(dim, depth, num_heads, input_resolution, window_size, hat=False, **kwargs)


# ---- Swin ---------------------------------------------------------------------------------------------


def shift_attention_mask(height: int, width: int, window_size: int, shift: int | tuple[int, int]) -> Tensor:
    """Swin's additive mask for a map rolled by ``-shift``: ``(nW, ws*ws, ws*ws)`` of 0 and -100.

    After the roll, a window at the bottom/right border holds tokens from up to four image regions that
    were not neighbours; they must not attend to each other.

    ``shift`` is one roll for both axes or ``(rows, columns)``; an axis rolled by 0 has one region. The mask of
    the converted Swin blocks (:func:`hatplug.adapters.swin.shifted_window_mask`) for square windows.

    >>> m = shift_attention_mask(8, 8, window_size=4, shift=2)
    >>> m.shape, m[0].abs().sum().item(), (m[-1] == -100).any().item()
    (torch.Size([4, 16, 16]), 0.0, True)
    """
    sh, sw = (shift, shift) if isinstance(shift, int) else shift
    return shifted_window_mask(height, width, (window_size, window_size), (sh, sw), torch.zeros(()))


class ShiftedWindowAttention(BiasedAttention):
    """:class:`~hatplug.layers.BiasedAttention` plus Swin's per-window shift mask.

    ``shift_mask`` is ``(nW, N, N)`` (see :func:`shift_attention_mask`) or ``None`` for unshifted windows;
    the input is ``(B * nW, N, C)`` with windows of one image consecutive, as :func:`window_partition` makes.

    >>> attn = ShiftedWindowAttention(32, 2, (4, 4), shift_mask=shift_attention_mask(8, 8, 4, 2))
    >>> attn(torch.randn(2 * 4, 16, 32)).shape
    torch.Size([8, 16, 32])
    """

    def __init__(self, dim: int, num_heads: int, window_size: tuple[int, int], shift_mask: Tensor | None, **kwargs):
        super().__init__(dim, num_heads, window_size, **kwargs)
        self.register_buffer("shift_mask", shift_mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.pos_emb_funct().to(q.dtype)  # (1, heads, N, N)
        if self.shift_mask is not None:
            nW = self.shift_mask.shape[0]
            bias = bias.unsqueeze(1) + self.shift_mask.to(q.dtype)[None, :, None]  # (1, nW, heads, N, N)
            bias = bias.expand(B_ // nW, -1, -1, -1, -1).reshape(B_, self.num_heads, N, N)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, C)))


class SwinBlock(nn.Module):
    """A FasterViT window block whose window grid is rolled by ``shift`` tokens (Swin); NCHW in and out.

    ``map_size`` is the (padded) map the block runs on; ``shift`` is one roll for both axes or ``(rows,
    columns)``. With ``shift=0`` it is a plain window block.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        map_size: tuple[int, int],
        shift: int | tuple[int, int],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.window_size, self.shift, self.map_size = window_size, shift, map_size
        self._rolls = (shift, shift) if isinstance(shift, int) else tuple(shift)
        mask = shift_attention_mask(*map_size, window_size, shift) if any(self._rolls) else None
        self.pos_embed = AbsolutePositionMLP(dim, window_size)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ShiftedWindowAttention(
            dim, num_heads, (window_size, window_size), mask,
            qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop,
        )  # fmt: skip
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.gamma3 = _layer_scale(dim, layer_scale)
        self.gamma4 = _layer_scale(dim, layer_scale)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the shift mask after ``to_empty`` of a model built on the meta device (timm's
        ``reinit_non_persistent_buffers`` calls this)."""
        if any(self._rolls):
            with torch.device("cpu"):
                mask = shift_attention_mask(*self.map_size, self.window_size, self.shift)
            refill_buffer(self.attn, "shift_mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        sh, sw = self._rolls
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(2, 3))
        t = window_partition(x, self.window_size) + self.pos_embed()  # (B*nW, ws*ws, C)
        t = t + self.drop_path(_scale(self.attn(self.norm1(t)), self.gamma3))
        t = t + self.drop_path(_scale(self.mlp(self.norm2(t)), self.gamma4))
        x = window_reverse(t, self.window_size, *self.map_size)  # (B, C, Hp, Wp)
        return torch.roll(x, shifts=(sh, sw), dims=(2, 3)) if sh or sw else x


class SwinStage(_PaddedStage):
    """Swin's shifted windows: block ``i`` rolls the grid by ``0`` (even ``i``) or ``window_size // 2`` (odd).

    An axis along which the map is a single window is not shifted (as in timm's Swin): a 4x16 map with 4-pixel
    windows rolls its columns only, and a map that is one window is not shifted at all.

    >>> SwinStage(32, depth=2, num_heads=2, input_resolution=(8, 8), window_size=4)(torch.randn(1, 32, 8, 8)).shape
    torch.Size([1, 32, 8, 8])
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        input_resolution: tuple[int, int],
        window_size: int,
        drop_path: float | Sequence[float] = 0.0,
        **block_kwargs,
    ) -> None:
        super().__init__(input_resolution, window_size, dim, depth)
        window_size = self.window_size
        rolls = tuple(window_size // 2 if n > window_size else 0 for n in self.padded_resolution)
        shift = rolls[0] if rolls[0] == rolls[1] else rolls
        rates = _rates(drop_path, depth)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, self.padded_resolution, shift if i % 2 else 0, drop_path=rates[i],
                      **block_kwargs)
            for i in range(depth)
        )  # fmt: skip

    def forward_padded(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


# ---- Twins --------------------------------------------------------------------------------------------


class GlobalSubsampledAttention(nn.Module):
    """Twins' GSA: every token queries keys/values of the map sub-sampled by an ``sr x sr`` strided conv.

    Input ``(B, H*W, C)`` plus the map size; output of the same shape.

    >>> GlobalSubsampledAttention(32, num_heads=2, sr_ratio=2)(torch.randn(2, 64, 32), (8, 8)).shape
    torch.Size([2, 64, 32])
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio) if sr_ratio > 1 else None
        self.norm = nn.LayerNorm(dim) if sr_ratio > 1 else None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, hd)
        if self.sr is not None:
            x = self.sr(x.transpose(1, 2).reshape(B, C, *size))  # (B, C, H/sr, W/sr)
            x = self.norm(x.flatten(2).transpose(1, 2))  # (B, n, C)
        k, v = self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class GSABlock(nn.Module):
    """Pre-norm block around :class:`GlobalSubsampledAttention` and an MLP; NCHW in and out."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GlobalSubsampledAttention(dim, num_heads, sr_ratio, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.gamma1 = _layer_scale(dim, layer_scale)
        self.gamma2 = _layer_scale(dim, layer_scale)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        t = t + self.drop_path(_scale(self.attn(self.norm1(t), (H, W)), self.gamma1))
        t = t + self.drop_path(_scale(self.mlp(self.norm2(t)), self.gamma2))
        return t.transpose(1, 2).reshape(B, C, H, W)


class TwinsStage(_PaddedStage):
    """Twins-SVT: locally-grouped attention (even blocks) alternating with global sub-sampled attention (odd).

    The LSA blocks are FasterViT window blocks (:class:`~hatplug.layers.HATBlock` without carrier tokens),
    which also carry the position information; Twins' PEG convolution is left out so that GSA is the only
    path between windows. ``sr_ratio`` is GSA's key/value sub-sampling (2 in Twins-SVT's third stage).

    >>> TwinsStage(32, depth=2, num_heads=2, input_resolution=(8, 8), window_size=4)(torch.randn(1, 32, 8, 8)).shape
    torch.Size([1, 32, 8, 8])
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        input_resolution: tuple[int, int],
        window_size: int,
        sr_ratio: int = 2,
        drop_path: float | Sequence[float] = 0.0,
        **block_kwargs,
    ) -> None:
        super().__init__(input_resolution, window_size, dim, depth)
        window_size = self.window_size
        rates = _rates(drop_path, depth)
        self.blocks = nn.ModuleList(
            GSABlock(dim, num_heads, sr_ratio, drop_path=rates[i], **block_kwargs)
            if i % 2
            else HATBlock(dim, num_heads, window_size, None, drop_path=rates[i], **block_kwargs)
            for i in range(depth)
        )

    def forward_padded(self, x: Tensor) -> Tensor:
        Hp, Wp = self.padded_resolution
        for blk in self.blocks:
            if isinstance(blk, HATBlock):
                x = window_reverse(blk(window_partition(x, self.window_size))[0], self.window_size, Hp, Wp)
            else:
                x = blk(x)
        return x


# ---- EdgeViT ------------------------------------------------------------------------------------------


class EdgeViTStage(nn.Module):
    """EdgeViT's Local-Global-Local blocks (:class:`hatplug.models.edgevit.LGLBlock`) as a stage.

    ``window_size`` plays the role of EdgeViT's ``sr_ratio``: one delegate token is sampled per
    ``window_size x window_size`` region, delegates attend globally, and a depthwise transposed conv spreads
    them back. EdgeViT blocks have no layer scale; ``layer_scale`` must be ``None``.

    >>> EdgeViTStage(32, depth=2, num_heads=2, input_resolution=(8, 8), window_size=2)(torch.randn(1, 32, 8, 8)).shape
    torch.Size([1, 32, 8, 8])
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        input_resolution: tuple[int, int],
        window_size: int,
        drop_path: float | Sequence[float] = 0.0,
        layer_scale: float | None = None,
        **block_kwargs,
    ) -> None:
        super().__init__()
        if layer_scale is not None:
            raise ValueError("EdgeViT blocks have no layer scale: build EdgeViTStage with layer_scale=None")
        check_positive_ints(window_size=window_size, depth=depth)  # window_size: the delegates' stride
        self.input_resolution, self.dim = _resolution(input_resolution), dim
        rates = _rates(drop_path, depth)
        # HATBlock's default, as for the other mixers (LGLBlock's own default is no bias: the arm differed)
        block_kwargs.setdefault("qkv_bias", True)
        self.blocks = nn.ModuleList(
            LGLBlock(dim, num_heads, drop_path=rates[i], sr_ratio=int(window_size), **block_kwargs)
            for i in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        H, W = self.input_resolution
        check_stage_input(self, x, self.dim, self.input_resolution)
        torch._assert(x.shape[2] == H and x.shape[3] == W, f"EdgeViTStage was built for {H}x{W} maps")
        for blk in self.blocks:
            x = blk(x)
        return x


# ---- HAT with the component-ablation switches ---------------------------------------------------------


class _Zero(nn.Module):
    """Stands in for a removed position embedding or bias: always returns a zero that broadcasts."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.register_buffer("zero", torch.zeros(shape), persistent=False)

    def init_non_persistent_buffers(self) -> None:
        """Zero again after ``to_empty`` of a model built on the meta device (timm's ``reinit_non_persistent_buffers``
        calls this)."""
        refill_buffer(self, "zero", torch.zeros(self.zero.shape))

    def forward(self) -> Tensor:
        return self.zero


class _NoMixing(nn.Module):
    """Stands in for removed carrier-token attention: contributes nothing to the residual stream."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


class HATAblationStage(HATStage):
    """FasterViT's HAT stage with the switches of the HAT-component ablation; the defaults give ``HATStage``.

    Args:
        ct_attention: global attention among carrier tokens. ``False`` removes it (and its parameters);
            each window's CTs then only summarise their own window, and the CT MLP still runs.
        position_bias: FasterViT's 2D position biases: the absolute position MLPs added to window tokens and
            CTs, and the continuous relative bias of both attentions. ``False`` removes all of them (the
            depthwise conv of the CT initialiser stays: it is part of making the CTs).
        do_propagation: upsample each window's CTs onto its tokens after the last block (FasterViT-3..6).
        other arguments: as :class:`~hatplug.layers.HATStage`.

    >>> stage = HATAblationStage(32, 2, 2, (8, 8), window_size=4, ct_attention=False, position_bias=False)
    >>> stage(torch.randn(1, 32, 8, 8)).shape
    torch.Size([1, 32, 8, 8])
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        input_resolution: tuple[int, int],
        window_size: int,
        ct_size: int = 2,
        ct_attention: bool = True,
        position_bias: bool = True,
        do_propagation: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(
            dim, depth, num_heads, input_resolution, window_size, ct_size=ct_size, hat=True,
            do_propagation=do_propagation, **kwargs,
        )  # fmt: skip
        for blk in self.blocks:
            if not position_bias:
                blk.pos_embed = _Zero(1, 1, 1)
                blk.attn.pos_emb_funct = _Zero(1, 1, 1, 1)
                if blk.hat_attn is not None:
                    blk.hat_pos_embed = None
                    blk.hat_attn.pos_emb_funct = _Zero(1, 1, 1, 1)
            if not ct_attention and blk.hat_attn is not None:
                blk.hat_attn = _NoMixing()
                blk.hat_norm1 = nn.Identity()  # fed only that attention: removed with it
                if not blk.propagate:  # the layer scale also scales propagated tokens in a propagating block
                    blk.gamma1 = None


MIXERS: dict[str, type[nn.Module]] = {
    "window": WindowStage,
    "swin": SwinStage,
    "twins": TwinsStage,
    "edgevit": EdgeViTStage,
    "hat": HATAblationStage,
}


def create_mixer(name: str, **kwargs) -> nn.Module:
    """Build the mixer registered as ``name`` in :data:`MIXERS` with the stage arguments ``kwargs``.

    >>> create_mixer("swin", dim=32, depth=2, num_heads=2, input_resolution=(8, 8), window_size=4).blocks[1].shift
    2
    """
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; choose one of {sorted(MIXERS)}")
    return MIXERS[name](**kwargs)
