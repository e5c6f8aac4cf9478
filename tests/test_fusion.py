"""Inference-time folding (hatplug.layers.fusion): where it runs, that it computes the same function, and that
its cache follows every change of the weights while the state dict stays the official one."""

import copy
import pickle
import warnings

import pytest
import torch
from timm.layers import GluMlp
from torch import nn

import fastervit
import fastervit.model as fv_model
from hatplug.layers import HATBlock, HATStage
from hatplug.layers.fusion import (
    FoldedTensors,
    fold_batchnorm,
    fusion_active,
    gelu_,
    inference_fusion,
    residual_linear,
    runs_as,
)

from .conftest import randomize_

SMALL = dict(depths=[1, 2, 2, 1], dim=16, in_dim=8, num_classes=10)
# a CT stage with layer scales and propagation, and conv blocks with a layer scale, as FasterViT-3..6 have
SCALED = dict(SMALL, layer_scale=1e-5, layer_scale_conv=1e-5, do_propagation=True)
TOL = dict(rtol=1e-5, atol=1e-5)


def _model(**overrides):
    cfg = dict(SCALED, resolution=[64, 80], window_size=[7, 7, 3, 2], **overrides)
    return randomize_(fastervit.create_model("faster_vit_0_any_res", **cfg)).eval()


def _plain(model, x):
    with torch.no_grad(), inference_fusion(False):
        return model(x)


def _fused_and_plain(fn, seed=0):
    """``fn()`` with folding on, then off, each from the same random state."""
    torch.manual_seed(seed)
    fused = fn()
    torch.manual_seed(seed)
    with inference_fusion(False):
        return fused, fn()


def test_folded_eval_forward_matches_the_plain_one():
    model = _model()
    x = torch.randn(3, 3, 64, 80)
    with torch.inference_mode():
        fused = model(x)
        features = model.forward_features(x)
        maps = model.forward_intermediates(x, intermediates_only=True)
    torch.testing.assert_close(fused, _plain(model, x), **TOL)
    with torch.no_grad(), inference_fusion(False):
        torch.testing.assert_close(features, model.forward_features(x), **TOL)
        for ours, plain in zip(maps, model.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(ours, plain, **TOL)
    # the maps come back in the input's layout although the conv levels ran channels-last inside
    assert features.is_contiguous() and all(m.is_contiguous() for m in maps)


def test_inference_fusion_works_as_a_call_and_as_a_context_manager():
    """Like ``torch.set_grad_enabled``: a plain call switches folding until the next call (a plain call used to
    build a context manager and change nothing); a ``with`` block restores the setting, also on an exception."""
    from hatplug.layers.fusion import inference_fusion_enabled

    model, x = _model(), torch.randn(1, 3, 64, 80)
    assert inference_fusion_enabled()
    try:
        inference_fusion(False)
        assert not inference_fusion_enabled()
        with torch.no_grad():
            assert not fusion_active(model.levels[0].blocks[0], x)
        with inference_fusion(True):
            assert inference_fusion_enabled()
        assert not inference_fusion_enabled()
    finally:
        inference_fusion(True)
    with pytest.raises(RuntimeError, match="boom"), inference_fusion(False):
        raise RuntimeError("boom")
    assert inference_fusion_enabled()
    for value in ("off", 0, 2, None):  # 0 and 2 were taken as False and True
        with pytest.raises(TypeError, match="True or False"):
            inference_fusion(value)
    assert inference_fusion_enabled()

    @inference_fusion(False)  # a decorator too (as the contextmanager was): the setting applies per call
    def plain_forward():
        return inference_fusion_enabled()

    assert inference_fusion_enabled() and plain_forward() is False and inference_fusion_enabled()


def test_eval_convs_take_cached_weights_in_the_maps_layout():
    """On channels-last maps (the CPU eval path) the folded and the downsample conv weights are kept in that layout,
    so that no forward copies a weight (oneDNN copied each NCHW weight on every call); an NCHW map keeps NCHW
    weights and gives an NCHW map, and the outputs are the plain form's."""
    from torch.profiler import profile

    model = _model()
    weight_shapes = [list(m.weight.shape) for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        first = model(x)  # folds and caches
        with profile(record_shapes=True) as prof:  # sees the copies inside the conv kernels too
            again = model(x)
    clones = [e.input_shapes[0] for e in prof.events() if e.name == "aten::clone"]
    copies = [shape for shape in clones if shape in weight_shapes]
    assert copies == [] and torch.equal(first, again)
    torch.testing.assert_close(again, _plain(model, x), **TOL)
    block = model.levels[0].blocks[0]
    assert block._folded.cached[0].is_contiguous(memory_format=torch.channels_last)
    assert model.levels[0].downsample._weight.cached[0].is_contiguous(memory_format=torch.channels_last)
    nchw = torch.randn(2, block.conv1.in_channels, 16, 20)
    with torch.no_grad():
        out = block(nchw)
        assert out.is_contiguous() and block._folded.cached[0].is_contiguous()
        torch.testing.assert_close(out, _plain(block, nchw), **TOL)


def test_hooks_on_submodules_fire_in_eval_mode():
    """A folded path skips its submodules' calls: where one has a hook (a feature or attention probe), its
    module runs the plain form, with the same result."""
    model = _model()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = model(x)
    seen = []
    probes = [model.patch_embed.conv_down[0], model.levels[0].blocks[0].norm1, model.levels[2].blocks[0].mlp.fc1,
              model.levels[2].blocks[0].hat_attn]  # fmt: skip
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__)) for m in probes]
    with torch.no_grad():
        hooked = model(x)
    assert sorted(seen) == sorted(type(m).__name__ for m in probes)
    torch.testing.assert_close(hooked, expected, **TOL)
    for handle in handles:
        handle.remove()
    seen.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(m))
    try:
        with torch.no_grad():
            globally = model(x)
    finally:
        handle.remove()
    assert {id(m) for m in probes} <= {id(m) for m in seen}  # a global hook sees the submodules too
    torch.testing.assert_close(globally, expected, **TOL)


