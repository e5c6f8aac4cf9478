"""hatplug's EdgeViT: ``GlobalSparseBlock`` (an LGL block's ``SelfAttn``) -> :class:`EdgeViTHATBlock`.

EdgeViT has no window attention to extend: its global sparse attention lets a strided subset of the tokens
(the delegates, one per ``sr_ratio x sr_ratio`` cell) attend to each other and spreads the result back with
a depthwise transposed conv (``LocalProp``) and a LayerNorm. Its HAT twin is the paper's HAT on the
token map: windows of :attr:`EdgeViTAdapter.window` tokens, each attending to ``[its carrier tokens; its
tokens]`` with the block's ``qkv`` / ``proj`` (no position bias: EdgeViT's positions come from its
depthwise ``pos_embed`` convs), carrier tokens made once per stage and threaded through the blocks with
CT attention + MLP, and propagation in the last block.

With ``init="identity"`` the global sparse attention is kept and the two are mixed per head before
``proj``: ``sparse + hat_gate * (hat - sparse)`` with the gate at 0, so the converted model computes the
original function and training moves it towards HAT. Unlike Swin and Twins, the two cannot come from one
set of logits (the original attends between delegates, HAT within windows), so this warm start costs the
sparse attention on top of HAT's. With ``init="random"`` the block is HAT only and the sparse-attention
parts (``LocalProp``, ``norm``) are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import get_model_input_config
from torch import Tensor, nn

from ..layers import CarrierWindowAttention, window_partition_nhwc, window_reverse_nhwc
from ..models.edgevit import EdgeViT, GlobalSparseAttn, GlobalSparseBlock
from .base import BlockAdapter, CarrierBlock, ConversionSettings, block_rates, padded_grid

__all__ = ["EdgeViTAdapter", "EdgeViTCarrierAttention", "EdgeViTHATBlock"]


class EdgeViTCarrierAttention(CarrierWindowAttention):
    """Window attention over ``[CTs; window]`` with EdgeViT's ``qkv`` / ``proj``; with ``gated``, mixed per
    head with the original global sparse attention (kept as ``sampler``, ``LocalProp``, ``norm``)."""

    def __init__(self, attn: GlobalSparseAttn, gated: bool) -> None:
        # the gate of this family mixes with the sparse attention, not inside the window softmax
        super().__init__(attn.num_heads, attn.qkv, attn.proj, attn.attn_drop.p, attn.proj_drop, gated=False)
        self.head_dim = attn.head_dim
        self.scale = attn.scale
        self.sr_ratio = attn.sr_ratio
        if gated:
            self.sampler = attn.sampler
            self.LocalProp = attn.LocalProp
            self.norm = attn.norm
            self.hat_gate = self.closed_gate(attn.num_heads, attn.qkv.weight)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B_, L = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x).reshape(B_, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q * self.scale, k, v

    def sparse_attention(self, x: Tensor, H: int, W: int) -> Tensor:
        """EdgeViT's global sparse attention before ``proj``: ``(B, N, C)`` -> ``(B, N, C)``."""
        B, C = x.shape[0], x.shape[2]
        h, w = H, W
        if self.sr_ratio > 1:
            x = self.sampler(x.transpose(1, 2).reshape(B, C, H, W))  # delegates (B, C, h, w)
            h, w = x.shape[2], x.shape[3]
            x = x.flatten(2).transpose(1, 2)
        q, k, v = self.project(x)
        dropout_p = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=1.0)
        x = x.transpose(1, 2).reshape(B, q.shape[2], C)  # no -1: an empty batch has no size to infer
        if self.sr_ratio > 1:
            x = self.LocalProp(x.transpose(1, 2).reshape(B, C, h, w))[:, :, :H, :W]  # (B, C, H, W)
            x = self.norm(x.flatten(2).transpose(1, 2))
        return x

    def forward(
        self, ct_windows: Tensor, x: Tensor, size: tuple[int, int], window_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """``ct_windows (B * nW, n, C)``, ``x (B, N, C)`` on an ``H x W`` grid -> outputs of both."""
        B, N, C = x.shape
        H, W = size
        Hp, Wp, _, _ = padded_grid(H, W, window_size)
        n = ct_windows.shape[1]
        windows = window_partition_nhwc(F.pad(x.view(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H)), window_size)
        q, k, v = self.project(torch.cat((ct_windows, windows), dim=1))
        hat = self.joint_attention(q, k, v, n).transpose(1, 2).reshape(q.shape[0], q.shape[2], C)  # (B*nW, n+N_w, C)
        hat_ct = hat[:, :n]
        out = window_reverse_nhwc(hat[:, n:], window_size, Hp, Wp)[:, :H, :W].reshape(B, N, C)
        if self.hat_gate is not None:
            sparse = self.sparse_attention(x, H, W)
            gate = self.hat_gate.repeat_interleave(self.head_dim)  # per head, over its channels
            out = sparse + gate * (out - sparse)
        return self.proj_drop(self.proj(hat_ct)), self.proj_drop(self.proj(out))


class EdgeViTHATBlock(CarrierBlock):
    """EdgeViT's ``GlobalSparseBlock`` with carrier tokens: ``forward(x (B, C, H, W), ct) -> (x, ct)``.

    Keeps ``pos_embed``, ``norm1``, ``attn.qkv``, ``attn.proj`` (and, gated, ``attn.LocalProp`` /
    ``attn.norm``), ``norm2``, ``mlp``; pre-norm on tokens, like the original.
    """

    def __init__(self, block: GlobalSparseBlock, settings: ConversionSettings, propagate: bool, window: int):
        super().__init__()
        self.pos_embed = block.pos_embed
        self.norm1 = block.norm1
        self.attn = EdgeViTCarrierAttention(block.attn, settings.gated)
        self.drop_path1 = block.drop_path1
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.drop_path2 = block.drop_path2
        dim = block.attn.dim
        mlp_ratio = block.mlp.fc1.out_features / dim
        rates = block_rates(block.drop_path1, block.mlp, block.attn)
        self.init_carriers(
            dim, block.attn.num_heads, (window, window), settings, mlp_ratio, propagate, block.norm1.weight, rates
        )

    def forward_block(self, x: Tensor, ct: Tensor) -> tuple[Tensor, Tensor]:
        x = x + self.pos_embed(x)
        B, C, H, W = x.shape
        Hp, Wp, n_h, n_w = padded_grid(H, W, self.window_size)
        ct_windows = self.carrier_windows(ct, n_h, n_w)  # (B*nW, ct*ct, C)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        ct_out, out = self.attn(self.norm1(ct_windows), self.norm1(x), (H, W), self.window_size)
        # the carrier tokens before the map: the map's last op must be the block's last, since fx feature
        # extraction (timm's create_feature_extractor) takes a module's output from its last op
        ct_windows = ct_windows + self.drop_path1(ct_out)
        ct_windows = ct_windows + self.drop_path2(self.mlp(self.norm2(ct_windows)))
        ct_out = ct_windows.reshape(B, n_h * n_w * ct_windows.shape[1], C)
        x = x + self.drop_path1(out)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        x = x.view(B, H, W, C)
        if self.propagation_scale is not None:
            x = self.propagate_into_map(x, ct_windows, Hp, Wp)
        return x.permute(0, 3, 1, 2).reshape(B, C, H, W), ct_out


def _judged_size(model: nn.Module) -> tuple[int, int]:
    """``(H, W)`` that single windows are judged at: the model's nominal input size (its ``img_size``, else
    its ``pretrained_cfg['input_size']``), as timm reports it."""
    return tuple(get_model_input_config(model)["input_size"][1:])


class EdgeViTAdapter(BlockAdapter):
    """hatplug's EdgeViT: the ``GlobalSparseBlock`` of every LGL block (see the module docstring).

    ``window`` is the side of HAT's windows (FasterViT's 7). Blocks are skipped where the map at the
    model's nominal input size (its ``img_size``, else the ``pretrained_cfg`` size, 224) is a single window:
    the last stage at 224. To convert for another size, create the EdgeViT with ``img_size=...``.
    """

    family = "hatplug EdgeViT"
    source_types = (GlobalSparseBlock,)
    window = 7

    def dim(self, block: nn.Module) -> int:
        return block.attn.dim

    def window_size(self, block: nn.Module) -> tuple[int, int]:
        return (self.window, self.window)

    def window_grid(self, model: nn.Module, path: str, block: nn.Module) -> tuple[int, int] | None:
        model, path = self.owner_of(model, path, "blocks")  # the EdgeViT, also inside a feature wrapper
        if not isinstance(model, EdgeViT) or not path.startswith("blocks"):
            return None
        stage = int(path.split(".")[0][len("blocks") :]) - 1
        size = _judged_size(model)
        reduction = model.feature_info[stage]["reduction"]
        return padded_grid(size[0] // reduction, size[1] // reduction, self.window_size(block))[2:]

    def resolution(self, model: nn.Module, path: str) -> str:
        h, w = _judged_size(self.owner_of(model, path, "blocks")[0])
        return f"at its input size {h}x{w} (create the EdgeViT with img_size=... for another)"

    def build(self, block: nn.Module, settings: ConversionSettings, propagate: bool) -> nn.Module:
        return EdgeViTHATBlock(block, settings, propagate, self.window)
