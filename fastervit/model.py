"""FasterViT (Hatamizadeh et al., ICLR 2024): the native model family, built on hatplug's HAT layers.

A clean re-implementation: the state-dict keys are those of the official checkpoints (NVlabs/FasterViT),
the function is the same, and every stage is built for a fixed input size like the released models.
The "any resolution" variants are the same model built for another (possibly non-square) size that
need not be a multiple of the window: stage maps are zero-padded to whole windows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import DropPath, LayerNorm2d, SelectAdaptivePool2d, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hatplug.layers import HATStage

__all__ = ["FasterViT", "stage_resolutions"]


def _to_2tuple(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"resolution must be an int or [H, W], got {size!r}")
    return size


def _conv_out(size: int) -> int:
    """Output size of a 3x3 stride-2 conv with padding 1."""
    return (size - 1) // 2 + 1


def stage_resolutions(resolution: int | Sequence[int], num_stages: int = 4) -> list[tuple[int, int]]:
    """Input map size of each stage for an image of ``resolution`` (stem /4, then /2 per stage).

    >>> stage_resolutions(224)
    [(56, 56), (28, 28), (14, 14), (7, 7)]
    >>> stage_resolutions([200, 300])[2]
    (13, 19)
    """
    h, w = _to_2tuple(resolution)
    h, w = _conv_out(_conv_out(h)), _conv_out(_conv_out(w))
    sizes = []
    for _ in range(num_stages):
        sizes.append((h, w))
        h, w = _conv_out(h), _conv_out(w)
    return sizes


class PatchEmbed(nn.Module):
    """Stem: two 3x3 stride-2 convs with BatchNorm (eps 1e-4) and ReLU; output stride 4."""

    def __init__(self, in_chans: int = 3, in_dim: int = 64, dim: int = 96) -> None:
        super().__init__()
        self.proj = nn.Identity()
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(in_dim, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(dim, eps=1e-4),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_down(self.proj(x))


class ConvBlock(nn.Module):
    """Residual conv block of stages 1-2: conv3x3-BN-GELU-conv3x3-BN (+ layer scale, drop path)."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.gamma = None if layer_scale is None else nn.Parameter(layer_scale * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)


class Downsample(nn.Module):
    """LayerNorm2d then a 3x3 stride-2 conv doubling the channels."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(self.norm(x))


class ConvLevel(nn.Module):
    """A convolutional stage (FasterViT stages 1-2) followed by its optional downsample."""

    def __init__(
        self, dim: int, depth: int, drop_path: Sequence[float], layer_scale: float | None, downsample: bool
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ConvBlock(dim, drop_path[i], layer_scale) for i in range(depth))
        self.downsample = Downsample(dim) if downsample else None
        self.grad_checkpointing = False

    def forward_blocks(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and self.training else blk(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class HATLevel(HATStage):
    """A HAT stage (FasterViT stages 3-4) followed by its optional downsample."""

    def __init__(self, dim: int, *, downsample: bool = False, **kwargs) -> None:
        super().__init__(dim=dim, **kwargs)
        self.downsample = Downsample(dim) if downsample else None

    def forward_blocks(self, x: Tensor) -> Tensor:
        return super().forward(x)

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        return x if self.downsample is None else self.downsample(x)


class FasterViT(nn.Module):
    """FasterViT classifier / backbone. Build it with :func:`fastervit.create_model`.

    Arguments follow the official code: ``dim`` (stage-1 width), ``in_dim`` (stem width), ``depths``,
    ``window_size`` (per stage), ``ct_size``, ``mlp_ratio``, ``num_heads`` (per stage), ``resolution``
    (int or ``[H, W]``: the model is built for this input size), ``drop_path_rate``, ``in_chans``,
    ``num_classes``, ``qkv_bias``, ``qk_scale``, ``drop_rate``, ``attn_drop_rate``, ``layer_scale``
    (HAT blocks), ``layer_scale_conv`` (conv blocks), ``layer_norm_last``, ``hat`` (per stage: use
    carrier tokens), ``do_propagation``. ``global_pool`` is timm's pooling type; ``img_size`` is timm's
    name for ``resolution`` and wins when given.

    Example:
        >>> import fastervit, torch
        >>> model = fastervit.create_model("faster_vit_0_224").eval()
        >>> model(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
    """

    def __init__(
        self,
        dim: int,
        in_dim: int,
        depths: Sequence[int],
        window_size: int | Sequence[int],
        ct_size: int,
        mlp_ratio: float,
        num_heads: Sequence[int],
        resolution: int | Sequence[int] = 224,
        drop_path_rate: float = 0.2,
        in_chans: int = 3,
        num_classes: int = 1000,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        layer_scale: float | None = None,
        layer_scale_conv: float | None = None,
        layer_norm_last: bool = False,
        hat: Sequence[bool] | None = (False, False, True, False),
        do_propagation: bool = False,
        global_pool: str = "avg",
        img_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if img_size is not None:  # timm's name for the input size
            resolution = img_size
        num_stages = len(depths)
        window_size = [window_size] * num_stages if isinstance(window_size, int) else list(window_size)
        hat = [True] * num_stages if hat is None else list(hat)
        for name, value in (("window_size", window_size), ("num_heads", num_heads), ("hat", hat)):
            if len(value) != num_stages:
                raise ValueError(f"{name} has {len(value)} entries but depths has {num_stages} stages")
        self.img_size = _to_2tuple(resolution)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = int(dim * 2 ** (num_stages - 1))
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(in_chans, in_dim, dim)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        sizes = stage_resolutions(self.img_size, num_stages)
        self.levels = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            level_dim = int(dim * 2**i)
            rates = dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            downsample = i < num_stages - 1
            if i < 2:
                level = ConvLevel(level_dim, depths[i], rates, layer_scale_conv, downsample)
            else:
                level = HATLevel(
                    dim=level_dim,
                    depth=depths[i],
                    num_heads=num_heads[i],
                    input_resolution=sizes[i],
                    window_size=window_size[i],
                    ct_size=ct_size,
                    hat=hat[i],
                    do_propagation=do_propagation,
                    drop_path=rates,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    layer_scale=layer_scale,
                    downsample=downsample,
                )
            self.levels.append(level)
            self.feature_info.append(dict(num_chs=level_dim, reduction=4 * 2**i, module=f"levels.{i}"))

        self.norm = LayerNorm2d(self.num_features) if layer_norm_last else nn.BatchNorm2d(self.num_features)
        self.avgpool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = (
            nn.Linear(self.num_features * self.avgpool.feat_mult(), num_classes) if num_classes > 0 else nn.Identity()
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, LayerNorm2d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- timm model contract -------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The position-bias MLPs, as timm does for SwinV2's continuous bias."""
        return {n for n, _ in self.named_parameters() if "cpb_mlp" in n}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^levels\.(\d+)" if coarse else [(r"^levels\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for level in self.levels:
            level.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for ``num_classes`` (0 removes it), optionally re-pooling."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.avgpool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        in_features = self.num_features * self.avgpool.feat_mult()
        self.head = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, in_chans, H, W)`` -> normalised final map ``(B, num_features, H/32, W/32)``."""
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool and classify a map from :meth:`forward_features`; ``pre_logits`` stops before the head."""
        x = self.head_drop(self.avgpool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