def test_state_dict_and_training_are_untouched():
    model = _model()
    keys = list(model.state_dict())
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 80))  # fills the caches
    assert list(model.state_dict()) == keys
    assert not any("fold" in k for k in keys)
    # training runs the plain modules: the same numbers with folding on or off
    model.train()
    x = torch.randn(2, 3, 64, 80)
    with inference_fusion(True):
        a, b = _fused_and_plain(lambda: model(x), seed=3)
    assert torch.equal(a, b)


def test_cache_follows_weight_and_statistics_changes():
    model = _model()
    x = torch.randn(2, 3, 64, 80)
    block = model.levels[0].blocks[0]
    with torch.no_grad():
        before = model(x)
        cached = block._folded.cached
        assert torch.equal(model(x), before) and block._folded.cached is cached  # reused
        block.norm1.running_var.mul_(2.0)  # new BN statistics
        after_stats = model(x)
        assert block._folded.cached is not cached
        torch.testing.assert_close(after_stats, _plain(model, x), **TOL)
        model.levels[2].blocks[0].attn.proj.weight.add_(0.1)  # a folded linear
        model.levels[2].blocks[0].gamma3.mul_(3.0)  # and its layer scale
        after_weights = model(x)
        torch.testing.assert_close(after_weights, _plain(model, x), **TOL)
    assert not torch.allclose(before, after_stats) and not torch.allclose(after_stats, after_weights)
    # a forward in training mode updates the BN statistics; eval folds them again
    model.train()
    assert block._folded.cached is None  # train() drops the cache
    model(x)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _plain(model, x), **TOL)
    # loading a checkpoint into a model that has folded already
    twin = _model()
    with torch.no_grad():
        twin(x)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)


def test_copies_and_pickles_fold_again():
    model = _model()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = model(x)
        clone = copy.deepcopy(model)
        assert clone.levels[0].blocks[0]._folded.cached is None
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
    restored = pickle.loads(pickle.dumps(model))  # torch.save(model) pickles: no derived tensors go along
    assert restored.levels[0].blocks[0]._folded.cached is None
    with torch.no_grad():
        torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)
    assert FoldedTensors().__getstate__() == {"derived": None}


def test_autograd_and_mc_dropout_take_the_plain_path():
    model = _model()
    x = torch.randn(2, 3, 64, 80)
    # eval mode with gradients (e.g. fine-tuning with frozen BN statistics): every parameter gets a gradient
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    block = model.levels[0].blocks[0]
    assert not fusion_active(block, x)
    with torch.no_grad():
        assert fusion_active(block, x)
        with inference_fusion(False):
            assert not fusion_active(block, x)
    # Monte-Carlo dropout: dropout re-enabled in eval must not be folded away
    mc = _model(drop_rate=0.5)
    for m in mc.modules():
        if isinstance(m, torch.nn.Dropout):
            m.train()
    with torch.no_grad():
        a, b = _fused_and_plain(lambda: mc.levels[2](torch.randn(2, 64, 4, 5)))
    assert torch.equal(a, b)


