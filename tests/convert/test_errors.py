"""What a user sees when a model cannot be converted."""

import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

import hatplug
from hatplug.errors import CheckpointError, ConversionError, HatplugError, UnsupportedModelError

from .conftest import FAMILIES, make_model


def test_global_attention_is_named_as_not_a_conversion_target():
    # Twins-PCPVT has only global (sub-sampled) attention: an adapter cannot help, and the message says why
    model = timm.create_model(
        "twins_pcpvt_small", embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), num_classes=10
    )
    with pytest.raises(UnsupportedModelError, match=r"GlobalSubSampleAttn\) has no windows to summarise"):
        hatplug.convert(model)


def test_block_rates_name_an_unreadable_module():
    from hatplug.adapters.base import block_rates

    class Stochastic(nn.Module):  # a drop path that keeps its rate under another name
        rate = 0.1

    with pytest.raises(ConversionError, match="drop-path rate of a Stochastic.*timm's DropPath"):
        block_rates(Stochastic(), None, None)


def test_resnet_is_unsupported_with_a_helpful_message():
    with pytest.raises(UnsupportedModelError) as info:
        hatplug.convert(timm.create_model("resnet18", pretrained=False))
    message = str(info.value)
    assert isinstance(info.value, HatplugError)
    assert "no block it can convert in ResNet" in message
    for family in ("timm Swin v1", "timm SwinV2", "timm Twins-SVT", "hatplug EdgeViT"):
        assert family in message
    assert "hatplug.register_adapter" in message and "BlockAdapter" in message


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        x = self.embed(x)
        return self.attn(x, x, x)[0]


def test_multihead_attention_model_names_the_module_it_cannot_convert():
    with pytest.raises(
        UnsupportedModelError, match=r"attention modules that no adapter knows: 'attn' \(MultiheadAttention\)"
    ):
        hatplug.convert(TinyTransformer())


