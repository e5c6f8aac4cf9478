"""Inference-time reparameterisation: BatchNorm and layer scales folded into the preceding conv / linear.

In eval mode a conv followed by BatchNorm (running statistics) and an optional per-channel scale is one
affine map, ``s * (BN(conv(x)))  = conv'(x)`` with ``w' = w * s * gamma / sqrt(var + eps)`` per output
channel; the same holds for a linear followed by a layer-scale ``gamma``: ``gamma * (W x + b) = (gamma W) x
+ gamma b``. Modules that use this keep their parameters, buffers and state-dict keys exactly as they are
(official checkpoints load unchanged) and derive the folded tensors on demand, cached like the position
biases (:class:`~hatplug.layers.CachedBias`): the cache key is the identity, in-place version, dtype and
device of every source tensor and the number of optimizer steps taken (fused optimizers do not bump
versions), so an optimiser step, ``load_state_dict``, ``.to()`` or new BatchNorm statistics or ``eps`` make
the next call fold again, and ``train()`` drops the cache. Edits through ``.data`` bypass
the version counters: after one, call ``model.eval()`` again (it drops the cache).

The folded path is taken only where it computes the same function up to float32 rounding and nothing can
observe the difference: eval mode, no tracer or compiler recording the forward (those see the plain
modules and fuse on their own), and no autograd through the weights or the input. In training the plain
modules run, so training is bit-identical with or without this. A submodule with hooks (a feature or
attention-map probe) makes its module run the plain form, so that the hooks fire, and so does one in
training mode under an eval-mode parent (test-time BatchNorm adaptation, MC dropout / drop path) or a
BatchNorm without running statistics. So does a block whose read-not-called layers are no longer the stock
classes (a LoRA adapter, a quantized linear, a subclass with its own ``forward``: :func:`runs_as`).
``inference_fusion(False)`` switches it off globally (A/B measurements, debugging), together with the
other inference-only forms that use
:func:`fusion_active`: FasterViT's conv levels in channels-last on CPU and its stem in batch chunks
(``fastervit.model``), HAT blocks that accumulate residuals in the projection GEMMs and apply GELU in
place, and the fused-kernel attention of converted blocks (:class:`~hatplug.layers.CarrierWindowAttention`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ._cache import FoldedTensors, must_run_below
from .pos_embed import _tracing

__all__ = [
    "FoldedTensors",
    "fold_batchnorm",
    "fold_scale",
    "fusion_active",
    "gelu_",
    "inference_fusion",
    "inference_fusion_enabled",
    "mlp_hidden",
    "passes_through",
    "residual_linear",
    "runs_as",
    "stream_dtype",
]

_ENABLED = True


def inference_fusion_enabled() -> bool:
    """Whether eval-mode modules may run their folded (reparameterised) form."""
    return _ENABLED


class inference_fusion:  # noqa: N801 - lower case like torch.set_grad_enabled, which it mirrors
    """Switch inference-time folding on or off (globally, not per thread).

    Like ``torch.set_grad_enabled`` it works both ways: as a plain call it sets the switch until the next call,
    and in a ``with`` block it restores the previous setting on leaving the block (also on an exception).

    >>> import fastervit, torch
    >>> model = fastervit.create_model("faster_vit_0_any_res", resolution=[64, 64]).eval()
    >>> x = torch.randn(1, 3, 64, 64)
    >>> with torch.no_grad(), inference_fusion(False):
    ...     plain = model(x)
    >>> with torch.no_grad():
    ...     torch.allclose(model(x), plain, rtol=1e-4, atol=1e-5)
    True
    >>> _ = inference_fusion(False)  # a plain call: off from here on
    >>> inference_fusion_enabled()
    False
    >>> _ = inference_fusion(True)
    """

    def __init__(self, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"inference_fusion takes True or False, got {type(enabled).__name__} {enabled!r}")
        global _ENABLED
        self.enabled = bool(enabled)
        self.previous, _ENABLED = _ENABLED, self.enabled

    def __call__(self, fn: Callable) -> Callable:
        """As a decorator: ``fn`` runs with the setting, which applies per call (the construction's global change
        is undone, as ``torch.set_grad_enabled`` does)."""
        global _ENABLED
        _ENABLED = self.previous
        enabled = self.enabled

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with inference_fusion(enabled):
                return fn(*args, **kwargs)

        return wrapper

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        global _ENABLED
        _ENABLED = self.previous

    def __repr__(self) -> str:
        return f"inference_fusion({self.enabled})"


def _not_foldable_below(module: nn.Module) -> bool:
    """Whether a submodule of ``module`` must run as itself, which the folded form (it skips their calls) cannot
    do (see :func:`~hatplug.layers._cache.must_run_below`)."""
    return must_run_below(module, folding=True)


_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def fusion_active(module: nn.Module, *inputs: Tensor | None) -> bool:
    """True where ``module`` may run its folded form: fusion enabled, ``module`` and every submodule in eval
    mode, no tracer/compiler, no ``torch.func`` transform (``vmap``, ``grad``) over ``inputs``, no autograd through
    its parameters or ``inputs``, no hooks on its submodules (the folded form skips their calls) and no BatchNorm
    without running statistics."""
    if not _ENABLED or module.training or _tracing() or _not_foldable_below(module):
        return False
    # inside torch.func transforms (vmap has no batching rule for the folded forms' out= writes): the plain form
    if any(t is not None and _functorch_wrapped(t) for t in inputs):
        return False
    if torch.is_grad_enabled():
        if any(t is not None and t.requires_grad for t in inputs):
            return False
        if any(p.requires_grad for p in module.parameters()):
            return False
    return True


def _channel_view(v: Tensor, ndim: int) -> Tensor:
    return v.view(-1, *([1] * (ndim - 1)))


def fold_batchnorm(
    weight: Tensor, bias: Tensor | None, bn: nn.modules.batchnorm._BatchNorm, scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(w', b')`` such that ``scale * bn(conv(x; weight, bias)) == conv(x; w', b')`` with ``bn`` in eval mode.

    Args:
        weight: ``(out, ...)`` weight of the conv (or linear) before ``bn``.
        bias: its ``(out,)`` bias, or ``None``.
        bn: a BatchNorm with running statistics.
        scale: optional per-channel factor applied after ``bn`` (a layer scale), ``(out,)``.

    >>> conv, bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4).eval()
    >>> _ = bn.running_var.uniform_(0.5, 2.0), bn.running_mean.normal_()
    >>> w, b = fold_batchnorm(conv.weight, conv.bias, bn)
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.allclose(bn(conv(x)), torch.nn.functional.conv2d(x, w, b), atol=1e-5)
    True
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics normalises with batch statistics: it cannot be folded")
    # folded in (at least) float32, as BatchNorm computes its statistics, then stored in the weight's dtype
    dtype = torch.promote_types(weight.dtype, torch.float32)
    factor = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        factor = factor * bn.weight.to(dtype)
    mean = bn.running_mean.to(dtype)
    shift = -mean if bias is None else bias.to(dtype) - mean
    shift = shift * factor
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    if scale is not None:
        factor, shift = factor * scale.to(dtype), shift * scale.to(dtype)
    folded = weight.to(dtype) * _channel_view(factor, weight.ndim)
    return folded.to(weight.dtype), shift.to(weight.dtype)


def fold_scale(weight: Tensor, bias: Tensor | None, scale: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(w', b')`` with ``scale * linear(x; weight, bias) == linear(x; w', b')`` (a layer scale folded into the
    projection before it; also for convs, ``scale`` per output channel).

    >>> lin, gamma = nn.Linear(4, 3), torch.rand(3)
    >>> w, b = fold_scale(lin.weight, lin.bias, gamma)
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(gamma * lin(x), torch.nn.functional.linear(x, w, b))
    True
    """
    scale = scale.to(weight.dtype)
    return weight * _channel_view(scale, weight.ndim), None if bias is None else bias * scale


