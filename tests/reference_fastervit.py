"""Slow, loop-based reference of the FasterViT forward pass (eval mode), used only by the tests.

It is a pure function of a state dict in the official key layout (``patch_embed.conv_down.*``,
``levels.N.blocks.M.*``, ``levels.N.global_tokenizer.*``, ``levels.N.downsample.*``, ``norm.*``, ``head.*``) and
is written to be obviously right rather than fast: Python loops over images, windows, carrier-token windows and
heads; every position bias is recomputed from the learned ``cpb_mlp`` weights (the derived buffers
``relative_bias``/``relative_coords_table``/``relative_position_index`` are never read). It shares no code with
the library's implementation.

Two flavours of the official model are covered, selected by ``cfg["any_res"]``:
  * fixed size (``faster_vit.py``): square ``resolution`` int, maps must be whole windows;
  * any resolution (``faster_vit_any_res.py``): ``resolution`` int or [H, W]; maps are zero-padded
    right/bottom to whole windows and cropped back after the level.
Quirks of the official code that are reproduced on purpose are marked "QUIRK".
"""

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# small primitives on a flat state dict
# ----------------------------------------------------------------------------------------------------------


def _linear(sd, p, x):
    return F.linear(x, sd[p + "weight"], sd.get(p + "bias"))


def _layer_norm(sd, p, x, eps):  # over the last (channel) dim
    return F.layer_norm(x, (x.shape[-1],), sd[p + "weight"], sd[p + "bias"], eps)


def _layer_norm_2d(sd, p, x):  # timm LayerNorm2d: channels of an NCHW map, eps 1e-6
    return _layer_norm(sd, p, x.permute(0, 2, 3, 1), 1e-6).permute(0, 3, 1, 2)


def _batch_norm(sd, p, x, eps):  # eval mode: running statistics
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        training=False, eps=eps)


def _mlp(sd, p, x):  # fc1 -> exact GELU -> fc2
    return _linear(sd, p + "fc2.", F.gelu(_linear(sd, p + "fc1.", x)))


def _cpb_mlp(sd, p, coords):  # Linear(2, 512) -> ReLU -> Linear(512, out, no bias)
    return _linear(sd, p + "cpb_mlp.2.", F.relu(_linear(sd, p + "cpb_mlp.0.", coords)))


def _gamma(sd, key):  # layer scale; absent (layer_scale=None) means 1
    return sd.get(key, 1.0)


# ----------------------------------------------------------------------------------------------------------
# position encodings, recomputed from the MLP weights
# ----------------------------------------------------------------------------------------------------------


def _abs_pos(sd, p, n_tokens, dtype):
    """(n, C) absolute 2D position MLP on a raster side x side grid: coords (row, col) -> (i - side//2) / (side//2)."""
    side = int(n_tokens ** 0.5)
    half = side // 2
    c = (torch.arange(side, dtype=dtype) - half) / half
    coords = torch.stack([torch.stack([c[i], c[j]]) for i in range(side) for j in range(side)])  # (side^2, 2)
    return _cpb_mlp(sd, p, coords)


def _rel_bias(sd, p, side, n_tokens, dtype):
    """(heads, n, n) SwinV2 continuous relative position bias of a side x side grid placed on the LAST side^2 tokens.

    The first n - side^2 rows/columns (the carrier tokens, or the tokens beyond the largest square) stay zero.
    """
    # offsets normalised to [-8, 8] then log-spaced; computed in float32 like the official init-time buffer
    off = torch.arange(-(side - 1), side, dtype=torch.float32) / (side - 1) * 8
    off = (torch.sign(off) * torch.log2(off.abs() + 1.0) / 3.0).to(dtype)  # / log2(8)
    table_in = torch.stack(torch.meshgrid(off, off, indexing="ij"), dim=-1)  # (2s-1, 2s-1, 2): (d_row, d_col)
    table = 16 * torch.sigmoid(_cpb_mlp(sd, p, table_in))  # (2s-1, 2s-1, heads)
    idx = torch.arange(side * side)
    rows, cols = idx // side, idx % side
    d_row = rows[:, None] - rows[None, :] + side - 1  # query minus key, shifted to be >= 0
    d_col = cols[:, None] - cols[None, :] + side - 1
    grid_bias = table[d_row, d_col].permute(2, 0, 1)  # (heads, s^2, s^2)
    extra = n_tokens - side * side
    bias = torch.zeros(grid_bias.shape[0], n_tokens, n_tokens, dtype=dtype)
    bias[:, extra:, extra:] = grid_bias
    return bias


