"""FasterViT as a backbone (``features_only``, ``forward_intermediates``) and moved to other geometries
(``fastervit.resize``, ``FasterViT.set_input_size``).

Models are FasterViT-0 with reduced width and depth so that each test takes a second or two; the
geometry (windows, padding, carrier-token grids) is that of the real models.
"""

import functools
import re
from collections import OrderedDict

import pytest
import timm
import torch
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import fastervit
from fastervit.resize import CARRIER_TOKEN_MODULES, AdaptReport, adapt_checkpoint, load_adapted
from fastervit.testing import official_state_dict, save_official_checkpoint
from hatplug.errors import CheckpointMismatchError

from .contracts import check_forward_intermediates

SMALL = dict(depths=[1, 1, 2, 1], dim=32, in_dim=16, num_classes=10)
CHANNELS = [32, 64, 128, 256]
ANY_RES = "faster_vit_0_any_res"
# 96x160 input: stage maps 24x40, 12x20, 6x10, 3x5; with 3-pixel windows in stages 3-4 the stage-3 map is
# padded to 6x12 = 2x4 windows (carrier tokens, non-square grid) and stage 4 to 3x6 = 1x2 windows.
SIZE = [96, 160]
WINDOWS = [7, 7, 3, 3]
CT_MODULES = CARRIER_TOKEN_MODULES - {"gamma1", "gamma2"}  # FasterViT-0 has no layer scale


def _any_res(size=SIZE, seed=0, **kwargs):
    torch.manual_seed(seed)
    return fastervit.create_model(ANY_RES, resolution=size, **{"window_size": WINDOWS, **SMALL, **kwargs})


def _level_outputs_by_hooks(model, x):
    """Each level's map before its downsample, caught by module hooks (independent of forward_blocks)."""
    maps, handles = {}, []
    for i, level in enumerate(model.levels):
        if level.downsample is not None:
            hook = functools.partial(lambda i, module, args: maps.__setitem__(i, args[0]), i)
            handles.append(level.downsample.register_forward_pre_hook(hook))
        else:
            hook = functools.partial(lambda i, module, args, out: maps.__setitem__(i, out), i)
            handles.append(level.register_forward_hook(hook))
    final = model.forward_features(x)
    for handle in handles:
        handle.remove()
    return [maps[i] for i in range(len(model.levels))], final


# ---- features_only / forward_intermediates -----------------------------------------------------------------


