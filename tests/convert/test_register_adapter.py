"""hatplug.register_adapter: a user teaches convert a window-attention block of their own in a few dozen lines.

The shared parts do the work: CarrierBlock (carrier-token half, propagation, geometry) and
CarrierWindowAttention (gated or joint attention over [CTs; window]); the adapter says how the block
projects tokens and how its skeleton runs.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatplug
from hatplug.adapters import CarrierBlock, padded_grid, unregister_adapter
from hatplug.layers import CarrierWindowAttention, window_partition_nhwc, window_reverse_nhwc


class MyWindowBlock(nn.Module):
    """The user's block: NCHW in and out, pre-norm window self-attention, no shift, no bias."""

    def __init__(self, dim=16, heads=2, ws=4):
        super().__init__()
        self.dim, self.heads, self.ws = dim, heads, ws
        self.norm = nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, C, H, W = x.shape
        windows = window_partition_nhwc(self.norm(x.permute(0, 2, 3, 1)), (self.ws, self.ws))
        q, k, v = self.qkv(windows).view(windows.shape[0], -1, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(windows.shape))
        return x + window_reverse_nhwc(out, (self.ws, self.ws), H, W).permute(0, 3, 1, 2)


class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.stage = nn.Sequential(MyWindowBlock(), MyWindowBlock())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.stage(self.stem(x)).mean((2, 3)))