def _attention(sd, p, tokens, num_heads, bias):
    """Multi-head self-attention of one window. tokens (N, C), bias (heads, N, N) -> (N, C)."""
    n, c = tokens.shape
    hd = c // num_heads
    qkv = _linear(sd, p + "qkv.", tokens)  # (N, 3C) laid out as [q | k | v], each [head0 | head1 | ...]
    outs = []
    for h in range(num_heads):
        q, k, v = (qkv[:, s * c + h * hd: s * c + (h + 1) * hd] for s in range(3))
        attn = torch.softmax(q @ k.T * hd ** -0.5 + bias[h], dim=-1)
        outs.append(attn @ v)
    return _linear(sd, p + "proj.", torch.cat(outs, dim=1))


# ----------------------------------------------------------------------------------------------------------
# carrier tokens
# ----------------------------------------------------------------------------------------------------------


def _pool_geometry(r, ct_size, ws):
    """TokenInitializer avg-pool (out, stride, kernel) along one axis of configured (padded) size r."""
    out = int(ct_size * r / ws)
    stride = int(r / out)
    return out, stride, r - (out - 1) * stride  # QUIRK: windows overlap/misalign with the attention windows


def _ct_dewindow(ct_wins, sr, cts):
    """Carrier-token windows (window k = a*sr1 + b, a row-major cts x cts patch each) -> raster (L, C) sequence."""
    grid = torch.zeros(sr[0] * cts, sr[1] * cts, ct_wins[0].shape[-1], dtype=ct_wins[0].dtype)
    for k, win in enumerate(ct_wins):
        a, b = divmod(k, sr[1])
        grid[a * cts:(a + 1) * cts, b * cts:(b + 1) * cts] = win.reshape(cts, cts, -1)
    return grid.reshape(-1, grid.shape[-1])


def _ct_window(seq, sr, cts):
    """Raster carrier tokens -> one cts x cts group per image window, exactly as the official ct_window does.

    QUIRK (any-res, sr0 != sr1): ct_window is called with the height/width roles swapped, so the raster sequence
    (really sr0*cts rows x sr1*cts cols) is cut as if it had sr1*cts rows and sr0*cts columns: image window k gets
    the patch at block (k // sr0, k % sr0) of that mis-shaped grid. For square grids this is the exact inverse
    of _ct_dewindow.
    """
    wins = []
    for k in range(sr[0] * sr[1]):
        a, b = divmod(k, sr[0])
        idx = [(a * cts + p) * (sr[0] * cts) + b * cts + q for p in range(cts) for q in range(cts)]
        wins.append(seq[idx])
    return wins


def _propagate(ct_win, cts, ws, dtype):
    """Nearest upsampling of a window's cts x cts carrier tokens to its ws x ws tokens -> (ws*ws, C).

    QUIRK: the official casts to float32 around nn.Upsample (loses precision in float64). F.interpolate is used
    because PyTorch's float32 index rule floor(dst * (in/out)) is what defines the official result at boundaries.
    """
    img = ct_win.T.reshape(1, -1, cts, cts).to(torch.float32)
    up = F.interpolate(img, size=(ws, ws), mode="nearest")
    return up.reshape(-1, ws * ws).T.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# one transformer level
# ----------------------------------------------------------------------------------------------------------


def stage_cfg(cfg, i):
    """The cfg_stage of level i (2 or 3) derived from a full model cfg, as the official constructor does."""
    res, any_res = cfg["resolution"], bool(cfg.get("any_res", False))
    if any_res:
        res = [res, res] if isinstance(res, int) else list(res)
        r_in = [int(2 ** (-2 - i) * r) for r in res]
    else:
        if not isinstance(res, int):
            raise ValueError("faster_vit.py (any_res=False) only accepts an int resolution")
        r_in = int(2 ** (-2 - i) * res)
    hat = cfg.get("hat") or [True] * len(cfg["depths"])  # official: hat=None means every level
    return dict(depth=cfg["depths"][i], num_heads=cfg["num_heads"][i], window_size=cfg["window_size"][i],
                ct_size=cfg["ct_size"], input_resolution=r_in, hat=bool(hat[i]),
                do_propagation=bool(cfg.get("do_propagation", False)), any_res=any_res)


