"""Converted blocks against a slow reference written here: explicit loops over images and windows, plain
softmax, position biases and shift masks looked up per token pair, nearest upsampling by index arithmetic.
It shares no code with hatplug beyond reading the blocks' weights (and calling their norms, MLPs and convs).

Every block gets non-trivial weights, random carrier tokens, open gates and propagation scales, and maps that
are not multiples of the window, so that padding, the shift mask, the gate and propagation all matter.
"""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import hatplug

from .conftest import FAMILIES, make_model, open_gates, rel_diff

TOL = dict(rtol=1e-4, atol=1e-5)


def lin(x, layer):
    return F.linear(x, layer.weight, layer.bias)


def softmax_attention(q, k, v, bias, n, gate):
    """``q, k, v (heads, L, hd)``, ``bias (heads, L, L)``: joint softmax, or the gated mix with the window-only
    softmax over the keys after the first ``n``."""
    logits = q @ k.transpose(-1, -2) + bias
    joint = torch.softmax(logits, -1) @ v
    if gate is None:
        return joint
    window = torch.softmax(logits[..., n:], -1) @ v[:, n:]
    return window + gate.view(-1, 1, 1) * (joint - window)


def heads_of(x, qkv_out, heads):
    L = x.shape[0]
    return qkv_out.view(L, 3, heads, -1).permute(1, 2, 0, 3)  # 3 x (heads, L, hd)


def merge_heads(o):
    return o.transpose(0, 1).reshape(o.shape[1], -1)


def plain_mha(x, attn):
    q, k, v = heads_of(x, lin(x, attn.qkv), attn.num_heads)
    return lin(merge_heads(torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1) @ v), attn.proj)


def carrier_half(blk, ct, n_h, n_w):
    """CT position embedding (centres of the CTs in normalised image coordinates, window by window), then
    attention + MLP over all CTs of one image."""
    c = blk.ct_size
    coords = [
        [(2 * (i * c + a) + 1) / (n_h * c) - 1, (2 * (j * c + b) + 1) / (n_w * c) - 1]
        for i in range(n_h)
        for j in range(n_w)
        for a in range(c)
        for b in range(c)
    ]
    ct = ct + blk.hat_pos_embed.cpb_mlp(torch.tensor(coords))
    ct = ct + plain_mha(blk.hat_norm1(ct), blk.hat_attn)
    return ct + blk.hat_mlp(blk.hat_norm2(ct))


