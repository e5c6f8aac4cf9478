"""The Hierarchical Attention (HAT) block and the stage that threads carrier tokens through it.

One implementation serves the native FasterViT family and every converted model: the carrier-token
half of a block (CT position embedding, CT attention + MLP with layer scales, joining the CTs of each
window to its tokens, splitting them off again, propagation into the map) is
:class:`CarrierTokenHalf` and the ``*_carrier_tokens`` functions below. :class:`HATBlock` adds
FasterViT's window attention to them; the blocks of ``hatplug.convert`` add a converted model's own
window attention instead.

Carrier tokens (CTs) travel between blocks as ``(B, nW * ct**2, C)``, grouped by window, so that the
per-window view needed for local attention is a free ``reshape``. CT attention is global over all CTs
and permutation-equivariant, so instead of re-ordering the CTs into raster order and back in every
block (as the released FasterViT does), the CT position embedding and the CT attention bias are laid
out in the grouped order once, at construction.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch
from timm.layers import DropPath, Mlp
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import refuse_scripting
from ._cache import refill_buffer
from .attention import BiasedAttention
from .carrier import CarrierTokenizer, check_ct_size
from .fusion import (
    FoldedTensors,
    fold_scale,
    fusion_active,
    is_channels_last,
    mlp_hidden,
    passes_through,
    residual_linear,
    runs_as,
    stream_dtype,
)
from .pos_embed import AbsolutePositionMLP, _tracing
from .windows import (
    ceil_to_multiple,
    grouped_to_raster_index,
    pad_to_windows,
    upsample_index,
    window_partition,
    window_reverse,
    window_reverse_nhwc,
)

__all__ = [
    "CarrierTokenGrid",
    "CarrierTokenHalf",
    "HATBlock",
    "HATStage",
    "join_carrier_tokens",
    "propagate_carrier_tokens",
    "split_carrier_tokens",
    "upsample_carrier_tokens",
]


def check_positive_ints(**values) -> None:
    """A named error for any of ``values`` that is not a positive int (NumPy ints count; bools do not)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_block_args(dim, num_heads, window_size, mlp_ratio) -> None:
    """Named errors for the shape arguments of :class:`HATBlock` / :class:`HATStage` (raw tensor errors, or a
    silently different MLP, otherwise)."""
    check_positive_ints(dim=dim, num_heads=num_heads, window_size=window_size)
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or not mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be a positive number (the MLP's hidden width / dim), got {mlp_ratio!r}")
    if int(dim * mlp_ratio) < 1:  # timm's Mlp would take a hidden width of 0 for "dim"
        raise ValueError(f"mlp_ratio={mlp_ratio} gives dim={dim} an MLP hidden width of int({dim * mlp_ratio}) = 0")


def _drop_path_rates(drop_path: float | Sequence[float], depth: int) -> list[float]:
    """One stochastic-depth rate per block: ``drop_path`` as given, or one rate repeated ``depth`` times; each in
    [0, 1) (a rate of 1 drops every sample), as FasterViT's ``drop_path_rate``."""
    if not isinstance(drop_path, Sequence):
        rates = [drop_path] * depth
    elif len(drop_path) != depth:
        raise ValueError(f"drop_path has {len(drop_path)} rates for {depth} blocks: give one per block, or one number")
    else:
        rates = list(drop_path)
    for rate in rates:
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
            raise ValueError(
                f"drop_path must be in [0, 1) (a stochastic-depth rate, or one per block), got {drop_path}"
            )
    return rates


def _resolution(size: int | Sequence[int]) -> tuple[int, int]:
    """``input_resolution`` as ``(H, W)`` of positive ints: an int ``n`` is ``(n, n)``, as in FasterViT."""
    if _is_int(size):
        size = (size, size)
    if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) != 2:
        raise ValueError(f"input_resolution must be an int or (H, W) of ints, got {size!r}")
    if not all(_is_int(side) and side >= 1 for side in size):
        raise ValueError(f"input_resolution must be positive ints, got {tuple(size)!r}")
    return operator.index(size[0]), operator.index(size[1])


