"""Tests for hatplug.models.edgevit (EdgeViT-XXS/XS/S).

Reference numbers below were measured by instantiating the official implementation,
saic-fi/edgevit at commit df3d070addc3dc761173429426eab5edeb0d6343 (``src/edgevit.py``), with
``num_classes=1000``. Numerical equality with that code (max abs logit diff < 1e-6 at 224x224 after
copying its state_dict) was checked outside the test suite, since the reference is not vendored.
"""

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.fx

import hatplug
from hatplug.models.edgevit import EdgeViT, GlobalSparseAttn, GlobalSparseBlock, LGLBlock, LocalAgg

from .contracts import check_forward_intermediates

VARIANTS = ["edgevit_xxs", "edgevit_xs", "edgevit_s"]

# Parameter counts of the official models (saic-fi/edgevit@df3d070, num_classes=1000).
OFFICIAL_PARAMS = {
    "edgevit_xxs": 4_067_704,
    "edgevit_xs": 6_770_056,
    "edgevit_s": 13_108_168,
}

# Official state_dict (saic-fi/edgevit@df3d070): number of entries and sha256 over the
# "key:shape" lines in state_dict order, e.g. "patch_embed1.proj.weight:(36, 3, 4, 4)".
OFFICIAL_STATE_DICT = {
    "edgevit_xxs": (251, "dabfd5b80bc78c335d79a0f1aec5a19cc88c053c2df9a03f8e100174ab0e2635"),
    "edgevit_xs": (237, "a9a7d82d3ccb62bdc5371b984ac7c0af27a8efb50676f42b4ca6c964186d26c8"),
    "edgevit_s": (385, "10a15f7018145768eb8fe9bf1ebd3f3f940c768457200aeed709dac8dc172bb4"),
}

KEYS_FILE = Path(__file__).parent / "data" / "edgevit_xxs_keys.json"

_MODEL_CACHE: dict = {}


def _model(name: str) -> EdgeViT:
    """Seeded eval-mode model, built once per variant (construction dominates the test time)."""
    if name not in _MODEL_CACHE:
        torch.manual_seed(0)
        _MODEL_CACHE[name] = timm.create_model(name).eval()
    return _MODEL_CACHE[name]


def _state_dict_digest(model: torch.nn.Module) -> tuple:
    lines = [f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items()]
    return len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()


@pytest.mark.parametrize("name", VARIANTS)
def test_param_count_matches_official(name):
    model = _model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_keys_and_shapes_match_official(name):
    assert _state_dict_digest(_model(name)) == OFFICIAL_STATE_DICT[name]


def test_xxs_key_list_matches_recorded_official_list():
    recorded = [(k, tuple(shape)) for k, shape in json.loads(KEYS_FILE.read_text())["keys"]]
    ours = [(k, tuple(v.shape)) for k, v in _model("edgevit_xxs").state_dict().items()]
    assert sorted(ours) == sorted(recorded)
    assert ours == recorded  # same order too, so positional converters see the same layout