def test_fused_optimizer_steps_invalidate_the_caches():
    """Fused optimizers update weights in place without bumping their version counters: with the model kept in
    eval mode through fine-tuning (frozen BatchNorm), the next no-grad forward reused folds of the old weights."""
    model = _model()
    x = torch.randn(2, 3, 64, 80)
    for make in (torch.optim.SGD, torch.optim.AdamW):
        optimizer = make(model.parameters(), lr=0.05, fused=True)
        with torch.no_grad():
            model(x)  # validation fills the caches
        model(x).square().mean().backward()  # eval mode with autograd: the plain path
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            torch.testing.assert_close(model(x), _plain(model, x), **TOL)


def test_submodules_in_training_mode_take_the_plain_path():
    """Test-time BatchNorm adaptation (eval model, BatchNorms back in train mode or without running statistics)
    and MC drop path in the conv blocks: the folded form would skip what those modules do."""
    x = torch.randn(2, 3, 64, 80)
    adapted = _model()
    for m in adapted.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()
    with torch.no_grad():
        with inference_fusion(False):
            expected = copy.deepcopy(adapted)(x)  # batch statistics, running statistics updated
        torch.testing.assert_close(adapted(x), expected, **TOL)
    stats_free = _model()
    for m in stats_free.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # TENT-style: normalise with the batch's statistics, keep none
            m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
    with torch.no_grad():
        torch.testing.assert_close(stats_free(x), _plain(stats_free, x), **TOL)
    mc = _model(drop_path_rate=0.5)
    for m in mc.modules():
        if type(m).__name__ == "DropPath":
            m.train()
    block, h = mc.levels[1].blocks[1], torch.randn(2, 32, 8, 10)  # a conv block with a nonzero rate
    assert type(block.drop_path).__name__ == "DropPath"
    with torch.no_grad():
        a, b = _fused_and_plain(lambda: block(h))
    assert torch.equal(a, b)


def test_batchnorm_eps_is_part_of_the_fold():
    model = _model()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        model(x)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eps = 0.5
        torch.testing.assert_close(model(x), _plain(model, x), **TOL)


def test_per_sample_gradients_with_vmap():
    """``vmap(grad(functional_call))`` (DP-SGD, influence functions) on an eval model, padded HAT stages
    included: the channels-last handling asked vmap's batched tensors for a memory format they do not have."""
    model = _model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, image):
        return torch.func.functional_call(model, (p, buffers), (image[None],)).logsumexp(-1).sum()

    x = torch.randn(2, 3, 64, 80)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(2):
        one = torch.func.grad(loss)(params, x[i])
        for k in ("patch_embed.conv_down.0.weight", "levels.2.blocks.0.attn.qkv.weight", "head.weight"):
            torch.testing.assert_close(per_sample[k][i], one[k], **TOL)


def test_stem_batch_chunks_change_nothing(monkeypatch):
    model = _model()
    x = torch.randn(5, 3, 64, 80)
    with torch.no_grad():
        whole = model.patch_embed(x)
        monkeypatch.setattr(fv_model, "STEM_CHUNK_BYTES", 8 * 32 * 40 * 4 * 2)  # two images per chunk
        assert model.patch_embed._batch_chunk(x) == 2
        chunked = model.patch_embed(x)
    assert torch.equal(chunked, whole)
    assert chunked.is_contiguous(memory_format=torch.channels_last)


def test_hat_stage_keeps_the_input_memory_format():
    stage = HATStage(16, depth=2, num_heads=2, input_resolution=(10, 13), window_size=7, do_propagation=True).eval()
    x = torch.randn(2, 16, 10, 13)
    with torch.no_grad():
        plain = stage(x)
        nhwc = stage(x.contiguous(memory_format=torch.channels_last))
    assert plain.is_contiguous()
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    torch.testing.assert_close(nhwc, plain, **TOL)  # the CT depthwise conv rounds differently in NHWC


@pytest.mark.parametrize("propagate", [False, True])
def test_hat_block_folds_layer_scales(propagate):
    from hatplug.layers import CarrierTokenGrid

    grid = CarrierTokenGrid(windows=(2, 2), ct_size=2)
    blk = HATBlock(32, num_heads=2, window_size=7, ct_grid=grid, layer_scale=0.5, propagate=propagate)
    blk = randomize_(blk).eval()
    x, ct = torch.randn(2 * 4, 49, 32), torch.randn(2, 16, 32)
    with torch.no_grad():
        fused = blk(x, ct)
        with inference_fusion(False):
            plain = blk(x, ct)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, **TOL)


