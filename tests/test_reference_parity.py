"""FasterViT and the HAT stage against the slow, loop-based reference in tests/reference_fastervit.py.

The reference shares no code with the library and was checked against the official implementation
(relative logit difference <= 3.3e-7 in float32 over fixed-size and any-resolution models).
"""

import pytest
import torch

import fastervit
from fastervit.factory import _VARIANTS
from fastervit.testing import official_state_dict as official_layout

from .conftest import randomize_
from .reference_fastervit import reference_forward, reference_hat_stage, stage_cfg
from .test_fastervit import CHEAP

TOL = dict(rtol=1e-5, atol=1e-5)


def _cfg(name: str, **overrides) -> dict:
    cfg = {**_VARIANTS[name][0], **overrides}
    cfg["any_res"] = name.endswith("any_res")
    return cfg


def _rel_close(ours, ref):
    scale = ref.abs().max()
    assert ((ours - ref).abs().max() / scale).item() < 1e-5


def _compare(name, x_size=None, batch=1, **overrides):
    model = randomize_(fastervit.create_model(name, **overrides)).eval()
    x = torch.randn(batch, 3, *(x_size or model.img_size))
    with torch.no_grad():
        ours = model(x)
        ref = reference_forward(official_layout(model), _cfg(name, **overrides), x)
    _rel_close(ours, ref)


def test_faster_vit_0_full_size():
    _compare("faster_vit_0_224")


@pytest.mark.parametrize(
    "name",
    [n for n in fastervit.list_models("*_224") + fastervit.list_models("faster_vit_4_21k_*") if "any_res" not in n],
)
def test_fixed_size_variants_small_width(name):
    _compare(name, **CHEAP)


@pytest.mark.parametrize(
    "resolution,hat",
    [
        ([224, 320], [False, False, True, False]),  # non-square grid of windows (2x3)
        ([200, 300], [False, False, True, False]),  # not multiples of the window: padding
        ([130, 500], [False, False, True, True]),  # very elongated, CTs in two stages
        ([448, 224], [False, False, True, True]),  # portrait
    ],
)
@pytest.mark.parametrize("name", ["faster_vit_0_any_res", "faster_vit_3_any_res"])  # propagation off / on
def test_any_resolution_non_square(name, resolution, hat):
    _compare(name, resolution=resolution, hat=hat, **CHEAP)


@pytest.mark.parametrize(
    "resolution,hat",
    [
        ([120, 120], [False, False, True, False]),  # stage 3: 7 px configured, the real 8x8 map needs 2x2 windows
        ([250, 180], [False, False, True, True]),  # stage 4: 7x5 configured, the real map 8x6
    ],
)
def test_any_resolution_where_the_map_rounds_up_into_another_window(resolution, hat):
    """The official code decides carrier tokens from floor(size / 2**(i+2)), which fits in one window here,
    though the real stage map (rounded up by the strided convs) spans two: that stage runs plain window
    attention over its windows, without carrier tokens. In float64 with large weights, so that another
    function shows far above rounding."""
    model = randomize_(fastervit.create_model("faster_vit_0_any_res", resolution=resolution, hat=hat, **CHEAP))
    model = model.eval().double()
    stage = 2 if hat[3] is False else 3
    level = model.levels[stage]
    assert not level.has_carrier_tokens and level.padded_resolution[0] == 2 * level.window_size  # 2 window rows
    assert not any(".hat_" in k or "global_tokenizer" in k for k in level.state_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("levels.2.", "levels.3.")) and p.ndim == 2:
                p.mul_(20)
        x = torch.randn(1, 3, *resolution, dtype=torch.float64)
        ours = model(x)
        cfg = _cfg("faster_vit_0_any_res", resolution=resolution, hat=hat, **CHEAP)
        ref = reference_forward(official_layout(model), cfg, x)
    # 1.2e-8 (float32 bias tables); with carrier tokens in that stage it was 0.2-0.3
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-6


@pytest.mark.parametrize("ct_size", [1, 3])
def test_other_carrier_token_sizes(ct_size):
    _compare("faster_vit_3_any_res", resolution=[224, 448], ct_size=ct_size, **CHEAP)


@pytest.mark.parametrize("do_propagation", [False, True])
@pytest.mark.parametrize("resolution", [[14, 14], [10, 26]])
def test_hat_stage_and_carrier_token_path(do_propagation, resolution):
    """One HAT level alone (CT init, blocks, propagation) against the reference stage."""
    overrides = dict(CHEAP, resolution=[r * 16 for r in resolution], do_propagation=do_propagation, layer_scale=0.5)
    model = randomize_(fastervit.create_model("faster_vit_0_any_res", **overrides)).eval()
    level = model.levels[2]
    assert level.has_carrier_tokens
    x = torch.randn(2, level.blocks[0].norm1.normalized_shape[0], *level.input_resolution)
    cfg = _cfg("faster_vit_0_any_res", **overrides)
    with torch.no_grad():
        ours = level.forward_blocks(x)
        ref = reference_hat_stage(official_layout(model), "levels.2.", stage_cfg(cfg, 2), x)
    torch.testing.assert_close(ours, ref, **TOL)