@pytest.mark.parametrize("name", VARIANTS)
def test_official_key_names_present(name):
    sd = _model(name).state_dict()
    for key in [
        "patch_embed1.proj.weight",
        "patch_embed1.norm.weight",
        "patch_embed4.proj.bias",
        "blocks1.0.LocalAgg.pos_embed.weight",
        "blocks1.0.LocalAgg.attn.weight",
        "blocks1.0.LocalAgg.mlp.fc1.weight",
        "blocks1.0.SelfAttn.attn.qkv.weight",
        "blocks1.0.SelfAttn.attn.proj.weight",
        "blocks1.0.SelfAttn.attn.LocalProp.weight",
        "blocks1.0.SelfAttn.attn.norm.weight",
        "blocks3.0.SelfAttn.attn.LocalProp.bias",
        "blocks4.0.SelfAttn.attn.qkv.bias",
        "blocks4.0.SelfAttn.mlp.fc2.weight",
        "norm.running_var",
        "head.weight",
    ]:
        assert key in sd, key
    # sr_ratio == 1 in the last stage: no local aggregation and no local propagation.
    assert not any(k.startswith("blocks4.0.LocalAgg.") for k in sd)
    assert "blocks4.0.SelfAttn.attn.LocalProp.weight" not in sd


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("size", [(160, 192), (256, 256)])
def test_forward_shape(name, size):
    model = _model(name)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, *size))
        out = model.forward_head(feats)
    assert feats.shape == (1, model.num_features, size[0] // 32, size[1] // 32)
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()


def test_forward_non_divisible_size():
    # Stage 1 is 50x58, not a multiple of sr_ratio=4; the reference could not run this size.
    with torch.no_grad():
        out = _model("edgevit_xxs")(torch.randn(1, 3, 200, 232))
    assert out.shape == (1, 1000)


@pytest.mark.parametrize("name", VARIANTS)
def test_fx_symbolic_trace_matches_eager(name):
    model = _model(name)
    traced = torch.fx.symbolic_trace(model)
    # Trace once, run at several sizes: spatial sizes must be recorded symbolically, not baked in.
    for size in [(224, 224), (128, 96)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


def test_fused_and_explicit_attention_agree():
    attn = GlobalSparseAttn(dim=72, num_heads=2, qkv_bias=True, sr_ratio=2).eval()
    x = torch.randn(2, 12 * 10, 72)
    with torch.no_grad():
        attn.fused_attn = True
        fused = attn(x, 12, 10)
        attn.fused_attn = False
        explicit = attn(x, 12, 10)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-6)


def test_global_sparse_attn_location_and_attributes():
    model = _model("edgevit_xxs")
    found = {n: m for n, m in model.named_modules() if isinstance(m, GlobalSparseAttn)}
    assert sorted(found) == sorted(
        ["blocks1.0.SelfAttn.attn", "blocks2.0.SelfAttn.attn"]
        + [f"blocks3.{i}.SelfAttn.attn" for i in range(3)]
        + [f"blocks4.{i}.SelfAttn.attn" for i in range(2)]
    )
    first, last = found["blocks1.0.SelfAttn.attn"], found["blocks4.1.SelfAttn.attn"]
    assert (first.sr_ratio, first.num_heads, first.head_dim) == (4, 1, 36)
    assert isinstance(first.sampler, torch.nn.AvgPool2d)
    assert isinstance(first.LocalProp, torch.nn.ConvTranspose2d) and first.LocalProp.groups == 36
    assert isinstance(first.norm, torch.nn.LayerNorm)
    assert (last.sr_ratio, last.num_heads) == (1, 8)
    assert all(isinstance(m, torch.nn.Identity) for m in (last.sampler, last.LocalProp, last.norm))
    assert isinstance(model.blocks1[0], LGLBlock)
    assert isinstance(model.blocks1[0].LocalAgg, LocalAgg)
    assert isinstance(model.blocks1[0].SelfAttn, GlobalSparseBlock)


def test_backward_reaches_all_parameters():
    torch.manual_seed(0)
    model = EdgeViT(depths=(1, 1, 3, 2), embed_dims=(36, 72, 144, 288), head_dim=36, drop_path_rate=0.1)
    model.train()
    model(torch.randn(2, 3, 96, 64)).logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_grad_checkpointing_matches():
    torch.manual_seed(0)
    model = timm.create_model("edgevit_xxs").train()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x).square().mean()
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    # BN running stats were updated by the first pass; train-mode outputs use batch stats, so they match.
    out = model(x).square().mean()
    out.backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_create_model_contract():
    model = timm.create_model("edgevit_xs", num_classes=10).eval()
    assert isinstance(model, EdgeViT)
    assert model.pretrained_cfg["architecture"] == "edgevit_xs"
    assert model.default_cfg["first_conv"] == "patch_embed1.proj"
    assert model.num_classes == 10 and model.num_features == 384
    assert model.no_weight_decay() == set()
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        assert model(x).shape == (1, 10)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, 384)
        model.reset_classifier(0)
        assert model(x).shape == (1, 384)
        model.reset_classifier(0, global_pool="")
        assert model(x).shape == (1, 384, 4, 3)
        with pytest.raises(ValueError, match="num_classes=0 to get the map"):
            model.reset_classifier(5)  # keeps global_pool=''
        model.reset_classifier(5, global_pool="avg")
        assert model(x).shape == (1, 5)
    assert model.get_classifier().out_features == 5
    with pytest.raises(ValueError, match="cannot take"):
        timm.create_model("edgevit_xs", num_classes=10, global_pool="")
    with pytest.raises(ValueError, match="not a pooling type"):
        timm.create_model("edgevit_xs", global_pool="max")


def test_pretrained_without_file_raises():
    with pytest.raises(RuntimeError, match="No pretrained weights were released"):
        timm.create_model("edgevit_xxs", pretrained=True)


