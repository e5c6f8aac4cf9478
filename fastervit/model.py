"""FasterViT (Hatamizadeh et al., ICLR 2024): the native model family, built on hatplug's HAT layers.

A clean re-implementation: the state-dict keys are those of the official checkpoints (NVlabs/FasterViT),
the function is the same, and every stage is built for a fixed input size like the released models.
The "any resolution" variants are the same model built for another (possibly non-square) size that
need not be a multiple of the window: stage maps are zero-padded to whole windows.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence

import torch
from timm.layers import DropPath, LayerNorm2d, SelectAdaptivePool2d, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._input import update_model_input_size
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hatplug.checkpoint import drop_derived
from hatplug.errors import refuse_scripting
from hatplug.layers import HATStage
from hatplug.layers._cache import hook_dicts
from hatplug.layers.fusion import (
    BATCHNORMS,
    FoldedTensors,
    fold_batchnorm,
    fusion_active,
    gelu_,
    is_channels_last,
    runs_as,
    stream_dtype,
)
from hatplug.layers.hat import _is_int as _is_integer
from hatplug.layers.pos_embed import _tracing
from hatplug.models.heads import check_head

from .resize import summarise_keys

__all__ = ["FasterViT", "stage_resolutions"]


def _positive_int(value, what: str) -> int:
    """``value`` as an int, refusing floats, strings, bools and values below 1."""
    if not _is_integer(value):
        raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    value = operator.index(value)
    if value < 1:
        raise ValueError(f"{what} must be positive, got {value}")
    return value


def _to_2tuple(size: int | Sequence[int], what: str = "resolution") -> tuple[int, int]:
    """An image size as ``(H, W)`` of positive ints: an int, or a sequence of two ints."""
    if _is_integer(size):
        side = _positive_int(size, what)
        return (side, side)
    if isinstance(size, (str, bytes)) or not isinstance(size, Sequence):
        raise TypeError(f"{what} must be an int or [H, W] of ints, got {size!r}")
    if len(size) != 2:
        raise ValueError(f"{what} must be an int or [H, W], got {list(size)!r}")
    return _positive_int(size[0], f"{what}[0]"), _positive_int(size[1], f"{what}[1]")


def _per_stage_ints(values: Sequence[int], what: str) -> list[int]:
    """A per-stage list of positive ints (``depths``, ``num_heads``)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise TypeError(f"{what} must be a non-empty sequence of ints (one per stage), got {values!r}")
    return [_positive_int(v, f"{what}[{i}]") for i, v in enumerate(values)]


def _rate(value, what: str, upper_open: bool = False) -> float:
    """A probability (dropout / drop-path rate) in [0, 1], or [0, 1) with ``upper_open``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number in [0, 1], got {value!r}")
    if not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        raise ValueError(f"{what} must be in [0, {'1)' if upper_open else '1]'}, got {value}")
    return float(value)


def _window_sizes(window_size: int | Sequence[int], num_stages: int) -> list[int]:
    """One positive window side per stage from an int or a per-stage sequence."""
    if _is_integer(window_size):
        window_size = [window_size] * num_stages
    elif isinstance(window_size, (str, bytes)) or not isinstance(window_size, Sequence):
        raise TypeError(f"window_size must be an int or one int per stage, got {window_size!r}")
    if len(window_size) != num_stages:
        raise ValueError(f"window_size has {len(window_size)} entries but the model has {num_stages} stages")
    return [_positive_int(w, f"window_size[{i}]") for i, w in enumerate(window_size)]


def _global_pool(pool_type: str) -> SelectAdaptivePool2d:
    """timm's head pooling (checked by ``check_head``): pooled and flattened, or ``""``: the unpooled map."""
    return SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))


def _conv_out(size: int) -> int:
    """Output size of a 3x3 stride-2 conv with padding 1."""
    return (size - 1) // 2 + 1


