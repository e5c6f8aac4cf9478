"""A supported model inside another module (nn.Sequential, a detector's backbone, timm's feature wrapper)
converts as the bare model does: the same stages, the same refusals, the same optimizer groups."""

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from torch import nn

import hatplug
from hatplug.errors import ConversionError

from .conftest import FAMILIES, make_model


class Net(nn.Module):
    """A detector-style model: a timm backbone as a submodule."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_twins_in_a_wrapper_numbers_its_stages_as_the_bare_model():
    model = make_model(FAMILIES["twins"], 128)
    bare = hatplug.report(hatplug.convert(model)).converted
    for wrapper, prefix in ((nn.Sequential(model), "0."), (Net(model), "backbone.")):
        rep = hatplug.report(hatplug.convert(wrapper))
        assert [(r.path, r.stage) for r in rep.converted] == [(prefix + r.path, r.stage) for r in bare]
        only = hatplug.report(hatplug.convert(wrapper, stages=[1])).converted
        assert [r.path for r in only] == [prefix + r.path for r in bare if r.stage == 1]


@pytest.mark.parametrize("stages", [None, [1]])
def test_resizing_a_converted_swin_inside_a_wrapper_changes_nothing(stages):
    hat = hatplug.convert(nn.Sequential(make_model(FAMILIES["swin"], 64)), stages=stages)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = hat(x)
    with pytest.raises(ConversionError, match="nothing was changed"):
        hat[0].set_input_size(img_size=128)
    assert tuple(hat[0].patch_embed.img_size) == (64, 64)  # refused before timm touched anything
    with torch.no_grad():
        assert torch.equal(hat(x), before)


def _groups(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``name -> (lr_scale, weight_decay)`` of timm's optimizer factory with layer-wise lr decay."""
    optimizer = create_optimizer_v2(model, "adamw", weight_decay=0.05, layer_decay=0.7)
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {name_of[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_a_wrapped_backbone_gets_the_optimizer_groups_of_a_direct_conversion():
    model = make_model(FAMILIES["swin"], 64)
    direct = _groups(hatplug.convert(model))
    for wrapper, inner in ((Net(model), lambda hat: hat.backbone), (nn.Sequential(model), lambda hat: hat[0])):
        assert _groups(inner(hatplug.convert(wrapper))) == direct


def test_a_wrapped_model_excludes_the_new_position_mlps_from_weight_decay(family):
    model = make_model(family, family.sizes[0])
    assert hatplug.convert(nn.Sequential(model))[0].no_weight_decay() == hatplug.convert(model).no_weight_decay()


def test_a_wrapper_of_a_converted_model_is_refused():
    model = make_model(FAMILIES["swin"], 64)
    for hat in (hatplug.convert(model), hatplug.convert(model, stages=[0])):
        with pytest.raises(ConversionError, match=r"'0' \(SwinTransformer\) in Sequential was converted already"):
            hatplug.convert(nn.Sequential(hat))
    with pytest.raises(ConversionError, match=r"'0\.0' \(SwinTransformerStage\) in Sequential was converted already"):
        hatplug.convert(nn.Sequential(hat.layers))  # a rewritten stage, taken out of its model


def test_a_data_parallel_or_compiled_wrapper_is_refused_with_the_fix():
    """convert(nn.DataParallel(model)) / convert(torch.compile(model)) converted, but saved the model under the
    wrapper's name and keys, which no model could load again; converting the model first and wrapping it after
    round-trips."""
    model = make_model(FAMILIES["swin"], 64)
    for wrapper, attribute in ((nn.DataParallel(model), "module"), (torch.compile(model), "_orig_mod")):
        message = rf"not a {type(wrapper).__name__} around it.*convert model\.{attribute}"
        with pytest.raises(ConversionError, match=message):
            hatplug.convert(wrapper)
    assert isinstance(nn.DataParallel(hatplug.convert(model)).module, type(model))


def test_edgevit_is_judged_at_its_img_size_and_the_skip_reason_names_it():
    """EdgeViT runs at any size; img_size is its nominal size, which single windows are judged at."""
    skipped = hatplug.report(hatplug.convert(timm.create_model("edgevit_xxs").eval())).skipped
    assert skipped and all("at its input size 224x224 (create the EdgeViT with img_size" in r.reason for r in skipped)
    model = timm.create_model("edgevit_xxs", img_size=512).eval()
    assert timm.models.get_model_input_config(model)["input_size"] == (3, 512, 512)
    assert not hatplug.report(hatplug.convert(model)).skipped  # 512 px: 3x3 windows in the last stage


def test_save_unwraps_compile_ddp_style_and_ema_wrappers(tmp_path):
    # hatplug.save(torch.compile(model)) wrote "_orig_mod."-prefixed keys that hatplug.load refused
    from timm.utils import ModelEmaV3

    family = FAMILIES["swin"]
    size = family.sizes[0]
    hat = hatplug.convert(make_model(family, size), init="random").eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = hat(x)
    for name, wrapped in [("compiled", torch.compile(hat)), ("ema", ModelEmaV3(hat)),
                          ("ddp_like", torch.nn.ModuleDict({"module": hat}))]:  # fmt: skip
        path = hatplug.save(wrapped, tmp_path / f"{name}.safetensors")
        restored = hatplug.load(path, make_model(family, size)).eval()
        with torch.no_grad():
            assert torch.equal(restored(x), expected), name