def test_features_only_returns_each_level_before_its_downsample():
    full = _any_res().eval()
    backbone = _any_res(features_only=True).eval()
    missing, unexpected = backbone.model.load_state_dict(full.state_dict(), strict=False)
    assert not missing and {k.split(".")[0] for k in unexpected} == {"norm", "head"}  # pruned, nothing else
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        feats = backbone(x)
        expected, _ = _level_outputs_by_hooks(full, x)
    sizes = fastervit.stage_resolutions(SIZE)
    assert [tuple(f.shape) for f in feats] == [(2, c, *s) for c, s in zip(CHANNELS, sizes)]
    for f, e in zip(feats, expected):
        torch.testing.assert_close(f, e, rtol=0, atol=0)
    info = backbone.feature_info
    assert info.channels() == CHANNELS
    assert info.reduction() == [4, 8, 16, 32]
    assert info.module_name() == ["levels.0.downsample", "levels.1.downsample", "levels.2.downsample", "levels.3"]


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (0, 1), (1, 2)])
def test_feature_info_names_where_hooks_catch_the_maps(out_indices):
    """timm's hook-based extractor (FeatureHookNet), driven by feature_info's module / hook_type alone, catches the
    maps that features_only returns, also after pruning moves the last kept level's tap to its output."""
    from timm.models._features import FeatureHookNet

    backbone = _any_res(features_only=True, out_indices=out_indices).eval()
    x = torch.randn(1, 3, *SIZE)
    hooked = FeatureHookNet(backbone.model, out_indices=out_indices)
    with torch.no_grad():
        for got, want in zip(hooked(x), backbone(x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    last = out_indices[-1]
    assert backbone.feature_info.module_name()[-1] == f"levels.{last}"
    assert backbone.model.levels[last].downsample is None


@pytest.mark.parametrize("out_indices, kept", [((1, 2), [1, 2]), ((-1,), [3]), ((0,), [0])])
def test_out_indices_select_levels_and_prune_the_rest(out_indices, kept):
    full = _any_res().eval()
    backbone = _any_res(features_only=True, out_indices=out_indices).eval()
    backbone.model.load_state_dict(full.state_dict(), strict=False)
    assert len(backbone.model.levels) == max(kept) + 1  # later levels are gone
    assert backbone.model.levels[-1].downsample is None
    assert backbone.feature_info.channels() == [CHANNELS[i] for i in kept]
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        feats = backbone(x)
        expected, _ = _level_outputs_by_hooks(full, x)
    assert len(feats) == len(kept)
    for f, i in zip(feats, kept):
        torch.testing.assert_close(f, expected[i], rtol=0, atol=0)


def test_forward_intermediates_equal_forward_blocks_outputs_and_forward_features():
    model = _any_res().eval()
    x = torch.randn(2, 3, *SIZE)
    recorded = []
    for level in model.levels:  # wrap each level's forward_blocks to record what it returns
        level.forward_blocks = (lambda f: lambda t: recorded.append(f(t)) or recorded[-1])(level.forward_blocks)
    with torch.no_grad():
        features = model.forward_features(x)
    for level in model.levels:
        del level.forward_blocks
    assert len(recorded) == 4
    check_forward_intermediates(model, x, recorded, features)


def test_features_only_backbone_feeds_torchvision_fpn_at_a_non_square_size():
    backbone = _any_res(features_only=True).train()
    fpn = FeaturePyramidNetwork(backbone.feature_info.channels(), 32, extra_blocks=LastLevelMaxPool())
    x = torch.randn(2, 3, *SIZE)
    pyramid = fpn(OrderedDict((str(i), f) for i, f in enumerate(backbone(x))))
    sizes = [*fastervit.stage_resolutions(SIZE), (2, 3)]  # + the max-pooled extra level
    assert [tuple(p.shape) for p in pyramid.values()] == [(2, 32, *s) for s in sizes]
    sum(p.square().mean() for p in pyramid.values()).backward()
    stem = backbone.model.patch_embed.conv_down[0].weight
    ct_attention = backbone.model.levels[2].blocks[0].hat_attn.qkv.weight
    assert stem.grad is not None and ct_attention.grad is not None and ct_attention.grad.abs().sum() > 0


def test_timm_create_model_builds_the_same_backbone():
    backbone = timm.create_model(ANY_RES, features_only=True, img_size=SIZE, window_size=WINDOWS, **SMALL)
    assert backbone.feature_info.channels() == CHANNELS
    with torch.no_grad():
        assert [f.shape[1] for f in backbone(torch.randn(1, 3, *SIZE))] == CHANNELS
    with pytest.raises(ValueError, match="getter"):
        fastervit.create_model(ANY_RES, features_only=True, feature_cls="hook", **SMALL)


def test_features_only_takes_global_pool_empty_as_timm_backbones_do():
    """timm's backbones take global_pool="" with features_only (no head is left to pool for); FasterViT refused it
    for the classifier's num_classes, which the wrapper prunes anyway."""
    x = torch.randn(1, 3, *SIZE)
    torch.manual_seed(0)
    plain = fastervit.create_model(ANY_RES, features_only=True, resolution=SIZE, window_size=WINDOWS, **SMALL).eval()
    for create in (fastervit.create_model, timm.create_model):
        torch.manual_seed(0)
        kw = dict(img_size=SIZE) if create is timm.create_model else dict(resolution=SIZE)
        backbone = create(ANY_RES, features_only=True, global_pool="", window_size=WINDOWS, **kw, **SMALL).eval()
        with torch.no_grad():
            for ours, want in zip(backbone(x), plain(x), strict=True):
                assert torch.equal(ours, want)
    with pytest.raises(ValueError, match="num_classes=0"):  # a classifier still needs pooling or num_classes=0
        fastervit.create_model(ANY_RES, global_pool="", **SMALL)


# ---- moving weights to another geometry ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_224(tmp_path_factory):
    """FasterViT-0 (reduced) at 224, saved as an official training checkpoint (``module.`` prefixes, metadata,
    derived buffers): stage 3 is 14x14 = 2x2 windows with carrier tokens."""
    torch.manual_seed(0)
    model = fastervit.create_model("faster_vit_0_224", **SMALL).eval()
    path = save_official_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "faster_vit_small_224.pth.tar")
    return model, path, official_state_dict(model)


def _modules_of(keys):
    return {next(p for p in key.split(".") if p in CARRIER_TOKEN_MODULES) for key in keys}


def test_224_weights_run_at_320x480_and_the_report_says_what_moved(source_224):
    source, path, state = source_224
    model = fastervit.create_model(ANY_RES, resolution=[320, 480], checkpoint_path=path, adapt_geometry=True, **SMALL)
    report = model.load_report
    assert isinstance(report, AdaptReport) and report.ok
    # stage 3 is 20x30 -> padded 21x35 = 3x5 windows: carrier tokens, but a non-square grid, which (as in the
    # official any-resolution model) has no carrier-token position embedding
    assert model.levels[2].blocks[0].hat_attn is not None and model.levels[2].blocks[0].hat_pos_embed is None
    learned = set(source.state_dict())
    assert report.new == [] and report.mismatched == []
    assert set(report.dropped) == {k for k in learned if ".hat_pos_embed." in k}
    assert set(report.loaded) == learned - set(report.dropped)  # everything else reused as is
    assert set(report.derived) == set(state) - learned  # official derived buffers: recomputed
    assert "resized none" in str(report)
    with torch.no_grad():
        logits = model.eval()(torch.randn(1, 3, 320, 480))
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "target, dropped",
    [
        (dict(resolution=224), set()),  # same geometry: a plain load
        (dict(resolution=[320, 320]), set()),  # 3x3 windows in stage 3
        (dict(resolution=[448, 448], window_size=[7, 7, 14, 7]), set()),  # window 14: 2x2 windows again
        (dict(resolution=[320, 320], window_size=[7, 7, 5, 5]), set()),  # 4x4 windows, stage 4 2x2 windows
        (dict(resolution=224, ct_size=1), set()),  # 1x1 carrier token per window
        (dict(resolution=[320, 480]), {"hat_pos_embed"}),  # non-square window grid
        (dict(resolution=[96, 96]), CT_MODULES),  # one window in stage 3: no carrier tokens
    ],
)
def test_transfer_reuses_every_learned_tensor_the_target_has(source_224, target, dropped):
    source, _, state = source_224
    model = fastervit.create_model(ANY_RES, **{"window_size": [7, 7, 7, 7], **SMALL, **target})
    adapted, report = adapt_checkpoint(state, model)
    assert report.ok and report.new == []
    assert _modules_of(report.dropped) == dropped
    assert set(adapted) == set(report.loaded) == set(model.state_dict())
    for key in adapted:
        assert adapted[key] is state[key]  # reused as is: the very tensor
    if target == dict(resolution=224):  # same geometry: the same function
        load_adapted(model, state)
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), source(x), rtol=0, atol=0)


