"""What a user sees when a checkpoint does not fit, is not a file, or the arguments are mixed up."""

import pytest
import torch
from torch import nn

import fastervit
import hatplug
from hatplug.checkpoint import LoadReport, read_checkpoint
from hatplug.errors import CheckpointError, CheckpointMismatchError


def _layers(widths: list[int]) -> nn.Sequential:
    return nn.Sequential(*(nn.Linear(w, w, bias=False) for w in widths))


def test_long_mismatch_lists_say_how_many_more_and_the_error_carries_every_name():
    model = _layers([2] * 66)  # keys 0.weight .. 65.weight, each (2, 2)
    state = {f"{i}.weight": torch.zeros(3, 3) for i in range(25)}  # 25 of another shape
    state.update({f"{i}.weight": torch.zeros(2, 2) for i in range(25, 30)})  # 5 that fit; 30..65 missing (36)
    state.update({f"extra{i}.weight": torch.zeros(1) for i in range(23)})  # 23 unexpected
    with pytest.raises(CheckpointMismatchError) as info:
        hatplug.load_checkpoint(model, state)
    message, report = str(info.value), info.value.report
    assert isinstance(report, LoadReport)
    assert len(report.missing) == 36 and len(report.unexpected) == 23 and len(report.mismatched) == 25
    assert "36 missing: 30.weight" in message and ", 49.weight ... and 16 more\n" in message
    assert "23 unexpected: extra0.weight" in message and "extra19.weight ... and 3 more\n" in message
    assert sum(line.startswith("shape mismatch ") for line in message.splitlines()) == 21  # 20 named + the tail
    assert "\nshape mismatch ... and 5 more\n" in message  # 20 shown, and no longer cut off silently
    assert "the error's .report, a hatplug.LoadReport, has every one" in message
    assert report.missing[-1] == "65.weight" and report.mismatched[-1] == ("24.weight", (3, 3), (2, 2))


def test_short_lists_are_complete_and_do_not_point_at_report():
    model = _layers([2, 2])
    with pytest.raises(CheckpointMismatchError) as info:
        hatplug.load_checkpoint(model, {"0.weight": torch.zeros(3, 3), "1.weight": torch.zeros(2, 2)})
    message = str(info.value)
    assert "... and" not in message and ".report" not in message
    assert info.value.report.mismatched == [("0.weight", (3, 3), (2, 2))]
    # the report lists the one tensor that fits as loaded: the message must say that nothing was (it is not)
    assert message.startswith("nothing was loaded (the model is unchanged)") and "loaded 1 state-dict keys" in message
    assert not torch.equal(model[1].weight, torch.zeros(2, 2))


def test_fastervit_0_weights_into_fastervit_1_report_every_name(tmp_path):
    # the auditor's repro: 72 missing (list cut at 20) and more than 20 shape mismatches (cut with no marker)
    source = fastervit.create_model("faster_vit_0_224", dim=16, in_dim=8)  # narrow: the shapes differ, as 64 / 80 do
    torch.save({"state_dict": source.state_dict()}, tmp_path / "0.pth")
    with pytest.raises(CheckpointMismatchError) as info:
        fastervit.create_model("faster_vit_1_224", checkpoint_path=tmp_path / "0.pth", dim=24, in_dim=8)
    message, report = str(info.value), info.value.report
    assert len(report.missing) > 20 and len(report.mismatched) > 20
    assert f"... and {len(report.missing) - 20} more" in message
    assert f"shape mismatch ... and {len(report.mismatched) - 20} more" in message
    assert ".report" in message and "adapt_geometry=True" in message  # fastervit's own hint is kept
    assert message.startswith("nothing was loaded")
    target = fastervit.create_model("faster_vit_0_any_res", resolution=[96, 96], dim=24, in_dim=8)
    with pytest.raises(CheckpointMismatchError, match="^nothing was loaded") as info:  # load_adapted alike
        fastervit.resize.load_adapted(target, tmp_path / "0.pth")
    assert info.value.report.loaded  # what fits (the stem) is listed, and was not loaded


def test_a_directory_is_named_as_such_with_the_files_inside(tmp_path):
    model = _layers([2])
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    for call in (lambda: read_checkpoint(tmp_path), lambda: hatplug.load_checkpoint(model, tmp_path)):
        with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint file: pass the path of the file"):
            call()  # "checkpoint file not found" before
    with pytest.raises(CheckpointError, match=r"it holds weights\.pth; nothing was loaded"):
        hatplug.load_checkpoint(model, tmp_path)
    with pytest.raises(CheckpointError, match=r"is a directory, not a checkpoint file"):
        fastervit.create_model("faster_vit_0_224", checkpoint_path=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty is a directory, not a checkpoint file: .* file\); nothing"):
        read_checkpoint(tmp_path / "empty")


