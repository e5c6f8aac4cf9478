"""hatplug.mixers: every stage-3 replacement keeps the shape, passes gradients, and mixes tokens as it claims."""

import pytest
import torch

from hatplug.layers import HATStage
from hatplug.mixers import (
    MIXERS,
    HATAblationStage,
    SwinBlock,
    create_mixer,
    shift_attention_mask,
)
from recipes.models import TINY_FASTERVIT, fastervit_mixer

GEOMETRY = dict(dim=32, depth=2, num_heads=2, input_resolution=(8, 8), window_size=4)


def _influence(stage: torch.nn.Module, target: tuple[int, int], source: tuple[int, int], size=(8, 8)) -> float:
    """|d out[target] / d in[source]| summed over channels: does the source token reach the target token?"""
    torch.manual_seed(0)
    x = torch.randn(1, GEOMETRY["dim"], *size, requires_grad=True)
    stage.eval()(x)[0, :, target[0], target[1]].sum().backward()
    return x.grad[0, :, source[0], source[1]].abs().sum().item()


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_shape_and_gradients(name):
    stage = create_mixer(name, **GEOMETRY)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    out = stage(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert x.grad.abs().sum() > 0
    no_grad = [n for n, p in stage.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"{name}: parameters without gradient: {no_grad}"


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_non_multiple_sizes(name):
    """Maps that are not a multiple of the window are padded inside and cropped back."""
    stage = create_mixer(name, **{**GEOMETRY, "input_resolution": (7, 10)})
    assert stage(torch.randn(1, 32, 7, 10)).shape == (1, 32, 7, 10)


def test_window_only_stays_inside_its_window():
    stage = create_mixer("window", **GEOMETRY)
    assert _influence(stage, (0, 3), (0, 2)) > 0  # same window
    assert _influence(stage, (0, 3), (0, 4)) == 0  # right across the window border
    assert _influence(stage, (0, 0), (7, 7)) == 0


def test_swin_crosses_the_unshifted_window_border():
    stage = create_mixer("swin", **GEOMETRY)
    assert [b.shift for b in stage.blocks] == [0, 2]
    near = _influence(stage, (0, 3), (0, 4))  # neighbours in different unshifted windows
    assert near > 0
    # opposite corners meet only in the rolled wrap-around window, where the -100 mask leaves exp(-100)
    assert _influence(stage, (0, 0), (7, 7)) < 1e-30 * near


def test_swin_mask_blocks_the_wrap_around():
    """After the roll, (0, 0) and (7, 7) share the last window; the -100 mask keeps them apart."""
    masked = SwinBlock(32, 2, window_size=4, map_size=(8, 8), shift=2)
    assert _influence(masked, (7, 7), (0, 0)) < 1e-6 * _influence(masked, (7, 7), (6, 6))
    unmasked = SwinBlock(32, 2, window_size=4, map_size=(8, 8), shift=2)
    unmasked.attn.shift_mask = None  # the failure the mask prevents
    assert _influence(unmasked, (7, 7), (0, 0)) > 1e-3 * _influence(unmasked, (7, 7), (6, 6))


def test_shift_mask_regions():
    mask = shift_attention_mask(8, 8, window_size=4, shift=2)
    assert mask.shape == (4, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert not mask[0].any()  # the top-left window holds one region only
    assert (mask[3] == -100).sum() > 0 and torch.equal(mask, mask.transpose(1, 2))


@pytest.mark.parametrize("name", ["twins", "edgevit", "hat"])
def test_global_mixers_reach_across_the_map(name):
    kwargs = {"window_size": 2} if name == "edgevit" else {}
    stage = create_mixer(name, **{**GEOMETRY, **kwargs})
    assert _influence(stage, (0, 0), (7, 7)) > 0


def test_hat_ablation_defaults_are_hatstage():
    torch.manual_seed(0)
    reference = HATStage(**GEOMETRY)
    torch.manual_seed(0)
    stage = HATAblationStage(**GEOMETRY)
    assert stage.state_dict().keys() == reference.state_dict().keys()
    stage.load_state_dict(reference.state_dict())
    x = torch.randn(2, 32, 8, 8)
    assert torch.equal(stage.eval()(x), reference.eval()(x))


def test_hat_ablation_switches():
    full = HATAblationStage(**GEOMETRY, do_propagation=True)
    no_ct = HATAblationStage(**GEOMETRY, do_propagation=True, ct_attention=False)
    no_bias = HATAblationStage(**GEOMETRY, do_propagation=True, position_bias=False)
    keys = set(full.state_dict())
    assert {k for k in keys if "hat_attn" in k} and not {k for k in no_ct.state_dict() if "hat_attn" in k}
    assert not {k for k in no_bias.state_dict() if "cpb_mlp" in k}
    assert full.blocks[-1].propagate and not HATAblationStage(**GEOMETRY).blocks[-1].propagate
    # without CT attention a window's carrier tokens only summarise their own window (plus the 3x3 conv's
    # one-token rim): two windows apart, nothing gets through
    assert _influence(no_ct, (0, 0), (7, 7)) == 0
    assert _influence(full, (0, 0), (7, 7)) > 0
    # position biases gone: every block's relative bias is a broadcast zero
    assert all(not blk.attn.pos_emb_funct().any() for blk in no_bias.blocks)


def test_create_mixer_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        create_mixer("nope", **GEOMETRY)


def test_edgevit_has_no_layer_scale():
    with pytest.raises(ValueError, match="no layer scale"):
        create_mixer("edgevit", **GEOMETRY, layer_scale=1e-5)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_fastervit_with_swapped_stage3(name):
    model = fastervit_mixer(name, img_size=64, num_classes=3, **TINY_FASTERVIT)
    assert type(model.levels[2].mixer) is MIXERS[name]
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    # everything outside stage 3 is FasterViT's
    reference = fastervit_mixer("window", img_size=64, num_classes=3, **TINY_FASTERVIT)
    outside = {k for k in model.state_dict() if not k.startswith("levels.2.mixer.")}
    assert outside == {k for k in reference.state_dict() if not k.startswith("levels.2.mixer.")}


def test_swapped_model_keeps_fastervit_features():
    model = fastervit_mixer("twins", img_size=64, num_classes=3, **TINY_FASTERVIT)
    features = model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
    assert [tuple(f.shape[1:]) for f in features] == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]