def _carrier_tokens(hat: bool, img_size: tuple[int, int], stage: int, window_size: int) -> bool:
    """Whether HAT stage ``stage`` of a model for ``img_size`` images has carrier tokens: the official rule.

    The official code sizes stage ``i`` as ``floor(size / 2**(i+2))`` and gives it carrier tokens when that
    size exceeds the window. The real map (strided convs) rounds up instead, so for sizes that are not
    multiples of 32 it can spill into a second window row or column that the official stage runs without
    carrier tokens (e.g. stage 3 at 113-127 px, stage 4 at 225-255 px): the same here, or the function and
    the state dict would differ from the official model's at those sizes.

    >>> _carrier_tokens(True, (120, 120), 2, 7), _carrier_tokens(True, (128, 128), 2, 7)
    (False, True)
    """
    H, W = img_size
    return hat and max(H >> (stage + 2), W >> (stage + 2)) > window_size


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


STEM_CHUNK_BYTES = 32 * 2**20  # glibc's largest dynamic mmap threshold on 64-bit Linux


def _nhwc_on_cpu(x: Tensor) -> Tensor:
    """oneDNN runs FasterViT's 3x3 convs 1.5-1.8x faster on channels-last maps (torch 2.15, one AVX-512
    core), so the folded inference path switches CPU maps to that layout once, at the stem."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


class PatchEmbed(nn.Module):
    """Stem: two 3x3 stride-2 convs with BatchNorm (eps 1e-4) and ReLU; output stride 4.

    In eval mode (without autograd or tracing) it runs with each BatchNorm folded into its conv (see
    :mod:`hatplug.layers.fusion`) and, on CPU, returns a channels-last map.
    """

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
        self._folded = FoldedTensors()

    def train(self, mode: bool = True) -> PatchEmbed:
        self._folded.clear()
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        if not (self._foldable() and fusion_active(self, x)):
            return self.conv_down(x)
        conv1, bn1, _, conv2, bn2, _ = self.conv_down
        x = _nhwc_on_cpu(x)
        w1, b1, w2, b2 = _folded_conv_bn(self._folded, ((conv1, bn1), (conv2, bn2)), like=x)
        chunk = self._batch_chunk(x) if x.device.type == "cpu" else x.shape[0]
        if chunk < x.shape[0]:
            return torch.cat([self._folded_forward(part, w1, b1, w2, b2) for part in x.split(chunk)])
        return self._folded_forward(x, w1, b1, w2, b2)

    def _foldable(self) -> bool:
        """Whether ``conv_down`` is still conv-BN-ReLU twice as built, which the folded form computes (not after
        ``torch.ao.quantization.fuse_modules``, other activations or layers with their own ``forward``)."""
        seq = self.conv_down
        return (
            type(seq) is nn.Sequential
            and len(seq) == 6
            and all(runs_as(seq[i], nn.Conv2d) and runs_as(seq[i + 1], *BATCHNORMS) for i in (0, 3))
            and type(seq[2]) is nn.ReLU
            and type(seq[5]) is nn.ReLU
        )

    def _folded_forward(self, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        conv1, conv2 = self.conv_down[0], self.conv_down[3]
        return conv2._conv_forward(conv1._conv_forward(x, w1, b1).relu_(), w2, b2).relu_()

    def _batch_chunk(self, x: Tensor) -> int:
        """Images per chunk such that the first conv's output (the largest activation of the model, 51 MB
        at batch 16 and 224 px) stays under :data:`STEM_CHUNK_BYTES`: glibc serves larger allocations
        with fresh ``mmap`` pages, whose first-touch page faults (12.5k per forward at batch 16) made the
        stem 1.4x slower on CPU (about 1 % of the whole forward). Each image is computed alone either way,
        so chunking does not change the result (bit for bit)."""
        conv1 = self.conv_down[0]
        h, w = (
            (n + 2 * p - k) // s + 1 for n, p, k, s in zip(x.shape[2:], conv1.padding, conv1.kernel_size, conv1.stride)
        )
        per_image = conv1.out_channels * h * w * x.element_size()
        chunks = -(-x.shape[0] * per_image // STEM_CHUNK_BYTES)
        return -(-x.shape[0] // max(chunks, 1))


def _folded_conv_bn(
    cache: FoldedTensors,
    pairs: Sequence[tuple[nn.Conv2d, nn.BatchNorm2d]],
    scale: Tensor | None = None,
    like: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """``(w1, b1, w2, b2, ...)``: each (conv, BatchNorm) pair folded into one conv, the last one also with the
    per-channel ``scale`` (a layer scale), from ``cache`` while none of the sources changed: the convs' and the
    BatchNorms' tensors, ``scale``, and each BatchNorm's ``eps`` (a plain attribute no version counter sees).

    The weights are stored in the memory format of the map ``like`` that the convs will see: oneDNN otherwise
    copies an NCHW weight into channels-last on every call for a channels-last map (3.4 ms of a FasterViT-0
    forward at batch 16 on one CPU core). The values are the same either way."""
    sources = [
        t for conv, bn in pairs for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    ]
    channels_last = like is not None and is_channels_last(like)

    def fold() -> tuple[Tensor, ...]:
        scales = [None] * (len(pairs) - 1) + [scale]
        folded = (t for (c, bn), s in zip(pairs, scales) for t in fold_batchnorm(c.weight, c.bias, bn, s))
        return tuple(
            t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t for t in folded
        )

    return cache.get((*sources, scale), fold, extra=(*(bn.eps for _, bn in pairs), channels_last))


class ConvBlock(nn.Module):
    """Residual conv block of stages 1-2: conv3x3-BN-GELU-conv3x3-BN (+ layer scale, drop path).

    In eval mode (without autograd or tracing) both BatchNorms and the layer scale are folded into the
    convs (see :mod:`hatplug.layers.fusion`); the map keeps its memory format.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.gamma = None if layer_scale is None else nn.Parameter(layer_scale * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self._folded = FoldedTensors()

    def train(self, mode: bool = True) -> ConvBlock:
        self._folded.clear()
        return super().train(mode)

    def _foldable(self) -> bool:
        """Whether the block's layers are the stock ones that the folded form reads instead of calling."""
        return (
            type(self.act1) is nn.GELU
            and runs_as(self.conv1, nn.Conv2d)
            and runs_as(self.conv2, nn.Conv2d)
            and runs_as(self.norm1, *BATCHNORMS)
            and runs_as(self.norm2, *BATCHNORMS)
        )

    def forward(self, x: Tensor) -> Tensor:
        if self._foldable() and fusion_active(self, x):
            pairs = ((self.conv1, self.norm1), (self.conv2, self.norm2))
            w1, b1, w2, b2 = _folded_conv_bn(self._folded, pairs, self.gamma, like=x)
            y = gelu_(self.conv1._conv_forward(x, w1, b1), self.act1.approximate)
            y = self.conv2._conv_forward(y, w2, b2)
            dtype = stream_dtype(y, x, self.gamma)  # y's dtype unless autocast meets a float32 map or layer scale
            return y.add_(x) if dtype == y.dtype else x + y.to(dtype)  # add_: the same sum, no new buffer
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
        self._weight = FoldedTensors()  # the conv weight in channels-last, for channels-last maps in eval mode

    def train(self, mode: bool = True) -> Downsample:
        self._weight.clear()
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        conv = self.reduction[0] if len(self.reduction) == 1 else None
        if runs_as(conv, nn.Conv2d) and fusion_active(self, x) and is_channels_last(x):
            # oneDNN would copy the NCHW weight into channels-last on every call; keep that copy instead
            (weight,) = self._weight.get(
                (conv.weight,), lambda: (conv.weight.contiguous(memory_format=torch.channels_last),)
            )
            return conv._conv_forward(x, weight, conv.bias)
        return self.reduction(x)


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

    def __init__(self, dim: int, *, downsample: bool = False, carrier_tokens: bool = True, **kwargs) -> None:
        hat = kwargs.pop("hat", True)
        super().__init__(dim=dim, hat=hat and carrier_tokens, **kwargs)  # the level's flag and the size rule
        self.downsample = Downsample(dim) if downsample else None
        # the official any-resolution code builds the carrier-token conv of every level with hat on, also of
        # one that then has no carrier tokens (one window by its count) and never runs it
        self._idle_tokenizer = hat and not self.has_carrier_tokens

    def derived_state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensors that official (any-resolution) checkpoints hold for this level and nothing uses: the
        carrier-token conv of a level with ``hat`` on but no carrier tokens. Loading drops them."""
        if not self._idle_tokenizer:
            return {}
        dim = self.blocks[0].norm1.normalized_shape[0]
        shapes = {"weight": (dim, 1, 3, 3), "bias": (dim,)}
        return {
            f"global_tokenizer.{conv}.{k}": s
            for conv in ("pos_embed", "to_global_feature.pos")
            for k, s in shapes.items()
        }

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        drop_derived(self, state_dict, prefix)  # misfits stay, and are unexpected keys (another width)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward_blocks(self, x: Tensor) -> Tensor:
        return super().forward(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


def _feature_tap(index: int, downsample: bool) -> dict[str, str]:
    """Where a hook catches level ``index``'s feature map (its blocks' output, before the downsample): the input
    of the downsample, or the level's output when it has none (timm's ``module`` / ``hook_type`` keys)."""
    if downsample:
        return dict(module=f"levels.{index}.downsample", hook_type="forward_pre")
    return dict(module=f"levels.{index}")


def _is_contiguous(x: Tensor) -> bool:
    return not _tracing() and x.is_contiguous()


def _same_layout(x: Tensor, contiguous: bool) -> Tensor:
    """The maps a model returns are contiguous when its input was, whatever layout it ran in inside."""
    return x.contiguous() if contiguous and not x.is_contiguous() else x


def check_output_fmt(output_fmt, where: str = "") -> None:
    """FasterViT's feature maps are NCHW: any other ``output_fmt`` (a str or timm's ``Format``) is refused."""
    fmt = getattr(output_fmt, "value", output_fmt)
    if fmt != "NCHW":
        raise ValueError(
            f"{where}output_fmt={fmt!r} is not supported: FasterViT's feature maps are NCHW (output_fmt='NCHW', the "
            "default); for channels-last maps permute them, m.permute(0, 2, 3, 1)"
        )


def _changed_since_built(module: nn.Module, built: nn.Module, prefix: str) -> str:
    """What in ``module`` differs from ``built`` (the same module as its constructor makes it) other than tensor
    values: a submodule replaced by another class (a LoRA or quantized layer, a subclass with its own ``forward``),
    added or removed, or a module with hooks. "" when nothing."""
    fresh = dict(built.named_modules())
    for name, sub in module.named_modules():
        path = f"{prefix}.{name}" if name else prefix
        like = fresh.pop(name, None)
        if like is None:
            return f"{path} ({type(sub).__name__}) was added"
        if type(like) is not type(sub):
            return f"{path} is a {type(sub).__qualname__} where the level is built with a {type(like).__qualname__}"
        if len(hook_dicts(sub)) > len(hook_dicts(like)):
            return f"{path} has hooks"
    if fresh:
        return f"{prefix}.{next(iter(fresh))} was removed"
    return ""


def _take_over_weights(old: nn.Module, new: nn.Module) -> None:
    """Make ``new`` (same structure, other geometry) use ``old``'s parameters and persistent buffers.

    The tensors themselves move over, not copies. ``new`` (built on the meta device: no memory, no weight init)
    computes its own non-persistent buffers (coordinate tables, indices, token orders: they describe the
    geometry) on ``old``'s device, in its float dtype.
    """
    device = next(old.parameters()).device
    for name, module in new.named_modules():
        source = old.get_submodule(name)
        module.training = source.training
        for key in module._parameters:
            module._parameters[key] = source._parameters[key]
        for key, buf in module._buffers.items():
            if buf is None:
                continue
            if key in module._non_persistent_buffers_set:
                former = source._buffers.get(key)
                dtype = former.dtype if former is not None and buf.is_floating_point() else buf.dtype
                module._buffers[key] = torch.empty(buf.shape, device=device, dtype=dtype)  # filled below
            else:
                module._buffers[key] = source._buffers[key]
    for module in new.modules():
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
    new.grad_checkpointing = old.grad_checkpointing


class FasterViT(nn.Module):
    """FasterViT classifier / backbone. Build it with :func:`fastervit.create_model`.

    Arguments follow the official code: ``dim`` (stage-1 width), ``in_dim`` (stem width), ``depths``,
    ``window_size`` (per stage), ``ct_size``, ``mlp_ratio``, ``num_heads`` (per stage), ``resolution``
    (int or ``[H, W]``: the model is built for this input size), ``drop_path_rate``, ``in_chans``,
    ``num_classes``, ``qkv_bias``, ``qk_scale``, ``drop_rate``, ``attn_drop_rate``, ``layer_scale``
    (HAT blocks), ``layer_scale_conv`` (conv blocks), ``layer_norm_last``, ``hat`` (per stage: use
    carrier tokens), ``do_propagation``. ``drop_rate`` is the official dropout inside the blocks (attention
    projections and MLPs), not timm's classifier dropout, which is ``head_drop_rate`` here (the official model
    has none). ``global_pool`` is timm's pooling type; ``img_size`` is timm's name for ``resolution`` and wins
    when given.

    Example:
        >>> import fastervit, torch
        >>> model = fastervit.create_model("faster_vit_0_224").eval()
        >>> model(torch.randn(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
    """

    __prepare_scriptable__ = refuse_scripting  # torch.jit.script: a named error, not a parser trace

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
        head_drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size is not None:  # timm's name for the input size
            resolution = img_size
        depths = _per_stage_ints(depths, "depths")  # a stage needs at least one block
        num_stages = len(depths)
        num_heads = _per_stage_ints(num_heads, "num_heads")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a positive number (the MLP's hidden width / dim), got {mlp_ratio!r}")
        drop_path_rate = _rate(drop_path_rate, "drop_path_rate", upper_open=True)
        attn_drop_rate = _rate(attn_drop_rate, "attn_drop_rate", upper_open=True)
        drop_rate = _rate(drop_rate, "drop_rate")
        head_drop_rate = _rate(head_drop_rate, "head_drop_rate")
        window_size = _window_sizes(window_size, num_stages)
        ct_size = _positive_int(ct_size, "ct_size")
        dim, in_dim = _positive_int(dim, "dim"), _positive_int(in_dim, "in_dim")
        in_chans = _positive_int(in_chans, "in_chans")
        num_classes = check_head(global_pool, num_classes)
        hat = [True] * num_stages if hat is None else list(hat)
        for name, value in (("num_heads", num_heads), ("hat", hat)):
            if len(value) != num_stages:
                raise ValueError(f"{name} has {len(value)} entries but depths has {num_stages} stages")
        self.img_size = _to_2tuple(resolution)
        self.in_chans = in_chans
        # every instance runs at the size it was built for (set_input_size changes it): timm's trait
        self._traits = dict(getattr(self, "_traits", {}), fixed_input_size=True)
        self.window_size = window_size
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = int(dim * 2 ** (num_stages - 1))
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(in_chans, in_dim, dim)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        sizes = stage_resolutions(self.img_size, num_stages)
        self.levels = nn.ModuleList()
        self.feature_info = []
        self._hat_level_args: dict[int, dict] = {}
        for i in range(num_stages):
            level_dim = int(dim * 2**i)
            rates = dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            downsample = i < num_stages - 1
            if i < 2:
                level = ConvLevel(level_dim, depths[i], rates, layer_scale_conv, downsample)
            else:
                # kept so that set_input_size can rebuild the level for another geometry
                self._hat_level_args[i] = dict(
                    dim=level_dim,
                    depth=depths[i],
                    num_heads=num_heads[i],
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
                )
                level = HATLevel(
                    **self._hat_level_args[i],
                    input_resolution=sizes[i],
                    window_size=window_size[i],
                    downsample=downsample,
                    carrier_tokens=_carrier_tokens(hat[i], self.img_size, i, window_size[i]),
                )
            self.levels.append(level)
            self.feature_info.append(dict(num_chs=level_dim, reduction=4 * 2**i, **_feature_tap(i, downsample)))

        self.norm = LayerNorm2d(self.num_features) if layer_norm_last else nn.BatchNorm2d(self.num_features)
        self.avgpool = _global_pool(global_pool)
        self.head_drop = nn.Dropout(head_drop_rate)  # drop_rate is the blocks' (the official code has no head dropout)
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
            blocks=r"^levels\.(\d+)"
            if coarse
            else [
                # a level's carrier tokens are made before its first block, its downsample runs after its last
                (r"^levels\.(\d+)\.global_tokenizer\.", (0,)),
                (r"^levels\.(\d+)\.blocks\.(\d+)", None),
                (r"^levels\.(\d+)\.downsample\.", (99999,)),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for level in self.levels:
            level.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    @property
    def global_pool(self) -> str:
        """The pooling type (timm's name; ``timm.models.get_model_args`` reads it after ``reset_classifier``)."""
        return self.avgpool.pool_type

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for ``num_classes`` (0 removes it), optionally re-pooling."""
        global_pool = self.avgpool.pool_type if global_pool is None else global_pool
        self.num_classes = check_head(global_pool, num_classes)
        self.avgpool = _global_pool(global_pool)
        in_features = self.num_features * self.avgpool.feat_mult()
        like = next(self.patch_embed.parameters())  # the new head joins the model on its device, in its dtype
        self.head = (
            nn.Linear(in_features, num_classes, device=like.device, dtype=like.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        if num_classes > 0:
            self._init_weights(self.head)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Forward that also returns the output of each level before its downsample (timm's contract).

        Args:
            x: ``(B, in_chans, H, W)`` at the size the model was built for.
            indices: levels to return: the last ``n`` if an int, these if a sequence (negative counts from
                the end), all four if None. Level ``i`` gives ``(B, dim * 2**i, ~H / 2**(i+2), ~W / 2**(i+2))``.
            norm: apply the final norm to the last level's map (the other levels have no norm of their own).
            stop_early: stop after the last requested level.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of maps.

        Returns:
            The list of maps, or ``(final, maps)`` where ``final`` equals :meth:`forward_features` when
            all levels ran.

        Example:
            >>> import fastervit, torch
            >>> model = fastervit.create_model("faster_vit_0_any_res", resolution=[96, 128]).eval()
            >>> maps = model.forward_intermediates(torch.randn(1, 3, 96, 128), intermediates_only=True)
            >>> [tuple(m.shape[1:]) for m in maps]
            [(64, 24, 32), (128, 12, 16), (256, 6, 8), (512, 3, 4)]
        """
        check_output_fmt(output_fmt)
        take_indices, max_index = feature_take_indices(len(self.levels), indices)
        levels = self.levels[: max_index + 1] if stop_early else self.levels
        last_index = len(self.levels) - 1
        intermediates = []
        contiguous = _is_contiguous(x)
        self._check_input(x)
        x = self.patch_embed(x)
        for i, level in enumerate(levels):
            x = level.forward_blocks(x)
            if i in take_indices:
                intermediates.append(_same_layout(self.norm(x) if norm and i == last_index else x, contiguous))
            if i < len(levels) - 1:
                x = level.downsample(x)
        if intermediates_only:
            return intermediates
        if len(levels) - 1 == last_index:
            x = self.norm(x)
        return _same_layout(x, contiguous), intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop what :meth:`forward_intermediates` does not need for ``indices`` (timm's contract).

        Levels after the last requested one go, and so does that level's downsample; the final norm goes
        with ``prune_norm`` or when the last level is not kept, the head with ``prune_head`` or then too.
        Returns the absolute indices kept.

        Example:
            >>> import fastervit
            >>> model = fastervit.create_model("faster_vit_0_224")
            >>> model.prune_intermediate_layers([0, 1])
            [0, 1]
            >>> len(model.levels), model.levels[1].downsample is None
            (2, True)
        """
        take_indices, max_index = feature_take_indices(len(self.levels), indices)
        prune_end = max_index < len(self.levels) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for the last level's map only
        self.levels = self.levels[: max_index + 1]
        self.levels[max_index].downsample = None  # its output would feed a pruned level
        self.feature_info[max_index].pop("hook_type", None)
        self.feature_info[max_index].update(_feature_tap(max_index, downsample=False))
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; a strict load that fails says how to load a checkpoint of another
        geometry or head (the tensors that do not fit are the carrier-token ones or the classifier then)."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as exc:
            if not strict or not exc.args or not str(exc.args[0]).startswith("Error(s) in loading state_dict"):
                raise
            hint = (
                "\n\tFasterViT: for weights trained at another resolution, window size or ct_size, or with another "
                "number of classes, use fastervit.resize.load_adapted(model, path) (or fastervit.create_model(name, "
                "checkpoint_path=path, adapt_geometry=True)): it keeps every tensor that fits and reports the rest; "
                "hatplug.load_checkpoint(model, path, strict=False) loads what fits as it is."
            )
            asked = {k: v for k, v in getattr(self, "_model_args", {}).items() if k in ("adapt_geometry", "strict")}
            if asked.get("adapt_geometry") is True or asked.get("strict") is False:
                hint += (
                    f" This model was created with {', '.join(f'{k}={v}' for k, v in asked.items())}, which apply "
                    "to the checkpoint_path of fastervit.create_model: timm.create_model(..., checkpoint_path=...) "
                    "loads that file itself, strictly, after building the model (timm.create_model(..., "
                    "pretrained=True, pretrained_cfg_overlay=dict(file=path)) goes through FasterViT's loader)."
                )
            exc.args = (exc.args[0] + hint, *exc.args[1:])
            raise

    @torch.jit.ignore
    def set_input_size(
        self, img_size: int | Sequence[int] | None = None, window_size: int | Sequence[int] | None = None
    ) -> None:
        """Rebuild the model in place for another input size and/or window size, keeping every weight.

        HAT levels are built for a fixed geometry (padding, windows, carrier-token pooling and bias index
        tables are static), so each is rebuilt with the same hyper-parameters for the new geometry and
        takes over the old level's parameters and buffers: the same ``Parameter`` objects (optimisers keep
        working), device, dtype, train/eval mode and gradient checkpointing. The conv levels do not depend
        on the size. Going back to the previous size gives back the previous function exactly.

        A ``torch.compile``d model recompiles for the new size. Compile with ``dynamic=False``: the geometry
        is static anyway, and with automatic dynamic shapes Inductor's CPU code generation can spend many
        minutes simplifying the symbolic padded-window indices (seen with torch 2.15).

        Args:
            img_size: new input size, int or ``[H, W]``; None keeps the current one.
            window_size: new window size, one int for every stage or one per stage; None keeps the current.

        Raises:
            ValueError: the new geometry would add or remove learned tensors: carrier tokens exist only
                where a stage has more than one window as the official code counts them
                (``floor(size / 2**(stage + 2))`` against the window), their absolute position embedding only
                where the window grid is square. Nothing is changed then; build a model for that geometry and
                transfer the weights with :func:`fastervit.resize.load_adapted` instead.

        Example:
            >>> import fastervit, torch
            >>> model = fastervit.create_model("faster_vit_0_any_res", resolution=[224, 224]).eval()
            >>> model.set_input_size([256, 320])
            >>> model(torch.randn(1, 3, 256, 320)).shape
            torch.Size([1, 1000])
        """
        num_stages = len(self.window_size)
        img_size = self.img_size if img_size is None else _to_2tuple(img_size, "img_size")
        window_size = list(self.window_size) if window_size is None else _window_sizes(window_size, num_stages)
        rebuilt, refusal = self._rebuilt_levels(img_size, window_size)
        if refusal:
            raise ValueError(
                f"set_input_size(img_size={list(img_size)}, window_size={window_size}) {refusal}. The model was left "
                "unchanged; build a model for the new geometry and transfer the weights with "
                "fastervit.create_model(..., adapt_geometry=True) or fastervit.resize.load_adapted."
            )
        for i, new in rebuilt.items():  # every check passed: now change the model
            _take_over_weights(self.levels[i], new)
            self.levels[i] = new
        self.img_size = img_size
        self.window_size = window_size
        update_model_input_size(self, img_size, window_size=window_size)
        self._model_args.pop("resolution", None)  # img_size (recorded above) is the size now

    def _rebuilt_levels(self, img_size: tuple[int, int], window_size: list[int]) -> tuple[dict[int, HATLevel], str]:
        """The HAT levels built for another geometry, and why they cannot replace the current ones ("" if they
        can: they hold the same tensors, and nothing but tensors was changed in the current ones)."""
        rebuilt = {}
        for i in self._hat_level_args:
            if i >= len(self.levels):  # pruned by prune_intermediate_layers
                continue
            old = self.levels[i]
            with torch.device("meta"):  # only its module types count here: no memory, no weight init (most of the time)
                built = self._hat_level(i, self.img_size, self.window_size)
            changed = _changed_since_built(old, built, f"levels.{i}")
            if changed:
                return {}, (
                    f"would lose what was changed in levels.{i}: {changed}. It rebuilds the HAT levels from their "
                    "constructor arguments and carries over only their tensors; change the input size before "
                    "replacing layers or adding hooks, or do those again afterwards"
                )
            with torch.device("meta"):  # its tensors are replaced by the old ones, its tables recomputed
                new = self._hat_level(i, img_size, window_size)
            old_keys, new_keys = set(old.state_dict()), set(new.state_dict())
            if old_keys != new_keys:
                return {}, (
                    f"changes which weights levels.{i} has (dropped: {summarise_keys(old_keys - new_keys) or 'none'}; "
                    f"added: {summarise_keys(new_keys - old_keys) or 'none'}): carrier tokens exist only where a "
                    "stage has more than one window (official rule: floor(size / 2**(stage+2)) exceeds the window), "
                    "and their position embedding only where the window grid is square"
                )
            rebuilt[i] = new
        return rebuilt, ""

    def _hat_level(self, i: int, img_size: Sequence[int], window_size: Sequence[int]) -> HATLevel:
        """A new HAT level ``i`` for that geometry, with the hyper-parameters the model was built with."""
        args = self._hat_level_args[i]
        return HATLevel(
            **args,
            input_resolution=stage_resolutions(img_size, len(window_size))[i],
            window_size=window_size[i],
            downsample=self.levels[i].downsample is not None,
            carrier_tokens=_carrier_tokens(args["hat"], img_size, i, window_size[i]),
        )

    def _check_input(self, x: Tensor) -> None:
        """A clear error for an input the model was not built for (skipped while tracing or compiling)."""
        if _tracing():
            return
        if x.dim() != 4:
            raise ValueError(
                f"FasterViT takes a batch of images (B, C, H, W), got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
                + ("; for one image add the batch dimension: model(x[None])" if x.dim() == 3 else "")
            )
        if x.shape[1] != self.in_chans:
            nhwc = x.shape[-1] == self.in_chans
            raise ValueError(
                f"this FasterViT takes {self.in_chans}-channel images (B, {self.in_chans}, H, W), got shape "
                f"{tuple(x.shape)}"
                + (
                    ": that looks channels-last (B, H, W, C); pass x.permute(0, 3, 1, 2) (and, for speed, "
                    ".contiguous(memory_format=torch.channels_last))"
                    if nhwc
                    else f"; for other channel counts create the model with in_chans={x.shape[1]}"
                )
            )
        if x.shape[0] == 0:
            raise ValueError("got an empty batch (0 images): FasterViT needs at least one image")
        if not x.is_floating_point():
            raise TypeError(
                f"FasterViT takes floating-point images, got {x.dtype}: convert them first, e.g. x.float() / 255 for "
                "uint8 images, then normalise as the model's data config says (timm.data.resolve_data_config)"
            )
        weight = next(self.patch_embed.parameters(), None)  # the stem may be fused or wrapped: any of its weights
        if weight is not None and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"the input is {x.dtype} but the model's weights are {weight.dtype}: pass x.to({weight.dtype}), or "
                f"move the model with model.to({x.dtype})"
            )
        if tuple(x.shape[-2:]) != tuple(self.img_size) and any(isinstance(level, HATLevel) for level in self.levels):
            H, W = self.img_size
            h, w = x.shape[-2:]
            _, refusal = self._rebuilt_levels((h, w), list(self.window_size))
            padded = (
                ""
                if H % 32 == 0 and W % 32 == 0
                else (
                    "; that transform also pads each batch to multiples of 32 (size_divisible=32), so for it build "
                    f"the model for a multiple of 32, e.g. {-(-H // 32) * 32}x{-(-W // 32) * 32}"
                )
            )
            raise ValueError(
                f"this FasterViT was built for {H}x{W} inputs (its HAT stages have a fixed window layout), got "
                f"{h}x{w}: resize or pad the inputs to {H}x{W} (torchvision's detection models: "
                f"GeneralizedRCNNTransform(..., fixed_size=({W}, {H})), width first{padded}), or "
                + (
                    f"call model.set_input_size([{h}, {w}]) (same weights)"
                    if not refusal
                    else f"build a model for {h}x{w} and move the weights to it with "
                    f"fastervit.create_model(..., resolution=[{h}, {w}], checkpoint_path=..., adapt_geometry=True) "
                    f"(set_input_size cannot: that size {refusal})"
                )
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, in_chans, H, W)`` -> normalised final map ``(B, num_features, H/32, W/32)``."""
        self._check_input(x)
        contiguous = _is_contiguous(x)
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
        return _same_layout(self.norm(x), contiguous)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool and classify a map from :meth:`forward_features`; ``pre_logits`` stops before the head."""
        x = self.head_drop(self.avgpool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
