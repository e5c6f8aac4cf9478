"""The layer pieces conversions add to hatplug.layers: any-size carrier tokens, the gated attention, the shift
mask, the carrier position embedding."""

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from hatplug.adapters import shifted_window_mask
from hatplug.layers import CarrierPositionMLP, CarrierTokenizer, gated_carrier_attention, upsample_index


@pytest.mark.parametrize("size", [(14, 21), (10, 13), (7, 30)])
def test_any_size_tokenizer_matches_fastervits_fixed_one(size):
    """Padding to whole windows, then FasterViT's pooling geometry worked out from the input."""
    H, W = size
    fixed = CarrierTokenizer(8, (-(-H // 7) * 7, -(-W // 7) * 7), 7, 2)
    any_size = CarrierTokenizer(8, None, 7, 2)
    any_size.load_state_dict({k: v for k, v in fixed.state_dict().items() if k.startswith("pos_embed")})
    x = torch.randn(2, 8, H, W)
    padded = torch.nn.functional.pad(x, (0, fixed.map_size[1] - W, 0, fixed.map_size[0] - H))
    torch.testing.assert_close(any_size(x), fixed(padded))
    channels_last = CarrierTokenizer(8, None, 7, 2, channels_last=True)
    channels_last.load_state_dict(any_size.state_dict())
    torch.testing.assert_close(channels_last(x.permute(0, 2, 3, 1)), any_size(x))


@pytest.mark.parametrize("res,window,shift", [((8, 8), 4, 2), ((10, 6), 4, 2), ((14, 21), 7, 3), ((12, 12), 3, 1)])
def test_shift_mask_matches_timm(res, window, shift):
    block = SwinTransformerBlock(8, res, num_heads=1, window_size=window, shift_size=shift)
    padded = [-(-r // window) * window for r in res]
    ours = shifted_window_mask(*padded, block.window_size, block.shift_size, torch.zeros(1))
    assert torch.equal(ours, block.attn_mask)


def _gated(q, k, v, n, gate):
    """The gated attention on a joint ``[CTs; window]`` sequence, outputs joined back."""
    carriers, window = (t[:, :, :n] for t in (q, k, v)), (t[:, :, n:] for t in (q, k, v))
    return torch.cat(gated_carrier_attention(tuple(carriers), tuple(window), gate), dim=2)


def _split_softmaxes(q, k, v, n, bias=None):
    logits = q @ k.transpose(-1, -2) + (0 if bias is None else bias)
    joint = logits.softmax(-1) @ v
    window = logits[..., n:].softmax(-1) @ v[:, :, n:]
    return joint, window


def test_gate_interpolates_between_window_and_joint_softmax():
    q, k, v = torch.randn(3, 4, 2, 7, 8).unbind(0)  # (B_, heads, n + N, hd), 3 carrier tokens
    joint, window = _split_softmaxes(q, k, v, 3)
    torch.testing.assert_close(_gated(q, k, v, 3, torch.zeros(2)), window)
    torch.testing.assert_close(_gated(q, k, v, 3, torch.ones(2)), joint)
    mixed = _gated(q, k, v, 3, torch.tensor([0.25, 0.75]))
    expected = window + torch.tensor([0.25, 0.75]).view(1, 2, 1, 1) * (joint - window)
    torch.testing.assert_close(mixed, expected)


def test_gated_attention_stays_exact_when_one_side_dominates():
    """Two separate softmaxes: carrier logits 200 above the window's (or below) lose nothing."""
    q, k, v = torch.randn(3, 1, 2, 6, 4).unbind(0)
    for offset in (200.0, -200.0):
        k_shifted = k.clone()
        k_shifted[:, :, :2] += offset * q.mean(2, keepdim=True) / q.mean(2, keepdim=True).square().sum(-1, True)
        out = _gated(q, k_shifted, v, 2, torch.zeros(2))
        _, window = _split_softmaxes(q, k_shifted, v, 2)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, window)


def test_carrier_position_embedding_is_grouped_by_window_and_cached_per_grid():
    pe = CarrierPositionMLP(dim=4, ct_size=2).eval()
    with torch.no_grad():
        emb = pe(2, 3)[0]  # windows 2 x 3, CT raster 4 x 6
        # the 2nd stored token of window (1, 2) is raster (2, 5): centre (2 * 2 + 1) / 4 - 1, (2 * 5 + 1) / 6 - 1
        torch.testing.assert_close(emb[(1 * 3 + 2) * 4 + 1], pe.cpb_mlp(torch.tensor([[0.25, 11 / 6 - 1]]))[0])
        assert pe(2, 3) is pe(2, 3) and pe(3, 3) is not pe(2, 3)


def test_rectangular_upsample_index_is_nearest_upsampling():
    grid = torch.randn(5, 4, 3)
    image = grid.transpose(1, 2).reshape(5, 3, 2, 2)
    ref = torch.nn.functional.interpolate(image, size=(3, 5), mode="nearest").flatten(2).transpose(1, 2)
    assert torch.equal(grid[:, upsample_index(2, (3, 5))], ref)