def tokenizer(tok, x):
    """One image ``(C, H, W)``: zero-pad to whole windows, depthwise conv, FasterViT's pooling by loops."""
    wh, ww = tok.window_size
    c = tok.ct_size
    H, W = x.shape[1:]
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    x = F.pad(x, (0, Wp - W, 0, Hp - H))
    x = tok.pos_embed(x[None])[0]
    out_h, out_w = c * Hp // wh, c * Wp // ww
    stride_h, stride_w = Hp // out_h, Wp // out_w
    kernel_h, kernel_w = Hp - (out_h - 1) * stride_h, Wp - (out_w - 1) * stride_w
    tokens = []
    for i in range(Hp // wh):
        for j in range(Wp // ww):
            for a in range(c):
                for b in range(c):
                    r, s = (i * c + a) * stride_h, (j * c + b) * stride_w
                    tokens.append(x[:, r : r + kernel_h, s : s + kernel_w].mean((1, 2)))
    return torch.stack(tokens)


def region(r, size, window, shift):
    """Swin's region label of row/column ``r`` of the padded, rolled map (0 without shift)."""
    if shift == 0 or r < size - window:
        return 0
    return 1 if r < size - shift else 2


def propagate(x, cts, scale, window, ct_size):
    """Add each window's CTs, upsampled by nearest neighbour, to the (unshifted) map ``x (H, W, C)``."""
    wh, ww = window
    n_w = math.ceil(x.shape[1] / ww)
    out = x.clone()
    for r in range(x.shape[0]):
        for s in range(x.shape[1]):
            w = (r // wh) * n_w + s // ww
            a, b = (r % wh) * ct_size // wh, (s % ww) * ct_size // ww
            out[r, s] = out[r, s] + scale * cts[w * ct_size * ct_size + a * ct_size + b]
    return out


def swin_reference(blk, x, ct, v2):
    attn = blk.attn
    (wh, ww), (sh, sw) = blk.window_size, blk.shift_size
    B, H, W, C = x.shape
    n, N, heads = blk.ct_size**2, wh * ww, attn.num_heads
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    n_h, n_w = Hp // wh, Wp // ww
    # the window bias, pair by pair
    pos = [(p // ww, p % ww) for p in range(N)]
    bias = torch.zeros(heads, N, N)
    for p, (yp, xp) in enumerate(pos):
        for q, (yq, xq) in enumerate(pos):
            dy, dx = yp - yq + wh - 1, xp - xq + ww - 1
            if v2:
                bias[:, p, q] = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table[0, dy, dx]))
            else:
                bias[:, p, q] = attn.relative_position_bias_table[dy * (2 * ww - 1) + dx]

    def qkv(seq):
        if v2:
            weight_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
            q, k, v = heads_of(seq, F.linear(seq, attn.qkv.weight, weight_bias), heads)
            scale = torch.clamp(attn.logit_scale, max=math.log(100.0)).exp()
            return F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1), v
        q, k, v = heads_of(seq, lin(seq, attn.qkv), heads)
        return q * attn.scale, k, v

    out_x, out_ct = [], []
    for b in range(B):
        cts = carrier_half(blk, ct[b], n_h, n_w)
        tokens = x[b] if v2 else blk.norm1(x[b])
        tokens = F.pad(torch.roll(tokens, (-sh, -sw), (0, 1)), (0, 0, 0, Wp - W, 0, Hp - H))
        y = torch.zeros(Hp, Wp, C)
        ct_y = torch.zeros_like(cts)
        for i in range(n_h):
            for j in range(n_w):
                w = i * n_w + j
                window = tokens[i * wh : (i + 1) * wh, j * ww : (j + 1) * ww].reshape(N, C)
                carriers = cts[w * n : (w + 1) * n] if v2 else blk.norm1(cts[w * n : (w + 1) * n])
                full = torch.zeros(heads, n + N, n + N)
                full[:, n:, n:] = bias
                for p, (yp, xp) in enumerate(pos):
                    for q, (yq, xq) in enumerate(pos):
                        rp = (region(i * wh + yp, Hp, wh, sh), region(j * ww + xp, Wp, ww, sw))
                        rq = (region(i * wh + yq, Hp, wh, sh), region(j * ww + xq, Wp, ww, sw))
                        if rp != rq:
                            full[:, n + p, n + q] -= 100.0
                o = lin(merge_heads(softmax_attention(*qkv(torch.cat((carriers, window))), full, n, attn.hat_gate)),
                        attn.proj)  # fmt: skip
                y[i * wh : (i + 1) * wh, j * ww : (j + 1) * ww] = o[n:].view(wh, ww, C)
                ct_y[w * n : (w + 1) * n] = o[:n]
        y = torch.roll(y[:H, :W], (sh, sw), (0, 1))
        if v2:
            y, ct_y = blk.norm1(y), blk.norm1(ct_y)
        xb, cb = x[b] + y, cts + ct_y
        if v2:
            xb, cb = xb + blk.norm2(blk.mlp(xb)), cb + blk.norm2(blk.mlp(cb))
        else:
            xb, cb = xb + blk.mlp(blk.norm2(xb)), cb + blk.mlp(blk.norm2(cb))
        if blk.propagation_scale is not None:
            xb = propagate(xb, cb, blk.propagation_scale, (wh, ww), blk.ct_size)
        out_x.append(xb)
        out_ct.append(cb)
    return torch.stack(out_x), torch.stack(out_ct)


def _swin_block(name, init, block):
    hat = hatplug.convert(make_model(FAMILIES[name], 40), init=init)  # stage 0: 10x10 map, 4x4 windows, padded
    return open_gates(hat).layers[0].blocks[block]


@pytest.mark.parametrize("init", ["identity", "random"])
@pytest.mark.parametrize("block", [0, 1])  # 1: shifted, last of its stage (propagation)
@pytest.mark.parametrize("name", ["swin", "swinv2"])
def test_swin_blocks_match_reference(name, block, init):
    blk = _swin_block(name, init, block)
    assert blk.shift_size == ((2, 2) if block else (0, 0)) and (blk.propagation_scale is not None) == bool(block)
    x, ct = torch.randn(2, 10, 10, 16), torch.randn(2, 9 * 4, 16)
    with torch.no_grad():
        ours = blk(x, ct)
        ref = swin_reference(blk, x, ct, v2=name == "swinv2")
    torch.testing.assert_close(ours[0], ref[0], **TOL)
    torch.testing.assert_close(ours[1], ref[1], **TOL)


@pytest.mark.parametrize("init", ["identity", "random"])
def test_twins_attention_matches_reference(init):
    hat = open_gates(hatplug.convert(make_model(FAMILIES["twins"], 128), init=init))
    attn = hat.blocks[0][0].attn
    H, W, C, ws = 10, 16, attn.dim, attn.ws  # padded to 14 x 21: 2 x 3 windows
    x = torch.randn(2, H * W, C)
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    n_h, n_w, n, N = Hp // ws, Wp // ws, attn.ct_size**2, ws * ws
    expected = []
    with torch.no_grad():
        for b in range(2):
            xm = x[b].view(H, W, C)
            cts = carrier_half(attn, tokenizer(attn.carrier_tokenizer, xm.permute(2, 0, 1)), n_h, n_w)
            padded = F.pad(xm, (0, 0, 0, Wp - W, 0, Hp - H))
            y, ct_y = torch.zeros(Hp, Wp, C), torch.zeros_like(cts)
            for i in range(n_h):
                for j in range(n_w):
                    w = i * n_w + j
                    seq = torch.cat(
                        (cts[w * n : (w + 1) * n], padded[i * ws : (i + 1) * ws, j * ws : (j + 1) * ws].reshape(N, C))
                    )
                    q, k, v = heads_of(seq, lin(seq, attn.qkv), attn.num_heads)
                    zero = torch.zeros(attn.num_heads, n + N, n + N)
                    o = lin(merge_heads(softmax_attention(q * attn.scale, k, v, zero, n, attn.hat_gate)), attn.proj)
                    y[i * ws : (i + 1) * ws, j * ws : (j + 1) * ws] = o[n:].view(ws, ws, C)
                    ct_y[w * n : (w + 1) * n] = o[:n]
            y = propagate(y[:H, :W], cts + ct_y, attn.propagation_scale, (ws, ws), attn.ct_size)
            expected.append(y.reshape(H * W, C))
        torch.testing.assert_close(attn(x, (H, W)), torch.stack(expected), **TOL)


@pytest.mark.parametrize("init", ["identity", "random"])
def test_edgevit_block_matches_reference(init):
    hat = open_gates(hatplug.convert(make_model(FAMILIES["edgevit"], 128), init=init))
    blk = hat.blocks2.get_submodule("0.SelfAttn")  # sr_ratio 2, two heads, last block of its stage
    attn = blk.attn
    B, C, H, W = 2, 72, 10, 12  # padded to 14 x 14: 2 x 2 windows of 7
    ws, r, heads, n = 7, attn.sr_ratio, attn.num_heads, blk.ct_size**2
    x_in, ct = torch.randn(B, C, H, W), torch.randn(B, 4 * n, C)
    Hp, Wp, N = 14, 14, ws * ws
    out_x, out_ct = [], []
    with torch.no_grad():
        ours = blk(x_in, ct)
        x = x_in + blk.pos_embed(x_in)
        for b in range(B):
            tokens = x[b].permute(1, 2, 0)  # (H, W, C)
            cts = carrier_half(blk, ct[b], 2, 2)
            tn, cn = blk.norm1(tokens), blk.norm1(cts)
            padded = F.pad(tn, (0, 0, 0, Wp - W, 0, Hp - H))
            hat_map, ct_y = torch.zeros(Hp, Wp, C), torch.zeros_like(cts)
            for i in range(2):
                for j in range(2):
                    w = i * 2 + j
                    seq = torch.cat(
                        (cn[w * n : (w + 1) * n], padded[i * ws : (i + 1) * ws, j * ws : (j + 1) * ws].reshape(N, C))
                    )
                    q, k, v = heads_of(seq, lin(seq, attn.qkv), heads)
                    zero = torch.zeros(heads, n + N, n + N)
                    o = merge_heads(softmax_attention(q * attn.scale, k, v, zero, n, None))
                    hat_map[i * ws : (i + 1) * ws, j * ws : (j + 1) * ws] = o[n:].view(ws, ws, C)
                    ct_y[w * n : (w + 1) * n] = lin(o[:n], attn.proj)
            mixed = hat_map[:H, :W].reshape(H * W, C)
            if init == "identity":  # EdgeViT's global sparse attention among the delegates, then the gate
                delegates = tn[::r, ::r]
                h, w_ = delegates.shape[:2]
                d = delegates.reshape(-1, C)
                q, k, v = heads_of(d, lin(d, attn.qkv), heads)
                o = merge_heads(torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1) @ v)
                spread = attn.LocalProp(o.T.reshape(1, C, h, w_))[0, :, :H, :W]
                sparse = attn.norm(spread.reshape(C, -1).T)
                gate = attn.hat_gate.repeat_interleave(C // heads)
                mixed = sparse + gate * (mixed - sparse)
            t = tokens.reshape(H * W, C) + lin(mixed, attn.proj)
            c = cts + ct_y
            t, c = t + blk.mlp(blk.norm2(t)), c + blk.mlp(blk.norm2(c))
            t = propagate(t.view(H, W, C), c, blk.propagation_scale, (ws, ws), blk.ct_size)
            out_x.append(t.permute(2, 0, 1))
            out_ct.append(c)
    torch.testing.assert_close(ours[0], torch.stack(out_x), **TOL)
    torch.testing.assert_close(ours[1], torch.stack(out_ct), **TOL)


def test_carrier_tokens_of_a_converted_stage_match_reference():
    """The stage-level stream: CTs made once from the first converted block's input, then threaded."""
    hat = open_gates(hatplug.convert(make_model(FAMILIES["swin"], 40)))
    stage, original = hat.layers[0], make_model(FAMILIES["swin"], 40).layers[0]
    x = torch.randn(2, 10, 10, 16)
    with torch.no_grad():
        ct = torch.stack([tokenizer(stage.carrier_tokenizer, x[b].permute(2, 0, 1)) for b in range(2)])
        y, ct = swin_reference(stage.blocks[0], original.downsample(x), ct, v2=False)
        y, _ = swin_reference(stage.blocks[1], y, ct, v2=False)
        torch.testing.assert_close(stage(x), y, **TOL)


def _swin_stage_1(init):
    """Stage 1 of a small Swin, converted alone and in train mode: an 8x8 map (after PatchMerging) of 2x2
    windows of 4x4, ct_size 2, one unshifted block with propagation; every parameter nudged off its init."""
    torch.manual_seed(0)
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=64, embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
        window_size=4, num_classes=2, drop_path_rate=0.0,  # no DropPath rescaling in train mode
    )  # fmt: skip
    stage = hatplug.convert(swin, init=init, stages=[1]).train().layers[1]
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return stage


@pytest.mark.parametrize("init", ["identity", "random"])
def test_converted_stage_in_train_mode_matches_reference_with_gradients(init):
    """The whole stage (PatchMerging, tokenizer, HAT block, propagation) with autograd on, in train mode:
    outputs, the input gradient and every parameter gradient against the loop reference."""
    stage = _swin_stage_1(init)
    blk = stage.blocks[0]
    assert stage.training and blk.window_size == (4, 4) and blk.ct_size == 2 and blk.shift_size == (0, 0)
    assert blk.propagation_scale is not None
    names, params = zip(*stage.named_parameters())
    x = torch.randn(3, 16, 16, 32, requires_grad=True)
    y = stage(x)
    assert y.shape == (3, 8, 8, 64)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), (x, *params))

    x_ref = x.detach().clone().requires_grad_(True)
    merged = stage.downsample(x_ref)
    ct = torch.stack([tokenizer(stage.carrier_tokenizer, m.permute(2, 0, 1)) for m in merged])
    y_ref, _ = swin_reference(blk, merged, ct, v2=False)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), (x_ref, *params), allow_unused=True)

    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(grads[0], grads_ref[0], **TOL)
    new_parts = {"carrier_tokenizer.pos_embed.weight", "blocks.0.hat_attn.qkv.weight", "blocks.0.propagation_scale"}
    assert new_parts <= set(names) and ("blocks.0.attn.hat_gate" in names) == (init == "identity"), names
    mismatched = {
        n: "unused by the reference" if b is None else rel_diff(a, b)
        for n, a, b in zip(names, grads[1:], grads_ref[1:])
        if b is None or not a.abs().max() > 0 or rel_diff(a, b) > 1e-4
    }
    assert not mismatched, mismatched