# --- what the user writes --------------------------------------------------------------------------------
class MyAttention(CarrierWindowAttention):
    def project(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return q * q.shape[-1] ** -0.5, k, v


class MyHATBlock(CarrierBlock):
    def __init__(self, block, settings, propagate):
        super().__init__()
        self.norm = block.norm
        self.attn = MyAttention(block.heads, block.qkv, block.proj, 0.0, nn.Identity(), settings.gated)
        self.init_carriers(block.dim, block.heads, (block.ws, block.ws), settings, 4.0, propagate, block.qkv.weight)

    def forward_block(self, x, ct):  # (B, C, H, W), (B, nW * ct**2, C)
        B, C, H, W = x.shape
        Hp, Wp, n_h, n_w = padded_grid(H, W, self.window_size)
        ct_windows = self.carrier_windows(ct, n_h, n_w)
        tokens = F.pad(self.norm(x.permute(0, 2, 3, 1)), (0, 0, 0, Wp - W, 0, Hp - H))
        ct_out, out = self.attn(self.norm(ct_windows), window_partition_nhwc(tokens, self.window_size))
        x = x.permute(0, 2, 3, 1) + window_reverse_nhwc(out, self.window_size, Hp, Wp)[:, :H, :W]
        ct_windows = ct_windows + ct_out
        if self.propagation_scale is not None:
            x = self.propagate_into_map(x, ct_windows, Hp, Wp)
        return x.permute(0, 3, 1, 2), ct_windows.reshape(B, -1, C)


class MyAdapter(hatplug.BlockAdapter):
    family = "my window blocks"
    source_types = (MyWindowBlock,)

    def window_size(self, block):
        return (block.ws, block.ws)

    def build(self, block, settings, propagate):
        return MyHATBlock(block, settings, propagate)


# ----------------------------------------------------------------------------------------------------------


def test_a_user_adapter_converts_a_new_block_type():
    model = MyNet().eval()
    try:
        hatplug.register_adapter(MyAdapter())
        hat = hatplug.convert(model)
        report = hatplug.report(hat)
        assert [r.path for r in report.converted] == ["stage.0", "stage.1"]
        assert report.converted[0].family == "my window blocks" and report.converted[1].propagates
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(hat(x), model(x), rtol=1e-5, atol=1e-5)  # warm start
        hat.train()
        with torch.no_grad():
            hat.stage.get_parameter("0.attn.hat_gate").fill_(1.0)  # a rewritten Sequential is a GraphModule
        hat(x).sum().backward()
        assert hat.stage.carrier_tokenizer.pos_embed.weight.grad.any()
    finally:
        unregister_adapter(MyAdapter)
    try:
        hatplug.convert(MyNet())
    except hatplug.UnsupportedModelError as exc:
        assert "my window blocks" not in str(exc)
    else:
        raise AssertionError("the adapter was not unregistered")


def test_build_at_sees_the_model_and_the_blocks_path():
    """``BlockAdapter.build_at`` (for twins that need more than the matched block) gets the converted model and
    the block's path in it, in stage-stream conversion as in per-block conversion (it once got the stage)."""
    seen = []

    class Recording(MyAdapter):
        def build_at(self, model, path, block, settings, propagate):
            seen.append((model, path, model.get_submodule(path) is block))
            return super().build_at(model, path, block, settings, propagate)

    model = MyNet()
    try:
        hatplug.register_adapter(Recording())
        hatplug.convert(model, inplace=True)
    finally:
        unregister_adapter(Recording)
    assert [(m is model, path, found) for m, path, found in seen] == [(True, "stage.0", True), (True, "stage.1", True)]


def test_a_malformed_adapter_is_refused_when_registered():
    """A class for source_types was registered and then broke every conversion (built-in families too), an
    unrelated class was instantiated before the type check, and an adapter without window_size failed inside
    convert with an empty NotImplementedError."""

    class OneClass(MyAdapter):
        source_types = MyWindowBlock  # not a tuple

    class NoWindow(hatplug.BlockAdapter):
        family, source_types = "x", (MyWindowBlock,)

        def build(self, block, settings, propagate):
            return MyHATBlock(block, settings, propagate)

    before = hatplug.adapters.registered_adapters()
    with pytest.raises(TypeError, match=r"OneClass\.source_types must be a tuple of nn\.Module classes.*\(MyBlock,\)"):
        hatplug.register_adapter(OneClass)
    with pytest.raises(TypeError, match=r"expects a hatplug\.adapters\.BlockAdapter, got the class Linear"):
        hatplug.register_adapter(nn.Linear)
    with pytest.raises(TypeError, match=r"NoWindow must implement window_size"):
        hatplug.register_adapter(NoWindow)
    assert hatplug.adapters.registered_adapters() == before


@pytest.mark.parametrize(
    "build, window, message",
    [
        (lambda block, s, p: block, None, r"build returned the block itself for 'stage\.0' \(MyWindowBlock\)"),
        (lambda block, s, p: nn.Identity(), None, r"build returned Identity for 'stage\.0'"),
        (None, (8, 8), r"has \(4, 4\) windows, but WrongAdapter\.window_size says \(8, 8\)"),
        (None, 4, r"window_size\(block\) must return \(height, width\).*got 4 for 'stage\.0'"),
    ],
)
def test_a_wrong_adapter_is_named_at_conversion(build, window, message):
    """A twin that is not one, or windows that disagree with the adapter's, converted (the report listed the blocks
    as converted) and failed at the first forward with raw shape or signature errors naming neither."""

    class WrongAdapter(MyAdapter):
        def window_size(self, block):
            return super().window_size(block) if window is None else window

        def build(self, block, settings, propagate):
            return super().build(block, settings, propagate) if build is None else build(block, settings, propagate)

    try:
        hatplug.register_adapter(WrongAdapter())
        with pytest.raises(hatplug.ConversionError, match=message):
            hatplug.convert(MyNet())
    finally:
        unregister_adapter(WrongAdapter)


def test_a_stage_the_model_loops_over_names_the_block_stream():
    """Blocks in an nn.ModuleList that the model's forward loops over have no stage module to rewrite; the error
    advised a tracer leaf, which cannot help."""

    class LoopNet(MyNet):
        def __init__(self):
            super().__init__()
            self.stage = nn.ModuleList([MyWindowBlock(), MyWindowBlock()])

        def forward(self, x):
            x = self.stem(x)
            for block in self.stage:
                x = block(x)
            return self.head(x.mean((2, 3)))

    try:
        hatplug.register_adapter(MyAdapter())
        with pytest.raises(hatplug.ConversionError, match=r"stage 'stage' \(ModuleList\) has no forward.*'block'"):
            hatplug.convert(LoopNet())
    finally:
        unregister_adapter(MyAdapter)