@torch.no_grad()
def reference_hat_stage(state_dict, prefix, cfg_stage, x):
    """One transformer level (levels.N.*: carrier-token init, blocks, propagation; NOT the downsample).

    cfg_stage keys: depth, num_heads, window_size, ct_size, input_resolution (configured map size of this level:
    int, or [H, W] for any_res), hat, do_propagation, any_res. x: (B, C, H, W) -> (B, C, H, W).
    """
    sd = {k: v.to(x.dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    ws, cts, heads = cfg_stage["window_size"], cfg_stage["ct_size"], cfg_stage["num_heads"]
    depth, any_res = cfg_stage["depth"], cfg_stage["any_res"]
    B, C, H, W = x.shape
    r_in = cfg_stage["input_resolution"]
    r_in = [r_in, r_in] if isinstance(r_in, int) else list(r_in)
    if any_res:  # pad the map, and the configured size, up to whole windows
        r_in = [r + (ws - r % ws) % ws for r in r_in]
        x = F.pad(x, (0, (ws - W % ws) % ws, 0, (ws - H % ws) % ws))
    elif H % ws or W % ws:
        raise ValueError(f"official faster_vit.py crashes (window_partition view): {H}x{W} map, window {ws}")
    Hp, Wp = x.shape[-2:]
    nh, nw = Hp // ws, Wp // ws

    # carrier-token geometry comes from the CONFIGURED resolution, not from x
    sr = [r // ws for r in r_in] if cfg_stage["hat"] else [1, 1]
    use_ct = sr[0] > 1 or sr[1] > 1
    if cfg_stage["hat"] and any_res:
        # any-res builds a global_tokenizer even when sr == [1, 1] (its output is then unused): its view must work
        for r, actual in zip(r_in, (Hp, Wp)):
            out, stride, kernel = _pool_geometry(r, cts, ws)
            n = (actual - kernel) // stride + 1
            if actual < kernel or n % cts or (use_ct and actual != r):
                # different map than configured -> carrier-token count mismatch: the official crashes in
                # TokenInitializer.view / ct_dewindow.reshape (or, for rare batch sizes, silently mixes images)
                raise ValueError(f"official any-res crashes: map {Hp}x{Wp} vs configured {r_in} (level {prefix})")
    elif use_ct and (Hp, Wp) != tuple(r_in):
        raise ValueError(f"official faster_vit.py crashes: map {Hp}x{Wp} but built for {r_in} (level {prefix})")

    # windows[b][k]: (ws*ws, C) raster tokens of window k = i*nw + j
    windows = [[x[b, :, i * ws:(i + 1) * ws, j * ws:(j + 1) * ws].reshape(C, ws * ws).T
                for i in range(nh) for j in range(nw)] for b in range(B)]

    cts_per_img = None
    if use_ct:  # TokenInitializer: 3x3 depthwise conv (bias) then avg-pool with the configured kernel/stride
        g = prefix + "global_tokenizer.pos_embed."
        y = F.conv2d(x, sd[g + "weight"], sd[g + "bias"], padding=1, groups=C)
        (oh, sh, kh), (ow, sw, kw) = (_pool_geometry(r, cts, ws) for r in r_in)  # oh = cts*sr0, ow = cts*sr1
        grid = torch.zeros(B, oh, ow, C, dtype=x.dtype)
        for u in range(oh):
            for v in range(ow):
                grid[:, u, v] = y[:, :, u * sh:u * sh + kh, v * sw:v * sw + kw].mean(dim=(-2, -1))
        # cts_per_img[b][k]: the cts x cts carrier tokens of window k = a*sr1 + b, (cts*cts, C)
        cts_per_img = [[grid[b, a * cts:(a + 1) * cts, c * cts:(c + 1) * cts].reshape(cts * cts, C)
                        for a in range(sr[0]) for c in range(sr[1])] for b in range(B)]

    n_ct = cts * cts if use_ct else 0
    for blk in range(depth):
        p = f"{prefix}blocks.{blk}."
        last = blk == depth - 1
        g1, g2 = _gamma(sd, p + "gamma1"), _gamma(sd, p + "gamma2")
        g3, g4 = _gamma(sd, p + "gamma3"), _gamma(sd, p + "gamma4")
        pos = _abs_pos(sd, p + "pos_embed.", ws * ws, x.dtype)  # (ws*ws, C)
        win_bias = _rel_bias(sd, p + "attn.pos_emb_funct.", ws, n_ct + ws * ws, x.dtype)  # ct rows/cols zero
        for b in range(B):
            if use_ct:
                # 1) global attention among all carrier tokens of the image, in raster order
                seq = _ct_dewindow(cts_per_img[b], sr, cts)  # (L, C), L = cts^2 * sr0 * sr1
                L = seq.shape[0]
                if sr[0] == sr[1]:  # QUIRK: any-res only has hat_pos_embed when the window grid is square
                    seq = seq + _abs_pos(sd, p + "hat_pos_embed.", L, x.dtype)
                # QUIRK: the bias grid is int(sqrt(L)) wide on the last side^2 tokens, zero elsewhere, whatever the
                # real grid shape (side 1, e.g. ct_size 1 with sr [1, 2], gives 0/0 = NaN, as in the official)
                ct_bias = _rel_bias(sd, p + "hat_attn.pos_emb_funct.", int(L ** 0.5), L, x.dtype)
                seq = seq + g1 * _attention(sd, p + "hat_attn.", _layer_norm(sd, p + "hat_norm1.", seq, 1e-5),
                                            heads, ct_bias)
                seq = seq + g2 * _mlp(sd, p + "hat_mlp.", _layer_norm(sd, p + "hat_norm2.", seq, 1e-5))
                ct_in = _ct_window(seq, sr, cts)  # per image window, (cts*cts, C)
            for k in range(nh * nw):
                # 2) window attention over [carrier tokens of this window, window tokens]
                t = windows[b][k] + pos
                if use_ct:
                    t = torch.cat([ct_in[k], t])
                t = t + g3 * _attention(sd, p + "attn.", _layer_norm(sd, p + "norm1.", t, 1e-5), heads, win_bias)
                t = t + g4 * _mlp(sd, p + "mlp.", _layer_norm(sd, p + "norm2.", t, 1e-5))
                if use_ct:
                    ct_k, t = t[:n_ct], t[n_ct:]
                    cts_per_img[b][k] = ct_k  # next block sees them in image-window order
                    if last and cfg_stage["do_propagation"]:
                        t = t + g1 * _propagate(ct_k, cts, ws, x.dtype)  # QUIRK: reuses gamma1
                windows[b][k] = t

    out = torch.zeros(B, C, Hp, Wp, dtype=x.dtype)
    for b in range(B):
        for k, t in enumerate(windows[b]):
            i, j = divmod(k, nw)
            out[b, :, i * ws:(i + 1) * ws, j * ws:(j + 1) * ws] = t.T.reshape(C, ws, ws)
    return out[:, :, :H, :W]  # any-res: drop the padding


# ----------------------------------------------------------------------------------------------------------
# whole model
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_forward(state_dict, cfg, x):
    """Logits of the official FasterViT (eval mode) computed with explicit Python loops over windows.

    cfg keys: depths, num_heads, window_size, ct_size, resolution, hat, do_propagation, any_res, and optionally
    layer_norm_last (else detected from the state dict). dim/in_dim/mlp_ratio/layer_scale may be present but are
    read off the weights (gammas are used iff present).
    """
    sd = {k: v.to(x.dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    # stem: two stride-2 3x3 convs, BN eps 1e-4, ReLU
    for conv, bn in ((0, 1), (3, 4)):
        x = F.conv2d(x, sd[f"patch_embed.conv_down.{conv}.weight"], stride=2, padding=1)
        x = F.relu(_batch_norm(sd, f"patch_embed.conv_down.{bn}.", x, 1e-4))
    for i in range(len(cfg["depths"])):
        if i < 2:  # conv levels (hat flags are ignored here by the official code too)
            for blk in range(cfg["depths"][i]):
                p = f"levels.{i}.blocks.{blk}."
                y = F.conv2d(x, sd[p + "conv1.weight"], sd[p + "conv1.bias"], padding=1)
                y = F.gelu(_batch_norm(sd, p + "norm1.", y, 1e-5))
                y = _batch_norm(sd, p + "norm2.", F.conv2d(y, sd[p + "conv2.weight"], sd[p + "conv2.bias"],
                                                           padding=1), 1e-5)
                if p + "gamma" in sd:  # layer_scale_conv (None in every official variant)
                    y = y * sd[p + "gamma"].reshape(-1, 1, 1)
                x = x + y
        else:
            x = reference_hat_stage(sd, f"levels.{i}.", stage_cfg(cfg, i), x)
        if i < 3:  # downsample: LayerNorm2d then stride-2 3x3 conv doubling channels
            x = _layer_norm_2d(sd, f"levels.{i}.downsample.norm.", x)
            x = F.conv2d(x, sd[f"levels.{i}.downsample.reduction.0.weight"], stride=2, padding=1)
    ln_last = cfg.get("layer_norm_last")
    if ln_last is None:
        ln_last = "norm.running_mean" not in sd
    x = _layer_norm_2d(sd, "norm.", x) if ln_last else _batch_norm(sd, "norm.", x, 1e-5)
    x = x.mean(dim=(2, 3))
    return _linear(sd, "head.", x) if "head.weight" in sd else x
