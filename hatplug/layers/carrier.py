"""Carrier-token initialisation: a depthwise conv as positional encoding, then pooling per window."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CarrierTokenizer", "carrier_pool_geometry"]


def carrier_pool_geometry(size: int, window_size: int, ct_size: int) -> tuple[int, int, int]:
    """``(output, stride, kernel)`` of FasterViT's carrier-token pooling along one axis.

    ``size`` is a multiple of ``window_size`` (the padded map). The map of ``n = size / window_size``
    windows is pooled to ``ct_size * n`` tokens with stride ``size // (ct_size * n)`` and a kernel that
    makes the last pooling window end at the border, exactly as the released FasterViT does (for a
    14-pixel map with 7-pixel windows and 2x2 CTs: 4 outputs, stride 3, kernel 5).

    >>> carrier_pool_geometry(14, 7, 2)
    (4, 3, 5)
    """
    if size % window_size:
        raise ValueError(f"map size {size} is not a multiple of window_size {window_size}; pad it first")
    output = ct_size * size // window_size
    stride = size // output
    kernel = size - (output - 1) * stride
    return output, stride, kernel


class CarrierTokenizer(nn.Module):
    """Makes ``ct_size x ct_size`` carrier tokens per window from an NCHW map (FasterViT's CT init).

    A depthwise 3x3 conv (``pos_embed``) acts as positional encoding, then average pooling summarises
    each window. The result is stored grouped by window: ``(B, nW * ct_size**2, C)`` where windows are
    row-major, so ``ct.view(B * nW, ct_size**2, C)`` lines up with :func:`window_partition`.

    The conv is reachable both as ``pos_embed`` and as ``to_global_feature.pos`` because official
    checkpoints store it under both names.

    Args:
        dim: channels.
        map_size: ``(H, W)`` of the (padded) map, multiples of ``window_size``.
        window_size: side of a window.
        ct_size: carrier tokens per window side.

    >>> import torch
    >>> tok = CarrierTokenizer(dim=8, map_size=(14, 21), window_size=7, ct_size=2)
    >>> tok(torch.randn(2, 8, 14, 21)).shape
    torch.Size([2, 24, 8])
    """

    def __init__(self, dim: int, map_size: tuple[int, int], window_size: int, ct_size: int) -> None:
        super().__init__()
        out_h, stride_h, kernel_h = carrier_pool_geometry(map_size[0], window_size, ct_size)
        out_w, stride_w, kernel_w = carrier_pool_geometry(map_size[1], window_size, ct_size)
        self.ct_size = ct_size
        self.grid_size = (out_h, out_w)
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.to_global_feature = nn.Sequential()
        self.to_global_feature.add_module("pos", self.pos_embed)
        self.to_global_feature.add_module(
            "pool", nn.AvgPool2d(kernel_size=(kernel_h, kernel_w), stride=(stride_h, stride_w))
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.to_global_feature(x)  # (B, C, ct * nH, ct * nW)
        B, C = x.shape[:2]
        c = self.ct_size
        gh, gw = self.grid_size
        x = x.view(B, C, gh // c, c, gw // c, c).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, gh * gw, C)  # grouped by window