def test_carrier_tokens_the_source_lacks_are_newly_initialised(source_224):
    torch.manual_seed(1)
    no_ct = fastervit.create_model(ANY_RES, resolution=[96, 96], window_size=[7, 7, 7, 7], **SMALL)
    assert not no_ct.levels[2].has_carrier_tokens
    model = fastervit.create_model("faster_vit_0_224", **SMALL)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_adapted(model, no_ct.state_dict())
    assert report.ok and report.dropped == []
    assert set(report.new) == {k for k in init if any(p in CARRIER_TOKEN_MODULES for p in k.split("."))}
    assert _modules_of(report.new) == CT_MODULES
    for key in report.new:
        assert torch.equal(model.state_dict()[key], init[key])  # kept the target's initialisation


def test_a_state_dict_with_one_name_of_the_carrier_token_conv_adapts_fully(source_224):
    """Deduplicating savers keep one of the conv's two names: the report must not call the other new."""
    source, _, _ = source_224
    state = {k: v for k, v in source.state_dict().items() if "to_global_feature.pos" not in k}
    target = fastervit.create_model(ANY_RES, resolution=224, **SMALL)
    report = load_adapted(target, state)
    assert report.ok and not report.new and not report.dropped
    conv = target.levels[2].global_tokenizer.pos_embed.weight
    assert torch.equal(conv, source.levels[2].global_tokenizer.pos_embed.weight)


def test_load_adapted_names_the_model_inside_a_backbone(source_224):
    _, path, _ = source_224
    backbone = fastervit.create_model(ANY_RES, resolution=224, features_only=True, **SMALL)
    with pytest.raises(TypeError, match=r"pass backbone\.model, or create the backbone with checkpoint_path"):
        load_adapted(backbone, path)
    with_weights = fastervit.create_model(
        ANY_RES, resolution=224, features_only=True, checkpoint_path=path, adapt_geometry=True, **SMALL
    )
    assert with_weights.load_report.ok


def test_other_architecture_is_not_a_geometry_change(source_224):
    _, path, _ = source_224
    with pytest.raises(CheckpointMismatchError, match="shape mismatch levels"):
        fastervit.create_model(ANY_RES, checkpoint_path=path, adapt_geometry=True, **{**SMALL, "dim": 48})
    model = fastervit.create_model(
        ANY_RES, checkpoint_path=path, adapt_geometry=True, strict=False, **{**SMALL, "dim": 48}
    )
    assert not model.load_report.ok and model.load_report.mismatched
    assert "patch_embed.conv_down.0.weight" in model.load_report.loaded  # what fits is loaded


def test_classifier_of_another_size_is_replaced(source_224):
    _, path, _ = source_224
    with pytest.raises(CheckpointMismatchError, match="number of classes, pass adapt_geometry=True"):
        fastervit.create_model(ANY_RES, checkpoint_path=path, resolution=224, **{**SMALL, "num_classes": 3})
    model = fastervit.create_model(
        ANY_RES, checkpoint_path=path, adapt_geometry=True, resolution=224, **{**SMALL, "num_classes": 3}
    )
    report = model.load_report
    assert report.ok and sorted(report.new) == sorted(report.dropped) == ["head.bias", "head.weight"]