def test_propagation_places_each_windows_carrier_tokens_on_its_own_quadrants():
    """Window ``w``'s CT ``k`` (row-major, as window_partition_nhwc and the tokenizer order them) lands on
    quadrant ``k`` of window ``w``; a 2 x 3 window grid so that rows and columns cannot be confused."""
    blk = _swin_stage_1("random").blocks[0]
    B, Hp, Wp, C, n_h, n_w = 2, 8, 12, blk.propagation_scale.numel(), 2, 3
    ct = torch.zeros(B * n_h * n_w, 4, C)
    for b in range(B):
        for w in range(n_h * n_w):
            ct[b * n_h * n_w + w, :, 0] = 100 * b + w
            ct[b * n_h * n_w + w, :, 1] = torch.arange(4.0)
    with torch.no_grad():
        blk.propagation_scale.fill_(1.0)
        out = blk.propagate_into_map(torch.zeros(B, Hp, Wp, C), ct, Hp, Wp)
    r, s = torch.meshgrid(torch.arange(Hp), torch.arange(Wp), indexing="ij")
    window = (r // 4) * n_w + s // 4
    quadrant = (r % 4 // 2) * 2 + s % 4 // 2
    for b in range(B):
        assert torch.equal(out[b, ..., 0], (100 * b + window).float())
        assert torch.equal(out[b, ..., 1], quadrant.float())
    assert not out[..., 2:].any()
