"""timm Twins-SVT: ``LocallyGroupedAttn`` (LSA) -> :class:`TwinsHATAttention`; ``GlobalSubSampleAttn`` stays.

Twins has no stage module: ``Twins.forward_features`` loops over ``blocks[k]`` itself and applies the
position generator (PEG) after block 0 of each stage. There is nothing to trace and rewrite that would
carry a carrier-token stream from block to block without re-implementing that loop, so the converted LSA
keeps its signature ``forward(x (B, N, C), size) -> (B, N, C)`` and makes its own carrier tokens: from
its (normalised) input, with its own :class:`~hatplug.layers.CarrierTokenizer`, then CT attention + MLP,
the window attention over ``[window CTs; window tokens]`` (LSA's ``qkv`` / ``proj``, no position bias,
zero padding as in LSA), and, with propagation, the carrier tokens (updated by the window attention)
nearest-upsampled into its output. :func:`hatplug.report` notes this per stage.
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.models.twins import LocallyGroupedAttn
from torch import Tensor, nn

from ..layers import CarrierTokenizer, CarrierWindowAttention, window_partition_nhwc, window_reverse_nhwc
from .base import BlockAdapter, CarrierBlock, ConversionSettings, block_rates, init_new_weights, padded_grid

__all__ = ["TwinsAdapter", "TwinsHATAttention"]


class TwinsHATAttention(CarrierBlock, CarrierWindowAttention):
    """Twins' locally-grouped attention with per-block carrier tokens; ``forward(x, size)`` as LSA.

    Keeps LSA's ``qkv`` and ``proj`` under their names; adds ``carrier_tokenizer``, the CT half
    (``hat_*``), ``hat_gate`` (``init="identity"``) and ``propagation_scale`` (``propagate=True``). The CT
    half's MLP width, stochastic depth and dropouts are those of ``owner``, the Twins block that holds
    ``attn`` (an MLP ratio of 4 and no regularisation without one).
    """

    def __init__(
        self,
        attn: LocallyGroupedAttn,
        settings: ConversionSettings,
        propagate: bool,
        owner: nn.Module | None = None,
    ) -> None:
        CarrierWindowAttention.__init__(
            self, attn.num_heads, attn.qkv, attn.proj, attn.attn_drop.p, attn.proj_drop, settings.gated
        )
        like = attn.qkv.weight
        self.dim = attn.dim
        self.scale = attn.scale
        self.ws = attn.ws
        self.carrier_tokenizer = init_new_weights(
            CarrierTokenizer(attn.dim, None, attn.ws, settings.ct_size, channels_last=True)
        ).to(device=like.device, dtype=like.dtype)
        mlp = getattr(owner, "mlp", None)
        mlp_ratio = mlp.fc1.out_features / attn.dim if mlp is not None else 4.0
        rates = block_rates(getattr(owner, "drop_path1", None), mlp, attn)
        self.init_carriers(attn.dim, attn.num_heads, (attn.ws, attn.ws), settings, mlp_ratio, propagate, like, rates)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B_, L = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x).reshape(B_, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return q * self.scale, k, v

    def forward_block(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        H, W = size
        x = x.view(B, H, W, C)
        Hp, Wp, n_h, n_w = padded_grid(H, W, self.window_size)
        ct_windows = self.carrier_windows(self.carrier_tokenizer(x), n_h, n_w)  # (B*nW, ct*ct, C)
        windows = window_partition_nhwc(F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H)), self.window_size)
        ct_out, out = CarrierWindowAttention.forward(self, ct_windows, windows)
        out = window_reverse_nhwc(out, self.window_size, Hp, Wp)[:, :H, :W]  # (B, H, W, C)
        if self.propagation_scale is not None:
            out = self.propagate_into_map(out, ct_windows + ct_out, Hp, Wp)
        return out.reshape(B, N, C)


class TwinsAdapter(BlockAdapter):
    """timm Twins-SVT ``LocallyGroupedAttn`` (``twins_svt_*``); carrier tokens per block (see module doc)."""

    family = "timm Twins-SVT"
    source_types = (LocallyGroupedAttn,)
    carrier_stream = "block"

    def window_size(self, block: nn.Module) -> tuple[int, int]:
        return (block.ws, block.ws)

    def stage_path(self, model: nn.Module, path: str) -> str:
        _, rest = self.owner_of(model, path, "blocks")  # the Twins model, also inside a wrapper
        prefix = path[: len(path) - len(rest)]
        return prefix + ".".join(rest.split(".")[:2])  # [prefix.]blocks.{k}.{j}.attn -> [prefix.]blocks.{k}

    def window_grid(self, model: nn.Module, path: str, block: nn.Module) -> tuple[int, int] | None:
        owner, path = self.owner_of(model, path, "blocks")  # the Twins model, also inside a feature wrapper
        embeds = getattr(owner, "patch_embeds", None)
        if embeds is None or not path.startswith("blocks."):
            return None
        embed = embeds[int(path.split(".")[1])]
        return padded_grid(embed.H, embed.W, self.window_size(block))[2:]

    def build(self, block: nn.Module, settings: ConversionSettings, propagate: bool) -> nn.Module:
        return TwinsHATAttention(block, settings, propagate)

    def build_at(
        self, model: nn.Module, path: str, block: nn.Module, settings: ConversionSettings, propagate: bool
    ) -> nn.Module:
        owner = model.get_submodule(path.rpartition(".")[0])  # [...]blocks.{k}.{j}: the block holding the attention
        return TwinsHATAttention(block, settings, propagate, owner=owner)