def test_pretrained_any_res_loads_the_224_weights_at_any_size(source_224, monkeypatch):
    _, path, _ = source_224
    monkeypatch.setattr(fastervit.factory, "pretrained_file", lambda name, url=None, cache_dir=None: path)
    model = fastervit.create_model(ANY_RES, pretrained=True, resolution=[320, 480], **SMALL)
    assert model.load_report.ok and model.load_report.dropped  # adapted: the CT position embedding is unused
    backbone = fastervit.create_model(ANY_RES, pretrained=True, resolution=[320, 480], features_only=True, **SMALL)
    assert backbone.load_report.ok
    qkv = backbone.model.levels[2].blocks[0].attn.qkv.weight
    torch.testing.assert_close(qkv, model.levels[2].blocks[0].attn.qkv.weight)
    fixed = fastervit.create_model("faster_vit_0_224", pretrained=True, **SMALL)  # strict, same geometry
    assert fixed.load_report.ok


def test_load_report_of_a_pruned_backbone_counts_only_its_own_tensors(source_224, monkeypatch):
    """Tensors of the modules features_only prunes (later levels, the last kept level's downsample, norm, head)
    are reported dropped, not loaded or new: every loaded key is one the backbone has."""
    _, path, _ = source_224
    monkeypatch.setattr(fastervit.factory, "pretrained_file", lambda name, url=None, cache_dir=None: path)
    for kwargs in (
        dict(pretrained=True, resolution=[320, 480], num_classes=3),  # adapted: an AdaptReport
        dict(checkpoint_path=path, resolution=224),  # the plain strict load: a LoadReport
    ):
        backbone = fastervit.create_model(ANY_RES, features_only=True, out_indices=(1, 2), **{**SMALL, **kwargs})
        report, own = backbone.load_report, set(backbone.model.state_dict())
        assert report.ok and report.loaded and set(report.loaded) <= own
        gone = report.dropped if isinstance(report, AdaptReport) else report.derived
        assert {"head.weight", "norm.weight", "levels.2.downsample.reduction.0.weight"} <= set(gone)
        assert any(key.startswith("levels.3.") for key in gone)
        assert not getattr(report, "new", []) and not report.replaced


# ---- set_input_size ------------------------------------------------------------------------------------------


def test_set_input_size_and_back_keeps_the_function():
    model = _any_res(size=[96, 128]).eval()
    x_old, x_new = torch.randn(2, 3, 96, 128), torch.randn(2, 3, 128, 192)
    with torch.no_grad():
        before = model(x_old)
    params = dict(model.named_parameters())

    model.set_input_size([128, 192])
    assert model.img_size == (128, 192)
    assert model.levels[2].input_resolution == fastervit.stage_resolutions([128, 192])[2]
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects
    fresh = _any_res(size=[128, 192], seed=1).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x_new), fresh(x_new), rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"built for 128x192 inputs .*set_input_size\(\[96, 128\]\)"):
            model(x_old)

    model.set_input_size([96, 128])
    assert all(not m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x_old), before, rtol=0, atol=0)


def test_set_input_size_changes_the_window_size():
    model = _any_res(size=[96, 128]).eval()
    model.set_input_size(window_size=[7, 7, 2, 2])
    fresh = _any_res(size=[96, 128], window_size=[7, 7, 2, 2], seed=1).eval()
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(x), rtol=0, atol=0)
    assert model.window_size == [7, 7, 2, 2]


def test_set_input_size_refuses_a_geometry_that_changes_the_weights():
    model = _any_res(size=[96, 128]).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        before = model(x)
    # 32x32: stage 3 is 2x2 pixels, one window, so its carrier-token modules would go
    with pytest.raises(ValueError, match=r"levels\.2 .*dropped: .*hat_attn.*adapt_geometry=True"):
        model.set_input_size([32, 32])
    assert model.img_size == (96, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


class _ScaledLinear(torch.nn.Linear):  # a layer with its own forward, such as a fake-quant or adapter layer
    def forward(self, x):
        return 2.0 * super().forward(x)


def test_set_input_size_refuses_to_lose_replaced_layers_and_hooks():
    """The HAT levels are rebuilt from their constructor arguments: a replaced layer or a hook inside one would
    be lost (they were: the round trip to another size and back changed the output), so it is refused and names
    the module; hooks elsewhere (conv levels, the model) are kept, and removing the change lets it through."""
    model = _any_res(size=[96, 128]).eval()
    mlp = model.levels[2].blocks[0].mlp
    scaled = _ScaledLinear(mlp.fc2.in_features, mlp.fc2.out_features)
    scaled.weight, scaled.bias, plain = mlp.fc2.weight, mlp.fc2.bias, mlp.fc2
    mlp.fc2 = scaled
    with pytest.raises(ValueError, match=r"levels\.2\.blocks\.0\.mlp\.fc2 is a _ScaledLinear where .* Linear"):
        model.set_input_size([128, 160])
    mlp.fc2 = plain
    handle = model.levels[3].blocks[0].register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"levels\.3\.blocks\.0 has hooks"):
        model.set_input_size([128, 160])
    model.levels[3].blocks[0].attn.extra = torch.nn.Identity()
    handle.remove()
    with pytest.raises(ValueError, match=r"levels\.3\.blocks\.0\.attn\.extra \(Identity\) was added"):
        model.set_input_size([128, 160])
    del model.levels[3].blocks[0].attn.extra
    calls = []
    model.levels[0].register_forward_hook(lambda *args: calls.append(1))  # not rebuilt: kept
    assert model.img_size == (96, 128)
    model.set_input_size([128, 160])
    model(torch.randn(1, 3, 128, 160))
    assert calls == [1]


