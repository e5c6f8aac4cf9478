"""The HAT primitives: shapes, orderings, position-bias caching, fx traceability."""

import copy

import pytest
import torch
import torch.nn.functional as F

from hatplug.layers import (
    AbsolutePositionMLP,
    BiasedAttention,
    CarrierPositionMLP,
    CarrierTokenGrid,
    CarrierTokenizer,
    ContinuousPositionBias,
    HATBlock,
    HATStage,
    carrier_pool_geometry,
    grouped_to_raster_index,
    pad_to_windows,
    upsample_index,
    window_partition,
    window_partition_nhwc,
    window_reverse,
    window_reverse_nhwc,
)
from hatplug.layers.fusion import inference_fusion


def test_window_partition_matches_explicit_slicing():
    x = torch.randn(2, 3, 14, 21)
    windows = window_partition(x, 7)
    assert windows.shape == (2 * 2 * 3, 49, 3)
    # window (b=1, row 1, col 2) is the 4th+... entry: b * 6 + 1 * 3 + 2
    expected = x[1, :, 7:14, 14:21].reshape(3, 49).T
    torch.testing.assert_close(windows[1 * 6 + 1 * 3 + 2], expected, rtol=0, atol=0)
    assert torch.equal(window_reverse(windows, 7, 14, 21), x)


