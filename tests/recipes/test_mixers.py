"""hatplug.mixers: every stage-3 replacement keeps the shape, passes gradients, and mixes tokens as it claims."""

import numpy as np
import pytest
import torch
from timm.models._manipulate import reinit_non_persistent_buffers

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


@pytest.mark.parametrize("size", [(4, 16), (16, 4), (8, 12)])
def test_swin_shifts_each_axis_that_has_more_than_one_window_as_timm_does(size):
    """A 4x16 map with 4-pixel windows has four windows across: the shifted block rolls the columns (it did not
    shift at all, since the shorter side is one window, which made the arm window-only there). Checked against
    timm's SwinTransformerBlock with the same weights and the position terms zeroed on both sides."""
    from timm.models.swin_transformer import SwinTransformerBlock

    from hatplug.mixers import _Zero

    stage = create_mixer("swin", **{**GEOMETRY, "input_resolution": size}).eval()
    ours = stage.blocks[1]
    assert ours._rolls == tuple(2 if n > 4 else 0 for n in size)
    ours.pos_embed, ours.attn.pos_emb_funct = _Zero(1, 1, 1), _Zero(1, 2, 16, 16)
    theirs = SwinTransformerBlock(32, size, num_heads=2, window_size=4, shift_size=2).eval()
    for name in ("norm1", "norm2", "mlp"):
        getattr(theirs, name).load_state_dict(getattr(ours, name).state_dict())
    theirs.attn.qkv.load_state_dict(ours.attn.qkv.state_dict())
    theirs.attn.proj.load_state_dict(ours.attn.proj.state_dict())
    with torch.no_grad():
        theirs.attn.relative_position_bias_table.zero_()
        x = torch.randn(2, 32, *size)
        torch.testing.assert_close(ours(x), theirs(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_mixers_built_on_the_meta_device_recompute_their_tables(name):
    """Built on the meta device, a stage gets its tables back from timm's reinit_non_persistent_buffers after
    to_empty (the Swin shift mask and the zeros standing in for removed biases had no such hook, so they kept
    whatever the memory held)."""
    kw = {"position_bias": False} if name.startswith("hat") else {}
    torch.manual_seed(0)
    reference = create_mixer(name, **GEOMETRY, **kw).eval()
    with torch.device("meta"):
        stage = create_mixer(name, **GEOMETRY, **kw)
    stage.to_empty(device="cpu").eval()
    for buf in stage.buffers():
        buf.fill_(1)  # what the memory held
    stage.load_state_dict(reference.state_dict())
    reinit_non_persistent_buffers(stage)
    for (key, buf), (_, want) in zip(stage.named_buffers(), reference.named_buffers()):
        assert torch.equal(buf, want), key
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        assert torch.equal(stage(x), reference(x))


def test_without_ct_attention_every_parameter_left_is_trained():
    """ct_attention=False removes the carrier-token attention and what fed only it (its norm and layer scale):
    they stayed, never got a gradient and inflated that ablation row's parameter count."""
    stage = HATAblationStage(**GEOMETRY, ct_attention=False, layer_scale=1e-2)
    stage(torch.randn(2, 32, 8, 8)).square().sum().backward()
    idle = [n for n, p in stage.named_parameters() if p.grad is None or not p.grad.any()]
    assert idle == [] and not any("hat_norm1" in n or "gamma1" in n for n, _ in stage.named_parameters())
    # a propagating last block keeps its layer scale, which scales the propagated tokens (only the attention goes)
    torch.manual_seed(0)
    full = HATAblationStage(**GEOMETRY, do_propagation=True, layer_scale=1e-2)
    torch.manual_seed(0)
    no_ct = HATAblationStage(**GEOMETRY, do_propagation=True, layer_scale=1e-2, ct_attention=False)
    assert no_ct.blocks[-1].gamma1 is not None and no_ct.blocks[0].gamma1 is None
    assert torch.equal(no_ct.blocks[-1].gamma1, full.blocks[-1].gamma1)


def test_edgevit_takes_the_shared_block_defaults_and_checks_its_stride():
    """The other mixers' q/k/v projections have a bias (HATBlock's default); the EdgeViT arm had none."""
    stage = create_mixer("edgevit", **{**GEOMETRY, "window_size": 2})
    biases = [m.bias for n, m in stage.named_modules() if n.endswith("qkv")]
    assert biases and all(b is not None for b in biases)
    assert create_mixer("window", **GEOMETRY).blocks[0].attn.qkv.bias is not None
    no_bias = create_mixer("edgevit", **{**GEOMETRY, "window_size": 2, "qkv_bias": False})
    assert all(m.bias is None for n, m in no_bias.named_modules() if n.endswith("qkv"))
    with pytest.raises(ValueError, match="window_size must be a positive int, got 0"):
        create_mixer("edgevit", **{**GEOMETRY, "window_size": 0})


@pytest.mark.parametrize("name", ["swin", "hat"])
def test_gradient_checkpointing_reaches_the_swapped_stage(name):
    """FasterViT.set_grad_checkpointing set a flag on the mixer level that nothing read: stage 3 ran without it."""
    model = fastervit_mixer(name, **TINY_FASTERVIT, img_size=64, num_classes=2)
    level = next(m for m in model.modules() if type(m).__name__ == "MixerLevel")
    calls, forward = [], level.mixer.forward

    def counted(x):  # (a forward hook does not fire when checkpointing recomputes)
        calls.append(1)
        return forward(x)

    level.mixer.forward = counted
    model.set_grad_checkpointing(True)
    model.train()(torch.randn(2, 3, 64, 64)).sum().backward()
    if name == "hat":  # a HAT stage checkpoints its own blocks
        assert level.mixer.grad_checkpointing and calls == [1]
    else:  # any other mixer is checkpointed whole: its forward runs again in the backward pass
        assert calls == [1, 1]
    model.set_grad_checkpointing(False)
    calls.clear()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert calls == [1] and not getattr(level.mixer, "grad_checkpointing", False)


@pytest.mark.parametrize("name", ["swin", "twins", "edgevit"])
def test_stages_name_bad_maps_and_arguments(name):
    """The Swin, Twins and EdgeViT stages answered a wrong channel count with a broadcast or conv error, a 3-D
    input with an IndexError, ran on integer maps, and divided by a zero window; the window and HAT stages
    already named each."""
    kwargs = {**GEOMETRY, "window_size": 2} if name == "edgevit" else GEOMETRY
    stage = create_mixer(name, **kwargs)
    for x, error, message in [
        (torch.randn(1, 16, 8, 8), ValueError, r"takes 32-channel maps \(B, 32, 8, 8\), got shape \(1, 16, 8, 8\)"),
        (torch.randn(32, 8, 8), ValueError, r"3-D tensor of shape \(32, 8, 8\)"),
        (torch.randn(1, 8, 8, 32), ValueError, r"channels-last .* x\.permute\(0, 3, 1, 2\)"),
        (torch.ones(1, 32, 8, 8, dtype=torch.long), TypeError, "floating-point maps, got torch.int64"),
    ]:
        with pytest.raises(error, match=message):
            stage(x)
    for bad in ({"window_size": 0}, {"depth": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a positive int, got 0"):
            create_mixer(name, **{**kwargs, **bad})
    # the checks HATStage makes (they were copies with other rules): a zero side or a 3-tuple is refused, a NumPy
    # int taken, and a map of another size is named
    for bad in ((0, 8), (8, 8, 8)):
        with pytest.raises(ValueError, match="input_resolution must be"):
            create_mixer(name, **{**kwargs, "input_resolution": bad})
    square = create_mixer(name, **{**kwargs, "input_resolution": np.int64(8), "window_size": np.int64(2)})
    assert square(torch.randn(1, 32, 8, 8)).shape == (1, 32, 8, 8)  # one int, as HATStage takes
    assert type(square.input_resolution[0]) is int
    with pytest.raises(AssertionError, match=r"was built for 8x8 maps, got 12x12: rebuild it with input_resolution"):
        stage(torch.randn(1, 32, 12, 12))


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
