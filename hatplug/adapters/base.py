"""What an adapter is, and the parts every HAT twin of a converted block shares.

An adapter teaches :func:`hatplug.convert` one kind of window-attention block: which module class it is,
how many windows it sees, and how to build its HAT twin from it (reusing its weights). Converted blocks
differ only in their window attention (a :class:`~hatplug.layers.CarrierWindowAttention` subclass:
the family's projections and position bias) and in their block skeleton (pre- or post-norm, channels-last
maps or tokens); the carrier-token half is :class:`CarrierBlock`, i.e. the same
:class:`~hatplug.layers.CarrierTokenHalf` that FasterViT's :class:`~hatplug.layers.HATBlock` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConversionError, refuse_scripting
from ..layers import (
    BiasedAttention,
    CarrierPositionMLP,
    CarrierTokenHalf,
    CarrierTokenizer,
    upsample_carrier_tokens,
    upsample_index,
    window_reverse_nhwc,
)
from ..layers._cache import refill_buffer

__all__ = [
    "BlockAdapter",
    "CarrierBlock",
    "ConversionSettings",
    "block_rates",
    "init_new_weights",
    "padded_grid",
]


@dataclass(frozen=True)
class ConversionSettings:
    """The options of :func:`hatplug.convert` that shape a HAT twin.

    Attributes:
        ct_size: carrier tokens per window side.
        init: ``"identity"`` (gated joint attention that starts as the original block) or ``"random"``
            (the paper's joint softmax, new parts at FasterViT's initialisation).
    """

    ct_size: int = 2
    init: str = "identity"

    @property
    def gated(self) -> bool:
        return self.init == "identity"


@torch.no_grad()
def init_new_weights(module: nn.Module) -> nn.Module:
    """FasterViT's initialisation for the parts a conversion adds: Linear weights ``trunc_normal(std=.02)``,
    zero biases, LayerNorm ones / zeros (convs keep PyTorch's default, as in FasterViT).

    timm's ``trunc_normal_(std=.02)`` truncates at +-2, i.e. 100 standard deviations, which a float normal
    draw never reaches: a plain ``normal_`` is the same distribution at a fraction of the cost.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def _dropout_rate(module: nn.Module | None, what: str) -> float:
    if module is None or isinstance(module, nn.Identity):
        return 0.0
    if isinstance(module, nn.modules.dropout._DropoutNd):  # Dropout, Dropout1d/2d/3d, AlphaDropout
        return float(module.p)
    rate = getattr(module, "drop_prob", None)  # timm's DropPath
    if rate is None:
        raise ConversionError(
            f"cannot read the {what} rate of a {type(module).__name__}: the new carrier-token half takes its "
            "block's rates; expected nn.Dropout, timm's DropPath (drop_prob) or nn.Identity"
        )
    return float(rate)


def block_rates(drop_path: nn.Module | None, mlp: nn.Module | None, attn: nn.Module | None) -> dict[str, float]:
    """The regularisation a block applies, for the carrier-token half a conversion adds to it: FasterViT gives
    that half its block's stochastic depth and dropouts. ``drop_path`` is the block's drop-path module (timm's
    ``DropPath`` or ``nn.Identity``), ``mlp`` a timm ``Mlp`` (``drop1``) and ``attn`` an attention with
    ``attn_drop`` / ``proj_drop`` dropouts; ``None`` where there is none.

    >>> from timm.layers import DropPath, Mlp
    >>> block_rates(DropPath(0.1), Mlp(8, 32, drop=0.2), None)
    {'drop_path': 0.1, 'drop': 0.2, 'attn_drop': 0.0, 'proj_drop': 0.0}
    """
    return {
        "drop_path": _dropout_rate(drop_path, "drop-path"),
        "drop": _dropout_rate(getattr(mlp, "drop1", None), "MLP dropout"),
        "attn_drop": _dropout_rate(getattr(attn, "attn_drop", None), "attention dropout"),
        "proj_drop": _dropout_rate(getattr(attn, "proj_drop", None), "projection dropout"),
    }


def padded_grid(H: int, W: int, window_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(Hp, Wp, nH, nW)``: a map padded to whole windows and its window grid (works on fx proxies too).

    >>> padded_grid(10, 14, (7, 7))
    (14, 14, 2, 2)
    """
    wh, ww = window_size
    Hp, Wp = H + (wh - H % wh) % wh, W + (ww - W % ww) % ww
    return Hp, Wp, Hp // wh, Wp // ww


class CarrierBlock(CarrierTokenHalf, nn.Module):
    """Base class of converted blocks: the carrier-token half, the propagation into the map, and the geometry.

    A subclass calls :meth:`init_carriers` after taking over the original block's modules and implements
    :meth:`forward_block`, using :meth:`carrier_windows` (CT attention + MLP, then the per-window view) and,
    in the last block of a stage, :meth:`propagate_into_map`. ``forward`` runs ``forward_block``, under
    activation checkpointing when ``grad_checkpointing`` is set (the rewritten stage sets it on its blocks
    when the model's ``set_grad_checkpointing`` sets it on the stage).

    New parts: ``hat_norm1``, ``hat_attn`` (multi-head attention over all CTs of an image, no relative
    bias since the CT grid follows the input size), ``hat_norm2``, ``hat_mlp``, ``hat_pos_embed`` (a
    :class:`~hatplug.layers.CarrierPositionMLP`) and, with propagation, ``propagation_scale`` (zeros for
    ``init="identity"``, ones for ``"random"``).
    """

    __prepare_scriptable__ = refuse_scripting  # torch.jit.script: a named error, not a parser trace

    window_size: tuple[int, int]
    grad_checkpointing = False

    def forward(self, *args):
        if self.grad_checkpointing and self.training:
            return checkpoint(self.forward_block, *args, use_reentrant=False)
        return self.forward_block(*args)

    def forward_block(self, *args):  # pragma: no cover - abstract
        raise NotImplementedError

    def init_carriers(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int],
        settings: ConversionSettings,
        mlp_ratio: float,
        propagate: bool,
        like: Tensor,
        rates: dict[str, float] | None = None,
    ) -> None:
        """Create the new parts on the device and in the dtype of ``like`` (a weight of the original block),
        with the block's stochastic depth and dropouts ``rates`` (see :func:`block_rates`; none if ``None``)."""
        rates = rates or {}
        self.window_size = tuple(window_size)
        self.ct_size = settings.ct_size
        # built on the meta device and initialised once: PyTorch's default init would be thrown away
        with torch.device("meta"):
            attn = BiasedAttention(
                dim,
                num_heads,
                window_size=None,
                attn_drop=rates.get("attn_drop", 0.0),
                proj_drop=rates.get("proj_drop", 0.0),
            )
            self.init_carrier_half(
                dim,
                hat_attn=attn,
                hat_pos_embed=CarrierPositionMLP(dim, settings.ct_size),
                mlp_ratio=mlp_ratio,
                drop=rates.get("drop", 0.0),
                drop_path=rates.get("drop_path", 0.0),
            )
        for name in ("hat_norm1", "hat_norm2", "hat_attn", "hat_mlp", "hat_pos_embed"):
            init_new_weights(getattr(self, name).to_empty(device=like.device)).to(like.dtype)
        self.propagation_scale = None
        if propagate:
            scale = torch.full((dim,), 0.0 if settings.gated else 1.0, device=like.device, dtype=like.dtype)
            self.propagation_scale = nn.Parameter(scale)
            self.register_buffer(
                "ct_upsample_index",
                upsample_index(settings.ct_size, self.window_size).to(like.device),
                persistent=False,
            )

    def init_non_persistent_buffers(self) -> None:
        """Recompute the tables computed from the geometry, e.g. after ``to_empty`` of a model converted on the
        meta device (timm's ``reinit_non_persistent_buffers`` calls this, as on timm's own blocks)."""
        with torch.device("cpu"):
            refill_buffer(self, "ct_upsample_index", upsample_index(self.ct_size, self.window_size))

    def carrier_windows(self, ct: Tensor, windows_h: int, windows_w: int) -> Tensor:
        """CT attention + MLP over ``ct (B, nW * n, C)``, returned per window as ``(B * nW, n, C)``."""
        ct = self.carrier_attention(ct, self.hat_pos_embed(windows_h, windows_w))
        return ct.reshape(-1, self.ct_size * self.ct_size, ct.shape[-1])

    def propagate_into_map(self, x: Tensor, ct_windows: Tensor, Hp: int, Wp: int) -> Tensor:
        """``x (B, H, W, C)`` plus each window's CTs, nearest-upsampled onto the (unshifted) window, times
        ``propagation_scale``."""
        up = upsample_carrier_tokens(ct_windows, self.ct_upsample_index, self.propagation_scale)  # (B*nW, N, C)
        up = window_reverse_nhwc(up, self.window_size, Hp, Wp)  # (B, Hp, Wp, C)
        return x + up[:, : x.shape[1], : x.shape[2]]


class BlockAdapter:
    """How :func:`hatplug.convert` turns one kind of window-attention block into its HAT twin.

    Subclass it, set the class attributes, implement :meth:`window_size` and :meth:`build`, and pass an
    instance to :func:`hatplug.register_adapter`. ``build`` usually returns a :class:`CarrierBlock`
    subclass whose ``forward_block(x, ct)`` returns ``(x, ct)`` and whose attention is a
    :class:`~hatplug.layers.CarrierWindowAttention` subclass (the family's ``project`` and
    ``window_bias``); ``tests/convert/test_register_adapter.py`` does it for a new block type in 40 lines.
    Pass :func:`block_rates` of the block to :meth:`CarrierBlock.init_carriers` so that the new carrier-token
    half gets the block's stochastic depth and dropouts.

    Class attributes:
        family: a name for reports and errors, e.g. ``"timm Swin v1"``.
        source_types: the block classes it converts (matched by exact type).
        carrier_stream: ``"stage"``: carrier tokens are made once per stage, before its first block, and
            threaded through the blocks (the stage's forward is traced with ``torch.fx`` and rewritten;
            the twin's ``forward(x, ct)`` returns ``(x, ct)``); ``"block"``: the twin makes its own
            carrier tokens and keeps the original signature (for models whose stages are not modules).
        channels_last: the stage passes ``(B, H, W, C)`` maps between blocks (Swin) rather than
            ``(B, C, H, W)``; sets the layout of the stage's :class:`~hatplug.layers.CarrierTokenizer`.
    """

    family: ClassVar[str] = ""
    source_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    carrier_stream: ClassVar[str] = "stage"
    channels_last: ClassVar[bool] = False

    def matches(self, module: nn.Module) -> bool:
        return type(module) in self.source_types

    def dim(self, block: nn.Module) -> int:
        """Channels of the block's tokens."""
        return block.dim

    def window_size(self, block: nn.Module) -> tuple[int, int]:
        """``(wh, ww)`` of the block's windows."""
        raise NotImplementedError(f"{type(self).__name__} must implement window_size(block)")

    def window_grid(self, model: nn.Module, path: str, block: nn.Module) -> tuple[int, int] | None:
        """Windows ``(nH, nW)`` the block sees at the model's configured input size (``None``: unknown, so
        it is converted). A block with a single window is skipped: carrier tokens would add nothing."""
        resolution = getattr(block, "input_resolution", None)
        if resolution is None:
            return None
        return padded_grid(*resolution, self.window_size(block))[2:]

    def resolution(self, model: nn.Module, path: str) -> str:
        """The input size :meth:`window_grid` judges at, as a skip reason names it."""
        return "at this resolution"

    def stage_path(self, model: nn.Module, path: str) -> str:
        """Path of the module whose forward runs the block's stage: by default the owner of the nearest
        ``nn.Sequential`` / ``nn.ModuleList`` holding the block, or that container itself when the model
        owns it directly or its owner runs other containers of blocks too (a model that owns its stages'
        block lists, e.g. EdgeViT's ``blocks1`` .. ``blocks4``, also inside a timm feature wrapper)."""
        parts = path.split(".")
        for i in range(len(parts) - 1, 0, -1):
            container = model.get_submodule(".".join(parts[:i]))
            if isinstance(container, (nn.Sequential, nn.ModuleList)):
                owner = model.get_submodule(".".join(parts[: i - 1]))
                siblings = [
                    c
                    for c in owner.children()
                    if c is not container
                    and isinstance(c, (nn.Sequential, nn.ModuleList))
                    and any(self.matches(m) for m in c.modules())
                ]
                return ".".join(parts[:i]) if siblings or i == 1 else ".".join(parts[: i - 1])
        raise ValueError(f"{path} is not inside an nn.Sequential / nn.ModuleList; override stage_path")

    @staticmethod
    def owner_of(model: nn.Module, path: str, marker: str) -> tuple[nn.Module, str]:
        """``(module, rest)``: the module at the part of ``path`` before the first component starting with
        ``marker`` (the model itself, or the model inside a timm feature wrapper such as
        ``FeatureGetterNet.model``), and the path from there."""
        parts = path.split(".")
        for i, part in enumerate(parts):
            if part.startswith(marker):
                return model.get_submodule(".".join(parts[:i])), ".".join(parts[i:])
        return model, path

    def make_tokenizer(self, block: nn.Module, settings: ConversionSettings) -> nn.Module:
        """The stage's carrier-token initialiser, fed with the first converted block's input."""
        like = next(block.parameters())
        tokenizer = CarrierTokenizer(
            self.dim(block), None, self.window_size(block), settings.ct_size, channels_last=self.channels_last
        )
        return init_new_weights(tokenizer).to(device=like.device, dtype=like.dtype)

    def build(self, block: nn.Module, settings: ConversionSettings, propagate: bool) -> nn.Module:
        """The HAT twin of ``block``, taking over its modules; ``propagate`` is set for the last block of a
        stage when propagation is on."""
        raise NotImplementedError(f"{type(self).__name__} must implement build(block, settings, propagate)")

    def build_at(
        self, model: nn.Module, path: str, block: nn.Module, settings: ConversionSettings, propagate: bool
    ) -> nn.Module:
        """What :func:`hatplug.convert` calls: :meth:`build`, for the ``block`` at ``path`` in ``model``. Override
        it where the twin needs more than the matched module (Twins: its owning block's MLP and drop path)."""
        return self.build(block, settings, propagate)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.family!r}: {', '.join(t.__name__ for t in self.source_types)})"