def test_fold_helpers():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    bn = randomize_(torch.nn.BatchNorm2d(6)).eval()
    gamma = torch.rand(6)
    w, b = fold_batchnorm(conv.weight, conv.bias, bn, gamma)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.nn.functional.conv2d(x, w, b, padding=1), gamma.view(1, -1, 1, 1) * bn(conv(x)), **TOL
        )
    # half-precision weights are folded in float32
    w16, _ = fold_batchnorm(conv.weight.half(), conv.bias.half(), bn.half())
    assert w16.dtype == torch.float16
    y = torch.randn(4, 8, 16)
    assert torch.equal(gelu_(y.clone()), torch.nn.functional.gelu(y))
    y4 = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    assert torch.equal(gelu_(y4.clone()), torch.nn.functional.gelu(y4.contiguous()))
    lin, h, r = torch.nn.Linear(16, 8), torch.randn(3, 5, 16), torch.randn(3, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(residual_linear(r, h, lin.weight, lin.bias), r + lin(h), **TOL)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert residual_linear(r, h, lin.weight, lin.bias).dtype == torch.float32  # the plain expression


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_folded_form_keeps_the_plain_precision_under_autocast(dtype):
    """A float32 layer scale keeps the residual stream in float32 under autocast in the plain form; the folded
    form has the scale inside the GEMMs' weights and ran the stream (and the level maps) in half precision,
    about 1.6x further from float32 than the plain form at the last level."""
    model = _model()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        exact = model.forward_intermediates(x, intermediates_only=True)
        with torch.autocast("cpu", dtype=dtype):
            folded = model.forward_intermediates(x, intermediates_only=True)
            with inference_fusion(False):
                plain = model.forward_intermediates(x, intermediates_only=True)
    for level, (f, p, e) in enumerate(zip(folded, plain, exact)):
        assert f.dtype == p.dtype, f"level {level}: folded {f.dtype}, plain {p.dtype}"
        err_folded = ((f.float() - e).norm() / e.norm()).item()
        err_plain = ((p.float() - e).norm() / e.norm()).item()
        assert err_folded <= 1.25 * err_plain + 1e-6, f"level {level}: {err_folded:.2e} against plain {err_plain:.2e}"


def test_eval_again_after_data_edits():
    """``.data`` edits do not bump a tensor's version, so the fold cache cannot see them: ``eval()`` drops it."""
    model = _model()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        model(x)
        model.patch_embed.conv_down[0].weight.data.mul_(0.5)
        model.levels[2].blocks[0].mlp.fc1.weight.data.mul_(0.5)
        model.eval()
        torch.testing.assert_close(model(x), _plain(model, x), **TOL)


def _same_storage_parameter(old: torch.Tensor) -> torch.nn.Parameter:
    """A new Parameter at ``old``'s address with a fresh version counter: what a replaced weight can get from
    the allocator after the old one was freed (seen with load_state_dict(assign=True) and nn.Parameter swaps)."""
    new = torch.empty(0, dtype=old.dtype).set_(old.untyped_storage(), old.storage_offset(), old.shape, old.stride())
    with torch.no_grad():
        while new._version < old._version:  # no-op writes until the version counters agree as well
            new.mul_(1)
    return torch.nn.Parameter(new)


def test_caches_notice_a_replaced_weight_at_the_freed_address_with_the_same_version():
    model = _model()
    x = torch.randn(2, 3, 64, 80)
    block, hat = model.levels[0].blocks[0], model.levels[2].blocks[0]
    with torch.no_grad():
        model(x)  # both caches filled: folded conv weights and the position biases
        for module, name in ((block.conv1, "weight"), (hat.attn.pos_emb_funct.cpb_mlp[2], "weight")):
            old = getattr(module, name)
            new = _same_storage_parameter(old)
            assert new.data_ptr() == old.data_ptr() and new._version == old._version  # the old key, exactly
            old.data.copy_(torch.randn_like(old))  # new values in that memory, bypassing the version counter
            setattr(module, name, new)
        torch.testing.assert_close(model(x), _plain(model, x), **TOL)  # computed afresh, not the stale values


def test_models_built_under_inference_mode_fold_every_call():
    """Weights made under ``torch.inference_mode`` (a model built or ``.to()``-ed there, as serving code does) are
    inference tensors, which keep no version counter: the caches fold them on each call instead of failing, and
    see an in-place edit made there."""
    x = torch.randn(2, 3, 64, 80)
    torch.manual_seed(0)
    reference = _model()
    with torch.inference_mode():
        torch.manual_seed(0)
        model = _model()
        assert model.levels[2].blocks[0].mlp.fc1.weight.is_inference()
        torch.testing.assert_close(model(x), _plain(reference, x), **TOL)
        model.patch_embed.conv_down[1].running_var.mul_(4.0)  # in place, inside inference mode: no version bump
        model.levels[2].blocks[0].attn.pos_emb_funct.cpb_mlp[2].weight.mul_(-1.0)
        edited = model(x)
    with torch.no_grad():
        reference.patch_embed.conv_down[1].running_var.mul_(4.0)
        reference.levels[2].blocks[0].attn.pos_emb_funct.cpb_mlp[2].weight.mul_(-1.0)
    torch.testing.assert_close(edited, _plain(reference, x), **TOL)
    assert model.patch_embed._folded.empty  # nothing kept that an unseen edit could make stale
    with torch.inference_mode():
        moved = copy.deepcopy(reference).to(torch.float64).to(torch.float32)  # new (inference) tensors
        assert moved.levels[0].blocks[0].conv1.weight.is_inference()
        torch.testing.assert_close(moved(x), _plain(reference, x), **TOL)


def test_cache_reads_one_entry_when_another_caller_stores_in_between(monkeypatch):
    """Two callers sharing a cache with different keys (threads serving one model under two autocast dtypes):
    when the other caller stores its value while this one is between its key check and its read (here: inside
    the source-identity check, where a thread switch can happen), this one still gets its own value. Reading the
    key, the sources and the value as separate attributes handed it the other caller's value."""
    import hatplug.layers._cache as cache_module

    cache, source = FoldedTensors(), torch.ones(3)

    def get(tag: int):
        return cache.get([source], lambda: (torch.full((1,), float(tag)),), extra=(tag,))[0].item()

    assert get(1) == 1.0
    real_check, switched = cache_module.same_sources, []

    def check_then_switch(refs, tensors):
        if not switched:
            switched.append(get(2))  # the other caller runs here and stores its own entry
        return real_check(refs, tensors)

    monkeypatch.setattr(cache_module, "same_sources", check_then_switch)
    assert get(1) == 1.0 and switched == [2.0]
    monkeypatch.setattr(cache_module, "same_sources", real_check)
    assert get(2) == 2.0 and get(1) == 1.0


class _LoRA(nn.Module):
    """A PEFT-style adapter: the wrapped layer plus a low-rank term, with ``weight`` / ``bias`` forwarded to the
    wrapped layer (so code that reads them instead of calling the module loses the low-rank term)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base
        if isinstance(base, nn.Linear):
            self.lora_a, self.lora_b = nn.Linear(base.in_features, 2, bias=False), nn.Linear(2, base.out_features)
        else:
            self.lora_a = nn.Conv2d(base.in_channels, 2, base.kernel_size, base.stride, base.padding, bias=False)
            self.lora_b = nn.Conv2d(2, base.out_channels, 1)
        nn.init.normal_(self.lora_b.weight, std=0.5)

    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def forward(self, x):
        return self.base_layer(x) + self.lora_b(self.lora_a(x))


def _own_forward(module: nn.Module) -> nn.Module:
    """``module`` as an instance of a subclass of its class that adds a per-channel offset in ``forward``."""

    class Shifted(type(module)):
        def forward(self, x):
            y = super().forward(x)
            if y.dim() == 4:  # an NCHW map: per channel
                return y + torch.linspace(-0.5, 0.5, y.shape[1]).view(1, -1, 1, 1)
            return y + torch.linspace(-0.5, 0.5, y.shape[-1])  # tokens

    shifted = Shifted.__new__(Shifted)
    shifted.__dict__ = module.__dict__.copy()
    return shifted


def _own_forward_act(act: nn.Module) -> nn.Module:
    class Doubled(type(act)):
        def forward(self, x):
            return 2 * super().forward(x)

    return Doubled()


def _swap(model, path: str, make) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, name, make(getattr(parent, name)))


REPLACEMENTS = {  # a module of the small model -> what a user puts in its place
    "LoRA on attn.proj": ("levels.2.blocks.0.attn.proj", _LoRA),
    "LoRA on mlp.fc2": ("levels.3.blocks.0.mlp.fc2", _LoRA),
    "LoRA on hat_attn.proj": ("levels.2.blocks.0.hat_attn.proj", _LoRA),
    "LoRA on hat_mlp.fc2": ("levels.2.blocks.1.hat_mlp.fc2", _LoRA),
    "own forward on mlp.fc2": ("levels.2.blocks.0.mlp.fc2", _own_forward),
    "own forward on mlp": ("levels.2.blocks.0.mlp", _own_forward),
    "GluMlp as mlp": ("levels.3.blocks.0.mlp", lambda m: GluMlp(m.fc1.in_features, 2 * m.fc1.out_features)),
    "LoRA on a conv block's conv": ("levels.0.blocks.0.conv2", _LoRA),
    "own forward on a conv": ("levels.1.blocks.0.conv1", _own_forward),
    "own forward on a BatchNorm": ("levels.0.blocks.0.norm2", _own_forward),
    "GroupNorm for a BatchNorm": ("levels.1.blocks.0.norm1", lambda m: nn.GroupNorm(4, m.num_features)),
    "GELU with its own forward": ("levels.0.blocks.0.act1", _own_forward_act),
    "SiLU in the stem": ("patch_embed.conv_down.2", lambda m: nn.SiLU()),
    "own forward on a stem conv": ("patch_embed.conv_down.3", _own_forward),
}


@pytest.mark.parametrize("case", list(REPLACEMENTS))
def test_replaced_layers_are_called_not_read(case):
    """The folded forms read some layers' tensors instead of calling them. A layer replaced by one whose call
    differs (a LoRA adapter, a subclass with its own forward, another MLP or norm or activation) must be called:
    the block takes the plain path, and the output is what the modules compute."""
    model = _model()
    path, make = REPLACEMENTS[case]
    _swap(model, path, make)
    model.eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _plain(model, x), **TOL)


def test_parametrized_layers_still_fold():
    """A parametrized layer (weight norm) is called as the stock class: it keeps the folded path, whose
    tensors are the parametrized weights."""
    model = _model()
    fc2 = model.levels[2].blocks[0].mlp.fc2
    torch.nn.utils.parametrizations.weight_norm(fc2)
    torch.nn.utils.parametrizations.weight_norm(model.levels[0].blocks[0].conv1)
    model.eval()  # the new parametrization modules too
    assert runs_as(fc2, nn.Linear)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        folded = model(x)
    assert not model.levels[2].blocks[0]._folded.empty and not model.levels[0].blocks[0]._folded.empty
    torch.testing.assert_close(folded, _plain(model, x), **TOL)


def test_fused_stem_and_quantized_linears_run():
    """``torch.ao.quantization.fuse_modules`` on the stem (conv-BN-ReLU -> ConvReLU2d + Identity) and
    ``quantize_dynamic`` on the linears (whose ``weight`` is a method) leave models that run in eval mode, as
    their modules compute them; both used to fail inside the folded path."""
    model = _model()
    torch.ao.quantization.fuse_modules(model.patch_embed.conv_down, [["0", "1", "2"], ["3", "4", "5"]], inplace=True)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _plain(model, x), **TOL)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5)
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    quantized.eval()
    with torch.no_grad():
        out, reference = quantized(x), _plain(model, x)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, rtol=0, atol=0.05 * reference.abs().max().item())


def test_hooks_on_a_position_mlp_see_every_forward():
    """A cached position bias skips its MLP's call: with a hook on that MLP, it is computed on every call."""
    model = _model()
    calls = []
    model.levels[2].blocks[0].attn.pos_emb_funct.cpb_mlp[0].register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        for _ in range(3):
            model(x)
    assert len(calls) == 3


def test_vmap_over_eval_forwards():
    """``torch.func.vmap`` over eval forwards without autograd (the folded form's ``out=`` writes have no batching
    rule): the plain form runs, and each slice gives what a forward of that slice gives."""
    model = _model()
    stage = HATStage(16, 1, 2, (8, 8), 4).eval()
    xs, maps = torch.randn(2, 1, 3, 64, 80), torch.randn(3, 1, 16, 8, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # functorch: no batching rule for the CPU attention kernel (a fallback)
        for module, inputs in ((model, xs), (stage, maps)):
            torch.testing.assert_close(torch.func.vmap(module)(inputs), torch.stack([module(x) for x in inputs]), **TOL)