def test_load_checkpoint_says_when_the_arguments_look_swapped(tmp_path):
    model = _layers([2])
    with pytest.raises(TypeError, match=r"look swapped, call load_checkpoint\(model, checkpoint\)"):
        hatplug.load_checkpoint(tmp_path / "w.pth", model)  # "checkpoint holds a Sequential" before
    with pytest.raises(TypeError, match=r"model must be the nn.Module to load the weights into, got dict"):
        hatplug.load_checkpoint({"0.weight": torch.zeros(2, 2)}, {"0.weight": torch.zeros(2, 2)})


def test_a_checkpoint_that_fits_a_submodule_says_which_and_how(tmp_path):
    """A full model's checkpoint into a features_only backbone (timm wraps the model as ``.model``): not one key
    fits, so the message no longer offers strict=False (which failed too) but names the prefix and the fix; a
    checkpoint with an extra prefix is told to strip it."""
    source = fastervit.create_model("faster_vit_0_224", dim=16, in_dim=8)
    torch.save(source.state_dict(), tmp_path / "full.pth")
    backbone = fastervit.create_model("faster_vit_0_224", dim=16, in_dim=8, features_only=True, out_indices=(1, 2))
    for strict in (True, False):
        with pytest.raises(CheckpointMismatchError, match=r"keys begin with 'model\.', which the checkpoint's lack"):
            hatplug.load_checkpoint(backbone, tmp_path / "full.pth", strict=strict)
    with pytest.raises(CheckpointMismatchError) as info:
        hatplug.load_checkpoint(backbone, tmp_path / "full.pth")
    message = str(info.value)
    assert "load_checkpoint(model.model, ...)" in message and "Pass strict=False" not in message
    hatplug.load_checkpoint(backbone.model, tmp_path / "full.pth", strict=False)  # the named fix loads
    assert torch.equal(backbone.model.patch_embed.conv_down[0].weight, source.patch_embed.conv_down[0].weight)
    wrapped = {f"net.{k}": v for k, v in source.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint's keys begin with 'net\.'.*strip that prefix"):
        hatplug.load_checkpoint(fastervit.create_model("faster_vit_0_224", dim=16, in_dim=8), wrapped)


def test_a_training_checkpoint_with_ema_weights_says_which_it_loaded(tmp_path):
    """timm's train.py saves ``state_dict`` and ``state_dict_ema``; timm's loader takes the EMA copy by default.
    Ours loads the weights unless use_ema=True, and the report says that an EMA copy was left out (it said
    nothing, so the two loaders gave different models silently)."""
    import argparse

    import timm

    weights, ema = (fastervit.create_model("faster_vit_0_224", dim=16, in_dim=8) for _ in range(2))
    path = tmp_path / "train.pth.tar"
    torch.save({"epoch": 3, "state_dict": weights.state_dict(), "state_dict_ema": ema.state_dict(),
                "args": argparse.Namespace(model="faster_vit_0_224")}, path)  # fmt: skip
    built = fastervit.create_model("faster_vit_0_224", dim=16, in_dim=8, checkpoint_path=path)
    assert torch.equal(built.head.weight, weights.head.weight) and built.load_report.ok
    assert built.load_report.unused_ema == "state_dict_ema" and "use_ema=True" in str(built.load_report)
    report = hatplug.load_checkpoint(built, path, use_ema=True)
    assert torch.equal(built.head.weight, ema.head.weight) and report.unused_ema is None
    assert "EMA" not in str(report)
    theirs = timm.create_model("faster_vit_0_224", dim=16, in_dim=8, checkpoint_path=str(path))
    assert torch.equal(theirs.head.weight, ema.head.weight)  # what use_ema=True matches
    target = fastervit.create_model("faster_vit_0_any_res", resolution=[96, 96], dim=16, in_dim=8)
    adapted = fastervit.resize.load_adapted(target, path, use_ema=True)
    assert torch.equal(target.head.weight, ema.head.weight) and adapted.unused_ema is None
    assert fastervit.resize.load_adapted(target, path).unused_ema == "state_dict_ema"
    torch.save({"state_dict": weights.state_dict()}, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        hatplug.load_checkpoint(built, tmp_path / "plain.pth", use_ema=True)
    torch.save({"state_dict_ema": ema.state_dict(), "epoch": 1}, tmp_path / "ema_only.pth")
    with pytest.raises(CheckpointError, match="EMA weights under 'state_dict_ema': pass use_ema=True"):
        hatplug.load_checkpoint(built, tmp_path / "ema_only.pth")