def test_pretrained_from_local_file(tmp_path):
    src = _model("edgevit_xxs")
    path = tmp_path / "edgevit_xxs.pth"
    # DeiT-style checkpoint layout, as written by the reference training script.
    torch.save({"model": src.state_dict(), "epoch": 299}, path)
    torch.manual_seed(123)
    loaded = timm.create_model("edgevit_xxs", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)


def _stage_outputs_by_hooks(model: EdgeViT, x: torch.Tensor) -> list:
    """Each stage's output, recorded with forward hooks on ``blocks1..4`` (independent of forward_intermediates)."""
    recorded = []
    handles = [
        getattr(model, f"blocks{i}").register_forward_hook(lambda m, a, out: recorded.append(out)) for i in range(1, 5)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return recorded


def test_forward_intermediates_equal_the_stage_outputs_and_forward_features():
    model = _model("edgevit_xxs")
    x = torch.randn(2, 3, 96, 128)
    stages = _stage_outputs_by_hooks(model, x)
    with torch.no_grad():
        features = model.forward_features(x)
        maps = model.forward_intermediates(x, indices=[-3], intermediates_only=True)  # negative indices count back
    assert [tuple(s.shape[1:]) for s in stages] == [(36, 24, 32), (72, 12, 16), (144, 6, 8), (288, 3, 4)]
    torch.testing.assert_close(maps[0], stages[1], rtol=0, atol=0)
    check_forward_intermediates(model, x, stages, features)


def test_feature_getter_and_pruned_model_give_the_hooked_features():
    torch.manual_seed(0)
    hooked = timm.create_model("edgevit_xxs", features_only=True, out_indices=(1, 2), feature_cls="hook").eval()
    getter = timm.create_model("edgevit_xxs", features_only=True, out_indices=(1, 2)).eval()  # the default
    weights = {k.removeprefix("body."): v for k, v in hooked.state_dict().items()}
    own = getter.model.state_dict()
    getter.model.load_state_dict({k: weights[k] for k in own})  # strict: every kept tensor comes from `hooked`
    pruned_keys = set(weights) - set(own)
    assert pruned_keys and all(k.startswith(("blocks4.", "patch_embed4.", "norm.")) for k in pruned_keys)
    assert getter.feature_info.channels() == hooked.feature_info.channels() == [72, 144]
    pruned = getter.model
    assert isinstance(pruned.blocks4, torch.nn.Identity) and isinstance(pruned.patch_embed4, torch.nn.Identity)
    assert isinstance(pruned.norm, torch.nn.Identity) and isinstance(pruned.head, torch.nn.Identity)
    assert pruned.num_features == 144
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for ours, theirs in zip(getter(x), hooked(x)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("feature_cls", ["getter", "hook"])
def test_features_only_takes_global_pool_empty_as_timm_backbones_do(feature_cls):
    """timm's backbones take global_pool="" with features_only; EdgeViT refused it for a classifier head that the
    feature wrapper prunes (or, with hooks, never returns)."""
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(0)
    plain = timm.create_model("edgevit_xxs", features_only=True, feature_cls=feature_cls).eval()
    torch.manual_seed(0)
    backbone = timm.create_model("edgevit_xxs", features_only=True, feature_cls=feature_cls, global_pool="").eval()
    with torch.no_grad():
        for ours, want in zip(backbone(x), plain(x), strict=True):
            assert torch.equal(ours, want)
    with pytest.raises(ValueError, match="num_classes=0"):  # a classifier still needs pooling or num_classes=0
        timm.create_model("edgevit_xxs", global_pool="")


def test_features_only_trains_every_parameter_it_keeps():
    """The default feature wrapper prunes after the last requested stage, so each kept parameter gets a gradient
    (DistributedDataParallel's default refuses unused ones; the hook wrapper ran the whole classifier, leaving 178
    of 216 parameters without a gradient for out_indices=(0,))."""
    model = timm.create_model("edgevit_xxs", features_only=True, out_indices=(0,))
    sum(f.sum() for f in model(torch.randn(1, 3, 64, 64))).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused[:5]


def test_input_channels_reach_timm_data_config():
    """timm's input helpers read the model's ``in_chans`` (without it they assumed 3 channels and refused 1)."""
    from timm.data import resolve_input_data_config
    from timm.models import get_model_input_config

    model = timm.create_model("edgevit_xxs", in_chans=1)
    assert get_model_input_config(model)["input_size"] == (1, 224, 224)
    assert resolve_input_data_config(model, args={"in_chans": 1})["input_size"] == (1, 224, 224)


def test_prune_intermediate_layers_keeps_the_requested_stages():
    model = timm.create_model("edgevit_xxs", num_classes=7).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
    assert model.prune_intermediate_layers(indices=(0, 3), prune_head=False) == [0, 3]  # nothing after stage 3
    assert model.head.out_features == 7 and not isinstance(model.norm, torch.nn.Identity)
    assert model.prune_intermediate_layers(indices=2) == [2, 3]
    assert isinstance(model.head, torch.nn.Identity) and model.num_classes == 0
    with torch.no_grad():
        kept = model.forward_intermediates(x, indices=2, intermediates_only=True)
    torch.testing.assert_close(kept, full[2:], rtol=0, atol=0)
    model.prune_intermediate_layers(indices=[1])
    assert model.num_features == 72 and isinstance(model.norm, torch.nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), full[1], rtol=0, atol=0)
        # the pruned model has two stages, as timm's pruned models count them: all maps are its two (the pruned
        # stages came back as copies of stage 1's map), and stage 3 is out of range (it gave stage 1's map)
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True), full[:2], rtol=0, atol=0)
        with pytest.raises(AssertionError, match="out of range"):
            model.forward_intermediates(x, indices=[3])
    with pytest.raises(AssertionError, match="out of range"):
        model.prune_intermediate_layers(indices=[2])
    model.reset_classifier(4)  # a new head on the pruned width
    with torch.no_grad():
        assert model(x).shape == (1, 4)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torch_jit_script_matches_eager():
    """EdgeViT targets mobile runtimes, some of which still load TorchScript; the plain model scripts (a
    converted one does not, and says so: tests/convert/test_export.py)."""
    model = _model("edgevit_xxs")
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(scripted.forward_features(x), model.forward_features(x), rtol=1e-6, atol=1e-6)


