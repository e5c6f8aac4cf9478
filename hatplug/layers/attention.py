"""Attention of HAT: FasterViT's biased window attention, and the window attention of converted models.

:class:`BiasedAttention` is FasterViT's (``softmax(q k^T * scale + bias) v`` through fused SDPA).
:class:`CarrierWindowAttention` is what a converted model's window attention becomes: attention over
``[carrier tokens of the window; window tokens]`` with the model's own projections and position bias,
either as the paper's joint softmax or gated so that it starts out as the original window attention.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import refuse_scripting
from .fusion import fusion_active
from .pos_embed import ContinuousPositionBias, _tracing

__all__ = ["BiasedAttention", "CarrierWindowAttention", "gated_carrier_attention", "merge_heads"]


def _onnx_export() -> bool:
    """An ONNX export through ``torch.export`` (the ``dynamo=True`` exporter) is recording the forward."""
    return torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export()


def merge_heads(x: Tensor) -> Tensor:
    """``(B_, heads, N, hd)`` -> ``(B_, N, heads * hd)``: an attention output with its heads side by side.

    A view where the layout allows (SDPA's CPU kernels return one), a copy otherwise. In an ONNX export by
    ``torch.export`` (``torch.onnx.export(..., dynamo=True)``) it always copies: the export records SDPA with its
    CPU kernel's output layout, where the reshape is a view, and the ONNX exporter then decomposes SDPA into ops
    laid out ``(B_, heads, N, hd)``, where that view fails. Other exports keep the view.

    >>> merge_heads(torch.zeros(2, 4, 5, 8)).shape
    torch.Size([2, 5, 32])
    """
    x = x.transpose(1, 2)
    if _onnx_export():
        x = x.clone(memory_format=torch.contiguous_format)
    return x.flatten(2)


class BiasedAttention(nn.Module):
    """Self-attention over a token sequence with a learned additive bias (FasterViT's ``WindowAttention``).

    ``softmax(q k^T * scale + bias) v`` runs in ``F.scaled_dot_product_attention``; the bias comes from
    ``pos_emb_funct`` (a :class:`ContinuousPositionBias`, cached in eval mode).

    Args:
        dim: token width.
        num_heads: attention heads; ``dim`` must be divisible by it.
        window_size: ``(h, w)`` grid that the relative bias covers, or ``None`` for no bias (plain
            multi-head attention, as the carrier-token attention of converted models, whose CT grid
            follows the input size).
        num_prefix_tokens: leading tokens (carrier tokens) that get no relative bias.
        qkv_bias: bias in the qkv projection.
        qk_scale: override of ``head_dim ** -0.5``.
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout after the output projection.
        token_order: permutation of the sequence relative to raster order (see the bias).

    Input and output: ``(B_, N, C)`` with ``N = num_prefix_tokens + h * w``.

    >>> import torch
    >>> attn = BiasedAttention(64, num_heads=2, window_size=(7, 7), num_prefix_tokens=4)
    >>> attn(torch.randn(3, 53, 64)).shape
    torch.Size([3, 53, 64])
    """

    __prepare_scriptable__ = refuse_scripting  # torch.jit.script: a named error, not a parser trace

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, int] | None,
        num_prefix_tokens: int = 0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        token_order: Tensor | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be at least 1, got {num_heads}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if not 0 <= attn_drop <= 1:
            raise ValueError(f"attn_drop is a dropout probability, between 0 and 1, got {attn_drop!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        if qk_scale is not None and (
            isinstance(qk_scale, bool) or not isinstance(qk_scale, numbers.Real) or not qk_scale > 0
        ):  # 0 used to fall back to the default silently (the official ``qk_scale or ...``)
            raise ValueError(f"qk_scale must be a positive number, or None for head_dim ** -0.5; got {qk_scale!r}")
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pos_emb_funct = (
            None
            if window_size is None
            else ContinuousPositionBias(num_heads, window_size, num_prefix_tokens, token_order)
        )

    def attend(self, x: Tensor) -> Tensor:
        """The attention before the output projection: ``(B_, N, C)`` -> ``(B_, N, C)``."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B_, heads, N, hd)
        bias = None if self.pos_emb_funct is None else self.pos_emb_funct().to(q.dtype)  # (1, heads, N, N)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        return merge_heads(x)

    def _check_tokens(self, x: Tensor) -> None:
        """A named error for tokens of another width or, with a position bias, another count."""
        C = self.num_heads * self.head_dim
        n = getattr(self.pos_emb_funct, "seq_len", None)  # a bias of other code (an ablation's) may have none
        if x.dim() != 3 or x.shape[2] != C or (n is not None and x.shape[1] != n):
            count = "N" if n is None else f"{n} (the window its position bias covers, with its prefix tokens)"
            raise ValueError(
                f"{type(self).__name__} takes (B, N, {C}) tokens with N = {count}, got shape {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        if not _tracing():  # not in attend: a HATBlock's folded form calls that on tokens it has checked itself
            self._check_tokens(x)
        return self.proj_drop(self.proj(self.attend(x)))


def _add_window_bias(logits: Tensor, bias: Tensor | None, mask: Tensor | None) -> Tensor:
    """Window logits ``(B_, h, N, N)`` plus the position bias ``(1, h, N, N)`` and the per-window shift mask
    ``(nW, N, N)``; ``B_`` is batch-major over windows."""
    if bias is not None:
        logits += bias  # in place: a fresh matmul output
    if mask is not None:
        # not in place through a view: the TorchScript ONNX exporter would lose it
        nw, heads, N = mask.shape[0], logits.shape[1], logits.shape[2]
        logits = (logits.view(-1, nw, heads, N, N) + mask.unsqueeze(1)).view(-1, heads, N, N)
    return logits


def _mix_softmaxes(
    l_win: Tensor, l_ct: Tensor, v_win: Tensor, v_ct: Tensor, gate: Tensor, attn_drop: nn.Module | None
) -> Tensor:
    """``lerp(softmax(l_win) v_win, softmax(l_ct) v_ct, gate * w_ct)``, ``w_ct`` the CT keys' share of the
    joint softmax; each softmax on its own, so both stay exact whichever side has the larger logits."""
    # the maxima only keep exp() in range; softmax does not depend on them, so they carry no gradient
    m_win = l_win.detach().amax(-1, keepdim=True)
    m_ct = l_ct.detach().amax(-1, keepdim=True)
    p_win = l_win.sub_(m_win).exp_()  # in place: the logits are not needed again
    p_ct = l_ct.sub_(m_ct).exp_()
    s_win = p_win.sum(-1, keepdim=True)
    s_ct = p_ct.sum(-1, keepdim=True)
    if attn_drop is not None:
        p_win, p_ct = attn_drop(p_win), attn_drop(p_ct)
    o_win = (p_win @ v_win) / s_win
    o_ct = (p_ct @ v_ct) / s_ct
    w_ct = torch.sigmoid((m_ct + s_ct.log()) - (m_win + s_win.log()))  # (B_, h, rows, 1)
    # in the activations' dtype: under autocast they are half precision while the gate stays float32
    return torch.lerp(o_win, o_ct.to(o_win.dtype), (gate.view(1, -1, 1, 1) * w_ct).to(o_win.dtype))


def gated_carrier_attention(
    carriers: tuple[Tensor, Tensor, Tensor],
    window: tuple[Tensor, Tensor, Tensor],
    gate: Tensor,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    attn_drop: nn.Module | None = None,
) -> tuple[Tensor, Tensor]:
    """Window attention that mixes the original window softmax and the joint softmax over ``[CTs; window]``.

    For every query (window tokens and carrier tokens alike), with its logits ``l_win`` against the window
    keys and ``l_ct`` against the window's carrier-token keys, ``o_window = softmax(l_win) v_win`` is the
    original window attention and ``o_joint = softmax([l_ct, l_win]) [v_ct; v_win]`` the paper's HAT
    attention. The result is ``o_window + gate * (o_joint - o_window)`` per head: ``gate = 0`` computes the
    original function exactly, ``gate = 1`` the joint softmax. Both come from one set of logits: with
    ``o_ct = softmax(l_ct) v_ct`` and ``w_ct`` the share of the CT keys in the joint softmax (a sigmoid of
    the difference of the two log-sum-exps), ``o_joint = o_window + w_ct * (o_ct - o_window)``.

    The window queries' logits against the window keys are exactly the original ones (bias and shift mask
    included), computed as the original computes them; carrier tokens get no bias and no mask.

    Args:
        carriers: ``q, k, v`` of the carrier tokens, each ``(B_, h, n, hd)``; ``q`` already scaled
            (``q * scale``, or the cosine form).
        window: ``q, k, v`` of the window tokens, each ``(B_, h, N, hd)``.
        gate: ``(h,)``.
        bias: window position bias ``(1, h, N, N)`` or ``None``.
        mask: shifted-window mask ``(nW, N, N)`` (0 / -100) or ``None``; ``B_`` is batch-major over windows.
        attn_drop: dropout applied to the attention weights.

    Returns:
        The outputs of the carrier tokens ``(B_, h, n, hd)`` and of the window tokens ``(B_, h, N, hd)``.

    >>> q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    >>> ct, win = (t[:, :, :1] for t in (q, k, v)), (t[:, :, 1:] for t in (q, k, v))
    >>> _, out = gated_carrier_attention(tuple(ct), tuple(win), gate=torch.zeros(2))
    >>> torch.allclose(out, torch.softmax(q[:, :, 1:] @ k[:, :, 1:].transpose(-2, -1), -1) @ v[:, :, 1:], atol=1e-6)
    True
    """
    q_ct, k_ct, v_ct = carriers
    q_win, k_win, v_win = window
    k_ct_t, k_win_t = k_ct.transpose(-2, -1), k_win.transpose(-2, -1)
    out_win = _mix_softmaxes(
        _add_window_bias(q_win @ k_win_t, bias, mask), q_win @ k_ct_t, v_win, v_ct, gate, attn_drop
    )  # the window queries: the original logits, plus those against the CTs
    out_ct = _mix_softmaxes(q_ct @ k_win_t, q_ct @ k_ct_t, v_win, v_ct, gate, attn_drop)
    return out_ct, out_win


def _pad_mask(bias: Tensor | None, mask: Tensor | None, pad: tuple[int, int, int, int]) -> Tensor | None:
    """The additive mask of a ``[CTs; window]`` sequence: the window bias ``(1, h, N, N)`` plus the shift mask
    ``(nW, 1, N, N)``, zero-padded for the carrier tokens' rows / columns (``pad`` as for ``F.pad``)."""
    if bias is None and mask is None:
        return None
    if mask is None:
        return F.pad(bias, pad)
    if bias is None:
        return F.pad(mask, pad)
    return F.pad(bias + mask, pad)  # (nW, h, L, L')


def _window_chunks(batch_windows: int, attn_mask: Tensor | None) -> list[tuple[int, int]]:
    """Slices of the windows ``(B_ = B * nW, ...)``, batch-major, that one SDPA call can take with ``attn_mask``.

    A per-window mask ``(nW, h | 1, L, L')`` does not broadcast over ``B_``; viewing the windows as
    ``(B, nW, ...)`` would make the inputs 5D, which sends SDPA to its unfused math kernel (3x the time
    here). Instead each image's windows get their own call of the fused kernel."""
    if attn_mask is None or attn_mask.shape[0] == 1:
        return [(0, batch_windows)]
    nw = attn_mask.shape[0]
    return [(i, i + nw) for i in range(0, batch_windows, nw)]


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _few_keys_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(softmax(q k^T) v, logsumexp(q k^T))`` for a handful of keys (the carrier tokens of a window):
    plain batched matmuls, 0.66x the time of the fused kernel, whose cost per (window, head) does not shrink
    with the number of keys."""
    logits = torch.matmul(q, k.transpose(-2, -1))  # (B_, h, L, n)
    lse = torch.logsumexp(logits, dim=-1)
    return torch.matmul(logits.sub_(lse.unsqueeze(-1)).exp_(), v), lse


class CarrierWindowAttention(nn.Module):
    """Window attention over ``[carrier tokens of the window; window tokens]``, built around a model's own
    projections, for the blocks that :func:`hatplug.convert` makes.

    Subclasses say how the family projects and scores tokens:

    * :meth:`project`: ``x (B_, L, C)`` -> ``q, k, v`` each ``(B_, h, L, hd)``, ``q`` already scaled;
    * :meth:`window_bias`: the relative position bias of the window, ``(1, h, N, N)``, or ``None``.

    With ``gated=True`` (``init="identity"``) the attention is :func:`gated_carrier_attention` with a
    per-head gate ``hat_gate`` that starts at 0: the block computes exactly the original window
    attention and the gate learns how much of the joint softmax to use. With ``gated=False``
    (``init="random"``) it is the paper's joint softmax over the whole sequence, through
    ``F.scaled_dot_product_attention``. Carrier tokens get no relative bias and no shift mask (zero rows
    and columns), as in FasterViT.

    ``forward(ct_windows (B_, n, C), windows (B_, N, C), mask (nW, N, N) | None)`` returns the outputs of
    both, ``(B_, n, C)`` and ``(B_, N, C)``.
    """

    def __init__(
        self,
        num_heads: int,
        qkv: nn.Module,
        proj: nn.Module,
        attn_drop: float,
        proj_drop: nn.Module,
        gated: bool,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = qkv
        self.proj = proj
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = proj_drop
        self.hat_gate = self.closed_gate(num_heads, proj.weight) if gated else None

    @staticmethod
    def closed_gate(num_heads: int, like: Tensor) -> nn.Parameter:
        """A per-head gate at 0 (the original attention), on ``like``'s device and in its dtype."""
        return nn.Parameter(torch.zeros(num_heads, device=like.device, dtype=like.dtype))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def window_bias(self) -> Tensor | None:
        return None

    def attend(self, ct_windows: Tensor, windows: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The attention before the output projection, for the CTs ``(B_, n, h * hd)`` and the window tokens
        ``(B_, N, h * hd)``."""
        n, N = ct_windows.shape[1], windows.shape[1]
        bias = self.window_bias()
        if fusion_active(self, ct_windows, windows):
            x = self._fused_attention(ct_windows, windows, bias, mask)
            return x[:, :n], x[:, n:]
        if self.hat_gate is not None:
            drop = self.attn_drop if self.training and self.attn_drop.p > 0 else None
            carriers, window = self.project(ct_windows), self.project(windows)
            bias = None if bias is None else bias.to(window[0].dtype)
            ct_out, out = gated_carrier_attention(carriers, window, self.hat_gate, bias, mask, drop)
        else:
            q, k, v = self.project(torch.cat((ct_windows, windows), dim=1))  # (B_, h, n + N, hd)
            bias = None if bias is None else bias.to(q.dtype)
            ct_out, out = self.joint_attention(q, k, v, n, bias, mask).split([n, N], dim=2)
        return merge_heads(ct_out), merge_heads(out)

    def _fused_attention(self, ct_windows: Tensor, windows: Tensor, bias: Tensor | None, mask: Tensor | None) -> Tensor:
        """Inference form of both modes in fused kernels; ``(B_, n + N, h * hd)``, heads merged, before ``proj``.

        One qkv projection of ``[CTs; window]``. ``gated=False``: the joint softmax in one SDPA call.
        ``gated=True``: the window-only softmax in SDPA's fused CPU kernel, which also returns its
        log-sum-exp, the softmax over the window's few carrier-token keys in plain matmuls, and per head
        ``lerp(window, joint, gate)`` with ``joint = window + w_ct * (ct - window)``, ``w_ct`` the CT keys'
        share of the joint softmax (a sigmoid of the difference of the log-sum-exps): exactly the window
        attention at ``gate = 0``. Results are written straight into the merged-heads layout. Equal to the
        training form up to float32 rounding.
        """
        B_, n = windows.shape[0], ct_windows.shape[1]
        q, k, v = self.project(torch.cat((ct_windows, windows), dim=1))  # (B_, h, L, hd)
        if q.dtype != v.dtype or k.dtype != v.dtype:  # autocast with SwinV2's cosine attention: float32 q, k
            q, k = q.to(v.dtype), k.to(v.dtype)  # as autocast's own matmul of q and k would cast them
        h, L, hd = q.shape[1], q.shape[2], q.shape[3]
        bias = None if bias is None else bias.to(q.dtype)
        mask = None if mask is None else mask.to(q.dtype).unsqueeze(1)  # (nW, 1, N, N)
        out = q.new_empty((B_, L, h, hd))
        merged = out.transpose(1, 2)  # (B_, h, L, hd) view of the output
        if self.hat_gate is None:
            joint_mask = _pad_mask(bias, mask, (n, 0, n, 0))
            for i, j in _window_chunks(B_, joint_mask):
                merged[i:j] = F.scaled_dot_product_attention(q[i:j], k[i:j], v[i:j], attn_mask=joint_mask, scale=1.0)
            return out.view(B_, L, h * hd)
        gate = self.hat_gate.view(1, -1, 1, 1).to(q.dtype)
        window_mask = _pad_mask(bias, mask, (0, 0, n, 0))  # CT queries: no bias and no mask on window keys
        k_win, v_win = k[:, :, n:], v[:, :, n:]
        if _FLASH_CPU is not None and q.device.type == "cpu":
            o_ct, lse_ct = _few_keys_attention(q, k[:, :, :n], v[:, :, :n])
            try:
                for i, j in _window_chunks(B_, window_mask):
                    o_win, lse_win = _FLASH_CPU(q[i:j], k_win[i:j], v_win[i:j], attn_mask=window_mask, scale=1.0)
                    w_ct = torch.sigmoid(lse_ct[i:j] - lse_win).unsqueeze(-1).to(q.dtype).mul_(gate)
                    torch.lerp(o_win, o_ct[i:j], w_ct, out=merged[i:j])
                return out.view(B_, L, h * hd)
            except (RuntimeError, TypeError):  # a build or dtype the private kernel does not take
                pass
        joint_mask = _pad_mask(bias, mask, (n, 0, n, 0))
        for i, j in _window_chunks(B_, window_mask):
            joint = F.scaled_dot_product_attention(q[i:j], k[i:j], v[i:j], attn_mask=joint_mask, scale=1.0)
            window = F.scaled_dot_product_attention(q[i:j], k_win[i:j], v_win[i:j], attn_mask=window_mask, scale=1.0)
            torch.lerp(window, joint, gate, out=merged[i:j])
        return out.view(B_, L, h * hd)

    def forward(self, ct_windows: Tensor, windows: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if fusion_active(self, ct_windows, windows):
            # inference: one output projection for the CTs and the window tokens together
            n = ct_windows.shape[1]
            x = self.proj_drop(self.proj(self._fused_attention(ct_windows, windows, self.window_bias(), mask)))
            return x[:, :n], x[:, n:]
        ct_out, out = self.attend(ct_windows, windows, mask)
        return self.proj_drop(self.proj(ct_out)), self.proj_drop(self.proj(out))

    def joint_attention(
        self, q: Tensor, k: Tensor, v: Tensor, n: int, bias: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """The paper's joint softmax over ``[CTs; window]`` through SDPA; ``(B_, h, n + N, hd)``."""
        dropout_p = self.attn_drop.p if self.training else 0.0
        if bias is None and mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=1.0)
        attn_mask = 0.0
        if bias is not None:
            attn_mask = F.pad(bias, (n, 0, n, 0))  # (1, h, L, L)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=1.0)
        nw = mask.shape[0]
        attn_mask = attn_mask + F.pad(mask, (n, 0, n, 0)).unsqueeze(1)  # (nW, h | 1, L, L)
        B_, h, L, hd = q.shape
        if _onnx_export():  # ONNX's attention takes 4D inputs: the mask repeated per image instead
            mask4 = attn_mask.repeat(B_ // nw, 1, 1, 1)  # (B_, h | 1, L, L), windows batch-major
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask4, dropout_p=dropout_p, scale=1.0)
        # windows are batch-major, so (B, nW, ...) views line the mask up with its window
        q, k, v = (t.view(-1, nw, h, L, hd) for t in (q, k, v))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=1.0)
        return x.view(B_, h, L, hd)
