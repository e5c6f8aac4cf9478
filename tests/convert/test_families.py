"""hatplug.convert on every supported family: warm start, the paper's init, sizes, gradients, model contract,
save/load, report and fx traceability."""

import pytest
import torch

import hatplug
from hatplug.conversion import symbolic_trace

from .conftest import FAMILIES, make_model, new_parameters, open_gates, rel_diff

WARM_START_TOL = 1e-5


@pytest.mark.parametrize("init", ["identity", "random"])
def test_runs_at_two_input_sizes(family, init):
    for size in family.sizes:
        model = make_model(family, size)
        hat = hatplug.convert(model, init=init)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            out, ref = hat(x), model(x)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        if init == "identity":  # warm start: the original function
            assert rel_diff(out, ref) <= WARM_START_TOL
        else:  # the paper's joint softmax changes every window at once
            assert rel_diff(out, ref) > 1e-3


def test_converted_model_runs_at_sizes_the_original_accepts():
    """A Swin built with dynamic_img_size takes any size; so does its conversion, including sizes that are not
    multiples of the window (padding) and non-square ones (the shift mask is recomputed per size)."""
    family = FAMILIES["swin"]
    torch.manual_seed(0)
    model = family.make(64, dynamic_img_size=True).eval()
    hat = hatplug.convert(model)
    for h, w in ((64, 64), (80, 72), (96, 112)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            assert rel_diff(hat(x), model(x)) <= WARM_START_TOL


@pytest.mark.parametrize("window", [3, 5, 7])
def test_every_swin_window_size(window):
    torch.manual_seed(0)
    model = FAMILIES["swin"].make(96, window_size=window).eval()
    hat = hatplug.convert(model)
    assert hatplug.report(hat).converted
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert rel_diff(hat(x), model(x)) <= WARM_START_TOL


def test_keeps_class_methods_and_original_weights(family):
    size = family.sizes[0]
    model = make_model(family, size)
    hat = hatplug.convert(model)
    assert type(hat) is type(model) and hat is not model
    # every original tensor is still there under its name, untouched
    own = hat.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(own[key], value), key
    assert getattr(model, "hatplug_conversion", None) is None  # the original is not converted
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = hat.forward_features(x)
        torch.testing.assert_close(hat.forward_head(features), hat(x))
        torch.testing.assert_close(features, model.forward_features(x), rtol=1e-5, atol=1e-5)
        if hasattr(model, "forward_intermediates"):
            ours = hat.forward_intermediates(x, intermediates_only=True)
            theirs = model.forward_intermediates(x, intermediates_only=True)
            assert [t.shape for t in ours] == [t.shape for t in theirs]
    assert getattr(hat, "feature_info", None) == getattr(model, "feature_info", None)
    hat.reset_classifier(3)
    with torch.no_grad():
        assert hat(x).shape == (2, 3)


def test_inplace_converts_the_model_itself():
    model = make_model(FAMILIES["swin"], 64)
    assert hatplug.convert(model, inplace=True) is model
    assert hatplug.report(model).converted


def test_gradients_at_identity_init_reach_the_gates_only(family):
    """At g = 0 the carrier-token branch is multiplied by zero, so its gradients are exactly zero (like LoRA's
    A at init); the gates and propagation scales get gradients, so training opens them. Once a gate is open,
    every new parameter gets a gradient."""
    size = family.sizes[0]
    model = make_model(family, size).train()
    hat = hatplug.convert(model)
    new = new_parameters(hat, model)
    gates = {n for n in new if n.endswith("hat_gate")}
    scales = {n for n in new if n.endswith("propagation_scale")}
    assert len(gates) == family.converted and scales
    assert all(p.requires_grad for p in new.values())

    x = torch.randn(2, 3, size, size)
    hat(x).square().mean().backward()
    for name, p in new.items():
        if name in gates or name in scales:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or not p.grad.any(), name

    hat.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name in gates:
            new[name].fill_(0.5)
    hat(x).square().mean().backward()
    dead = [n for n, p in new.items() if p.grad is None or not p.grad.any()]
    assert not dead


def test_gradients_reach_every_new_parameter_at_random_init(family):
    size = family.sizes[0]
    model = make_model(family, size).train()
    hat = hatplug.convert(model, init="random")
    new = new_parameters(hat, model)
    assert new and not any(n.endswith("hat_gate") for n in new)
    hat(torch.randn(2, 3, size, size)).square().mean().backward()
    dead = [n for n, p in new.items() if p.grad is None or not p.grad.any()]
    assert not dead


def test_new_parts_follow_fastervit_init(family):
    model = make_model(family, family.sizes[0])
    for init, scale in (("identity", 0.0), ("random", 1.0)):
        new = new_parameters(hatplug.convert(model, init=init), model)
        for name, p in new.items():
            if name.endswith("propagation_scale"):
                assert torch.all(p == scale), name
            elif name.endswith("hat_gate"):
                assert torch.all(p == 0), name
            elif "norm" in name:
                assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
            elif name.endswith("bias") and "tokenizer" not in name:
                assert torch.all(p == 0), name
            elif p.ndim == 2:  # Linear weights
                assert abs(p.std().item() - 0.02) < 0.005, name


def test_carrier_half_takes_its_blocks_regularisation(family):
    """FasterViT gives a block's carrier-token half the block's stochastic depth, dropouts and MLP width; the
    converted halves had none (and Twins a fixed MLP ratio of 4)."""
    kw = dict(drop_path_rate=0.3, attn_drop_rate=0.1)
    kw["drop_rate" if family.name == "edgevit" else "proj_drop_rate"] = 0.2  # MLP and projection dropout
    if family.name == "twins":
        kw["mlp_ratios"] = (2, 2, 2, 2)
    model = family.make(family.sizes[0], **kw)
    converted = [(n, m) for n, m in hatplug.convert(model).named_modules() if hasattr(m, "hat_drop_path")]
    assert len(converted) == family.converted
    rates = []
    for name, twin in converted:
        attn = model.get_submodule(name if family.name == "twins" else name + ".attn")
        block = model.get_submodule(name.rpartition(".")[0] if family.name == "twins" else name)
        rate = getattr(block.drop_path1, "drop_prob", 0.0)
        assert getattr(twin.hat_drop_path, "drop_prob", 0.0) == rate, name
        assert twin.hat_attn.attn_drop == attn.attn_drop.p == 0.1, name
        assert twin.hat_attn.proj_drop.p == attn.proj_drop.p == 0.2, name
        assert twin.hat_mlp.drop1.p == block.mlp.drop1.p == 0.2, name
        assert twin.hat_mlp.fc1.out_features == block.mlp.fc1.out_features, name
        rates.append(rate)
    assert max(rates) > 0  # the test can fail: converted blocks with stochastic depth (the first has rate 0)


@pytest.mark.parametrize("init", ["identity", "random"])
def test_save_load_round_trip(family, init, tmp_path):
    size = family.sizes[0]
    hat = open_gates(hatplug.convert(make_model(family, size), init=init, ct_size=1))
    path = hatplug.save(hat, tmp_path / "hat.safetensors")
    restored = hatplug.load(path, make_model(family, size, seed=7))  # other weights: all must come from the file
    assert hatplug.report(restored).config == hatplug.report(hat).config
    assert type(restored) is type(hat)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(restored.eval()(x), hat.eval()(x))


def test_report_lists_converted_and_skipped_blocks(family):
    model = make_model(family, family.sizes[0])
    hat = hatplug.convert(model)
    report = hatplug.report(hat)
    assert len(report.converted) == family.converted and len(report.skipped) == family.skipped
    assert all("single window" in r.reason for r in report.skipped)
    paths = {r.path for r in report.converted}
    modules = dict(hat.named_modules())
    assert all(p in modules for p in paths)
    assert report.params_before == sum(p.numel() for p in model.parameters())
    assert report.params_after == report.params_before + report.params_new
    assert report.params_new == sum(p.numel() for p in new_parameters(hat, model).values())
    text = str(report)
    assert all(p in text for p in paths) and "skipped: single window" in text
    mode = "per block" if family.name == "twins" else "stage stream"
    assert {r.carrier_tokens for r in report.converted} == {mode}
    assert any(r.propagates for r in report.converted)
    if family.name == "twins":
        assert report.notes and "carrier tokens from its input" in report.notes[0]


def test_stages_select_what_is_converted():
    model = make_model(FAMILIES["swin"], 64)
    report = hatplug.report(hatplug.convert(model, stages=[1]))
    assert [r.path for r in report.converted] == ["layers.1.blocks.0", "layers.1.blocks.1"]
    assert len(report.skipped) == 5 and all("stage" in r.reason and "not selected" in r.reason for r in report.skipped)
    with pytest.raises(ValueError, match="stages \\[7\\] do not exist"):
        hatplug.convert(model, stages=[7])


def test_converted_model_is_fx_traceable(family):
    size = family.sizes[0]
    hat = open_gates(hatplug.convert(make_model(family, size)))
    graph = symbolic_trace(hat)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), hat(x), rtol=1e-6, atol=1e-6)
    # the rewritten stages show the carrier-token stream as nodes
    if family.name != "twins":
        assert any(n.name == "carrier_tokens" for m in hat.modules() if isinstance(m, torch.fx.GraphModule)
                   for n in m.graph.nodes)  # fmt: skip


