"""What a timm user expects of a converted model beyond its outputs: modes, dtypes, hooks, feature
extraction, layer-wise lr decay and the report of what a conversion dropped."""

import copy
import io
import re

import pytest
import timm
import torch
from timm.models import create_feature_extractor
from timm.models._manipulate import reinit_non_persistent_buffers
from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

import hatplug
from hatplug.errors import ConversionError

from .conftest import FAMILIES, _swin, make_model


def test_eval_model_converts_to_an_eval_model(family):
    """New modules take the mode of the block they replace: with attention dropout in the original, an eval
    model stays deterministic after conversion (the new modules used to start in train mode)."""
    kw = {"attn_drop_rate": 0.3} if family.name in ("swin", "swinv2", "twins") else {"drop_rate": 0.3}
    torch.manual_seed(0)
    model = family.make(family.sizes[0], **kw).eval()
    for init in ("identity", "random"):
        hat = hatplug.convert(model, init=init)
        assert not [name for name, m in hat.named_modules() if m.training]
        x = torch.randn(1, 3, family.sizes[0], family.sizes[0])
        with torch.no_grad():
            assert torch.equal(hat(x), hat(x))
    train_hat = hatplug.convert(model.train())
    assert all(m.training for m in train_hat.modules())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_converts(family, dtype):
    model = make_model(family, family.sizes[0]).to(dtype)
    hat = hatplug.convert(model)
    assert {p.dtype for p in hat.parameters()} == {dtype}
    x = torch.randn(1, 3, family.sizes[0], family.sizes[0], dtype=dtype)
    with torch.no_grad():
        assert (hat(x).float() - model(x).float()).abs().max() < 0.05