def test_set_input_size_keeps_dtype_mode_and_gradient_checkpointing():
    model = _any_res(size=[96, 128]).double().train()
    model.set_grad_checkpointing()
    model.set_input_size([128, 160])
    assert all(t.dtype == torch.float64 for t in model.state_dict().values() if t.is_floating_point())
    assert model.levels[2].blocks[0].attn.pos_emb_funct.relative_coords_table.dtype == torch.float64
    assert model.levels[2].grad_checkpointing and model.training
    model(torch.randn(2, 3, 128, 160, dtype=torch.float64)).sum().backward()
    assert model.levels[2].blocks[0].hat_attn.qkv.weight.grad is not None


def test_bad_geometry_is_refused_and_a_failed_resize_changes_nothing():
    model = _any_res(size=[64, 64]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    for bad, error, message in [
        (0, ValueError, r"img_size must be positive, got 0"),
        ([64, -8], ValueError, r"img_size\[1\] must be positive"),
        ("96", TypeError, r"img_size must be an int or \[H, W\] of ints, got '96'"),
        ([64.7, 64], TypeError, r"img_size\[0\] must be an integer, got 64.7"),
        ([64, 64, 3], ValueError, r"img_size must be an int or \[H, W\]"),
    ]:
        with pytest.raises(error, match=message):
            model.set_input_size(bad)
    with pytest.raises(ValueError, match=r"window_size\[2\] must be positive"):
        model.set_input_size(window_size=[7, 7, 0, 3])
    with pytest.raises(ValueError, match=r"ct_size=2 .*window is 1x1: lower ct_size"):
        model.set_input_size([224, 224], window_size=1)
    assert model.img_size == (64, 64) and model.window_size == WINDOWS
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)

    for kwargs, error, message in [
        ({"resolution": "64"}, TypeError, "resolution must be an int or"),
        ({"resolution": 64.5}, TypeError, "resolution must be an int or"),
        ({"window_size": 0}, ValueError, r"window_size\[0\] must be positive"),
        ({"window_size": 7.5}, TypeError, "window_size must be an int or one int per stage"),
        ({"ct_size": 0}, ValueError, "ct_size must be positive"),
        ({"ct_size": [2, 2]}, TypeError, "ct_size must be an integer"),
        ({"ct_size": 8, "resolution": 224}, ValueError, r"ct_size=8 .*window is 7x7"),
    ]:
        with pytest.raises(error, match=message):
            fastervit.create_model("faster_vit_0_any_res", **kwargs)