def test_grad_checkpointing_reaches_the_hat_blocks():
    torch.manual_seed(0)
    hat = open_gates(hatplug.convert(FAMILIES["swin"].make(64, drop_path_rate=0.0))).train()
    x = torch.randn(2, 3, 64, 64)
    hat(x).square().mean().backward()
    expected = {n: p.grad.clone() for n, p in hat.named_parameters()}
    hat.zero_grad(set_to_none=True)
    hat.set_grad_checkpointing(True)
    blocks = [m for m in hat.modules() if isinstance(m, hatplug.adapters.CarrierBlock)]
    assert blocks and all(b.grad_checkpointing for b in blocks)
    hat(x).square().mean().backward()
    for name, p in hat.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_grad_checkpointing_on_a_converted_edgevit():
    torch.manual_seed(0)
    hat = open_gates(hatplug.convert(FAMILIES["edgevit"].make(64))).train()
    x = torch.randn(2, 3, 64, 64)
    hat(x).square().mean().backward()
    expected = {n: p.grad.clone() for n, p in hat.named_parameters() if p.grad is not None}
    hat.zero_grad(set_to_none=True)
    hat.set_grad_checkpointing(True)
    hat(x).square().mean().backward()  # the rewritten stages are not Sequential: checkpointed whole
    for name, grad in expected.items():
        torch.testing.assert_close(dict(hat.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("init", ["identity", "random"])
def test_bfloat16_autocast_trains_and_infers_close_to_float32(family, init):
    # the gates are float32 parameters: with init="identity" every autocast training step (and a SwinV2's eval
    # forward, whose cosine attention leaves q and k in float32) stopped at a dtype error in torch.lerp
    size = family.sizes[0]
    model = make_model(family, size)
    hat = open_gates(hatplug.convert(model, init=init)) if init == "random" else hatplug.convert(model, init=init)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        exact = hat(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = hat(x)
            base = model(x)
    # no further from float32 than the unconverted model is under the same autocast (plus some slack)
    assert rel_diff(low.float(), exact) <= max(2 * rel_diff(base.float(), model(x).detach()), 2e-2)
    hat.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = hat(x).float().logsumexp(-1).mean()
    loss.backward()
    new = new_parameters(hat, model)
    assert new and all(p.grad is not None and torch.isfinite(p.grad).all() for p in new.values())