def test_empty_and_unbatched_inputs():
    """An empty batch gives empty logits, as timm's ViT and ResNet do (a reshape with -1 failed on it), also after
    conversion; one image without the batch dimension gets a named error (it failed in a permute)."""
    model = timm.create_model("edgevit_xxs", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.zeros(0, 3, 64, 64)).shape == (0, 5)
        assert hatplug.convert(model)(torch.zeros(0, 3, 64, 64)).shape == (0, 5)
    with pytest.raises(Exception, match=r"for one image pass x\[None\]"):
        model(torch.zeros(3, 64, 64))


def test_inputs_below_32_pixels_and_bad_arguments_get_named_errors():
    """Below 32 px a stage's map is smaller than its patch (PyTorch's kernel-size error named neither); a head_dim
    wider than a stage gave ZeroDivisionError, a short mlp_ratios IndexError; feature_cls list / dict built,
    then failed in a grouped conv (timm's flattening wrappers run modules in registration order)."""
    model = _model("edgevit_xxs")
    for size in ((16, 16), (31, 64), (64, 31)):
        with pytest.raises(Exception, match="EdgeViT takes images of at least 32x32 pixels"):
            model(torch.zeros(1, 3, *size))
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)
    with pytest.raises(ValueError, match=r"head_dim=48 is wider than stage widths \[32\]"):
        EdgeViT(embed_dims=(32, 64, 128, 256), head_dim=48)
    with pytest.raises(ValueError, match=r"mlp_ratios needs one number, or one per stage \(4\)"):
        EdgeViT(mlp_ratios=(4, 4))
    from timm.models import FeatureDictNet

    for how in (dict(feature_cls="list"), dict(feature_cfg=dict(feature_cls="dict")), dict(feature_cls="LIST"),
                dict(feature_cls=FeatureDictNet)):  # fmt: skip
        with pytest.raises(ValueError, match="does not work for EdgeViT: timm's flattening wrappers"):
            timm.create_model("edgevit_xxs", features_only=True, **how)
    with warnings.catch_warnings():  # the size checks are skipped in a trace, which would only warn about them
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64), check_trace=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def test_global_pool_is_case_insensitive_as_in_timm():
    """ "AVG" passed the (lower-casing) check but the forward compared with "avg": no pooling at all, so the map went
    to the head (a shape error) or came back unpooled with num_classes=0."""
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pooled = timm.create_model("edgevit_xxs", num_classes=0).eval()(x)
        assert pooled.shape == (1, 288)
        for name in ("AVG", "Avg"):
            torch.manual_seed(0)
            model = timm.create_model("edgevit_xxs", num_classes=0, global_pool=name).eval()
            assert model(x).shape == (1, 288)
            model.reset_classifier(5, global_pool=name)
            assert model(x).shape == (1, 5)