def test_fx_feature_extraction_returns_the_stage_maps():
    """timm's create_feature_extractor takes a module's output from its last op: the carrier tokens of a
    stage's last block must not come after the map."""
    model = make_model(FAMILIES["swin"], 64)
    hat = hatplug.convert(model)
    nodes = {"layers.0": "s0", "layers.1": "s1"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = create_feature_extractor(hat, return_nodes=nodes)(x)
        theirs = create_feature_extractor(model, return_nodes=nodes)(x)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape
        assert torch.allclose(ours[key], theirs[key], atol=1e-5)  # identity init: the same maps


def test_stage_hooks_move_and_block_hooks_are_refused():
    model = make_model(FAMILIES["swin"], 64)
    hook_net = hatplug.convert(_swin(64, features_only=True, feature_cls="hook").eval())
    assert len(hook_net(torch.randn(1, 3, 64, 64))) == 4  # FeatureHookNet hooks its (rewritten) stages

    seen = []
    handle = model.layers[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    hat = hatplug.convert(model)
    with torch.no_grad():
        hat(torch.randn(1, 3, 64, 64))
    assert seen == [torch.Size([1, 16, 16, 16])]
    handle.remove()

    handle = model.layers[0].blocks[0].register_forward_hook(lambda m, i, o: None)
    with pytest.raises(ConversionError, match=r"hooks registered on \['layers.0.blocks.0'\] would be lost"):
        hatplug.convert(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError, match="would be lost"):
        hatplug.convert(model, inplace=True)  # refused before the model changed
    assert type(model.layers[0].blocks[0]).__name__ == "SwinTransformerBlock"
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _count(calls: list, name: str):
    return lambda module, args, output: calls.append(name)


@pytest.mark.parametrize("name", ["swin", "edgevit"])
def test_hooks_inside_a_rewritten_stage_still_run_or_are_refused(name):
    """A stage rewrite traces only through the modules between the stage and its blocks; every other module of
    the stage (Swin's downsample, EdgeViT's local aggregation) is still called as a module, so its hooks run,
    registered before or after the conversion. They used to be inlined into the graph: hooks stopped firing,
    and one that changed the output ran once on the tracer's proxies and stayed in the graph for good.
    Hooks on the modules carrier tokens are threaded through are refused, as they could never run."""
    family = FAMILIES[name]
    leaf, between = {
        "swin": ("layers.1.downsample", "layers.0.blocks"),
        "edgevit": ("blocks2.0.LocalAgg", "blocks2.0"),
    }[name]
    model = make_model(family, family.sizes[0])
    x = torch.randn(1, 3, family.sizes[0], family.sizes[0])
    calls = []
    handle = model.get_submodule(leaf).register_forward_hook(_count(calls, "before"))
    hat = hatplug.convert(model)
    handle.remove()  # the hook stays on the converted copy, as on any deepcopy
    assert calls == []  # not run while tracing
    hat.get_submodule(leaf).register_forward_hook(_count(calls, "after"))
    with torch.no_grad():
        hat(x)
    assert calls == ["before", "after"]

    # an output-changing hook acts while it is registered, and not after its removal
    with torch.no_grad():
        plain = hat(x)
        handle = hat.get_submodule(leaf).register_forward_hook(lambda module, args, output: output * 2)
        assert not torch.allclose(hat(x), plain)
        handle.remove()
        assert torch.equal(hat(x), plain)
    with torch.no_grad():
        model.get_submodule(leaf).register_forward_hook(lambda module, args, output: output * 2)
        doubled = model(x)
        assert torch.allclose(hatplug.convert(model)(x), doubled, atol=1e-5)  # identity init: the same function

    model = make_model(family, family.sizes[0])
    model.get_submodule(between).register_forward_hook(_count(calls, "lost"))
    with pytest.raises(ConversionError, match=rf"hooks registered on \['{re.escape(between)}'\] would be lost"):
        hatplug.convert(model)
    with pytest.raises(ConversionError, match="would be lost"):
        hatplug.convert(model, inplace=True)
    assert set(model.state_dict()) == set(make_model(family, family.sizes[0]).state_dict())  # left unchanged
    handle.remove()


def test_edgevit_features_only_converts_per_stage():
    """Inside timm's feature wrapper each of EdgeViT's block lists is still its own stage (one carrier
    stream per width), and single-window stages are still skipped."""
    torch.manual_seed(0)
    model = timm.create_model("edgevit_xxs", features_only=True).eval()
    hat = hatplug.convert(model)
    plain = hatplug.report(hatplug.convert(make_model(FAMILIES["edgevit"], 128)))
    rep = hatplug.report(hat)
    assert (len(rep.converted), len(rep.skipped)) == (len(plain.converted), len(plain.skipped))
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        for ours, theirs in zip(hat(x), model(x)):
            assert torch.allclose(ours, theirs, atol=1e-5)


def test_twins_feature_getter_skips_single_window_stages():
    torch.manual_seed(0)
    kw = dict(embed_dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), img_size=128)
    model = timm.create_model("twins_svt_small", features_only=True, feature_cls="getter", **kw)
    rep = hatplug.report(hatplug.convert(model))
    assert (len(rep.converted), len(rep.skipped)) == (FAMILIES["twins"].converted, FAMILIES["twins"].skipped)


def test_report_lists_dropped_original_parameters():
    model = make_model(FAMILIES["edgevit"], 128)
    assert hatplug.report(hatplug.convert(model)).dropped == []
    rep = hatplug.report(hatplug.convert(model, init="random"))
    assert rep.dropped and all(".LocalProp." in n or ".attn.norm." in n for n in rep.dropped)
    before = sum(p.numel() for p in model.parameters())
    dropped = sum(model.get_parameter(n).numel() for n in rep.dropped)
    assert rep.params_after == before + rep.params_new - dropped
    assert "dropped 20 original parameters" in str(rep)


def test_layer_decay_puts_carrier_tokenizers_with_their_stage():
    hat = hatplug.convert(make_model(FAMILIES["swin"], 64))
    groups = param_groups_layer_decay(hat, layer_decay=0.7)
    name_of = {id(p): n for n, p in hat.named_parameters()}
    scale = {name_of[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    for stage in (0, 1):
        tokenizer = [v for n, v in scale.items() if n.startswith(f"layers.{stage}.carrier_tokenizer.")]
        assert tokenizer and set(tokenizer) == {scale[f"layers.{stage}.blocks.0.norm1.weight"]}
    head = scale["head.fc.weight"]
    assert all(v < head for n, v in scale.items() if "carrier_tokenizer" in n)
    for coarse in (False, True):  # the rules are the model's own plus the tokenizers'
        assert set(type(hat).group_matcher(hat, coarse)) == set(hat.group_matcher(coarse))


def test_new_position_mlps_get_no_weight_decay_in_every_family(family):
    """FasterViT keeps its position-bias MLPs out of weight decay (timm does the same for SwinV2's continuous
    bias); a converted model does it for the HAT position MLPs it gained, whatever its family's own rule."""
    model = make_model(family, family.sizes[0])
    hat = hatplug.convert(model)
    own = model.no_weight_decay()
    excluded = hat.no_weight_decay()
    params = dict(hat.named_parameters())
    new_mlps = {n for n in params if n not in dict(model.named_parameters()) and ".cpb_mlp." in n}
    assert new_mlps and own <= excluded and new_mlps <= excluded
    assert excluded - own - new_mlps <= {n for n in params if ".cpb_mlp." in n}  # nothing else was added
    no_decay, decay = param_groups_weight_decay(hat, weight_decay=0.05, no_weight_decay_list=excluded)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.05)
    kept_out = {id(p) for p in no_decay["params"]}
    assert all(id(params[n]) in kept_out for n in new_mlps)
    assert all(id(params[n]) not in kept_out for n in params if n.endswith("hat_attn.qkv.weight"))
    for clone in (copy.deepcopy(hat), _pickled(hat)):  # the set follows the copy, not the original
        assert clone.no_weight_decay() == excluded and clone.no_weight_decay.model is clone


_CALLS: list[str] = []


def _record_call(module, args, output) -> None:  # a module-level hook: it pickles with the model
    _CALLS.append(type(module).__name__)


def _pickled(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("name", ["swin", "swinv2", "edgevit"])
def test_copies_of_a_rewritten_stage_keep_its_children_and_attributes(name):
    """copy.copy of a rewritten stage rebuilt it as torch.fx does, with its containers as plain Modules
    (``stage.blocks[0]`` failed) and without its plain attributes; a copy of a stage loaded from a whole-model
    file lost those attributes too (``input_resolution``, the refused ``set_input_size``)."""
    from hatplug.conversion.rewrite import _PRESERVED, CarrierStage

    family = FAMILIES[name]
    hat = hatplug.convert(make_model(family, family.sizes[0]))
    loaded = _pickled(hat)
    stages = [n for n, m in hat.named_modules() if isinstance(m, CarrierStage)]
    assert stages
    for path in stages:
        stage = hat.get_submodule(path)
        children = {n: type(c) for n, c in stage.named_children()}
        attributes = stage.meta[_PRESERVED]
        assert attributes and set(children) - {"carrier_tokenizer"}
        twins = [copy.copy(stage), copy.deepcopy(stage)]
        twins += [loaded.get_submodule(path), copy.copy(loaded.get_submodule(path))]
        twins += [copy.deepcopy(loaded.get_submodule(path)), copy.deepcopy(loaded).get_submodule(path)]
        for twin in twins:
            assert {n: type(c) for n, c in twin.named_children()} == children
            assert {key: getattr(twin, key, "missing") for key in attributes} == attributes
            assert list(twin.state_dict()) == list(stage.state_dict())


def test_a_rewritten_sequential_stage_still_indexes_like_one():
    """EdgeViT's stages are the nn.Sequential of their blocks; rewritten, ``blocks2[0]``, ``len`` and iteration
    failed ("'Sequential' object is not subscriptable"). They give the same entries again, without the carrier
    tokenizer the rewrite adds; a slice is a ModuleList of them."""
    from hatplug.conversion.rewrite import CarrierSequence

    model = make_model(FAMILIES["edgevit"], 128)
    hat = hatplug.convert(model)
    loaded = _pickled(hat)
    stages = [n for n, m in hat.named_modules() if isinstance(m, CarrierSequence)]
    assert stages == ["blocks1", "blocks2", "blocks3"]
    for path in stages:
        before, after = model.get_submodule(path), hat.get_submodule(path)
        names = [n for n, _ in before.named_children()]
        assert len(after) == len(before) == len(names) > 0
        assert list(after) == [after.get_submodule(n) for n in names]
        assert [type(b) for b in after] == [type(b) for b in before]
        assert after[-1] is after.get_submodule(names[-1]) and after[0] is after.get_submodule(names[0])
        assert isinstance(after[:1], nn.ModuleList) and list(after[:1]) == [after[0]]
        for twin in (copy.copy(after), copy.deepcopy(after), loaded.get_submodule(path)):
            assert [type(b) for b in twin] == [type(b) for b in before] and len(twin) == len(before)
    with pytest.raises(IndexError):
        hat.blocks1[len(model.blocks1)]


def test_a_model_saved_whole_comes_back_converted(family):
    """torch.save(model) / torch.load: the rewritten stages come back as rewritten stages (torch.fx alone
    rebuilds them as plain GraphModules), so the layer-decay groups, gradient checkpointing and the refused
    resize hold, and the function is the same; copies keep them too, and the stages' forward hooks."""
    from hatplug.adapters import CarrierBlock
    from hatplug.conversion.rewrite import CarrierStage

    hat = hatplug.convert(make_model(family, family.sizes[0]))
    stages = [n for n, m in hat.named_modules() if isinstance(m, CarrierStage)]
    for name in stages:
        hat.get_submodule(name).register_forward_hook(_record_call)
    loaded = _pickled(hat)
    assert [n for n, m in loaded.named_modules() if isinstance(m, CarrierStage)] == stages
    for name in stages:
        stage = hat.get_submodule(name)
        assert isinstance(copy.copy(stage), CarrierStage) and isinstance(copy.deepcopy(stage), CarrierStage)
        # and under the stage's own name (print(model) showed the copies' stages as "GraphModule")
        for twin in (copy.copy(stage), copy.deepcopy(stage), loaded.get_submodule(name)):
            assert type(twin).__name__ == type(stage).__name__ != "GraphModule"
    for model in (loaded, copy.deepcopy(hat)):
        _CALLS.clear()
        with torch.no_grad():
            model(torch.randn(1, 3, family.sizes[0], family.sizes[0]))
        assert len(_CALLS) == len(stages)
    x = torch.randn(2, 3, family.sizes[0], family.sizes[0])
    with torch.no_grad():
        assert torch.equal(loaded(x), hat(x))
    if hasattr(type(hat), "group_matcher"):
        assert loaded.group_matcher() == hat.group_matcher()
    if stages:
        loaded.get_submodule(stages[0]).grad_checkpointing = True
        blocks = [b for b in loaded.get_submodule(stages[0]).modules() if isinstance(b, CarrierBlock)]
        assert blocks and all(b.grad_checkpointing for b in blocks)
        if hasattr(loaded, "set_input_size"):
            with pytest.raises(ConversionError, match="cannot change its input size"):
                loaded.set_input_size(img_size=family.sizes[1])


def test_repeated_stage_index_is_refused():
    with pytest.raises(ValueError, match="more than once"):
        hatplug.convert(make_model(FAMILIES["swin"], 64), stages=[0, 0])


def test_model_converted_on_the_meta_device_gets_its_tables_back(family):
    """A model built and converted on the meta device, then ``to_empty`` + timm's reinit_non_persistent_buffers +
    the weights, computes what the same model converted on the CPU does. The converted blocks hold copies of
    timm's position indices, shift masks and k_bias and their own propagation index, which no hook recomputed:
    they kept whatever the memory held (an IndexError, or silently wrong biases). EdgeViT did not build under a
    meta-device context at all."""
    size = family.sizes[0]
    reference = hatplug.convert(make_model(family, size))
    with torch.device("meta"):
        hat = hatplug.convert(family.make(size))
    hat.to_empty(device="cpu").eval()
    for buf in hat.buffers():
        buf.fill_(1)  # what the memory held
    hat.load_state_dict(reference.state_dict())
    reinit_non_persistent_buffers(hat)
    for (key, buf), (_, want) in zip(hat.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(buf, want), key
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert torch.equal(hat(x), reference(x))
