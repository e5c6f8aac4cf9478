"""Position biases of HAT: the log-spaced continuous relative bias and the absolute 2D position MLP.

Both are small MLPs evaluated on constant coordinate grids, so their output depends on the weights
only. In eval mode it is computed once per weight state and reused; any change of the weights (an
optimiser step, ``load_state_dict``, ``.to()``) or a call to ``train()`` makes the next call recompute
it. Coordinates and indices are non-persistent buffers: checkpoints carry only the learned MLPs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from torch import Tensor, nn

from ..checkpoint import drop_derived
from ..errors import refuse_scripting
from ._cache import FoldedTensors, must_run_below, refill_buffer

__all__ = ["CachedBias", "ContinuousPositionBias", "AbsolutePositionMLP", "CarrierPositionMLP"]


def _tracing() -> bool:
    """True while a tracer or compiler records the forward: those must see the computation."""
    return torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.compiler.is_compiling()


class CachedBias(nn.Module):
    """A module whose ``forward(*geometry)`` returns a tensor that is a function of its own weights and
    of a few integers (a grid size) only.

    Subclasses implement :meth:`compute`. In training, under tracing/compilation, and whenever
    autograd needs the result (grad enabled and a weight requires grad), it is computed afresh.
    Otherwise the cached value is returned while the weights, buffers and the geometry are unchanged: the same
    tensor objects, storages, in-place version counters, devices and dtypes, the same autocast dtype (if autocast
    is on) and geometry (the cache of the folded weights, :class:`~hatplug.layers.fusion.FoldedTensors`), so a
    cached value is always the one a fresh computation would give. That value is the cache itself: a caller
    that edits it in place (to mask keys, say) must clone it first.
    """

    __prepare_scriptable__ = refuse_scripting  # torch.jit.script: a named error, not a parser trace

    def __init__(self) -> None:
        super().__init__()
        self._cache = FoldedTensors()  # the cache of the folded weights, keyed also by autocast and geometry

    def compute(self, *geometry: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def train(self, mode: bool = True) -> CachedBias:
        self._cache.clear()
        return super().train(mode)

    def forward(self, *geometry: int) -> Tensor:
        if self.training or _tracing() or must_run_below(self):  # hooks on the MLP see every computation
            return self.compute(*geometry)
        params = list(self.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self.compute(*geometry)
        # under autocast the value is computed in the autocast dtype, as a fresh computation would be: the
        # cache must not hand a float32 value to a float16 forward (or a bfloat16 one to a float16 forward)
        device = params[0].device.type if params else "cpu"
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        sources = params + [b for b in self._buffers.values() if b is not None]  # its tables count too
        return self._cache.get(sources, lambda: (self.compute(*geometry),), extra=(autocast, geometry))[0]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """Official checkpoints store the derived tables too: where their shapes are this geometry's they are
        dropped (recomputed here), so that ``load_state_dict`` and timm's loaders take the files; where they
        are not, the checkpoint is for another window size, which is an error, not something to ignore."""
        for key, got, shape in drop_derived(self, state_dict, prefix):
            errors.append(
                f"{key}: the checkpoint's table has shape {got}, this model's window gives {shape}: it was trained "
                "at another window size or resolution; load it with "
                "fastervit.create_model(..., checkpoint_path=..., adapt_geometry=True)"
            )
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


def _log_relative_coords(window_h: int, window_w: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """SwinV2 log-spaced relative coordinates, ``(1, 2h-1, 2w-1, 2)``.

    Built in float32 by default, as the official FasterViT and SwinV2 code build them (the float32 log2 differs
    from the rounded float64 value in the last bit, so this keeps float32 results identical to theirs)."""
    dh = torch.arange(-(window_h - 1), window_h, dtype=dtype)
    dw = torch.arange(-(window_w - 1), window_w, dtype=dtype)
    table = torch.stack(torch.meshgrid(dh, dw, indexing="ij"), dim=-1).unsqueeze(0)
    # a single-row window has no relative offsets to normalise; avoid 0/0
    table[..., 0] /= max(window_h - 1, 1)
    table[..., 1] /= max(window_w - 1, 1)
    table = table * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def _centred_axis(side: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(i - side // 2) / (side // 2)`` for ``i < side``: a 7-wide grid spans ``[-1, 1]``."""
    return (torch.arange(side, dtype=dtype) - side // 2) / max(side // 2, 1)


def _device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in which float dtype ``module`` computes: those of its first floating-point parameter, or CPU
    float32 for one without (a dynamically quantized MLP keeps its weights packed, and takes float32 inputs)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _float64_coordinates(like: Tensor) -> bool:
    """Whether coordinates are built in float64: for a float64 model, told by ``like`` (a coordinate buffer,
    which ``.double()`` casts, or a weight), since float32 coordinates cast up are about 1e-7 off. Otherwise
    float32, as the official code builds them, then cast. Under ``torch.fx`` a weight is a proxy whose dtype
    is unknown: float32 then (buffers keep their dtype there)."""
    return isinstance(like, Tensor) and like.dtype == torch.float64


def _at_full_precision(coords: Tensor, build) -> Tensor:
    """The float32-built coordinate buffer ``coords``, or, in a float64 model, the same coordinates built again
    in float64 by ``build(dtype)`` (cheap: a few hundred numbers, and cached with the bias in eval mode)."""
    if not _float64_coordinates(coords):
        return coords
    return build(torch.float64).to(coords.device)


def _build_dtype(like: Tensor | None = None) -> torch.dtype:
    """The dtype coordinates are built in: float64 for a float64 module (``like``, a coordinate buffer, or the
    default dtype when building one), else float32 as the official code builds them (then cast)."""
    dtype = torch.get_default_dtype() if like is None else like.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _checked_order(order: Tensor | None, count: int) -> Tensor | None:
    """``token_order`` checked to be a permutation of ``count`` tokens, kept on the CPU (it is computed there, also
    under a meta device context) for ``init_non_persistent_buffers``."""
    if order is None:
        return None
    if order.is_meta:
        raise ValueError("token_order must hold its values (a CPU tensor), got a tensor on the meta device")
    order = order.to("cpu")
    if (
        order.dim() != 1
        or order.dtype.is_floating_point
        or not torch.equal(order.sort().values, torch.arange(count, device="cpu"))
    ):
        raise ValueError(
            f"token_order must be a permutation of the {count} tokens (each index 0..{count - 1} once), got "
            f"{order.tolist() if order.numel() <= 16 else tuple(order.shape)}"
        )
    return order


def _relative_position_index(window_h: int, window_w: int) -> Tensor:
    """``(h*w, h*w)`` index into the flattened ``(2h-1, 2w-1)`` table, as in Swin."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_h), torch.arange(window_w), indexing="ij")).flatten(
        1
    )  # (2, h*w)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (h*w, h*w, 2)
    return (rel[..., 0] + window_h - 1) * (2 * window_w - 1) + (rel[..., 1] + window_w - 1)


class ContinuousPositionBias(CachedBias):
    """Additive attention bias of HAT: SwinV2's log-spaced continuous relative position bias.

    An MLP ``2 -> 512 -> num_heads`` maps log-spaced relative offsets to a per-head bias,
    ``16 * sigmoid(.)``, laid out for the ``window_h * window_w`` tokens of a window. The first
    ``num_prefix_tokens`` positions of the sequence (the carrier tokens) get zero bias, as in FasterViT.

    Args:
        num_heads: attention heads.
        window_size: ``(h, w)`` of the token grid the bias covers (an int for a square one).
        num_prefix_tokens: leading tokens (carrier tokens) with zero bias rows and columns.
        token_order: optional permutation of the resulting sequence (``seq[k] = old[order[k]]``), for
            token streams that are not stored in raster order.

    ``forward()`` returns ``(1, num_heads, N, N)`` with ``N = num_prefix_tokens + h * w``.

    >>> bias = ContinuousPositionBias(num_heads=2, window_size=(7, 7), num_prefix_tokens=4)
    >>> bias().shape
    torch.Size([1, 2, 53, 53])
    """

    def __init__(
        self,
        num_heads: int,
        window_size: tuple[int, int],
        num_prefix_tokens: int = 0,
        token_order: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = to_2tuple(window_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
        )
        coords = _log_relative_coords(*self.window_size, dtype=_build_dtype())
        self.register_buffer("relative_coords_table", coords.to(torch.get_default_dtype()), persistent=False)
        self.register_buffer("relative_position_index", _relative_position_index(*self.window_size), persistent=False)
        self._token_order = _checked_order(token_order, self.seq_len)  # what init_non_persistent_buffers restores
        self.register_buffer("token_order", token_order, persistent=False)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the coordinate and index tables, e.g. after ``to_empty`` of a model built on the meta device
        (timm's ``reinit_non_persistent_buffers`` calls this)."""
        with torch.device("cpu"):
            dtype = _build_dtype(self.relative_coords_table)
            refill_buffer(self, "relative_coords_table", _log_relative_coords(*self.window_size, dtype=dtype))
            refill_buffer(self, "relative_position_index", _relative_position_index(*self.window_size))
        refill_buffer(self, "token_order", self._token_order)

    @property
    def seq_len(self) -> int:
        return self.num_prefix_tokens + self.window_size[0] * self.window_size[1]

    def derived_state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Official checkpoints also store these recomputable tensors; their shapes reveal the geometry."""
        return {
            "relative_coords_table": tuple(self.relative_coords_table.shape),
            "relative_position_index": tuple(self.relative_position_index.shape),
            "relative_bias": (1, self.num_heads, self.seq_len, self.seq_len),
        }

    def compute(self) -> Tensor:
        n = self.window_size[0] * self.window_size[1]
        coords = _at_full_precision(
            self.relative_coords_table,
            lambda dtype: _log_relative_coords(*self.window_size, dtype=dtype),
        )
        table = self.cpb_mlp(coords).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, self.num_heads)
        bias = 16 * torch.sigmoid(bias.permute(2, 0, 1))  # (heads, n, n)
        p = self.num_prefix_tokens
        if p:
            bias = F.pad(bias, (p, 0, p, 0))
        if self.token_order is not None:
            bias = bias[:, self.token_order][:, :, self.token_order]
        return bias.unsqueeze(0)


class AbsolutePositionMLP(CachedBias):
    """FasterViT's absolute 2D position embedding: an MLP ``2 -> 512 -> dim`` on grid coordinates.

    Coordinates of a ``side x side`` grid are centred and scaled, ``(i - side // 2) / (side // 2)``,
    so a 7x7 window spans ``[-1, 1]``. ``forward()`` returns ``(1, side * side, dim)``, added to the
    tokens by the caller.

    Args:
        dim: embedding width.
        side: side of the square token grid.
        token_order: optional permutation of the grid tokens (``seq[k] = raster[order[k]]``).

    >>> AbsolutePositionMLP(dim=64, side=7)().shape
    torch.Size([1, 49, 64])
    """

    def __init__(self, dim: int, side: int, token_order: Tensor | None = None) -> None:
        super().__init__()
        self.side = side
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(), nn.Linear(512, dim, bias=False))
        self.register_buffer("coords", self._grid(_build_dtype()).to(torch.get_default_dtype()), persistent=False)
        self._token_order = _checked_order(token_order, side * side)  # what init_non_persistent_buffers restores
        self.register_buffer("token_order", token_order, persistent=False)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the grid coordinates, e.g. after ``to_empty`` of a model built on the meta device (timm's
        ``reinit_non_persistent_buffers`` calls this)."""
        with torch.device("cpu"):
            refill_buffer(self, "coords", self._grid(_build_dtype(self.coords)))
        refill_buffer(self, "token_order", self._token_order)

    def _grid(self, dtype: torch.dtype) -> Tensor:
        ax = _centred_axis(self.side, dtype)
        return torch.stack(torch.meshgrid(ax, ax, indexing="ij"), dim=-1).view(1, self.side * self.side, 2)

    def derived_state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Official checkpoints store the last computed embedding as ``relative_bias``."""
        return {"relative_bias": (1, self.side * self.side, self.cpb_mlp[2].out_features)}

    def compute(self) -> Tensor:
        emb = self.cpb_mlp(_at_full_precision(self.coords, self._grid))
        if self.token_order is not None:
            emb = emb[:, self.token_order]
        return emb


class CarrierPositionMLP(CachedBias):
    """Absolute 2D position embedding of a carrier-token grid of any size, in the grouped-by-window order.

    The same MLP ``2 -> 512 -> dim`` as :class:`AbsolutePositionMLP`, evaluated on the centre of each
    carrier token in normalised image coordinates, ``(2 * i + 1) / grid - 1`` in ``(-1, 1)``: a token
    covering a given part of the image gets the same coordinate at every input size, so a converted
    model keeps one embedding for all resolutions. Used by converted models, whose window grid follows
    the input.

    ``forward(windows_h, windows_w)`` returns ``(1, windows_h * windows_w * ct_size**2, dim)``, tokens
    ordered window by window (row-major), ``ct_size x ct_size`` row-major inside each window, i.e. the
    order of :class:`~hatplug.layers.CarrierTokenizer`.

    >>> pe = CarrierPositionMLP(dim=8, ct_size=2)
    >>> pe(2, 3).shape
    torch.Size([1, 24, 8])
    """

    def __init__(self, dim: int, ct_size: int) -> None:
        super().__init__()
        self.ct_size = ct_size
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(), nn.Linear(512, dim, bias=False))

    def compute(self, windows_h: int, windows_w: int) -> Tensor:
        c = self.ct_size
        device, dtype = _device_and_dtype(self.cpb_mlp)
        local = torch.arange(c, device=device)
        rows = torch.arange(windows_h, device=device).view(-1, 1, 1, 1) * c + local.view(1, 1, -1, 1)
        cols = torch.arange(windows_w, device=device).view(1, -1, 1, 1) * c + local.view(1, 1, 1, -1)
        shape = (windows_h, windows_w, c, c)
        exact = torch.float64 if dtype == torch.float64 else torch.float32
        y = (2 * rows.expand(shape).to(exact) + 1) / (windows_h * c) - 1
        x = (2 * cols.expand(shape).to(exact) + 1) / (windows_w * c) - 1
        coords = torch.stack((y, x), dim=-1).reshape(1, -1, 2).to(dtype)
        return self.cpb_mlp(coords)