def _is_int(value) -> bool:
    """A Python, NumPy or torch integer (``operator.index`` takes it), not a bool."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool)


def _layer_scale(dim: int, value: float | None) -> nn.Parameter | None:
    return None if value is None else nn.Parameter(value * torch.ones(dim))


def _scale(x: Tensor, gamma: Tensor | None) -> Tensor:
    return x if gamma is None else gamma * x


def _scaled_linear(linear: nn.Linear, gamma: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(weight, bias)`` of ``gamma * linear(.)``: the layer's own tensors when there is no layer scale."""
    return (linear.weight, linear.bias) if gamma is None else fold_scale(linear.weight, linear.bias, gamma)


def _attention_runs_as_stock(attn: nn.Module) -> bool:
    """Whether the folded form may stand in for ``attn``'s call: ``attn.proj(attn.attend(x))`` with ``proj`` read,
    not called (:func:`~hatplug.layers.fusion.runs_as`)."""
    return runs_as(attn, BiasedAttention) and runs_as(attn.proj, nn.Linear)


def _folded_residual_pair(cache, proj: nn.Linear, gamma_attn, fc2: nn.Linear, gamma_mlp) -> tuple:
    """``(w_attn, b_attn, w_mlp, b_mlp)``: an attention output projection and an MLP's last layer with their
    layer scales folded in, from ``cache`` (a :class:`FoldedTensors`) while none of the sources changed."""
    return cache.get(
        (proj.weight, proj.bias, gamma_attn, fc2.weight, fc2.bias, gamma_mlp),
        lambda: _scaled_linear(proj, gamma_attn) + _scaled_linear(fc2, gamma_mlp),
    )


def join_carrier_tokens(ct: Tensor, x: Tensor) -> Tensor:
    """Put each window's carrier tokens in front of its tokens.

    Args:
        ct: ``(B, nW * n, C)`` grouped by window (or already ``(B * nW, n, C)``).
        x: ``(B * nW, N, C)`` window tokens.

    Returns:
        ``(B * nW, n + N, C)``.

    >>> join_carrier_tokens(torch.zeros(2, 6 * 4, 8), torch.ones(12, 9, 8)).shape
    torch.Size([12, 13, 8])
    """
    return torch.cat((ct.reshape(x.shape[0], -1, x.shape[2]), x), dim=1)