#: what a folded conv + BatchNorm may stand for: the classes whose eval call is ``(x - mean) / sqrt(var + eps) * weight
#: + bias`` with the module's own running statistics (timm's ``freeze_batch_norm_2d`` makes torchvision's)
BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)


def runs_as(module: nn.Module | None, *classes: type) -> bool:
    """Whether calling ``module`` runs the call of one of ``classes``: an instance of one whose class overrides
    neither ``forward`` nor (for convs) ``_conv_forward`` (a parametrized layer qualifies: its weight is a property
    but its call is the stock one). A folded form reads such a module's tensors and skips its call, so it must
    check this: a LoRA wrapper, a subclass with its own ``forward`` or a dynamically quantized linear is called as
    itself on the plain path instead.

    >>> lin = nn.Linear(2, 2)
    >>> runs_as(lin, nn.Linear), runs_as(nn.utils.parametrizations.weight_norm(lin), nn.Linear)
    (True, True)
    >>> class Shifted(nn.Linear):
    ...     def forward(self, x):
    ...         return super().forward(x) + 1
    >>> runs_as(Shifted(2, 2), nn.Linear), runs_as(nn.Conv2d(1, 1, 1), nn.Linear)
    (False, False)
    """
    cls = type(module)
    if cls in classes:  # the common case, in a tenth of the time of the loop
        return True
    for base in classes:
        if (
            issubclass(cls, base)
            and cls.forward is base.forward
            and getattr(cls, "_conv_forward", None) is getattr(base, "_conv_forward", None)
        ):
            return True
    return False


