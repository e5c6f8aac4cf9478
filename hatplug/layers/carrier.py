"""Carrier-token initialisation: a depthwise conv as positional encoding, then pooling per window."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from torch import Tensor, nn

from ..errors import refuse_scripting
from .pos_embed import _tracing

__all__ = ["CarrierTokenizer", "carrier_pool_geometry"]


def check_ct_size(ct_size, window: tuple[int, int]) -> None:
    """The one check of a carrier-token size against its window (tokenizer, stage and block share it)."""
    if isinstance(ct_size, bool) or not isinstance(ct_size, numbers.Integral) or ct_size < 1:
        raise ValueError(f"ct_size must be a positive int (carrier tokens per window side), got {ct_size!r}")
    if ct_size > min(window):
        raise ValueError(
            f"ct_size={ct_size} carrier tokens per window side need 1 <= ct_size <= window_size, and the window is "
            f"{window[0]}x{window[1]}: lower ct_size or raise window_size"
        )


def carrier_pool_geometry(size: int, window_size: int, ct_size: int) -> tuple[int, int, int]:
    """``(output, stride, kernel)`` of FasterViT's carrier-token pooling along one axis.

    ``size`` is a multiple of ``window_size`` (the padded map). The map of ``n = size / window_size``
    windows is pooled to ``ct_size * n`` tokens with stride ``size // (ct_size * n)`` and a kernel that
    makes the last pooling window end at the border, exactly as the released FasterViT does (for a
    14-pixel map with 7-pixel windows and 2x2 CTs: 4 outputs, stride 3, kernel 5).

    >>> carrier_pool_geometry(14, 7, 2)
    (4, 3, 5)
    """
    for name, value in (("size", size), ("window_size", window_size), ("ct_size", ct_size)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"carrier_pool_geometry: {name} must be a positive int, got {value!r}")
    if size % window_size:
        raise ValueError(f"map size {size} is not a multiple of window_size {window_size}; pad it first")
    check_ct_size(ct_size, (window_size, window_size))
    return _pool_geometry(size, window_size, ct_size)


def _pool_geometry(size, window_size, ct_size):
    # Plain integer arithmetic only, so that it also runs on torch.fx proxies and symbolic sizes.
    output = ct_size * (size // window_size)
    stride = size // output
    kernel = size - (output - 1) * stride
    return output, stride, kernel


_ALIASES = [(f"pos_embed.{name}", f"to_global_feature.pos.{name}") for name in ("weight", "bias")]


def _add_alias(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """The official checkpoints' second name of the conv, ``to_global_feature.pos``, in a state dict: the same
    Parameter with ``keep_vars=True``, else a copy (not the same memory), so that savers that refuse shared
    memory (``safetensors.torch.save_file``, timm's ``save_for_hf``) take it."""
    for name, alias in _ALIASES:
        value = state_dict.get(prefix + name)
        if value is not None:
            state_dict[prefix + alias] = value if isinstance(value, nn.Parameter) else value.clone()


def _take_alias(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """The conv loads the tensor given under ``pos_embed`` (else the one under the second name, which is then
    not an unexpected key): a state dict holding one of them (deduplicating savers such as
    ``safetensors.torch.save_model`` keep one) loads with ``load_state_dict``, strict or not, and so does a full
    state dict that ``torch.distributed.checkpoint`` has sharded under the first name only (FSDP2)."""
    for name, alias in _ALIASES:
        a, b = prefix + name, prefix + alias
        if b in state_dict:
            value = state_dict.pop(b)
            state_dict.setdefault(a, value)


class CarrierTokenizer(nn.Module):
    """Makes ``ct_size x ct_size`` carrier tokens per window from a map (FasterViT's CT init).

    A depthwise 3x3 conv (``pos_embed``) acts as positional encoding, then average pooling summarises
    each window. The result is stored grouped by window: ``(B, nW * ct_size**2, C)`` where windows are
    row-major, so ``ct.view(B * nW, ct_size**2, C)`` lines up with :func:`window_partition`.

    With a ``map_size`` the tokenizer is built for that (padded) size, as in FasterViT, and its state dict
    also holds the conv as ``to_global_feature.pos``, because official checkpoints store it under both names
    (either loads). The conv is one module, registered once (``torch.func.functional_call`` does not put back
    a submodule registered under two names).
    With ``map_size=None`` it accepts any size: the map is zero-padded to whole windows and the pooling
    geometry (:func:`carrier_pool_geometry`) is worked out from the input on every call, which is what
    converted models use.

    Args:
        dim: channels.
        map_size: ``(H, W)`` of the (padded) map, multiples of the window; ``None`` for any size.
        window_size: side of a window, or ``(wh, ww)``.
        ct_size: carrier tokens per window side.
        channels_last: the input is ``(B, H, W, C)`` (timm's Swin layout) instead of ``(B, C, H, W)``.

    >>> import torch
    >>> tok = CarrierTokenizer(dim=8, map_size=(14, 21), window_size=7, ct_size=2)
    >>> tok(torch.randn(2, 8, 14, 21)).shape
    torch.Size([2, 24, 8])
    >>> any_size = CarrierTokenizer(dim=8, map_size=None, window_size=7, ct_size=2, channels_last=True)
    >>> any_size(torch.randn(2, 12, 20, 8)).shape  # padded to 14 x 21: 2 x 3 windows
    torch.Size([2, 24, 8])
    """

    __prepare_scriptable__ = refuse_scripting  # torch.jit.script: a named error, not a parser trace

    def __init__(
        self,
        dim: int,
        map_size: tuple[int, int] | None,
        window_size: int | tuple[int, int],
        ct_size: int,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        window = to_2tuple(window_size)
        check_ct_size(ct_size, window)
        self.window_size = window
        self.ct_size = ct_size
        self.channels_last = channels_last
        self.map_size = None if map_size is None else tuple(map_size)
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        if self.map_size is not None:
            out_h, stride_h, kernel_h = carrier_pool_geometry(self.map_size[0], window[0], ct_size)
            out_w, stride_w, kernel_w = carrier_pool_geometry(self.map_size[1], window[1], ct_size)
            self.grid_size = (out_h, out_w)
            self.to_global_feature = nn.Sequential()  # the official module, but for its "pos", which is pos_embed
            self.to_global_feature.add_module(
                "pool", nn.AvgPool2d(kernel_size=(kernel_h, kernel_w), stride=(stride_h, stride_w))
            )
            # reachable by that name (torch.distributed.checkpoint resolves state-dict keys by attribute), but not
            # registered twice: the official "pos" is an attribute of the Sequential, not one of its modules
            object.__setattr__(self.to_global_feature, "pos", self.pos_embed)
            self.register_state_dict_post_hook(_add_alias)
            self.register_load_state_dict_pre_hook(_take_alias)

    def _check_input(self, x: Tensor) -> None:
        """A named error for a map this tokenizer was not built for (a raw reshape error, or tokens grouped into
        the wrong windows, otherwise)."""
        layout = "(B, H, W, C)" if self.channels_last else "(B, C, H, W)"
        C = self.pos_embed.in_channels
        channels = x.shape[-1] if self.channels_last else x.shape[1] if x.dim() == 4 else None
        size = tuple(x.shape[1:3] if self.channels_last else x.shape[2:]) if x.dim() == 4 else None
        if x.dim() == 4 and channels == C and (self.map_size is None or size == self.map_size):
            return
        expected = "H, W" if self.map_size is None else f"{self.map_size[0]}, {self.map_size[1]}"
        expected = f"(B, {expected}, {C})" if self.channels_last else f"(B, {C}, {expected})"
        if x.dim() != 4:
            hint = "add the batch dimension, x[None]" if x.dim() == 3 else "pass a batch of maps"
        elif channels != C:
            hint = (
                "build with channels_last=True for (B, H, W, C) maps"
                if not self.channels_last and x.shape[-1] == C
                else "build with channels_last=False for (B, C, H, W) maps"
                if self.channels_last and x.shape[1] == C
                else f"build it with dim={channels} for {channels}-channel maps"
            )
        else:
            hint = (
                f"it was built for {self.map_size[0]}x{self.map_size[1]} maps: pad a smaller map to whole windows "
                f"(pad_to_windows), or build with map_size={size} (or None for any size)"
            )
        raise ValueError(f"CarrierTokenizer takes {layout} = {expected} maps, got shape {tuple(x.shape)}: {hint}")

    def forward(self, x: Tensor) -> Tensor:
        if not _tracing():
            self._check_input(x)
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)  # (B, C, H, W)
        if self.map_size is not None:
            x = self.to_global_feature(self.pos_embed(x))  # (B, C, ct * nH, ct * nW)
            gh, gw = self.grid_size
        else:
            x = self._pool_any_size(x)
            gh, gw = x.shape[2], x.shape[3]
        B, C = x.shape[0], x.shape[1]
        c = self.ct_size
        x = x.view(B, C, gh // c, c, gw // c, c).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, gh * gw, C)  # grouped by window

    def _pool_any_size(self, x: Tensor) -> Tensor:
        H, W = x.shape[2], x.shape[3]
        if torch.jit.is_tracing():
            # ONNX wants a constant pooling kernel: a traced model is specialised to the traced map size
            H, W = int(H), int(W)
        wh, ww = self.window_size
        pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
        x = self.pos_embed(F.pad(x, (0, pad_w, 0, pad_h)))  # (B, C, Hp, Wp)
        _, stride_h, kernel_h = _pool_geometry(H + pad_h, wh, self.ct_size)
        _, stride_w, kernel_w = _pool_geometry(W + pad_w, ww, self.ct_size)
        return F.avg_pool2d(x, (kernel_h, kernel_w), (stride_h, stride_w))  # (B, C, ct * nH, ct * nW)