def test_wrong_input_says_which_size_the_model_was_built_for():
    model = _any_res(size=[64, 64]).eval()
    with pytest.raises(ValueError, match=r"built for 64x64 inputs .*got 96x80: resize or pad the inputs to 64x64 .*"
                       r"fixed_size=\(64, 64\)\), width first\).*or call model.set_input_size\(\[96, 80"):  # fmt: skip
        model(torch.randn(1, 3, 96, 80))
    # a size whose carrier-token layout needs other weights: set_input_size would refuse it, so it is not advised
    wide = _any_res(size=[96, 96]).eval()  # stage 3: 2x2 windows, a square grid with its position embedding
    refused = r"got 96x160: resize or pad .* or build a model for 96x160 .*adapt_geometry=True\) \(set_input_size "
    with pytest.raises(ValueError, match=refused + "cannot: that size changes which weights levels.2 has") as error:
        wide(torch.randn(1, 3, 96, 160))
    assert "call model.set_input_size" not in str(error.value)
    with pytest.raises(ValueError, match=r"got a 3-D tensor .*model\(x\[None\]\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="built for 64x64 inputs"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(1, 64, 64, 3\): that looks channels-last .*permute\(0, 3, 1, 2\)"):
        model(torch.randn(1, 64, 64, 3))
    with pytest.raises(ValueError, match=r"3-channel images .*create the model with in_chans=1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"empty batch \(0 images\)"):
        model(torch.randn(0, 3, 64, 64))


def _advised_fixed_size(model, x):
    with pytest.raises(ValueError, match="GeneralizedRCNNTransform") as error:
        model(x)
    return tuple(int(v) for v in re.search(r"fixed_size=\((\d+), (\d+)\)", str(error.value)).groups()), str(error.value)


def test_the_size_error_advice_for_torchvision_detection_works():
    """Following the error's advice literally gives batches of the size the model was built for, also for a
    non-square model (torchvision reads fixed_size as (width, height)) and one that is not a multiple of 32."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    images = [torch.rand(3, 120, 90), torch.rand(3, 70, 200)]
    model = _any_res(size=[64, 96]).eval()
    fixed_size, message = _advised_fixed_size(model, torch.randn(1, 3, 120, 90))
    assert "multiple of 32" not in message
    transform = GeneralizedRCNNTransform(64, 96, [0.0] * 3, [1.0] * 3, fixed_size=fixed_size).eval()
    batch, _ = transform(images)
    assert tuple(batch.tensors.shape[-2:]) == (64, 96)
    with torch.no_grad():
        assert model(batch.tensors).shape == (2, 10)

    odd = _any_res(size=[100, 150]).eval()  # torchvision pads batches to multiples of 32: 128x160
    fixed_size, message = _advised_fixed_size(odd, torch.randn(1, 3, 120, 90))
    suggested = tuple(int(v) for v in re.search(r"multiple of 32, e\.g\. (\d+)x(\d+)", message).groups())
    assert suggested == (128, 160)
    model = _any_res(size=list(suggested)).eval()
    fixed_size, _ = _advised_fixed_size(model, torch.randn(1, 3, 120, 90))
    batch, _ = GeneralizedRCNNTransform(128, 160, [0.0] * 3, [1.0] * 3, fixed_size=fixed_size).eval()(images)
    assert tuple(batch.tensors.shape[-2:]) == suggested


def test_a_backbone_without_hat_levels_takes_any_size():
    """Pruned to the conv levels, nothing is tied to the built size: other sizes run, as in a model built for them."""
    conv_only = fastervit.create_model(
        ANY_RES, resolution=[64, 96], features_only=True, out_indices=(0, 1), window_size=WINDOWS, **SMALL
    ).eval()
    torch.manual_seed(0)
    built = fastervit.create_model(
        ANY_RES, resolution=[80, 80], features_only=True, out_indices=(0, 1), window_size=WINDOWS, **SMALL
    ).eval()
    built.load_state_dict(conv_only.state_dict())
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        for got, want in zip(conv_only(x), built(x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="built for 64x96 inputs"):  # a HAT level left: still tied to its size
        fastervit.create_model(ANY_RES, resolution=[64, 96], features_only=True, window_size=WINDOWS, **SMALL)(x)


def test_inputs_of_another_dtype_get_a_named_fix():
    model = _any_res(size=[64, 64]).eval()
    with pytest.raises(TypeError, match=r"floating-point images, got torch.uint8: .*x.float\(\) / 255"):
        model(torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"input is torch.float64 but the model's weights are torch.float32: pass "):
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the convs: allowed
        assert model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)).shape == (1, 10)


def test_features_only_model_can_change_its_input_size():
    feats = fastervit.create_model(
        ANY_RES, resolution=[64, 64], features_only=True, window_size=WINDOWS, **SMALL
    ).eval()
    feats.set_input_size([96, 96])  # stage 3 keeps its 2x2 windows, so the weights are the same
    with torch.no_grad():
        maps = feats(torch.randn(1, 3, 96, 96))
    assert [tuple(m.shape[-2:]) for m in maps] == [(24, 24), (12, 12), (6, 6), (3, 3)]
    with pytest.raises(ValueError, match="out_indices is empty"):
        fastervit.create_model(ANY_RES, features_only=True, out_indices=(), **SMALL)
    with pytest.raises(TypeError, match="model name is a string"):
        fastervit.create_model(None)


def test_timm_feature_options_are_taken_or_refused_by_name():
    import numpy as np

    x = torch.randn(1, 3, *SIZE)
    plain = _any_res(features_only=True, out_indices=(1, 3)).eval()
    normed = _any_res(features_only=True, out_indices=(1, 3), feature_cfg=dict(norm=True)).eval()
    from_cfg = _any_res(features_only=True, feature_cfg=dict(out_indices=(1, 3)), output_stride=32).eval()
    numpy_ints = _any_res(features_only=True, out_indices=np.array([1, 3])).eval()
    full = _any_res().eval()  # same seed: the same weights
    with torch.no_grad():
        want = plain(x)
        for g, w in zip(from_cfg(x), want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        torch.testing.assert_close(normed(x)[-1], full.forward_features(x), rtol=0, atol=0)  # the final norm
        assert [m.shape for m in numpy_ints(x)] == [m.shape for m in want]
    with pytest.raises(ValueError, match=r"return_dict would be ignored .*dict\(zip\(names, backbone\(x\)\)\)"):
        _any_res(features_only=True, feature_cfg=dict(return_dict=True))
    assert numpy_ints.feature_info.channels() == plain.feature_info.channels()
    with pytest.raises(ValueError, match="feature_cfg configures feature maps: pass it together with features_only"):
        _any_res(feature_cfg=dict(return_dict=True))
    with pytest.raises(ValueError, match=r"feature_cfg: flatten_sequential not options of .* which takes "):
        _any_res(features_only=True, feature_cfg=dict(flatten_sequential=True))
    with pytest.raises(ValueError, match=r"got out_indices=\(1, 2\) and feature_cfg out_indices=\(1, 3\): pass one"):
        _any_res(features_only=True, out_indices=(1, 2), feature_cfg=dict(out_indices=(1, 3)))
    with pytest.raises(ValueError, match="feature_cls='fx' is not supported"):
        _any_res(features_only=True, feature_cfg=dict(feature_cls="fx"))
    with pytest.raises(ValueError, match="output_stride=16: FasterViT has no dilated variant"):
        _any_res(features_only=True, output_stride=16)
    from timm.layers import Format

    for fmt in ("NHWC", Format.NHWC):  # accepted at creation, then every forward failed
        with pytest.raises(ValueError, match=r"output_fmt='NHWC' is not supported: FasterViT's feature maps are NCHW"):
            _any_res(features_only=True, feature_cfg=dict(output_fmt=fmt))
    for fmt in ("NCHW", Format.NCHW):
        with torch.no_grad():
            assert [m.shape for m in _any_res(features_only=True, feature_cfg=dict(output_fmt=fmt)).eval()(x)]
    with pytest.raises(ValueError, match=r"^output_fmt='NHWC' is not supported: FasterViT's feature maps are NCHW"):
        full.forward_intermediates(x, output_fmt=Format.NHWC)


def test_feature_indices_and_sizes_are_checked():
    for out_indices in ((2, 0), (1, 1), (-1, 0)):
        with pytest.raises(ValueError, match="distinct levels in increasing order"):
            fastervit.create_model(ANY_RES, features_only=True, out_indices=out_indices, **SMALL)
    feats = fastervit.create_model(ANY_RES, features_only=True, out_indices=(0, -1), **SMALL)
    assert feats.feature_info.channels() == [32, 256]
    for kwargs, message in [
        ({"num_classes": -1}, "num_classes must be an int >= 0"),
        ({"num_classes": "10"}, "num_classes must be an int >= 0"),
        ({"dim": 0}, "dim must be positive"),
        ({"in_chans": 0}, "in_chans must be positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            fastervit.create_model(ANY_RES, **{**SMALL, **kwargs})


def test_default_out_indices_follow_the_number_of_levels_and_bad_ones_are_named():
    three = dict(depths=[1, 1, 1], num_heads=[2, 4, 8], window_size=[7, 7, 7], hat=[False, False, True])
    feats = fastervit.create_model(ANY_RES, features_only=True, resolution=[64, 64], **{**SMALL, **three})
    assert feats.feature_info.reduction() == [4, 8, 16]  # it asked for a fourth level and failed
    five = dict(depths=[1] * 5, num_heads=[2, 4, 8, 16, 32], window_size=[7] * 5, hat=[False] * 5)
    feats = fastervit.create_model(ANY_RES, features_only=True, resolution=[128, 128], **{**SMALL, **five})
    assert feats.feature_info.reduction() == [4, 8, 16, 32, 64]  # the fifth level was pruned, weights and all
    for out_indices, message in [((0, 4), r"\[4\] not level indices of this model, which has 4 levels"),
                                 ((-5,), r"\[-5\] not level indices"), (5, "the last 5 levels of 4")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            fastervit.create_model(ANY_RES, features_only=True, out_indices=out_indices, **SMALL)


def test_a_backbone_reloads_its_own_state_dict_and_timm_loads_a_classifier_checkpoint(tmp_path):
    backbone = _any_res(features_only=True, out_indices=(1, 2)).eval()
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        expected = backbone(x)
    options = dict(resolution=SIZE, window_size=WINDOWS, features_only=True, out_indices=(1, 2), **SMALL)
    for name, state in [("own", backbone.state_dict()), ("compiled", {f"_orig_mod.{k}": v for k, v in
                                                                       backbone.state_dict().items()})]:  # fmt: skip
        torch.save(state, tmp_path / f"{name}.pth")
        again = fastervit.create_model(ANY_RES, checkpoint_path=tmp_path / f"{name}.pth", **options).eval()
        assert not again.load_report.missing and not again.load_report.unexpected  # strict, every tensor
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(again(x), expected))
    # and into a backbone for another size, moved by adapt_geometry (strict: the pruned norm and head were
    # reported missing, which failed the load)
    moved = fastervit.create_model(ANY_RES, checkpoint_path=tmp_path / "own.pth", adapt_geometry=True,
                                   **{**options, "resolution": [128, 192]})  # fmt: skip
    assert moved.load_report.ok and not moved.load_report.new and not moved.load_report.missing
    # a classifier's official checkpoint through timm.create_model, which loads it into the wrapper
    classifier = _any_res(seed=3).eval()
    save_official_checkpoint(classifier, tmp_path / "official.pth.tar")
    ours = fastervit.create_model(ANY_RES, checkpoint_path=tmp_path / "official.pth.tar", **options).eval()
    theirs = timm.create_model(ANY_RES, checkpoint_path=str(tmp_path / "official.pth.tar"), **options).eval()
    with torch.no_grad():
        reference = classifier.forward_intermediates(x, indices=(1, 2), intermediates_only=True)
        for a, b, c in zip(ours(x), theirs(x), reference):
            assert torch.equal(a, c) and torch.equal(b, c)
    # strict=False is for a partial fit: a file none of whose tensors fits is an error, not a random model
    torch.save({f"net.{k}": v for k, v in classifier.state_dict().items()}, tmp_path / "other.pth")
    with pytest.raises(CheckpointMismatchError, match="Not one of its .* tensors fits, even with strict=False"):
        fastervit.create_model(ANY_RES, checkpoint_path=tmp_path / "other.pth", strict=False, **options)


def test_a_backbone_that_keeps_the_final_norm_loads_it_and_requires_it(tmp_path):
    """``feature_cfg=dict(norm=True)`` keeps the final norm on the last map: a checkpoint's norm is loaded (and
    reported so, not as dropped) by us and by timm.create_model, and a strict load of a file without it fails
    (it passed, leaving the norm at its initial values)."""
    classifier = _any_res(seed=5).eval()
    with torch.no_grad():
        classifier.norm.weight.uniform_(0.5, 2.0), classifier.norm.bias.uniform_(-1, 1)
        classifier.norm.running_mean.uniform_(-1, 1)
    torch.save(classifier.state_dict(), tmp_path / "full.pth")
    options = dict(resolution=SIZE, window_size=WINDOWS, features_only=True, feature_cfg=dict(norm=True), **SMALL)
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        reference = classifier.forward_intermediates(x, norm=True, intermediates_only=True)[-1]
    ours = fastervit.create_model(ANY_RES, checkpoint_path=tmp_path / "full.pth", **options).eval()
    theirs = timm.create_model(ANY_RES, checkpoint_path=str(tmp_path / "full.pth"), **options).eval()
    assert "norm.weight" in ours.load_report.loaded and "norm.weight" not in ours.load_report.derived
    with torch.no_grad():
        assert torch.equal(ours(x)[-1], reference) and torch.equal(theirs(x)[-1], reference)
    torch.save({k: v for k, v in classifier.state_dict().items() if not k.startswith("norm.")}, tmp_path / "no.pth")
    with pytest.raises(CheckpointMismatchError, match="missing: norm.weight"):
        fastervit.create_model(ANY_RES, checkpoint_path=tmp_path / "no.pth", **options)
    # without norm=True the wrapper prunes the norm, and a file without it is complete
    pruned = fastervit.create_model(ANY_RES, checkpoint_path=tmp_path / "no.pth", **{**options, "feature_cfg": {}})
    assert pruned.load_report.ok


def test_a_backbone_has_timm_training_helpers_under_its_own_parameter_names():
    from timm.models import group_parameters
    from timm.optim import create_optimizer_v2

    full, backbone = _any_res(), _any_res(features_only=True)
    backbone.set_grad_checkpointing(True)
    assert backbone.model.grad_checkpointing
    names = {n for n, _ in backbone.named_parameters()}
    no_decay = backbone.no_weight_decay()
    assert no_decay and no_decay <= names and {n[len("model.") :] for n in no_decay} == full.no_weight_decay()
    optimizer = create_optimizer_v2(backbone, opt="adamw", weight_decay=0.05)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    cpb = [p for n, p in backbone.named_parameters() if "cpb_mlp" in n and p.ndim > 1]
    assert cpb and not any(id(p) in decayed for p in cpb)  # as for the classifier: they were decayed
    for coarse in (False, True):
        groups = group_parameters(backbone, backbone.group_matcher(coarse))
        expected = group_parameters(full, full.group_matcher(coarse))
        grouped = {n for names_ in groups.values() for n in names_}
        assert grouped == names  # every parameter in a group
        full_of = {n: g for g, names_ in expected.items() for n in names_}
        # each parameter in the layer of the classifier's parameter of that name (the prefix is the only change)
        assert all(full_of[n[len("model.") :]] == g for g, names_ in groups.items() for n in names_)


def test_load_adapted_reports_every_mismatch_and_names_swapped_arguments():
    torch.manual_seed(0)
    wide = fastervit.create_model(ANY_RES, resolution=224, **{**SMALL, "dim": 48})
    target = _any_res(size=[224, 224])
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch ... and \d+ more") as error:
        load_adapted(target, wide.state_dict())
    report = error.value.report
    assert isinstance(report, AdaptReport) and report.truncated and "has every one" in str(error.value)
    own = target.state_dict()
    want = {k for k, v in wide.state_dict().items() if k in own and v.shape != own[k].shape} - {"head.weight"}
    assert {key for key, _, _ in report.mismatched} == want and len(want) > 20  # a head of another size: new
    swapped = r"load_adapted got a (Ordered)?[dD]ict as model and a FasterViT as checkpoint: the arguments look swapped"
    with pytest.raises(TypeError, match=swapped):
        load_adapted(wide.state_dict(), target)