def passes_through(*modules: nn.Module) -> bool:
    """Whether each module (dropout, drop path, identity) is the identity as it stands: in eval mode, or with
    a zero rate. A folded path that skips them must check this (MC dropout re-enables dropout in eval)."""
    for m in modules:
        if not m.training or isinstance(m, nn.Identity):
            continue
        if getattr(m, "p", getattr(m, "drop_prob", None)) != 0:
            return False
    return True


def is_channels_last(x: Tensor) -> bool:
    """Whether a 4-D map is channels-last strided and not also contiguous (as a 1x1 map is): the layout
    oneDNN then runs a conv in, and the one whose dense NHWC view :func:`gelu_` uses. False under
    ``torch.func.vmap``, whose batched tensors have no memory format to query (it raises)."""
    if x.dim() != 4 or x.is_contiguous():
        return False
    try:
        return x.is_contiguous(memory_format=torch.channels_last)
    except RuntimeError:
        return False


_GELU_ = getattr(torch._C._nn, "gelu_", None)


def gelu_(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU in place on a fresh activation (saves allocating, and first touching, a second buffer of its
    size); exactly ``F.gelu``'s values. A channels-last map goes through its dense NHWC view: torch 2.15
    runs GELU on channels-last strides through a slower non-vectorised loop (1.5x the time) whose values
    differ from the NCHW ones in the last bit, while the dense view gives exactly the NCHW values."""
    if is_channels_last(x):
        return gelu_(x.permute(0, 2, 3, 1), approximate).permute(0, 3, 1, 2)
    if _GELU_ is None or not x.is_contiguous():
        return F.gelu(x, approximate=approximate)
    return _GELU_(x, approximate=approximate)


def mlp_hidden(mlp: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """For a timm ``Mlp`` (``fc1, act, drop1, norm, fc2, drop2``) whose ``fc2`` is a linear layer: the part before
    ``fc2`` (with an exact ``nn.GELU`` applied in place), or ``None`` for any other module (another MLP, such as
    ``GluMlp``, an ``Mlp`` subclass with its own ``forward``, or an ``fc2`` that must be called as itself, see
    :func:`runs_as`): the folded forms then run the plain one."""
    if not runs_as(mlp, Mlp) or not runs_as(mlp.fc2, nn.Linear):
        return None
    act = mlp.act
    if type(act) is nn.GELU:
        return lambda x: mlp.norm(mlp.drop1(gelu_(mlp.fc1(x), act.approximate)))
    return lambda x: mlp.norm(mlp.drop1(act(mlp.fc1(x))))


def stream_dtype(x: Tensor, *terms: Tensor | None) -> torch.dtype:
    """The dtype of a residual stream ``x`` after the plain (unfolded) form has added terms involving ``terms``
    (layer scales, position embeddings, carrier tokens): type promotion over them.

    Under autocast a float32 layer scale turns a half-precision stream into float32 in the plain form
    (``x + gamma * branch``); a folded form, which has the scale inside a GEMM's weights, casts the stream to
    this dtype first so that it keeps the same precision and gives the same dtype. Without autocast every term
    has the stream's dtype and this is ``x.dtype``.

    >>> x = torch.zeros(2, dtype=torch.bfloat16)
    >>> stream_dtype(x, None, torch.ones(2))
    torch.float32
    """
    dtype = x.dtype
    for t in terms:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def residual_linear(x: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x + F.linear(h, weight, bias)`` for a residual branch that ends in a linear layer.

    ``F.linear`` copies the bias into a new output and lets the GEMM accumulate into it, and the residual
    add is one more pass over the output; here the residual and the bias are summed in that first pass
    and the GEMM accumulates into the sum (``addmm_``), which saves a full read and write of the tokens.
    The same terms are added in another order, so results agree to float32 rounding. Falls back to the
    plain expression where the dtypes differ or autocast is on.

    >>> x, h, lin = torch.randn(2, 5, 4), torch.randn(2, 5, 8), nn.Linear(8, 4)
    >>> torch.allclose(residual_linear(x, h, lin.weight, lin.bias), x + lin(h), atol=1e-6)
    True
    """
    if (
        torch.is_autocast_enabled(x.device.type)
        or not (x.dtype == h.dtype == weight.dtype)
        or x.shape[:-1] != h.shape[:-1]
        or x.shape[-1] != weight.shape[0]
    ):
        return x + F.linear(h, weight, bias)
    out = (x + bias if bias is not None else x.clone()).contiguous()
    out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), weight.t())
    return out