class DataDependentStage(nn.Module):
    """A stage whose forward branches on tensor values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(
            *[SwinTransformerBlock(8, (8, 8), num_heads=1, window_size=4, shift_size=2 * i) for i in range(2)]
        )

    def forward(self, x):
        if x.mean() > 0:
            x = x * 1.0
        return self.blocks(x)


class WithDataDependentStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage = DataDependentStage()

    def forward(self, x):
        return self.stage(x)


def test_untraceable_stage_names_the_stage_and_the_trace_failure():
    with pytest.raises(ConversionError) as info:
        hatplug.convert(WithDataDependentStage())
    message = str(info.value)
    assert "cannot trace stage 'stage' (DataDependentStage)" in message
    assert "TraceError" in message and "control flow" in message
    assert "register_notrace_module" in message


def test_bad_arguments_and_repeated_conversion():
    model = make_model(FAMILIES["swin"], 64)
    with pytest.raises(ValueError, match="init must be one of"):
        hatplug.convert(model, init="zeros")
    with pytest.raises(ValueError, match="ct_size"):
        hatplug.convert(model, ct_size=0)
    hat = hatplug.convert(model)
    with pytest.raises(ConversionError, match="converted already"):
        hatplug.convert(hat)
    with pytest.raises(HatplugError, match="was not converted"):
        hatplug.report(model)
    with pytest.raises(HatplugError, match="was not converted"):
        hatplug.save(model, "unused.safetensors")


def test_converting_nothing_is_an_error_that_gives_the_reasons():
    model = make_model(FAMILIES["swin"], 64)
    with pytest.raises(ConversionError, match=r"no block of SwinTransformer was converted.*smaller than ct_size=5"):
        hatplug.convert(model, ct_size=5)  # every window is 4x4
    with pytest.raises(ConversionError, match=r"stage 0 not selected \(stages=\[\]\).*Try other stages="):
        hatplug.convert(model, stages=[])
    # the fix named is the one that helps (it said "change ct_size / stages" for single windows too)
    with pytest.raises(ConversionError, match=r"single window.*Try a larger input size or smaller windows"):
        hatplug.convert(make_model(FAMILIES["swin"], 16))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError):
        hatplug.convert(model, ct_size=5, inplace=True)
    assert getattr(model, "hatplug_conversion", None) is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # left as it was
    hatplug.convert(model)  # and still convertible


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ct_size": True}, "ct_size must be a positive int"),
        ({"propagate": "no"}, "propagate must be True or False"),
        ({"inplace": 1}, "inplace must be True or False"),
        ({"stages": 0}, "stages must be a list of stage indices"),
        ({"stages": [True]}, "stages must be a list of stage indices"),
        ({"stages": "01"}, "stages must be a list of stage indices"),
    ],
)
def test_argument_types_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hatplug.convert(make_model(FAMILIES["swin"], 64), **kwargs)


def test_convert_needs_a_module():
    with pytest.raises(TypeError, match=r"takes an nn.Module.*got str"):
        hatplug.convert("swin_tiny_patch4_window7_224")


def test_load_checks_the_base_model(tmp_path):
    path = hatplug.save(hatplug.convert(make_model(FAMILIES["swin"], 64)), tmp_path / "swin.safetensors")
    with pytest.raises(CheckpointError, match="holds a converted SwinTransformer, but base_model is a Twins"):
        hatplug.load(path, make_model(FAMILIES["twins"], 128))
    with pytest.raises(hatplug.CheckpointMismatchError, match="base_model must be built as the model that was"):
        hatplug.load(path, make_model(FAMILIES["swin"], 32))  # same class, other geometry
    with pytest.raises(CheckpointError, match="the folder .*no_such_dir does not exist"):
        hatplug.save(hatplug.convert(make_model(FAMILIES["swin"], 64)), tmp_path / "no_such_dir" / "x.safetensors")
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a readable safetensors file .*it is a torch.save file"):
        hatplug.load(tmp_path / "plain.pt", make_model(FAMILIES["swin"], 64))


def test_save_names_a_converted_submodule(tmp_path):
    """A converted model inside an nn.Sequential: the message said only "Sequential was not converted" and
    pointed at torch.save, which loses the conversion options."""
    outer = nn.Sequential(hatplug.convert(make_model(FAMILIES["swin"], 64)))
    with pytest.raises(HatplugError, match=r"its submodule '0' was: save that one, .*get_submodule\('0'\)"):
        hatplug.save(outer, tmp_path / "x.safetensors")
    assert hatplug.save(outer.get_submodule("0"), tmp_path / "x.safetensors").is_file()


def test_a_saved_conversion_loads_only_into_a_model_converted_alike(tmp_path):
    """No tensor shape shows ct_size: a hatplug.save file of a ct_size=2 conversion loaded strictly into a ct_size=1
    one (another function), and into an unconverted model the error said only "strict=False". The file's recorded
    options are compared; strict=False loads what fits after a warning."""
    import logging

    base = make_model(FAMILIES["swin"], 64)
    path = hatplug.save(hatplug.convert(base, ct_size=2), tmp_path / "swin.safetensors")
    other = hatplug.convert(base, ct_size=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(hatplug.CheckpointMismatchError, match="ct_size=2 in the file, 1 here"):
        hatplug.load_checkpoint(other, path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # nothing loaded
    with pytest.raises(hatplug.CheckpointMismatchError, match=r"is not converted: rebuild it with hatplug\.load"):
        hatplug.load_checkpoint(make_model(FAMILIES["swin"], 64), path)
    # another family's file names both classes, converted or not (it blamed the options, or said to rebuild with
    # hatplug.load, which then refused the class)
    twins = make_model(FAMILIES["twins"], 128)
    for target in (hatplug.convert(twins, init="random"), twins):
        with pytest.raises(hatplug.CheckpointMismatchError, match=r"holds a SwinTransformer .* this model is a Twins"):
            hatplug.load_checkpoint(target, path)
    alike = hatplug.convert(base, ct_size=2)
    assert hatplug.load_checkpoint(alike, path).ok  # the same options: loads
    logger = logging.getLogger("hatplug.checkpoint")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        assert hatplug.load_checkpoint(other, path, strict=False).ok  # every tensor fits: loaded, after a warning
    finally:
        logger.removeHandler(handler)
    assert any("ct_size=2 in the file, 1 here" in r.getMessage() for r in records)


def test_resizing_a_converted_swin_says_what_to_do_and_deepcopy_keeps_the_stages():
    import copy

    hat = copy.deepcopy(hatplug.convert(make_model(FAMILIES["swin"], 64)))  # e.g. an EMA copy
    assert hat.layers[0].input_resolution == (16, 16) and hat.layers[0].grad_checkpointing is False
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.isfinite(hat(x)).all()
    with pytest.raises(ConversionError, match="call set_input_size on the original model and convert it again"):
        hat.set_input_size((96, 96))
    assert tuple(hat.patch_embed.img_size) == (64, 64)  # refused before timm touched anything
    with torch.no_grad():
        assert torch.isfinite(hat(x)).all()


def test_load_names_damaged_save_metadata(tmp_path):
    from safetensors.torch import save_file

    from hatplug.conversion.io import FORMAT

    cases = {
        "no_model": {"format": FORMAT, "config": "{}"},
        "bad_json": {"format": FORMAT, "model": "SwinTransformer", "config": "{not json"},
        "odd_key": {"format": FORMAT, "model": "SwinTransformer", "config": '{"ct_size": 2, "foo": 1}'},
    }
    for name, metadata in cases.items():
        save_file({"w": torch.zeros(1)}, str(tmp_path / f"{name}.safetensors"), metadata=metadata)
        with pytest.raises(CheckpointError, match=f"{name}.safetensors: its (hatplug.save metadata|conversion config)"):
            hatplug.load(tmp_path / f"{name}.safetensors", make_model(FAMILIES["swin"], 64))


SWINV2_CR = dict(embed_dim=16, depths=(1, 1), num_heads=(1, 1), img_size=64, window_size=4)


@pytest.mark.parametrize(
    "name, kwargs, attention",
    [
        ("swinv2_cr_tiny_ns_224", SWINV2_CR, "WindowMultiHeadAttention"),
        ("maxvit_pico_rw_256", dict(embed_dim=(32, 64), depths=(1, 1), img_size=64), "PartitionAttentionCl"),
    ],
)
def test_windowed_family_without_adapter_is_named_unsupported_not_global(name, kwargs, attention):
    # their attention is windowed: "already spans the whole map" would be false; the family is what is missing
    with pytest.raises(UnsupportedModelError) as info:
        hatplug.convert(timm.create_model(name, num_classes=10, **kwargs))
    message = str(info.value)
    assert "spans the whole map" not in message
    assert "model family is not supported by hatplug.convert: it has windowed attention ('stages.0.blocks.0." in message
    assert f"({attention})" in message
    assert "swin_* / swinv2_* (not swinv2_cr_*" in message and "twins_svt_*" in message and "edgevit_*" in message
    assert "subclass hatplug.BlockAdapter" in message and "hatplug.register_adapter()" in message


def test_vit_is_still_named_global_attention():
    model = timm.create_model("vit_tiny_patch16_224", depth=1, embed_dim=16, num_heads=1, img_size=32, num_classes=10)
    with pytest.raises(UnsupportedModelError, match=r"already spans the whole map") as info:
        hatplug.convert(model)
    assert "not supported by hatplug.convert" not in str(info.value)


def test_save_and_load_name_swapped_or_wrong_arguments(tmp_path):
    hat = hatplug.convert(make_model(FAMILIES["swin"], 64))
    path = hatplug.save(hat, tmp_path / "swin.safetensors")
    base = make_model(FAMILIES["swin"], 64)
    with pytest.raises(TypeError, match=r"the arguments look swapped, call hatplug.load\(path, base_model\)") as info:
        hatplug.load(base, path)
    assert len(str(info.value)) < 300  # the model is not printed
    with pytest.raises(TypeError, match=r"the arguments look swapped, call hatplug.save\(model, path\)"):
        hatplug.save(str(path), hat)
    with pytest.raises(TypeError, match=r"base_model must be an nn.Module .*got str"):
        hatplug.load(path, "swin_tiny_patch4_window7_224")
    with pytest.raises(TypeError, match=r"path must be a str or os.PathLike, got int"):
        hatplug.save(hat, 3)
    assert isinstance(hatplug.load(str(path), base), nn.Module)  # str and Path both work


def test_save_refuses_a_directory_and_other_suffixes(tmp_path):
    hat = hatplug.convert(make_model(FAMILIES["swin"], 64))
    with pytest.raises(CheckpointError, match=r"it is a directory; pass a file path, e\.g\. .*model\.safetensors"):
        hatplug.save(hat, tmp_path)  # a raw SafetensorError before
    for name in ("hat.pth", "hat"):  # safetensors under a .pth name: load_checkpoint called it "not a checkpoint"
        with pytest.raises(CheckpointError, match=r"must end in \.safetensors .*use .*hat\.safetensors"):
            hatplug.save(hat, tmp_path / name)
        assert not (tmp_path / name).exists()
    (tmp_path / "swin.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"swin\.safetensors is a directory, not a checkpoint file"):
        hatplug.load(tmp_path / "swin.safetensors", make_model(FAMILIES["swin"], 64))


def test_fx_feature_extractor_says_to_convert_first():
    """timm's ``features_only=True, feature_cls="fx"`` is a FeatureGraphNet holding an fx graph with the blocks
    inlined: the refusal says to convert the model first and extract features from the converted one."""
    model = FAMILIES["swin"].make(64, features_only=True, out_indices=(1, 2), feature_cls="fx")
    with pytest.raises(UnsupportedModelError, match="convert the model first, then extract features"):
        hatplug.convert(model)
