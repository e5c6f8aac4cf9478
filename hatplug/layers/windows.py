"""Window partitioning and carrier-token orderings.

Everything here is a pure reshape or a static index computation, so it traces with ``torch.fx``,
``torch.jit.trace`` and ``torch.compile`` alike. Maps are NCHW, windows are token sequences
``(B * nH * nW, ws * ws, C)`` in row-major order inside each window and across windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from torch import Tensor

from .pos_embed import _tracing

__all__ = [
    "ceil_to_multiple",
    "pad_to_windows",
    "window_partition",
    "window_reverse",
    "window_partition_nhwc",
    "window_reverse_nhwc",
    "grouped_to_raster_index",
    "upsample_index",
]


def ceil_to_multiple(size: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``size``.

    >>> ceil_to_multiple(13, 7)
    14
    """
    return -(-size // multiple) * multiple


def pad_to_windows(x: Tensor, pad_h: int, pad_w: int) -> Tensor:
    """Zero-pad an NCHW map at the bottom/right so that it splits into whole windows.

    The pad amounts are static (computed when the stage is built), which keeps the graph free of
    shape-dependent control flow.

    >>> pad_to_windows(torch.ones(1, 2, 5, 6), 2, 1).shape
    torch.Size([1, 2, 7, 7])
    """
    if pad_h == 0 and pad_w == 0:
        return x
    if pad_h < 0 or pad_w < 0:  # F.pad would crop
        raise ValueError(f"pad_to_windows pads, it does not crop: pad_h and pad_w must be >= 0, got {pad_h}, {pad_w}")
    return F.pad(x, (0, pad_w, 0, pad_h))


def window_partition(x: Tensor, window_size: int | tuple[int, int]) -> Tensor:
    """Split an NCHW map into windows of tokens.

    Args:
        x: ``(B, C, H, W)`` with H and W multiples of the window sides.
        window_size: side of the square window, or ``(wh, ww)``.

    Returns:
        ``(B * H/wh * W/ww, wh * ww, C)``; windows in row-major order, tokens row-major inside.

    >>> window_partition(torch.zeros(2, 8, 14, 21), 7).shape
    torch.Size([12, 49, 8])
    """
    if not _tracing():  # a traced or compiled graph records the reshape, not this check
        _check_windows(x, window_size)
    B, C, H, W = x.shape
    wh, ww = to_2tuple(window_size)
    x = x.view(B, C, H // wh, wh, W // ww, ww)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, wh * ww, C)


def _check_windows(x: Tensor, window_size: int | tuple[int, int], nhwc: bool = False) -> None:
    """A named error for a map that :func:`window_partition` (``nhwc``: :func:`window_partition_nhwc`) cannot
    split (a raw reshape error otherwise)."""
    name, layout = ("window_partition_nhwc", "(B, H, W, C)") if nhwc else ("window_partition", "(B, C, H, W)")
    if x.dim() != 4:
        raise ValueError(f"{name} takes a {layout} map, got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    wh, ww = to_2tuple(window_size)
    if wh < 1 or ww < 1:
        raise ValueError(f"window_size must be a positive int, got {window_size!r}")
    H, W = x.shape[1:3] if nhwc else x.shape[2:]
    if H % wh or W % ww:
        other = (
            "an NCHW (B, C, H, W) map goes to window_partition"
            if nhwc
            else "a channels-last (B, H, W, C) map goes to window_partition_nhwc"
        )
        raise ValueError(
            f"{name}: the {H}x{W} map (shape {tuple(x.shape)}, read as {layout}) does not split into "
            f"{wh}x{ww} windows: pad it to {ceil_to_multiple(H, wh)}x{ceil_to_multiple(W, ww)} first "
            f"(pad_to_windows); {other}"
        )


def window_reverse(windows: Tensor, window_size: int | tuple[int, int], H: int, W: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, wh * ww, C)`` -> ``(B, C, H, W)``.

    >>> x = torch.randn(2, 8, 14, 21)
    >>> torch.equal(window_reverse(window_partition(x, 7), 7, 14, 21), x)
    True
    """
    if not _tracing():  # a traced or compiled graph records the reshape, not this check
        _check_fold(windows, window_size, H, W)
    C = windows.shape[-1]
    wh, ww = to_2tuple(window_size)
    x = windows.view(-1, H // wh, W // ww, wh, ww, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, C, H, W)


def _check_fold(windows: Tensor, window_size: int | tuple[int, int], H: int, W: int, nhwc: bool = False) -> None:
    """A named error for windows that :func:`window_reverse` (``nhwc``: :func:`window_reverse_nhwc`) cannot fold
    into an ``H x W`` map."""
    name = "window_reverse_nhwc" if nhwc else "window_reverse"
    wh, ww = to_2tuple(window_size)
    if wh < 1 or ww < 1 or H % wh or W % ww:
        raise ValueError(
            f"{name}: a {H}x{W} map does not split into {wh}x{ww} windows: pass the H and W "
            "of the padded map the windows came from (multiples of window_size)"
        )
    per_image = (H // wh) * (W // ww)
    if windows.dim() != 3 or windows.shape[1] != wh * ww or windows.shape[0] % per_image:
        raise ValueError(
            f"{name}: windows of shape {tuple(windows.shape)} are not (B * {per_image}, "
            f"{wh * ww}, C), the {per_image} windows of {wh}x{ww} tokens per "
            f"image that a {H}x{W} map has: pass the window_size and the H and W they were made with"
        )


def window_partition_nhwc(x: Tensor, window_size: int | tuple[int, int]) -> Tensor:
    """Split a channels-last map into windows of tokens (the layout of timm's Swin and Twins).

    Args:
        x: ``(B, H, W, C)`` with H and W multiples of the window sides.
        window_size: ``(wh, ww)``, or one int for square windows.

    Returns:
        ``(B * H/wh * W/ww, wh * ww, C)``, batch-major, windows and tokens row-major: the same order as
        :func:`window_partition` and as the carrier tokens of :class:`~hatplug.layers.CarrierTokenizer`.

    >>> x = torch.randn(2, 14, 21, 8)
    >>> torch.equal(window_partition_nhwc(x, (7, 7)), window_partition(x.permute(0, 3, 1, 2), 7))
    True
    """
    if not _tracing():  # a traced or compiled graph records the reshape, not this check
        _check_windows(x, window_size, nhwc=True)
    B, H, W, C = x.shape
    wh, ww = to_2tuple(window_size)
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def window_reverse_nhwc(windows: Tensor, window_size: int | tuple[int, int], H: int, W: int) -> Tensor:
    """Inverse of :func:`window_partition_nhwc`: ``(B * nW, wh * ww, C)`` -> ``(B, H, W, C)``.

    >>> x = torch.randn(2, 14, 21, 8)
    >>> torch.equal(window_reverse_nhwc(window_partition_nhwc(x, (7, 3)), (7, 3), 14, 21), x)
    True
    """
    if not _tracing():  # a traced or compiled graph records the reshape, not this check
        _check_fold(windows, window_size, H, W, nhwc=True)
    C = windows.shape[-1]
    wh, ww = to_2tuple(window_size)
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def grouped_to_raster_index(windows_h: int, windows_w: int, ct_size: int) -> Tensor:
    """Raster position of each carrier token when the CT grid is stored grouped by window.

    A CT grid of ``(windows_h * ct_size, windows_w * ct_size)`` tokens is stored window by window
    (row-major over windows, ``ct_size * ct_size`` row-major tokens inside a window), so that
    ``ct.view(B * nW, ct_size**2, C)`` is the per-window view. Entry ``k`` of the result is the
    row-major raster index of the ``k``-th stored token.

    >>> grouped_to_raster_index(1, 2, 2).tolist()
    [0, 1, 4, 5, 2, 3, 6, 7]
    """
    raster = torch.arange(windows_h * ct_size * windows_w * ct_size, device="cpu")
    raster = raster.view(windows_h, ct_size, windows_w, ct_size).permute(0, 2, 1, 3)
    return raster.reshape(-1)


def upsample_index(ct_size: int, window_size: int | tuple[int, int]) -> Tensor:
    """For each token of a window, the index of the carrier token that nearest upsampling copies.

    Derived by running ``F.interpolate(mode="nearest")`` on the CT indices, so a gather with it is
    bit-identical to nearest upsampling of a ``ct_size x ct_size`` grid to the window (``window_size``
    is a side or ``(wh, ww)``), without the float round trip.

    >>> upsample_index(2, 3).tolist()
    [0, 0, 1, 0, 0, 1, 2, 2, 3]
    >>> upsample_index(2, (2, 3)).tolist()
    [0, 0, 1, 2, 2, 3]
    """
    size = to_2tuple(window_size)
    ids = torch.arange(ct_size * ct_size, dtype=torch.float32, device="cpu").view(1, 1, ct_size, ct_size)
    up = F.interpolate(ids, size=size, mode="nearest")
    return up.reshape(-1).long()