def split_carrier_tokens(seq: Tensor, ct_per_window: int) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`join_carrier_tokens`: ``(B * nW, n + N, C)`` -> ``(B * nW, n, C)``, ``(B * nW, N, C)``.

    >>> ct, x = split_carrier_tokens(torch.zeros(12, 13, 8), 4)
    >>> tuple(ct.shape), tuple(x.shape)
    ((12, 4, 8), (12, 9, 8))
    """
    return seq.split([ct_per_window, seq.shape[1] - ct_per_window], dim=1)


def propagate_carrier_tokens(x: Tensor, ct_windows: Tensor, index: Tensor, scale: Tensor | None) -> Tensor:
    """Add each window's carrier tokens, nearest-upsampled onto its tokens, to them (FasterViT's propagation).

    Args:
        x: ``(B * nW, N, C)`` window tokens.
        ct_windows: ``(B * nW, n, C)``.
        index: :func:`~hatplug.layers.upsample_index` of the window, ``(N,)``.
        scale: per-channel scale ``(C,)``, or ``None`` for 1.

    >>> ct = torch.arange(4.0).view(1, 4, 1)
    >>> propagate_carrier_tokens(torch.zeros(1, 9, 1), ct, upsample_index(2, 3), None).flatten().tolist()
    [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 3.0]
    """
    return x + upsample_carrier_tokens(ct_windows, index, scale)


def upsample_carrier_tokens(ct_windows: Tensor, index: Tensor, scale: Tensor | None) -> Tensor:
    """The term :func:`propagate_carrier_tokens` adds: ``scale * ct_windows[:, index]``, ``(B * nW, N, C)``.

    Blocks whose tokens live in a map rather than in windows fold it back with a window reverse.
    """
    return _scale(ct_windows[:, index], scale)


class CarrierTokenHalf:
    """The carrier-token half of a HAT block, as a mixin for an ``nn.Module``.

    It owns flat attributes, so that the state-dict keys are FasterViT's: ``hat_norm1``, ``hat_attn``,
    ``hat_norm2``, ``hat_mlp``, ``hat_pos_embed`` and the layer scales ``gamma1`` / ``gamma2``.
    :meth:`carrier_attention` is global attention + MLP over all carrier tokens of an image; the
    module using the mixin decides how its window attention sees them (see
    :func:`join_carrier_tokens`). ``hat_attn`` is ``None`` where a block has no carrier tokens.
    """

    hat_attn: nn.Module | None
    hat_pos_embed: nn.Module | None

    def init_carrier_half(
        self,
        dim: int,
        hat_attn: nn.Module,
        hat_pos_embed: nn.Module | None,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
    ) -> None:
        """Create the CT modules: norms, ``hat_attn`` (given), MLP, ``hat_pos_embed`` (given or ``None``), gammas."""
        self.hat_norm1 = nn.LayerNorm(dim)
        self.hat_norm2 = nn.LayerNorm(dim)
        self.hat_attn = hat_attn
        self.hat_mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.hat_drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.hat_pos_embed = hat_pos_embed
        self.gamma1 = _layer_scale(dim, layer_scale)
        self.gamma2 = _layer_scale(dim, layer_scale)
        self._hat_folded = FoldedTensors()

    def carrier_attention(self, ct: Tensor, pos: Tensor | None = None, folding: bool | None = None) -> Tensor:
        """``(B, n_ct, C)`` -> ``(B, n_ct, C)``: add ``pos``, then attention and MLP with residuals and layer scales.

        In eval mode (no autograd, no tracing) the layer scales are folded into the output projections and
        each residual is accumulated by the projection's GEMM (:mod:`hatplug.layers.fusion`). ``folding``: the
        caller's :func:`~hatplug.layers.fusion.fusion_active` answer for a module that contains this one
        (``None``: ask it here), which saves walking the same submodules twice.
        """
        if pos is not None:
            ct = ct + pos
        hidden = mlp_hidden(self.hat_mlp)
        if (
            (fusion_active(self, ct) if folding is None else folding)
            and hidden is not None
            and _attention_runs_as_stock(self.hat_attn)
            and passes_through(self.hat_drop_path, self.hat_attn.proj_drop, self.hat_mlp.drop2)
        ):
            w_attn, b_attn, w_mlp, b_mlp = _folded_residual_pair(
                self._hat_folded, self.hat_attn.proj, self.gamma1, self.hat_mlp.fc2, self.gamma2
            )
            ct = ct.to(stream_dtype(ct, self.gamma1, self.gamma2))  # a no-op unless autocast meets a layer scale
            ct = residual_linear(ct, self.hat_attn.attend(self.hat_norm1(ct)), w_attn, b_attn)
            return residual_linear(ct, hidden(self.hat_norm2(ct)), w_mlp, b_mlp)
        ct = ct + self.hat_drop_path(_scale(self.hat_attn(self.hat_norm1(ct)), self.gamma1))
        ct = ct + self.hat_drop_path(_scale(self.hat_mlp(self.hat_norm2(ct)), self.gamma2))
        return ct


class CarrierTokenGrid:
    """Static geometry of the carrier tokens of one stage, and the orderings derived from it.

    Args:
        windows: ``(nH, nW)`` windows of the stage.
        ct_size: carrier tokens per window side.
        official_order: reproduce how the released FasterViT regroups CTs into windows after CT
            attention: it reads the CT raster with the window grid's height and width swapped. For a
            square grid of windows that is the identity; for a non-square grid it changes which CTs a
            window sees, and official any-resolution checkpoints were trained that way. ``False``
            keeps every window's own CTs.

    Attributes:
        num_tokens: CTs per image.
        token_order: ``order[k]`` is the raster index of the ``k``-th CT as seen by CT attention, or
            ``None`` when that is the identity.
        block_perm: gather applied to the stored CTs at the start of each block, or ``None``.
        square: whether the window grid is square (FasterViT gives CTs an absolute position embedding
            only then).
    """

    def __init__(self, windows: tuple[int, int], ct_size: int, official_order: bool = True) -> None:
        n_h, n_w = windows
        for name, value in (("windows[0]", n_h), ("windows[1]", n_w), ("ct_size", ct_size)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"CarrierTokenGrid: {name} must be a positive int, got {value!r}")
        self.windows = (n_h, n_w)
        self.ct_size = ct_size
        self.num_tokens = n_h * n_w * ct_size * ct_size
        self.square = n_h == n_w
        stored = grouped_to_raster_index(n_h, n_w, ct_size)  # raster index of each stored CT
        regroup = grouped_to_raster_index(n_w, n_h, ct_size) if official_order else stored
        raster_to_stored = torch.argsort(stored)
        perm = raster_to_stored[regroup]
        identity = torch.arange(self.num_tokens, device="cpu")
        self.token_order = None if torch.equal(regroup, identity) else regroup
        self.block_perm = None if torch.equal(perm, identity) else perm


class HATBlock(CarrierTokenHalf, nn.Module):
    """One HAT block: CT attention + MLP, then local attention + MLP over ``[window CTs; window tokens]``.

    Without carrier tokens (``ct_grid=None``) it is a plain window-attention block with FasterViT's
    position embeddings. The attribute names follow the official checkpoints.

    Args:
        dim: token width.
        num_heads: heads of both attentions.
        window_size: side of the square window.
        ct_grid: carrier-token geometry of the stage, or ``None`` for no carrier tokens.
        mlp_ratio: hidden width of both MLPs relative to ``dim``.
        qkv_bias: bias in qkv projections.
        qk_scale: override of the attention scale.
        drop: dropout after projections and in MLPs.
        attn_drop: attention-weight dropout.
        drop_path: stochastic depth rate.
        layer_scale: initial value of the layer-scale gammas, or ``None`` for none.
        propagate: add the upsampled CTs of each window to its tokens at the end (last block of a
            stage in FasterViT-3..6).

    ``forward(x, ct)``: ``x`` is ``(B * nW, ws * ws, C)``, ``ct`` is ``(B, nW * ct**2, C)`` or ``None``;
    returns both, updated.

    >>> grid = CarrierTokenGrid(windows=(2, 2), ct_size=2)
    >>> blk = HATBlock(64, num_heads=2, window_size=7, ct_grid=grid)
    >>> x, ct = blk(torch.randn(2 * 4, 49, 64), torch.randn(2, 16, 64))
    >>> tuple(x.shape), tuple(ct.shape)
    ((8, 49, 64), (2, 16, 64))
    """

    __prepare_scriptable__ = refuse_scripting  # torch.jit.script: a named error, not a parser trace

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        ct_grid: CarrierTokenGrid | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        propagate: bool = False,
    ) -> None:
        super().__init__()
        _check_block_args(dim, num_heads, window_size, mlp_ratio)
        if isinstance(drop_path, Sequence):
            raise ValueError(f"HATBlock takes one drop_path rate (HATStage takes one per block), got {drop_path!r}")
        _drop_path_rates(drop_path, 1)
        if ct_grid is not None:
            check_ct_size(ct_grid.ct_size, (window_size, window_size))
        self.window_size = window_size
        self.ct_per_window = 0 if ct_grid is None else ct_grid.ct_size**2
        self.num_windows = 0 if ct_grid is None else ct_grid.windows[0] * ct_grid.windows[1]
        self.token_dim = dim
        self.propagate = propagate and ct_grid is not None
        hidden = int(dim * mlp_ratio)

        self.pos_embed = AbsolutePositionMLP(dim, window_size)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = BiasedAttention(
            dim,
            num_heads,
            (window_size, window_size),
            self.ct_per_window,
            qkv_bias,
            qk_scale,
            attn_drop,
            drop,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden, drop=drop)
        self.gamma3 = _layer_scale(dim, layer_scale)
        self.gamma4 = _layer_scale(dim, layer_scale)
        self._folded = FoldedTensors()

        self.hat_attn = None
        if ct_grid is not None:
            # The released model covers the largest square of the CT raster with its relative bias and
            # leaves the leading remainder unbiased (all CTs are covered when the grid is square).
            side = math.isqrt(ct_grid.num_tokens)
            self.init_carrier_half(
                dim,
                hat_attn=BiasedAttention(
                    dim,
                    num_heads,
                    (side, side),
                    ct_grid.num_tokens - side * side,
                    qkv_bias,
                    qk_scale,
                    attn_drop,
                    drop,
                    token_order=ct_grid.token_order,
                ),
                hat_pos_embed=None,
                mlp_ratio=mlp_ratio,
                drop=drop,
                drop_path=drop_path,
                layer_scale=layer_scale,
            )
            # made after the CT MLP, as always, so that a seed gives the same initial weights
            if ct_grid.square:
                self.hat_pos_embed = AbsolutePositionMLP(dim, side, token_order=ct_grid.token_order)
            self.register_buffer("ct_block_perm", ct_grid.block_perm, persistent=False)
            if self.propagate:
                self.register_buffer(
                    "ct_upsample_index", upsample_index(ct_grid.ct_size, window_size), persistent=False
                )
        self._ct_grid = ct_grid  # what init_non_persistent_buffers recomputes from (CPU tensors)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the carrier-token orders, e.g. after ``to_empty`` of a model built on the meta device
        (timm's ``reinit_non_persistent_buffers`` calls this; the position modules restore their own tables)."""
        if self._ct_grid is not None:
            refill_buffer(self, "ct_block_perm", self._ct_grid.block_perm)
            with torch.device("cpu"):
                refill_buffer(self, "ct_upsample_index", upsample_index(self._ct_grid.ct_size, self.window_size))

    def train(self, mode: bool = True) -> HATBlock:
        self._folded.clear()
        if self.hat_attn is not None:
            self._hat_folded.clear()
        return super().train(mode)

    def _fused_forward(self, x: Tensor, ct: Tensor | None, hidden) -> tuple[Tensor, Tensor | None]:
        """Eval-mode forward: the same function as :meth:`forward` up to float32 rounding, with the layer
        scales folded into ``attn.proj`` / ``mlp.fc2``, the residuals accumulated by those GEMMs, and the
        position embedding added while the carrier tokens are joined (one pass instead of two)."""
        w_attn, b_attn, w_mlp, b_mlp = _folded_residual_pair(
            self._folded, self.attn.proj, self.gamma3, self.mlp.fc2, self.gamma4
        )
        pos = self.pos_embed()
        if self.hat_attn is None:
            x = x.to(stream_dtype(x, pos, self.gamma3, self.gamma4)) + pos
        else:
            C = ct.shape[-1]
            if self.ct_block_perm is not None:
                ct = ct[:, self.ct_block_perm]
            pos_ct = self.hat_pos_embed() if self.hat_pos_embed is not None else None
            ct = self.carrier_attention(ct, pos_ct, folding=True)  # this block's fusion_active said yes
            n = self.ct_per_window
            # the dtype the plain form's cat and layer-scaled residuals give (differs only under autocast)
            dtype = stream_dtype(x, pos, ct, self.gamma3, self.gamma4)
            seq = x.new_empty((x.shape[0], n + x.shape[1], C), dtype=dtype)
            seq[:, :n] = ct.view(x.shape[0], n, C)
            torch.add(x, pos, out=seq[:, n:])  # (B*nW, ct*ct + ws*ws, C)
            x = seq
        x = residual_linear(x, self.attn.attend(self.norm1(x)), w_attn, b_attn)
        x = residual_linear(x, hidden(self.norm2(x)), w_mlp, b_mlp)
        return self._split_carrier_tokens(x, ct)

    def _split_carrier_tokens(self, x: Tensor, ct: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Take the carrier tokens back out of the windows (``ct`` only gives the batch and channel sizes) and,
        in a stage's last block, propagate them into the window tokens."""
        if self.hat_attn is None:
            return x, ct
        B, _, C = ct.shape
        ct_windows, x = split_carrier_tokens(x, self.ct_per_window)
        if self.propagate:
            x = propagate_carrier_tokens(x, ct_windows, self.ct_upsample_index, self.gamma1)
        return x, ct_windows.reshape(B, -1, C)

    def _check_input(self, x: Tensor, ct: Tensor | None) -> None:
        """Named errors for tokens this block was not built for (raw broadcast or view errors otherwise)."""
        if ct is None and self.hat_attn is not None:
            raise ValueError(
                "this HATBlock has carrier tokens (it was built with a ct_grid): call it as block(x, ct) with the "
                "(B, num_windows * ct_size**2, C) tokens of a CarrierTokenizer, or use a HATStage, which makes them"
            )
        C, n = self.token_dim, self.window_size**2
        if x.dim() != 3 or x.shape[1:] != (n, C):
            raise ValueError(
                f"HATBlock takes windows of tokens (B * num_windows, {n}, {C}), {self.window_size}x{self.window_size} "
                f"tokens of width {C} each (window_partition makes them from a map), got shape {tuple(x.shape)}"
            )
        if ct is not None and self.hat_attn is not None:
            m = self.num_windows * self.ct_per_window
            if ct.dim() != 3 or ct.shape[1:] != (m, C) or ct.shape[0] * self.num_windows != x.shape[0]:
                raise ValueError(
                    f"this HATBlock's carrier-token grid has {self.num_windows} windows of {self.ct_per_window} "
                    f"tokens: it takes ct of shape (B, {m}, {C}) with x of shape (B * {self.num_windows}, {n}, {C}), "
                    f"got ct {tuple(ct.shape)} and x {tuple(x.shape)}"
                )

    def forward(self, x: Tensor, ct: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if not _tracing():
            self._check_input(x, ct)
        hidden = mlp_hidden(self.mlp)
        if (
            hidden is not None
            and _attention_runs_as_stock(self.attn)
            and fusion_active(self, x, ct)
            and passes_through(self.drop_path, self.attn.proj_drop, self.mlp.drop2)
        ):
            return self._fused_forward(x, ct, hidden)
        x = x + self.pos_embed()  # (B*nW, ws*ws, C)
        if self.hat_attn is not None:
            if self.ct_block_perm is not None:
                ct = ct[:, self.ct_block_perm]
            ct = self.carrier_attention(ct, self.hat_pos_embed() if self.hat_pos_embed is not None else None)
            x = join_carrier_tokens(ct, x)  # (B*nW, ct*ct + ws*ws, C)

        x = x + self.drop_path(_scale(self.attn(self.norm1(x)), self.gamma3))
        x = x + self.drop_path(_scale(self.mlp(self.norm2(x)), self.gamma4))
        return self._split_carrier_tokens(x, ct)


def check_stage_input(stage: nn.Module, x: Tensor, dim: int, resolution: tuple[int, int]) -> None:
    """A named error for a map a stage (``HATStage``, the ablation mixers) would fail on deep inside: an unbatched
    map, an empty batch, channels-last data or other channels, integers, another size than it was built for.
    Skipped while tracing (the stage's ``torch._assert`` on the size stays in the graph)."""
    if _tracing():
        return
    name = type(stage).__name__
    if x.dim() != 4:
        raise ValueError(
            f"{name} takes (B, C, H, W) maps, got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
            + ("; for one map add the batch dimension: stage(x[None])" if x.dim() == 3 else "")
        )
    if x.shape[0] == 0:
        raise ValueError(f"got an empty batch (0 maps): {name} needs at least one")
    if x.shape[1] != dim:
        H, W = resolution
        nhwc = x.shape[-1] == dim
        raise ValueError(
            f"this {name} takes {dim}-channel maps (B, {dim}, {H}, {W}), got shape {tuple(x.shape)}"
            + ("; that looks channels-last (B, H, W, C): pass x.permute(0, 3, 1, 2)" if nhwc else "")
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} takes floating-point maps, got {x.dtype}: convert them first, e.g. x.float()")
    H, W = resolution
    if x.shape[2] != H or x.shape[3] != W:  # the stage's asserts, naming the size received
        h, w = x.shape[2:]
        raise AssertionError(
            f"{name} was built for {H}x{W} maps, got {h}x{w}: rebuild it with input_resolution=({h}, {w}) for this "
            f"size, or resize the input to {H}x{W}"
        )


class HATStage(nn.Module):
    """A stage of HAT blocks on an NCHW map: pad, make CTs, partition, run the blocks, reverse, crop.

    Carrier tokens are made once from the stage input and threaded block to block; the last block
    propagates them into the map when ``do_propagation``. CTs exist only where ``hat`` is on and the
    (padded) map has more than one window.

    Args:
        dim: channels.
        depth: number of blocks.
        num_heads: attention heads.
        input_resolution: ``(H, W)`` of the stage input, or ``n`` for ``(n, n)``; the stage is built for this size.
        window_size: side of a window; the map is zero-padded to whole windows.
        ct_size: carrier tokens per window side.
        hat: use carrier tokens (otherwise plain window attention).
        do_propagation: add CTs back into the map at the end of the stage.
        official_ct_order: see :class:`CarrierTokenGrid`.
        drop_path: a rate in [0, 1), or one rate per block.
        mlp_ratio, qkv_bias, qk_scale, drop, attn_drop, layer_scale: the :class:`HATBlock` arguments of every block.

    >>> stage = HATStage(64, depth=2, num_heads=2, input_resolution=(14, 20), window_size=7)
    >>> stage(torch.randn(1, 64, 14, 20)).shape
    torch.Size([1, 64, 14, 20])
    """

    __prepare_scriptable__ = refuse_scripting  # torch.jit.script: a named error, not a parser trace

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        input_resolution: int | tuple[int, int],
        window_size: int,
        ct_size: int = 2,
        hat: bool = True,
        do_propagation: bool = False,
        official_ct_order: bool = True,
        drop_path: float | Sequence[float] = 0.0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        check_positive_ints(depth=depth)
        _check_block_args(dim, num_heads, window_size, mlp_ratio)
        H, W = _resolution(input_resolution)
        self.dim = dim
        self.input_resolution = (H, W)
        self.window_size = window_size
        self.padded_resolution = (ceil_to_multiple(H, window_size), ceil_to_multiple(W, window_size))
        windows = (self.padded_resolution[0] // window_size, self.padded_resolution[1] // window_size)
        self.grad_checkpointing = False

        ct_grid = None
        self.global_tokenizer = None
        if hat and windows[0] * windows[1] > 1:
            check_ct_size(ct_size, (window_size, window_size))
            ct_grid = CarrierTokenGrid(windows, ct_size, official_ct_order)
            self.global_tokenizer = CarrierTokenizer(dim, self.padded_resolution, window_size, ct_size)
        rates = _drop_path_rates(drop_path, depth)
        self.blocks = nn.ModuleList(
            HATBlock(
                dim,
                num_heads,
                window_size,
                ct_grid,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=rates[i],
                layer_scale=layer_scale,
                propagate=do_propagation and i == depth - 1,
            )
            for i in range(depth)
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """In training, recompute each block's activations in the backward pass instead of keeping them (less
        memory, one more forward per block), as timm models' method of that name does.

        >>> stage = HATStage(16, depth=2, num_heads=2, input_resolution=8, window_size=4)
        >>> stage.set_grad_checkpointing()
        >>> stage(torch.randn(1, 16, 8, 8, requires_grad=True)).sum().backward()
        """
        self.grad_checkpointing = enable

    @property
    def has_carrier_tokens(self) -> bool:
        return self.global_tokenizer is not None

    def forward(self, x: Tensor) -> Tensor:
        H, W = self.input_resolution
        check_stage_input(self, x, self.dim, self.input_resolution)
        # kept in traced and exported graphs, where the message cannot hold the size received
        torch._assert(x.shape[2] == H, f"HATStage was built for {H}x{W} maps: rebuild it for the new input size")
        torch._assert(x.shape[3] == W, f"HATStage was built for {H}x{W} maps: rebuild it for the new input size")
        Hp, Wp = self.padded_resolution
        channels_last = not _tracing() and is_channels_last(x)  # a traced graph keeps one layout
        x = pad_to_windows(x, Hp - H, Wp - W)
        ct = self.global_tokenizer(x) if self.global_tokenizer is not None else None
        x = window_partition(x, self.window_size)  # (B*nW, ws*ws, C)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x, ct = checkpoint(blk, x, ct, use_reentrant=False)
            else:
                x, ct = blk(x, ct)
        # the output keeps the input's memory format, as a conv's does; cropped (and copied) in that layout, so
        # that no memory_format argument is needed (torch.func.vmap has none but the contiguous one)
        if channels_last:
            x = window_reverse_nhwc(x, (self.window_size, self.window_size), Hp, Wp)  # (B, Hp, Wp, C)
            if Hp != H or Wp != W:
                x = x[:, :H, :W].contiguous()
            return x.permute(0, 3, 1, 2)
        x = window_reverse(x, self.window_size, Hp, Wp)
        if Hp != H or Wp != W:
            x = x[:, :, :H, :W].contiguous()
        return x