def test_window_partition_and_reverse_name_maps_that_do_not_split():
    x = torch.randn(1, 8, 10, 10)
    with pytest.raises(ValueError, match=r"the 10x10 map .* does not split into 4x4 windows: pad it to 12x12 first"):
        window_partition(x, 4)  # a raw reshape error before
    with pytest.raises(ValueError, match=r"the 10x8 map \(shape \(1, 10, 10, 8\), read as \(B, C, H, W\)\).*_nhwc"):
        window_partition(torch.randn(1, 10, 10, 8), 5)  # channels-last data
    with pytest.raises(ValueError, match="window_size must be a positive int, got 0"):
        window_partition(x, 0)  # ZeroDivisionError before
    with pytest.raises(ValueError, match=r"takes a \(B, C, H, W\) map, got a 3-D tensor"):
        window_partition(x[0], 5)
    windows = window_partition(x, 5)  # (4, 25, 8)
    with pytest.raises(ValueError, match=r"window_reverse: a 8x11 map does not split into 5x5 windows"):
        window_reverse(windows, 5, 8, 11)
    with pytest.raises(ValueError, match=r"windows of shape \(4, 25, 8\) are not \(B \* 6, 25, C\)"):
        window_reverse(windows, 5, 10, 15)
    assert torch.equal(window_reverse(windows, 5, 10, 10), x)


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.trace(_method)?` is deprecated:FutureWarning")
def test_window_checks_stay_out_of_traced_graphs():
    def roundtrip(x):
        return window_reverse(window_partition(x, 5), 5, 10, 10)

    graph = torch.fx.symbolic_trace(roundtrip)  # the checks branch on sizes: they must not run while tracing
    x = torch.randn(2, 3, 10, 10)
    assert torch.equal(graph(x), x)
    traced = torch.jit.trace(roundtrip, x)
    assert torch.equal(traced(x), x)


@pytest.mark.parametrize("ct,ws", [(2, 7), (1, 7), (3, 7), (2, 14), (2, 3)])
def test_upsample_index_is_nearest_upsampling(ct, ws):
    grid = torch.randn(5, ct * ct, 4)  # (windows, ct*ct, C)
    gathered = grid[:, upsample_index(ct, ws)]
    image = grid.transpose(1, 2).reshape(5, 4, ct, ct)
    reference = F.interpolate(image, size=(ws, ws), mode="nearest").flatten(2).transpose(1, 2)
    assert torch.equal(gathered, reference)


def test_carrier_pool_geometry_covers_the_map():
    for n in range(2, 9):
        out, stride, kernel = carrier_pool_geometry(7 * n, 7, 2)
        assert out == 2 * n
        assert (out - 1) * stride + kernel == 7 * n  # last pooling window ends at the border
    with pytest.raises(ValueError, match="multiple of window_size"):
        carrier_pool_geometry(15, 7, 2)


def test_grouped_order_matches_per_window_view():
    """Stored CTs viewed as (B*nW, ct*ct, C) must give each window its own CTs."""
    tok = CarrierTokenizer(dim=4, map_size=(14, 21), window_size=7, ct_size=2)
    x = torch.randn(2, 4, 14, 21)
    ct = tok(x)  # (B, nW*4, C)
    pooled = tok.to_global_feature(tok.pos_embed(x))  # (B, C, 4, 6)
    per_window = ct.reshape(2 * 6, 4, 4)
    # window (row 1, col 2) of image 1 owns pooled[1, :, 2:4, 4:6]
    expected = pooled[1, :, 2:4, 4:6].reshape(4, 4).T
    assert torch.equal(per_window[6 + 3 + 2], expected)
    raster = pooled.flatten(2).transpose(1, 2)
    assert torch.equal(raster[:, grouped_to_raster_index(2, 3, 2)], ct)


@pytest.mark.parametrize("windows", [(2, 2), (2, 3), (3, 5)])
def test_carrier_token_grid_orders(windows):
    stored = grouped_to_raster_index(*windows, 2)
    own = CarrierTokenGrid(windows, 2, official_order=False)
    assert own.block_perm is None and torch.equal(own.token_order, stored)
    official = CarrierTokenGrid(windows, 2, official_order=True)
    if windows[0] == windows[1]:
        assert official.block_perm is None and torch.equal(official.token_order, stored)
    else:
        assert official.block_perm is not None
        assert sorted(official.block_perm.tolist()) == list(range(official.num_tokens))


def _independent_cpb(mlp, h, w, heads, dtype=torch.float32):
    """SwinV2 log-CPB written out per token pair."""
    bias = torch.zeros(heads, h * w, h * w, dtype=dtype)
    for p in range(h * w):
        for q in range(h * w):
            dy, dx = p // w - q // w, p % w - q % w
            c = torch.tensor([dy / max(h - 1, 1), dx / max(w - 1, 1)], dtype=dtype) * 8
            c = torch.sign(c) * torch.log2(c.abs() + 1) / 3
            bias[:, p, q] = 16 * torch.sigmoid(mlp(c))
    return bias


def test_continuous_position_bias_against_per_pair_loop():
    cpb = ContinuousPositionBias(num_heads=3, window_size=(3, 4), num_prefix_tokens=2).eval()
    with torch.no_grad():
        out = cpb()[0]
        ref = _independent_cpb(cpb.cpb_mlp, 3, 4, 3)
    assert out.shape == (3, 14, 14)
    assert torch.all(out[:, :2] == 0) and torch.all(out[:, :, :2] == 0)
    torch.testing.assert_close(out[:, 2:, 2:], ref, rtol=1e-5, atol=1e-6)


def test_position_mlps_are_float64_accurate_after_double():
    """The coordinate tables are float32 buffers (as in the official code); a float64 model must not compute
    on float32 coordinates (about 1e-7 off, which shows as ~1e-8 in the biases)."""
    torch.manual_seed(0)
    cpb = ContinuousPositionBias(num_heads=2, window_size=(3, 7)).double().eval()
    pe = AbsolutePositionMLP(dim=3, side=7).double().eval()
    ct = CarrierPositionMLP(dim=3, ct_size=2).double().eval()
    with torch.no_grad():
        torch.testing.assert_close(cpb()[0], _independent_cpb(cpb.cpb_mlp, 3, 7, 2, torch.float64), rtol=0, atol=1e-12)
        grid = torch.tensor([[(i - 3) / 3, (j - 3) / 3] for i in range(7) for j in range(7)], dtype=torch.float64)
        torch.testing.assert_close(pe()[0], pe.cpb_mlp(grid), rtol=0, atol=1e-12)
        # a 2 x 3 window grid of 2 x 2 carrier tokens: centres (2 * index + 1) / tokens - 1, window by window
        centres = [
            [(2 * (2 * wy + i) + 1) / 4 - 1, (2 * (2 * wx + j) + 1) / 6 - 1]
            for wy in range(2)
            for wx in range(3)
            for i in range(2)
            for j in range(2)
        ]
        torch.testing.assert_close(
            ct(2, 3)[0], ct.cpb_mlp(torch.tensor(centres, dtype=torch.float64)), rtol=0, atol=1e-12
        )
    # float32 models keep the float32 tables bit for bit (what makes them match the official code)
    cpb32 = ContinuousPositionBias(num_heads=2, window_size=(3, 7))
    assert cpb32.relative_coords_table.dtype == torch.float32
    assert torch.equal(cpb32.double().float().relative_coords_table, cpb32.relative_coords_table)


def test_absolute_position_mlp_coordinates():
    pe = AbsolutePositionMLP(dim=5, side=7)
    assert pe.coords[0, 0].tolist() == [-1.0, -1.0]
    assert pe.coords[0, 48].tolist() == [1.0, 1.0]
    assert pe.coords[0, 10].tolist() == pytest.approx([(1 - 3) / 3, (3 - 3) / 3])


def test_attention_equals_plain_softmax():
    attn = BiasedAttention(16, num_heads=2, window_size=(2, 2), num_prefix_tokens=1).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        out = attn(x)
        q, k, v = attn.qkv(x).reshape(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-1, -2) * 8**-0.5 + attn.pos_emb_funct()).softmax(-1)
        ref = attn.proj((weights @ v).transpose(1, 2).reshape(3, 5, 16))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


class TestBiasCache:
    def test_eval_caches_until_weights_change(self):
        cpb = ContinuousPositionBias(num_heads=2, window_size=(7, 7)).eval()
        with torch.no_grad():
            first = cpb()
            assert cpb() is first  # cached
            cpb.cpb_mlp[2].weight.mul_(2)  # in-place change (optimizer-style)
            second = cpb()
        assert second is not first
        torch.testing.assert_close(second, cpb.compute().detach())
        assert not torch.allclose(first, second)

    def test_load_state_dict_and_train_invalidate(self):
        pe = AbsolutePositionMLP(dim=4, side=3).eval()
        with torch.inference_mode():
            stale = pe()
        other = AbsolutePositionMLP(dim=4, side=3)
        pe.load_state_dict(other.state_dict())
        with torch.no_grad():
            fresh = pe()
            torch.testing.assert_close(fresh, other.compute())
            assert not torch.allclose(fresh, stale)
            pe.train()
            assert pe._cache.empty
            pe.eval()
            assert pe() is not fresh

    def test_replaced_parameter_invalidates(self):
        pe = AbsolutePositionMLP(dim=4, side=3).eval()
        with torch.no_grad():
            stale = pe()
            pe.cpb_mlp[0].weight = torch.nn.Parameter(torch.randn(512, 2))
            assert not torch.allclose(pe(), stale)

    def test_grad_flows_in_eval_when_needed(self):
        cpb = ContinuousPositionBias(num_heads=2, window_size=(3, 3)).eval()
        cpb().sum().backward()
        assert cpb.cpb_mlp[0].weight.grad is not None
        assert cpb._cache.empty  # nothing graph-attached was cached

    def test_cache_made_in_inference_mode_is_usable_for_autograd(self):
        attn = BiasedAttention(8, num_heads=2, window_size=(2, 2)).eval().requires_grad_(False)
        with torch.inference_mode():
            attn(torch.randn(1, 4, 8))
        x = torch.randn(1, 4, 8, requires_grad=True)
        attn(x).sum().backward()  # would raise if the cached bias were an inference tensor
        assert x.grad is not None


def _block_with_cts(propagate):
    grid = CarrierTokenGrid((2, 3), 2)
    return HATBlock(16, 2, 3, grid, layer_scale=0.5, propagate=propagate)


def test_hat_block_shapes_and_gradients():
    blk = _block_with_cts(propagate=True)
    x, ct = torch.randn(2 * 6, 9, 16), torch.randn(2, 24, 16)
    out, ct_out = blk(x, ct)
    assert out.shape == x.shape and ct_out.shape == ct.shape
    (out.sum() + ct_out.sum()).backward()
    missing = [n for n, p in blk.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_propagation_only_changes_window_tokens():
    torch.manual_seed(0)
    with_prop = _block_with_cts(propagate=True).eval()
    without = copy.deepcopy(with_prop)
    without.propagate = False
    x, ct = torch.randn(2 * 6, 9, 16), torch.randn(2, 24, 16)
    with torch.no_grad():
        a, ct_a = with_prop(x, ct)
        b, ct_b = without(x, ct)
        ct_windows = ct_b.reshape(12, 4, 16)
        expected = b + with_prop.gamma1 * ct_windows[:, upsample_index(2, 3)]
    assert torch.equal(ct_a, ct_b)
    torch.testing.assert_close(a, expected)


def test_stage_pads_and_crops_non_multiple_maps():
    stage = HATStage(16, depth=2, num_heads=2, input_resolution=(10, 13), window_size=7, do_propagation=True)
    assert stage.has_carrier_tokens and stage.padded_resolution == (14, 14)
    assert stage(torch.randn(2, 16, 10, 13)).shape == (2, 16, 10, 13)
    with pytest.raises(AssertionError, match="built for 10x13"):
        stage(torch.randn(2, 16, 14, 14))


def test_stage_wrong_size_names_the_size_received_also_when_traced():
    stage = HATStage(16, depth=1, num_heads=2, input_resolution=(10, 13), window_size=7)
    with pytest.raises(AssertionError, match=r"HATStage was built for 10x13 maps, got 14x12: rebuild it with "):
        stage(torch.randn(2, 16, 14, 12))
    graph = torch.fx.symbolic_trace(stage)  # the size check is still in the graph (with the size it expects)
    with pytest.raises(AssertionError, match="HATStage was built for 10x13 maps"):
        graph(torch.randn(2, 16, 14, 12))


def test_stage_takes_an_int_resolution_and_refuses_what_fastervit_refuses():
    stage = HATStage(8, depth=1, num_heads=2, input_resolution=14, window_size=7)  # "cannot unpack" before
    assert stage.input_resolution == (14, 14) and stage.has_carrier_tokens
    assert stage(torch.randn(1, 8, 14, 14)).shape == (1, 8, 14, 14)
    base = dict(dim=8, depth=2, num_heads=2, input_resolution=(14, 14), window_size=7)
    for override, message in [  # each was accepted before
        (dict(mlp_ratio=0), r"mlp_ratio must be a positive number \(the MLP's hidden width / dim\), got 0"),
        (dict(drop_path=1.5), r"drop_path must be in \[0, 1\) .*got 1.5"),
        (dict(drop_path=[0.1, 1.0]), r"drop_path must be in \[0, 1\) .*got \[0.1, 1.0\]"),
        (dict(input_resolution=(14, 0)), r"input_resolution must be positive ints, got \(14, 0\)"),
        (dict(input_resolution=(14, 14, 3)), r"input_resolution must be an int or \(H, W\) of ints"),
    ]:
        with pytest.raises(ValueError, match=message):
            HATStage(**{**base, **override})


def test_stage_names_itself_for_a_misspelt_keyword_and_passes_block_options_on():
    base = dict(dim=8, depth=2, num_heads=2, input_resolution=(14, 14), window_size=7)
    with pytest.raises(TypeError, match=r"HATStage.__init__\(\) got an unexpected keyword argument 'ct_sz'"):
        HATStage(**base, ct_sz=2)  # reported against HATBlock.__init__ before
    stage = HATStage(**base, mlp_ratio=2.0, qkv_bias=False, qk_scale=0.5, drop=0.1, attn_drop=0.2, layer_scale=1e-5)
    for blk in stage.blocks:
        assert blk.mlp.fc1.out_features == 16 and blk.attn.qkv.bias is None and blk.attn.scale == 0.5
        assert blk.mlp.drop1.p == 0.1 and blk.attn.attn_drop == 0.2 and torch.all(blk.gamma3 == 1e-5)


def test_single_window_stage_has_no_carrier_tokens():
    stage = HATStage(16, depth=1, num_heads=2, input_resolution=(7, 7), window_size=7)
    assert not stage.has_carrier_tokens
    assert all(k.startswith("blocks.0.") and "hat_" not in k for k in stage.state_dict())


def test_stage_is_fx_traceable_with_same_output():
    stage = HATStage(16, depth=2, num_heads=2, input_resolution=(10, 20), window_size=5, do_propagation=True).eval()
    x = torch.randn(2, 16, 10, 20)
    graph = torch.fx.symbolic_trace(stage)
    with torch.no_grad():
        with inference_fusion(False):  # the traced graph is the plain computation, bit for bit
            torch.testing.assert_close(graph(x), stage(x), rtol=0, atol=0)
        # eager eval mode runs the folded form (hatplug.layers.fusion): equal up to float32 rounding
        torch.testing.assert_close(graph(x), stage(x), rtol=1e-5, atol=1e-6)


def test_stage_names_bad_inputs_and_arguments():
    stage = HATStage(8, depth=1, num_heads=2, input_resolution=(14, 14), window_size=7)
    for x, message in [
        (torch.randn(8, 14, 14), r"3-D tensor of shape \(8, 14, 14\); for one map add the batch dimension"),
        (torch.randn(1, 14, 14, 8), r"got shape \(1, 14, 14, 8\); that looks channels-last .*permute\(0, 3, 1, 2\)"),
        (torch.randn(1, 4, 14, 14), r"takes 8-channel maps \(B, 8, 14, 14\), got shape \(1, 4, 14, 14\)$"),
    ]:  # an IndexError, a size error about a map of the right size, a conv error before
        with pytest.raises(ValueError, match=message):
            stage(x)
    base = dict(dim=8, depth=2, num_heads=2, input_resolution=(14, 14), window_size=7)
    for override, message in [
        (dict(window_size=0), "window_size must be a positive int, got 0"),  # ZeroDivisionError before
        (dict(num_heads=0), "num_heads must be a positive int, got 0"),
        (dict(depth=0), "depth must be a positive int, got 0"),
        (dict(drop_path=[0.1]), "drop_path has 1 rates for 2 blocks"),  # IndexError before
        (dict(window_size=3, ct_size=4), "ct_size=4 carrier tokens per window side"),
    ]:
        with pytest.raises(ValueError, match=message):
            HATStage(**{**base, **override})
    with pytest.raises(ValueError, match=r"ct_size=4 .* the window is 3x3"):  # AvgPool2d(stride=0) before
        CarrierTokenizer(8, (14, 14), 3, 4)
    with pytest.raises(ValueError, match=r"empty batch \(0 maps\)"):  # a reshape error before
        stage(torch.randn(0, 8, 14, 14))
    block = HATStage(8, depth=1, num_heads=2, input_resolution=(14, 14), window_size=7).blocks[0]
    assert block.hat_attn is not None
    with pytest.raises(ValueError, match=r"call it as block\(x, ct\)"):  # "NoneType + Tensor" before
        block(torch.randn(4, 49, 8))


def test_functional_call_puts_every_parameter_back():
    """``torch.func.functional_call`` swaps parameters in and back out. The carrier-token conv, which official
    checkpoints name twice (``pos_embed`` and ``to_global_feature.pos``), used to be registered under both names,
    and torch does not put back a submodule registered twice: it kept the swapped-in tensor, so the stage's own
    output changed and a deepcopy after per-sample gradients failed. The state dict still has both names."""
    stage = HATStage(16, 1, 2, (8, 8), 4).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        before = stage(x)
    params = dict(stage.named_parameters())
    zeros = {name: torch.zeros_like(p) for name, p in params.items()}
    with torch.no_grad():
        swapped = torch.func.functional_call(stage, zeros, (x,))
    assert not torch.equal(swapped, before)
    assert all(p is params[name] for name, p in stage.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(stage(x), before, rtol=0, atol=0)
    state = copy.deepcopy(stage).state_dict()
    tok = "global_tokenizer."
    assert torch.equal(state[tok + "pos_embed.weight"], state[tok + "to_global_feature.pos.weight"])


def _block_and_tokens(dim=16, window=4, windows=(2, 2), ct=2):
    grid = CarrierTokenGrid(windows, ct)
    block = HATBlock(dim, 2, window, grid)
    n = windows[0] * windows[1]
    return block, torch.randn(2 * n, window * window, dim), torch.randn(2, n * ct * ct, dim)


BAD_INPUTS = {  # what a researcher may pass the primitives -> the named error it gets
    "tokenizer: map of another size": (
        lambda: CarrierTokenizer(8, (8, 12), 4, 2)(torch.randn(1, 8, 12, 8)),
        "built for 8x12 maps",
    ),
    "tokenizer: unpadded map": (lambda: CarrierTokenizer(8, (8, 12), 4, 2)(torch.randn(1, 8, 7, 11)), "pad_to_windows"),
    "tokenizer: channels-last map": (
        lambda: CarrierTokenizer(6, (8, 12), 4, 2)(torch.randn(1, 8, 12, 6)),
        "channels_last=True",
    ),
    "tokenizer: unbatched map": (lambda: CarrierTokenizer(8, None, 4, 2)(torch.randn(8, 7, 11)), r"x\[None\]"),
    "block: wrong token count": (
        lambda: (lambda b, x, ct: b(x[:, :9], ct))(*_block_and_tokens()),
        r"takes windows of tokens \(B \* num_windows, 16, 16\)",
    ),
    "block: a map instead of windows": (
        lambda: (lambda b, x, ct: b(torch.randn(2, 16, 8, 8), ct))(*_block_and_tokens()),
        "window_partition makes them",
    ),
    "block: carrier tokens of another grid": (
        lambda: (lambda b, x, ct: b(x, ct[:, :8]))(*_block_and_tokens()),
        "grid has 4 windows of 4 tokens",
    ),
    "block: batch not B * windows": (
        lambda: (lambda b, x, ct: b(x[:6], ct))(*_block_and_tokens()),
        r"with x of shape \(B \* 4, 16, 16\)",
    ),
    "block: ct_size above the window": (lambda: _block_and_tokens(window=2, ct=3), r"1 <= ct_size <= window_size"),
    "grid: ct_size 0": (lambda: CarrierTokenGrid((2, 2), 0), "ct_size must be a positive int"),
    "stage: float ct_size": (lambda: HATStage(16, 1, 2, (8, 8), 4, ct_size=2.0), "ct_size must be a positive int"),
    "nhwc partition: indivisible map": (
        lambda: window_partition_nhwc(torch.randn(2, 14, 21, 8), 4),
        "does not split into 4x4 windows",
    ),
    "nhwc reverse: wrong H": (
        lambda: window_reverse_nhwc(torch.randn(12, 49, 8), (7, 7), 15, 21),
        "a 15x21 map does not split",
    ),
    "pad: negative amount": (lambda: pad_to_windows(torch.ones(1, 2, 5, 6), -1, 0), "does not crop"),
    "attention: negative dropout": (lambda: BiasedAttention(16, 2, (4, 4), attn_drop=-1.0), "between 0 and 1"),
    "attention: tokens of another window": (
        lambda: BiasedAttention(16, 2, (4, 4), num_prefix_tokens=4)(torch.randn(2, 16, 16)),
        r"N = 20",
    ),
}


def test_stage_refuses_integer_maps():
    """An integer map failed inside the carrier-token conv ("Input type (long int) and bias type (float)"), or,
    without carrier tokens, was silently promoted to float."""
    for hat in (True, False):
        with pytest.raises(TypeError, match="floating-point maps"):
            HATStage(16, 1, 2, (8, 8), 4, hat=hat)(torch.ones(1, 16, 8, 8, dtype=torch.long))


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_to_the_primitives_get_named_errors(case):
    call, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_window_helpers_take_an_int_window():
    x = torch.randn(2, 14, 21, 8)
    assert torch.equal(window_partition_nhwc(x, 7), window_partition_nhwc(x, (7, 7)))
    assert torch.equal(window_reverse_nhwc(window_partition_nhwc(x, 7), 7, 14, 21), x)
    square, pair = ContinuousPositionBias(2, 7), ContinuousPositionBias(2, (7, 7))
    pair.load_state_dict(square.state_dict())
    assert torch.equal(square(), pair())


def test_stage_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    stage = HATStage(16, depth=2, num_heads=2, input_resolution=(8, 12), window_size=4, do_propagation=True)
    x = torch.randn(2, 16, 8, 12)
    grads, calls = [], []
    stage.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))  # recomputation may stop early
    for enable in (False, True):
        stage.set_grad_checkpointing(enable)
        stage.zero_grad()
        calls.clear()
        stage(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in stage.named_parameters()})
        assert len(calls) == (2 if enable else 1)  # checkpointed: the block runs again in the backward pass
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_bias_cache_follows_its_tables():
    """The eval bias cache was keyed on the weights only: a stage run once before its tables were recomputed
    (meta device -> to_empty -> load -> forward -> init_non_persistent_buffers) kept the junk bias, and so did
    an in-place edit of a table."""
    torch.manual_seed(0)
    reference = HATStage(dim=16, depth=2, num_heads=2, input_resolution=(12, 16), window_size=4).eval()
    with torch.device("meta"):
        stage = HATStage(dim=16, depth=2, num_heads=2, input_resolution=(12, 16), window_size=4)
    stage.to_empty(device="cpu").eval()
    for buf in stage.buffers():
        buf.fill_(1)
    stage.load_state_dict(reference.state_dict())
    x = torch.randn(2, 16, 12, 16)
    with torch.no_grad():
        want = reference(x)
        assert not torch.allclose(stage(x), want)  # junk tables
        for module in stage.modules():
            if hasattr(module, "init_non_persistent_buffers"):
                module.init_non_persistent_buffers()
        assert torch.equal(stage(x), want)
        bias = ContinuousPositionBias(num_heads=2, window_size=(3, 3), num_prefix_tokens=1).eval()
        before = bias().clone()
        bias.relative_coords_table.mul_(2)
        assert not torch.equal(bias(), before)
        assert torch.equal(bias(), bias.compute())  # what a fresh computation gives


def test_modules_build_under_a_float64_default_dtype():
    """The coordinate tables were float32 whatever the default dtype, so a module built under
    torch.set_default_dtype(torch.float64) (usual for gradient checks) failed on its first forward."""
    torch.manual_seed(0)
    plain = HATStage(dim=8, depth=1, num_heads=2, input_resolution=(8, 8), window_size=4).double()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        stage = HATStage(dim=8, depth=1, num_heads=2, input_resolution=(8, 8), window_size=4)
    finally:
        torch.set_default_dtype(previous)
    assert {b.dtype for b in stage.buffers() if b.is_floating_point()} == {torch.float64}
    stage.load_state_dict(plain.state_dict())
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    for mode in (True, False):
        stage.train(mode), plain.train(mode)
        assert torch.equal(stage(x), plain(x))


def test_window_functions_take_rectangular_windows():
    x = torch.randn(2, 3, 8, 12)
    for size in ((4, 2), (2, 6), 4):
        windows = window_partition(x, size)
        assert torch.equal(windows, window_partition_nhwc(x.permute(0, 2, 3, 1), size))
        assert torch.equal(window_reverse(windows, size, 8, 12), x)


def test_layer_arguments_get_named_errors():
    cases = [
        (lambda: carrier_pool_geometry(14, 7, 8), "ct_size=8 carrier tokens per window side need"),
        (lambda: carrier_pool_geometry(14, 7, 0), "ct_size must be a positive int"),
        (lambda: carrier_pool_geometry(0, 7, 2), "size must be a positive int"),
        (lambda: HATBlock(8, 2, window_size=0), "window_size must be a positive int, got 0"),
        (lambda: HATBlock(8, 2, window_size=(4, 4)), r"window_size must be a positive int, got \(4, 4\)"),
        (lambda: HATBlock(8, 2, 4, drop_path=1.5), r"drop_path must be in \[0, 1\)"),
        (lambda: HATBlock(8, 2, 4, drop_path=[0.1]), r"HATBlock takes one drop_path rate"),
        (lambda: HATBlock(8, 2, 4, mlp_ratio=0), "mlp_ratio must be a positive number"),
        (lambda: HATStage(8, 1, 2, 8, 4, mlp_ratio=0.1), r"MLP hidden width of int\(0.8\) = 0"),  # was dim
        (lambda: BiasedAttention(8, 2, (2, 2), qk_scale=0.0), "qk_scale must be a positive number, or None"),
        (lambda: ContinuousPositionBias(2, (2, 2), token_order=torch.tensor([0, 1, 2])), "permutation of the 4"),
        (lambda: AbsolutePositionMLP(8, 2, token_order=torch.tensor([0, 0, 1, 2])), "permutation of the 4"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message):
            build()
    assert BiasedAttention(8, 2, (2, 2), qk_scale=0.25).scale == 0.25
