"""EdgeViT: hybrid CNN/ViT models built from Local-Global-Local (LGL) blocks.

Paper: `EdgeViTs: Competing Light-weight CNNs on Mobile Devices with Vision Transformers`
(Pan et al., ECCV 2022) - https://arxiv.org/abs/2205.03436

This is an independent re-implementation following the architecture of the reference code at
https://github.com/saic-fi/edgevit (Apache-2.0). Module attribute names (and therefore state-dict keys,
including their order) are kept identical to the reference so its checkpoints load with ``strict=True``.

Differences from the reference, none of which change parameters or state-dict keys:

* any input size works: there is no ``img_size`` assertion, and the delegate grid of the global sparse
  attention is read from the sampled tensor instead of ``int(H / sr)``, so non-divisible sizes work too;
* the forward pass is plain ``torch.fx.symbolic_trace``-able (no shape asserts, no Python math on shapes)
  and ``torch.jit.script``-able;
* attention uses ``F.scaled_dot_product_attention`` when timm's fused attention is enabled (differences
  at float rounding level); with ``fused_attn=False`` outputs match the reference bit for bit;
* timm model contract (``forward_features`` / ``forward_head`` / ``forward_intermediates`` /
  ``prune_intermediate_layers`` / ``reset_classifier`` / ``set_grad_checkpointing`` / ``group_matcher``)
  and registration as ``edgevit_xxs`` / ``_xs`` / ``_s``.

No pretrained weights were released with the paper. To load a local checkpoint (e.g. one trained with the
reference code), use timm's file override::

    timm.create_model("edgevit_s", pretrained=True, pretrained_cfg_overlay=dict(file="edgevit_s.pth"))
"""
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_, use_fused_attn
from timm.models import (
    FeatureDictNet,
    FeatureListNet,
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models._features import feature_take_indices
from timm.models._input import update_model_input_size

from .heads import check_head, drop_pool_of_pruned_head

__all__ = ["EdgeViT", "LGLBlock", "LocalAgg", "GlobalSparseAttn", "GlobalSparseBlock", "PatchEmbed"]


class PatchEmbed(nn.Module):
    """Non-overlapping strided conv patchify followed by a channel LayerNorm; NCHW in, NCHW out.

    Works at any input size (the reference asserted a fixed ``img_size``); a border that does not fill a
    whole patch is dropped, as with any strided conv.

    Example:
        >>> embed = PatchEmbed(patch_size=4, in_chans=3, embed_dim=36)
        >>> embed(torch.randn(2, 3, 64, 48)).shape
        torch.Size([2, 36, 16, 12])
    """

    def __init__(
            self,
            patch_size: int | tuple[int, int] = 16,
            in_chans: int = 3,
            embed_dim: int = 768,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        # Registration order (norm before proj) mirrors the reference so state_dict key order matches too.
        self.norm = nn.LayerNorm(embed_dim, **dd)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.dim() == 4, "EdgeViT takes a batch of images (B, C, H, W): for one image pass x[None]")
        if not torch.jit.is_tracing():  # a trace records the shapes it saw (the checks would only warn there)
            # each stage halves the map (the first quarters it): below 32 px a map gets smaller than its patch
            small = (
                "a map smaller than the patch: EdgeViT takes images of at least 32x32 pixels (the stages reduce "
                "them by 4, 2, 2 and 2)"
            )
            torch._assert(x.shape[-2] >= self.patch_size[0], small)
            torch._assert(x.shape[-1] >= self.patch_size[1], small)
        x = self.proj(x)  # (B, C, H/p, W/p)
        # LayerNorm normalises the last dim, so channels go last for the norm and come back afterwards;
        # contiguous() keeps the rest of the network in the default NCHW memory format.
        x = self.norm(x.permute(0, 2, 3, 1))  # (B, H/p, W/p, C)
        return x.permute(0, 3, 1, 2).contiguous()  # (B, C, H/p, W/p)


class LocalAgg(nn.Module):
    """Local aggregation ("L" of LGL): depthwise-conv token mixer plus a 1x1-conv MLP, NCHW in/out.

    Layout (reference names): ``pos_embed`` 3x3 dw conv (conditional position encoding), then
    ``norm1`` (BN) -> ``conv1`` (1x1) -> ``attn`` (5x5 dw conv) -> ``conv2`` (1x1), then ``norm2`` (BN) ->
    ``mlp`` (1x1-conv MLP), each with a residual connection.

    Example:
        >>> agg = LocalAgg(dim=36)
        >>> agg(torch.randn(2, 36, 14, 14)).shape
        torch.Size([2, 36, 14, 14])
    """

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            drop: float = 0.,
            drop_path: float = 0.,
            act_layer: type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.norm1 = nn.BatchNorm2d(dim, **dd)
        self.conv1 = nn.Conv2d(dim, dim, 1, **dd)
        self.conv2 = nn.Conv2d(dim, dim, 1, **dd)
        # Named `attn` in the reference although it is a 5x5 depthwise conv; kept for checkpoint keys.
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop, use_conv=True, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path1(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class GlobalSparseAttn(nn.Module):
    """Global sparse attention ("G" + the last "L" of LGL) on a (B, N, C) token sequence.

    1. *Sampler*: ``sampler`` is ``nn.AvgPool2d(kernel_size=1, stride=sr_ratio)``, i.e. it keeps every
       ``sr_ratio``-th token in each spatial direction; these are the "delegates".
    2. *Attention over delegates*: ordinary multi-head self-attention among the delegates only
       (``qkv`` -> softmax(q k^T * scale) v -> heads merged). Cost is O((N / r^2)^2) instead of O(N^2).
    3. *Local propagation*: ``LocalProp`` is a depthwise ``ConvTranspose2d(kernel=stride=sr_ratio)`` that
       spreads each delegate back over its r x r neighbourhood (cropped to H x W), then ``norm`` (LayerNorm).
    4. ``proj`` (Linear) and ``proj_drop``.

    With ``sr_ratio == 1`` (last stage) ``sampler``, ``LocalProp`` and ``norm`` are ``nn.Identity`` and the
    module is plain global MHSA.

    Converter notes (attributes a replacement such as hierarchical attention needs):

    * ``dim``, ``num_heads``, ``head_dim``, ``scale`` (python numbers);
    * ``qkv``: ``nn.Linear(dim, 3 * dim)``, output laid out as ``(3, num_heads, head_dim)`` i.e. all of q,
      then all of k, then all of v, each head-major;
    * ``proj``: ``nn.Linear(dim, dim)`` applied last (after ``norm``);
    * ``sr_ratio``: int spatial reduction ratio r (the reference called it ``sr``);
    * ``sampler``: ``nn.AvgPool2d(1, r)`` or ``nn.Identity``;
    * ``LocalProp``: ``nn.ConvTranspose2d(dim, dim, r, stride=r, groups=dim)`` or ``nn.Identity``;
    * ``norm``: ``nn.LayerNorm(dim)`` (eps 1e-5) or ``nn.Identity``;
    * ``attn_drop``, ``proj_drop``: ``nn.Dropout``; ``fused_attn``: whether SDPA is used.

    Call contract: ``forward(x, H, W)`` with ``x`` of shape (B, N, C), ``N == H * W`` in row-major order
    (already normalised by the enclosing block's ``norm1``); returns (B, N, C). The enclosing
    :class:`GlobalSparseBlock` adds the residual. Inside an :class:`EdgeViT` the module lives at
    ``blocks{s}.{i}.SelfAttn.attn`` (s = 1..4).

    Example:
        >>> attn = GlobalSparseAttn(dim=72, num_heads=2, sr_ratio=2).eval()
        >>> attn(torch.randn(2, 14 * 10, 72), 14, 10).shape
        torch.Size([2, 140, 72])
    """

    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_scale: float | None = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            sr_ratio: int = 1,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

        self.sr_ratio = int(sr_ratio)
        if self.sr_ratio > 1:
            # kernel_size=1 makes this pure strided subsampling (delegate selection), as in the reference.
            self.sampler = nn.AvgPool2d(kernel_size=1, stride=self.sr_ratio)
            self.LocalProp = nn.ConvTranspose2d(
                dim, dim, kernel_size=self.sr_ratio, stride=self.sr_ratio, groups=dim, **dd)
            self.norm = nn.LayerNorm(dim, **dd)
        else:
            # Identity placeholders (no parameters, so no state-dict keys) keep the attribute set uniform.
            self.sampler = nn.Identity()
            self.LocalProp = nn.Identity()
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, C = x.shape[0], x.shape[2]
        h, w = H, W  # delegate grid; equals the token grid when there is no spatial reduction
        # The branch depends on a constructor argument only, so fx traces it away.
        if self.sr_ratio > 1:
            x = x.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
            x = self.sampler(x)  # (B, C, h, w) with h = ceil(H / r), w = ceil(W / r)
            # Read the delegate grid from the tensor rather than computing H / r in Python, so that fx
            # records it symbolically and non-divisible sizes stay consistent with the sampler.
            h, w = x.shape[2], x.shape[3]
            x = x.flatten(2).transpose(1, 2)  # (B, n, C), n = h * w

        qkv = self.qkv(x).reshape(B, x.shape[1], 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, n, head_dim)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, heads, n, n)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v  # (B, heads, n, head_dim)
        x = x.transpose(1, 2).reshape(B, x.shape[2], C)  # (B, n, C); no -1, so that an empty batch works

        if self.sr_ratio > 1:
            x = x.transpose(1, 2).reshape(B, C, h, w)  # (B, C, h, w)
            x = self.LocalProp(x)  # (B, C, h * r, w * r)
            # h * r overshoots H when H is not a multiple of r; for multiples the slice is a no-op view.
            x = x[:, :, :H, :W]  # (B, C, H, W)
            x = x.flatten(2).transpose(1, 2)  # (B, N, C)
            x = self.norm(x)

        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class GlobalSparseBlock(nn.Module):
    """Transformer half of an LGL block: conditional pos-embed, global sparse attention and MLP; NCHW in/out.

    Stored as ``LGLBlock.SelfAttn`` (the reference class name) so checkpoint keys match.

    Example:
        >>> blk = GlobalSparseBlock(dim=72, num_heads=2, sr_ratio=2)
        >>> blk(torch.randn(2, 72, 14, 14)).shape
        torch.Size([2, 72, 14, 14])
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            qk_scale: float | None = None,
            drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            sr_ratio: int = 1,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = GlobalSparseAttn(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            proj_drop=drop,
            sr_ratio=sr_ratio,
            **dd,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        B, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        x = x + self.drop_path1(self.attn(self.norm1(x), H, W))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class LGLBlock(nn.Module):
    """Local-Global-Local block: :class:`LocalAgg` then :class:`GlobalSparseBlock`; NCHW in/out.

    As in the reference, stages without spatial reduction (``sr_ratio == 1``) skip the local aggregation
    (``LocalAgg`` is ``nn.Identity``).

    Example:
        >>> blk = LGLBlock(dim=36, num_heads=1, sr_ratio=4)
        >>> blk(torch.randn(2, 36, 16, 16)).shape
        torch.Size([2, 36, 16, 16])
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            qk_scale: float | None = None,
            drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: type[nn.Module] = nn.GELU,
            norm_layer: type[nn.Module] = nn.LayerNorm,
            sr_ratio: int = 1,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if sr_ratio > 1:
            self.LocalAgg = LocalAgg(
                dim, mlp_ratio=mlp_ratio, drop=drop, drop_path=drop_path, act_layer=act_layer, **dd)
        else:
            self.LocalAgg = nn.Identity()
        self.SelfAttn = GlobalSparseBlock(
            dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            drop=drop,
            attn_drop=attn_drop,
            drop_path=drop_path,
            act_layer=act_layer,
            norm_layer=norm_layer,
            sr_ratio=sr_ratio,
            **dd,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.SelfAttn(self.LocalAgg(x))


class EdgeViT(nn.Module):
    """EdgeViT classifier: four stages of (patch embed, LGL blocks), BatchNorm, average pool, linear head.

    Attribute layout follows the reference (``patch_embed1..4``, ``blocks1..4``, ``norm``, ``head``) so that
    reference checkpoints load with ``strict=True``. Input size is free (any H, W >= 32).

    Args:
        depths: number of LGL blocks per stage.
        embed_dims: channels per stage.
        head_dim: channels per attention head (heads per stage = ``embed_dims[i] // head_dim``).
        mlp_ratios: MLP expansion per stage (a single number applies to all stages).
        sr_ratios: spatial reduction ratio of the global sparse attention per stage.
        in_chans: input image channels.
        num_classes: classifier outputs (0 for no head).
        global_pool: ``'avg'`` or ``''`` (no pooling; then use ``num_classes=0``).
        qkv_bias: bias in the attention ``qkv`` projection.
        qk_scale: override of the ``head_dim ** -0.5`` attention scale.
        drop_rate: dropout after the stem, in MLPs and after attention projections (as in the reference).
        attn_drop_rate: attention-probability dropout.
        drop_path_rate: stochastic depth rate, linearly increased over all blocks.
        norm_layer: token norm of the attention blocks (default ``LayerNorm(eps=1e-6)`` as in the reference).
        act_layer: MLP activation.
        img_size: the nominal input size (int or ``(H, W)``), what ``timm.models.get_model_input_config``
            reports and :func:`hatplug.convert` judges single-window stages at; the model itself runs at any
            size. ``None``: the ``pretrained_cfg`` size (224).

    Example:
        >>> model = EdgeViT(depths=(1, 1, 3, 2), embed_dims=(36, 72, 144, 288), head_dim=36).eval()
        >>> model(torch.randn(1, 3, 160, 192)).shape
        torch.Size([1, 1000])
    """

    def __init__(
            self,
            depths: Sequence[int] = (1, 2, 5, 3),
            embed_dims: Sequence[int] = (48, 96, 240, 384),
            head_dim: int = 48,
            mlp_ratios: float | Sequence[float] = 4.,
            sr_ratios: Sequence[int] = (4, 2, 2, 1),
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            qkv_bias: bool = True,
            qk_scale: float | None = None,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: type[nn.Module] | None = None,
            act_layer: type[nn.Module] = nn.GELU,
            img_size: Any = None,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        num_classes = check_head(global_pool, num_classes, pool_types=("avg",))
        global_pool = global_pool.lower()  # as timm: "AVG" pools too
        num_stages = len(depths)
        if num_stages != 4 or len(embed_dims) != 4 or len(sr_ratios) != 4:
            raise ValueError("EdgeViT has four stages: depths, embed_dims and sr_ratios need 4 entries each")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        if isinstance(mlp_ratios, (int, float)):
            mlp_ratios = (mlp_ratios,) * num_stages
        if len(mlp_ratios) != num_stages:
            raise ValueError(f"mlp_ratios needs one number, or one per stage (4), got {tuple(mlp_ratios)}")
        narrow = [d for d in embed_dims if d < head_dim]
        if narrow:
            raise ValueError(
                f"head_dim={head_dim} is wider than stage widths {narrow} (embed_dims={tuple(embed_dims)}): every "
                "stage needs at least one head of head_dim channels; lower head_dim"
            )

        if img_size is not None:
            update_model_input_size(self, to_2tuple(img_size))
        self.num_classes = num_classes
        self.in_chans = in_chans  # timm reads it (get_model_input_config, resolve_input_data_config)
        self.global_pool = global_pool
        self.embed_dims = tuple(embed_dims)
        self.num_stages = num_stages  # fewer once prune_intermediate_layers drops the last ones
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        # Stage 1 patchifies by 4, later stages downsample by 2 (overall stride 32).
        patch_sizes = (4, 2, 2, 2)
        prev_dim = in_chans
        for i in range(num_stages):
            self.add_module(f"patch_embed{i + 1}", PatchEmbed(patch_sizes[i], prev_dim, embed_dims[i], **dd))
            prev_dim = embed_dims[i]
        self.pos_drop = nn.Dropout(p=drop_rate)

        # stochastic depth decay rule (on the CPU: a meta-device context must not reach these numbers)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.feature_info = []
        reduction = 1
        block_idx = 0
        for i in range(num_stages):
            blocks = nn.Sequential(*[
                LGLBlock(
                    embed_dims[i],
                    num_heads=embed_dims[i] // head_dim,
                    mlp_ratio=mlp_ratios[i],
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[block_idx + j],
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    sr_ratio=sr_ratios[i],
                    **dd,
                )
                for j in range(depths[i])
            ])
            self.add_module(f"blocks{i + 1}", blocks)
            block_idx += depths[i]
            reduction *= patch_sizes[i]
            self.feature_info.append(
                dict(num_chs=embed_dims[i], reduction=reduction, module=f"blocks{i + 1}"))

        self.norm = nn.BatchNorm2d(embed_dims[-1], **dd)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Same scheme as the reference: only Linear and LayerNorm are re-initialised; convs and BN keep
        # PyTorch defaults.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # No position tables or tokens; norms and biases are covered by timm's 1-D parameter rule.
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^patch_embed1\.",
            blocks=[
                (r"^(?:blocks|patch_embed)(\d+)", None),
                (r"^norm", (99999,)),
            ] if coarse else [
                (r"^blocks(\d+)\.(\d+)", None),
                (r"^patch_embed(\d+)", (-1,)),  # a stage's embed sorts before its first block
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in the backward pass instead of storing its activations (timm's contract).

        Outputs and gradients are the same; as in timm's CNNs, the recomputation runs the BatchNorms of the
        local aggregation in training mode again, so their running statistics take two updates per step.
        """
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        global_pool = self.global_pool if global_pool is None else global_pool
        self.num_classes = check_head(global_pool, num_classes, pool_types=("avg",))
        self.global_pool = global_pool.lower()
        w = self.patch_embed1.proj.weight  # the stem is never pruned
        self.head = (
            nn.Linear(self.num_features, num_classes, device=w.device, dtype=w.dtype)
            if num_classes > 0 else nn.Identity()
        )

    @torch.jit.unused
    def _run_stage(self, blocks: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing:
            if isinstance(blocks, nn.Sequential):
                return checkpoint_seq(blocks, x)
            # a stage rewritten by hatplug.convert threads carrier tokens between its blocks: checkpoint it whole
            return torch.utils.checkpoint.checkpoint(blocks, x, use_reentrant=False)
        return blocks(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, in_chans, H, W) -> BN-normalised last-stage map (B, num_features, H/32, W/32)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = self.pos_drop(self.patch_embed1(x))
            x = self._run_stage(self.blocks1, x)
            x = self._run_stage(self.blocks2, self.patch_embed2(x))
            x = self._run_stage(self.blocks3, self.patch_embed3(x))
            x = self._run_stage(self.blocks4, self.patch_embed4(x))
            return self.norm(x)
        x = self.pos_drop(self.patch_embed1(x))  # (B, C1, H/4, W/4)
        x = self.blocks1(x)
        x = self.blocks2(self.patch_embed2(x))  # (B, C2, H/8, W/8)
        x = self.blocks3(self.patch_embed3(x))  # (B, C3, H/16, W/16)
        x = self.blocks4(self.patch_embed4(x))  # (B, C4, H/32, W/32)
        return self.norm(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | Sequence[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward that also returns each stage's output map (timm's contract).

        Args:
            x: ``(B, in_chans, H, W)``, any size of at least 32 x 32.
            indices: stages to return: the last ``n`` if an int, these if a sequence (negative counts from
                the end), all if None (four, or those that :meth:`prune_intermediate_layers` kept). Stage ``i``
                gives ``(B, embed_dims[i], ~H / 2**(i+2), ~W / 2**(i+2))``, the same maps as ``features_only=True``.
            norm: apply the final BatchNorm to the last stage's map (the other stages have no norm).
            stop_early: stop after the last requested stage.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of maps.

        Returns:
            The list of maps, or ``(final, maps)`` where ``final`` equals :meth:`forward_features` when
            all stages ran (otherwise it is the last stage that ran, without norm).

        Example:
            >>> import timm, torch
            >>> import hatplug.models  # registers the EdgeViT family with timm
            >>> model = timm.create_model("edgevit_xxs").eval()
            >>> maps = model.forward_intermediates(torch.randn(1, 3, 96, 128), intermediates_only=True)
            >>> [tuple(m.shape[1:]) for m in maps]
            [(36, 24, 32), (72, 12, 16), (144, 6, 8), (288, 3, 4)]
        """
        if output_fmt != "NCHW":
            raise ValueError(f"EdgeViT features are NCHW maps; output_fmt={output_fmt!r} is not supported")
        num_stages = self.num_stages
        take_indices, max_index = feature_take_indices(num_stages, indices)
        last_run = max_index if stop_early else num_stages - 1
        intermediates = []
        for i in range(last_run + 1):
            x = getattr(self, f"patch_embed{i + 1}")(x)
            if i == 0:
                x = self.pos_drop(x)
            x = self._run_stage(getattr(self, f"blocks{i + 1}"), x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm and i == num_stages - 1 else x)
        if intermediates_only:
            return intermediates
        if last_run == num_stages - 1:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop what :meth:`forward_intermediates` does not need for ``indices`` (timm's contract).

        Stages after the last requested one become ``nn.Identity`` (patch embed and blocks); the final norm
        goes with ``prune_norm`` or when the last stage is not kept, the head with ``prune_head`` or then
        too. Returns the absolute indices kept.

        Example:
            >>> import timm
            >>> import hatplug.models
            >>> model = timm.create_model("edgevit_xxs")
            >>> model.prune_intermediate_layers([0, 1])
            [0, 1]
            >>> type(model.blocks3).__name__, model.num_features
            ('Identity', 72)
        """
        num_stages = self.num_stages
        take_indices, max_index = feature_take_indices(num_stages, indices)
        prune_end = max_index < num_stages - 1
        for i in range(max_index + 1, num_stages):
            setattr(self, f"patch_embed{i + 1}", nn.Identity())
            setattr(self, f"blocks{i + 1}", nn.Identity())
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for the last stage's channels only
        if prune_end:
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
            self.num_stages = max_index + 1  # forward_intermediates counts (and checks indices) against these
        if prune_head or prune_end:
            self.reset_classifier(0)
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> logits (or pooled features with ``pre_logits=True``)."""
        if self.global_pool == "avg":
            x = x.flatten(2).mean(-1)  # (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_edgevit(variant: str, pretrained: bool = False, **kwargs) -> EdgeViT:
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        if not (cfg.has_weights or cfg.state_dict is not None):
            raise RuntimeError(
                f"No pretrained weights were released for {variant} (the EdgeViT authors published code "
                f"only). Use pretrained=False, or point timm at a local checkpoint with "
                f"timm.create_model({variant!r}, pretrained=True, "
                f"pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth'))."
            )
    # features_only: taken by forward_intermediates on a model pruned after the last requested stage (timm's
    # "getter"), so every parameter it keeps gets a gradient (DDP's default needs that) and nothing after the
    # last feature runs. feature_cls="hook" still works: forward hooks on the whole, unmodified model (its
    # stages are not registered in execution order, so timm's module-flattening wrapper cannot be used).
    feature_cls = kwargs.get("feature_cls", (kwargs.get("feature_cfg") or {}).get("feature_cls"))
    flattening = isinstance(feature_cls, str) and feature_cls.lower() in ("list", "dict")  # timm lower-cases it
    flattening |= isinstance(feature_cls, type) and issubclass(feature_cls, (FeatureListNet, FeatureDictNet))
    if kwargs.get("features_only") and flattening:
        raise ValueError(
            f"feature_cls={feature_cls!r} does not work for EdgeViT: timm's flattening wrappers run the modules in "
            "registration order, and EdgeViT registers its four patch embeddings before its stages. Use the "
            "default ('getter'), 'hook' or 'fx'"
        )
    return build_model_with_cfg(
        EdgeViT,
        variant,
        pretrained,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **drop_pool_of_pruned_head(kwargs),
    )


def _cfg(**kwargs) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed1.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2205.03436",
        "paper_name": "EdgeViTs: Competing Light-weight CNNs on Mobile Devices with Vision Transformers",
        "origin_url": "https://github.com/saic-fi/edgevit",
        "notes": ("No pretrained weights were released; load a local file via pretrained_cfg_overlay.",),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "edgevit_xxs": _cfg(),
    "edgevit_xs": _cfg(),
    "edgevit_s": _cfg(),
})


@register_model
def edgevit_xxs(pretrained: bool = False, **kwargs) -> EdgeViT:
    """EdgeViT-XXS (4.07M params at 1000 classes)."""
    model_args = dict(depths=(1, 1, 3, 2), embed_dims=(36, 72, 144, 288), head_dim=36, sr_ratios=(4, 2, 2, 1))
    return _create_edgevit("edgevit_xxs", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def edgevit_xs(pretrained: bool = False, **kwargs) -> EdgeViT:
    """EdgeViT-XS (6.77M params at 1000 classes)."""
    model_args = dict(depths=(1, 1, 3, 1), embed_dims=(48, 96, 240, 384), head_dim=48, sr_ratios=(4, 2, 2, 1))
    return _create_edgevit("edgevit_xs", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def edgevit_s(pretrained: bool = False, **kwargs) -> EdgeViT:
    """EdgeViT-S (13.1M params at 1000 classes)."""
    model_args = dict(depths=(1, 2, 5, 3), embed_dims=(48, 96, 240, 384), head_dim=48, sr_ratios=(4, 2, 2, 1))
    return _create_edgevit("edgevit_s", pretrained=pretrained, **dict(model_args, **kwargs))
