"""The native FasterViT family: registry, official layout, strict and safe checkpoint loading."""

import argparse
import datetime
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file, save_model

import fastervit
import hatplug
from fastervit.testing import official_state_dict
from hatplug.checkpoint import _derived_shapes
from hatplug.errors import (
    CheckpointError,
    CheckpointMismatchError,
    PretrainedWeightsNotFoundError,
    UnsafeCheckpointError,
)
from hatplug.layers.fusion import inference_fusion

from .conftest import randomize_

OFFICIAL = json.loads((Path(__file__).parent / "data" / "fastervit_official_keys.json").read_text())["variants"]
ALL_NAMES = fastervit.list_models()
# Small widths keep every variant's structure (depths, windows, CT grid, layer scale, propagation) but make it cheap.
SMALL = dict(dim=16, in_dim=8)


def write_official_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """Like the official training script: module.-prefixed weights and derived buffers under state_dict,
    plus metadata of the benign types such files carry."""
    state = {f"module.{k}": v for k, v in official_state_dict(model).items()}
    torch.save(
        {
            "state_dict": state,
            "epoch": 309,
            "args": argparse.Namespace(model="faster_vit", lr=5e-3),
            "metric": np.float64(82.1),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-6, "params": [0, 1]}]},
        },
        path,
    )
    return path


def test_every_official_name_is_registered_in_both_registries():
    expected = {f"faster_vit_{i}_224" for i in range(7)} | {f"faster_vit_{i}_any_res" for i in range(7)}
    expected |= {f"faster_vit_4_21k_{r}" for r in (224, 384, 512, 768)}
    expected |= {f"faster_vit_4_21k_{r}_any_res" for r in (224, 384, 512, 768)}
    assert expected == set(ALL_NAMES)
    assert expected <= set(timm.list_models("faster_vit_*"))


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_parameter_count_and_key_layout_match_official(name):
    with torch.device("meta"):
        model = fastervit.create_model(name)
    official = OFFICIAL[name]
    assert sum(p.numel() for p in model.parameters()) == official["num_params"]
    # our state dict holds the learned tensors; the official one adds recomputable buffers
    lines = [f"{k}:{list(v.shape)}" for k, v in model.state_dict().items()]
    lines += [f"{k}:{list(shape)}" for k, shape in _derived_shapes(model).items()]
    assert len(lines) == official["num_keys"]
    if "keys" in official:
        assert sorted(lines) == sorted(official["keys"])
    assert hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest() == official["sha256"]


def test_published_parameter_counts():
    # ../shared/REFERENCE.md: 0: 31.4M, 1: 53.4M, 2: 75.9M, 3: 159.5M, 4: 365.6M, 5: 957.5M, 4_21k: 271.9M
    published = {"0": 31.4, "1": 53.4, "2": 75.9, "3": 159.5, "4": 365.6, "5": 957.5, "4_21k": 271.9}
    for size, millions in published.items():
        with torch.device("meta"):
            model = fastervit.create_model(f"faster_vit_{size}_224")
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


def _small_input(model, batch=2):
    return torch.randn(batch, 3, *model.img_size)


# One block per conv stage and two per HAT stage still exercise CT threading and last-block propagation.
CHEAP = dict(SMALL, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4])


@pytest.mark.parametrize("name", ALL_NAMES)
def test_official_checkpoint_round_trip_is_exact(name, tmp_path):
    source = randomize_(fastervit.create_model(name, **CHEAP)).eval()
    path = write_official_checkpoint(source, tmp_path / "ckpt.pth.tar")
    loaded = fastervit.create_model(name, checkpoint_path=path, **CHEAP).eval()
    assert loaded.load_report.ok and loaded.load_report.derived
    x = _small_input(source, batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_full_size_official_checkpoint_round_trip(tmp_path):
    source = randomize_(fastervit.create_model("faster_vit_0_224")).eval()
    path = write_official_checkpoint(source, tmp_path / "fastervit_0_224_1k.pth.tar")
    loaded = fastervit.create_model("faster_vit_0_224", checkpoint_path=path).eval()
    assert loaded.load_report.ok and len(loaded.load_report.derived) == 68
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_safetensors_and_plain_state_dicts(tmp_path):
    source = randomize_(fastervit.create_model("faster_vit_0_224", **SMALL)).eval()
    save_model(source, str(tmp_path / "w.safetensors"))  # keeps one name of the aliased CT conv
    state = source.state_dict()
    save_file({k: v.clone() for k, v in state.items()}, str(tmp_path / "both.safetensors"))
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    torch.save({"model": source.state_dict()}, tmp_path / "model_key.pth")
    x = _small_input(source)
    with torch.no_grad():
        expected = source(x)
        for file in ("w.safetensors", "both.safetensors", "plain.pth", "model_key.pth"):
            model = fastervit.create_model("faster_vit_0_224", checkpoint_path=tmp_path / file, **SMALL).eval()
            assert torch.equal(model(x), expected), file


def test_state_dicts_save_with_safetensors_and_load_under_either_alias(tmp_path):
    """The carrier-token conv has two names (as in the official checkpoints): a state dict holds a copy under
    the second, so savers that refuse shared memory take it, and a file with only one of the names (what
    deduplicating savers write) loads with plain load_state_dict."""
    from safetensors.torch import load_file

    source = randomize_(fastervit.create_model("faster_vit_0_224", **SMALL)).eval()
    conv, alias = "levels.2.global_tokenizer.pos_embed.weight", "levels.2.global_tokenizer.to_global_feature.pos.weight"
    params = source.state_dict(keep_vars=True)
    assert params[conv] is params[alias]  # one Parameter: training updates both names
    state = source.state_dict()
    save_file(state, str(tmp_path / "plain.safetensors"))
    save_model(source, str(tmp_path / "save_model.safetensors"))
    for dropped in (conv, alias):  # what a deduplicating saver may write
        save_file({k: v for k, v in state.items() if k != dropped}, str(tmp_path / f"{dropped}.safetensors"))
    x = _small_input(source)
    for file in ("plain.safetensors", "save_model.safetensors", f"{conv}.safetensors", f"{alias}.safetensors"):
        model = fastervit.create_model("faster_vit_0_224", **SMALL).eval()
        model.load_state_dict(load_file(str(tmp_path / file)))  # strict
        loaded = model.state_dict(keep_vars=True)
        assert loaded[conv] is loaded[alias] and torch.equal(loaded[conv], params[conv])
        with torch.no_grad():
            assert torch.equal(model(x), source(x)), file


def test_fsdp2_loads_a_full_state_dict():
    """torch.distributed.checkpoint shards a full state dict under the first name of a shared tensor only; the
    carrier-token conv's second name then loads the same sharded tensor (one process, gloo, CPU)."""
    import socket

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        full = get_model_state_dict(randomize_(fastervit.create_model("faster_vit_0_224", **CHEAP)))
        expected = {k: v.clone() for k, v in full.items()}  # set_model_state_dict shards the values in place
        sharded = fastervit.create_model("faster_vit_0_224", **CHEAP)
        fully_shard(sharded)
        set_model_state_dict(sharded, full, options=StateDictOptions(full_state_dict=True))
        back = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
        assert back.keys() == expected.keys() and all(torch.equal(back[k], v) for k, v in expected.items())
    finally:
        dist.destroy_process_group()


def _fsdp2_step(rank: int, world: int, store: str, out: str) -> None:
    """One SGD step of a FasterViT sharded with FSDP2 over ``world`` CPU processes, each on its slice of the
    batch; rank 0 saves the full state dict."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    # a stalled peer fails the test in 2 minutes, not after gloo's default 30
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        torch.manual_seed(0)
        model = fastervit.create_model("faster_vit_0_224", drop_path_rate=0.0, **CHEAP)
        for level in model.levels[2:]:  # the HAT levels (tied carrier-token conv inside) as their own units
            fully_shard(level)
        fully_shard(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1)
        x, y = torch.randn(2 * world, 3, 224, 224), torch.randint(0, 1000, (2 * world,))
        part = slice(2 * rank, 2 * rank + 2)
        torch.nn.functional.cross_entropy(model(x[part]), y[part]).backward()
        optimizer.step()
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_training_step_on_two_processes_matches_one_process(tmp_path):
    """FSDP2 over two CPU processes (gloo): after one step every parameter equals that of one process that
    averages the same two half-batch losses (BatchNorm statistics differ by design: each rank sees its half)."""
    import torch.multiprocessing as mp

    out = tmp_path / "state.pt"
    mp.spawn(_fsdp2_step, args=(2, str(tmp_path / "store"), str(out)), nprocs=2)
    torch.manual_seed(0)
    reference = fastervit.create_model("faster_vit_0_224", drop_path_rate=0.0, **CHEAP)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 224, 224), torch.randint(0, 1000, (4,))
    loss = sum(torch.nn.functional.cross_entropy(reference(x[i : i + 2]), y[i : i + 2]) for i in (0, 2)) / 2
    loss.backward()
    optimizer.step()
    sharded, expected = torch.load(out), reference.state_dict()
    assert sharded.keys() == expected.keys()
    for name, _ in reference.named_parameters():
        torch.testing.assert_close(sharded[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(expected[n], initial[n]) for n, _ in reference.named_parameters())  # it trained


@pytest.mark.parametrize("how", ["fastervit", "timm", "timm, then set_input_size", "timm, adapted weights"])
def test_timm_model_folder_round_trip(how, tmp_path):
    """timm.models.save_for_hf writes weights (safetensors and pickle) and config.json with the model
    arguments; timm.create_model("local-dir:<folder>", pretrained=True) builds the same model from them."""
    from timm.models import get_model_args, save_for_hf

    args = dict(CHEAP, window_size=[7, 7, 2, 2], num_classes=5)
    if how == "fastervit":
        source = fastervit.create_model("faster_vit_0_any_res", resolution=[64, 96], **args)
    elif how == "timm":
        source = timm.create_model("faster_vit_0_any_res", resolution=[64, 96], **args)
    elif how == "timm, then set_input_size":
        source = timm.create_model("faster_vit_0_any_res", resolution=[64, 128], **args)
        source.set_input_size([64, 96])
    else:  # weights of another size: timm records the loader options with the model's arguments
        weights = tmp_path / "w.pth"
        torch.save(fastervit.create_model("faster_vit_0_any_res", resolution=[64, 128], **args).state_dict(), weights)
        source = timm.create_model(
            "faster_vit_0_any_res", resolution=[64, 96], pretrained=True, adapt_geometry=True,
            pretrained_cfg_overlay=dict(file=str(weights)), **args,
        )  # fmt: skip
        assert source.load_report.ok and get_model_args(source)["adapt_geometry"] is True
        weights.unlink()
    source = randomize_(source).eval()
    save_for_hf(source, tmp_path, safe_serialization="both")
    assert {"model.safetensors", "pytorch_model.bin", "config.json"} <= {f.name for f in tmp_path.iterdir()}
    x = torch.randn(1, 3, 64, 96)
    rebuilt = timm.create_model("faster_vit_0_any_res", **get_model_args(source))
    assert rebuilt.img_size == (64, 96) and rebuilt.load_state_dict(source.state_dict())
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert loaded.img_size == (64, 96) and loaded.num_classes == 5
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    assert timm.create_model(f"local-dir:{tmp_path}").img_size == (64, 96)  # the architecture alone
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(PretrainedWeightsNotFoundError, match="no weights in .*model.safetensors"):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)


def test_model_args_follow_reset_classifier():
    from timm.models import get_model_args

    model = fastervit.create_model("faster_vit_0_224", **SMALL)
    model.reset_classifier(5, "max")
    rebuilt = timm.create_model("faster_vit_0_224", **get_model_args(model))
    assert rebuilt.global_pool == "max" and rebuilt.num_classes == 5
    assert rebuilt.load_state_dict(model.state_dict())


def test_backbone_set_input_size_updates_what_timm_reads():
    from timm.models import get_model_args, get_model_input_config

    backbone = fastervit.create_model(
        "faster_vit_0_any_res", resolution=[64, 96], window_size=[7, 7, 2, 2], features_only=True, **CHEAP
    )
    backbone.set_input_size([64, 128])
    assert backbone.model.img_size == (64, 128)
    assert get_model_input_config(backbone)["input_size"] == (3, 64, 128)
    assert get_model_args(backbone)["img_size"] == (64, 128) and "resolution" not in get_model_args(backbone)
    assert [f.shape[-1] for f in backbone(torch.randn(1, 3, 64, 128))] == [32, 16, 8, 4]


def test_any_resolution_variants_say_their_input_size_is_fixed():
    """Each instance runs at the size it was built for (set_input_size changes it), as timm's Swin does."""
    model = timm.create_model("faster_vit_0_any_res", resolution=[64, 96], window_size=[7, 7, 2, 2], **CHEAP)
    assert model.pretrained_cfg["fixed_input_size"] and timm.models.get_model_input_config(model)["fixed_input_size"]
    assert timm.models.get_model_input_config(model)["input_size"] == (3, 64, 96)


@pytest.mark.parametrize("resolution,hat", [([96, 96], [False, False, True, False]), (224, [False] * 2 + [True] * 2)])
def test_official_any_res_checkpoints_with_an_idle_carrier_token_conv_load(resolution, hat):
    """The official any-resolution code builds the carrier-token conv of every level with hat on, also of one
    that has a single window (by its count) and so no carrier tokens, and never runs it: its checkpoints hold
    4 such tensors per level, which loading drops (and reports) as it does the derived buffers."""
    model = randomize_(fastervit.create_model("faster_vit_0_any_res", resolution=resolution, hat=hat, **CHEAP)).eval()
    idle_level = model.levels[2 if hat[3] is False else 3]
    assert not idle_level.has_carrier_tokens
    prefix = "levels.2." if hat[3] is False else "levels.3."
    idle = {prefix + k: torch.randn(s) for k, s in idle_level.derived_state_shapes().items()}
    convs = (prefix + "global_tokenizer.pos_embed.", prefix + "global_tokenizer.to_global_feature.pos.")
    assert sorted(idle) == sorted(conv + p for conv in convs for p in ("weight", "bias"))
    state = {**official_state_dict(model), **idle}
    x = _small_input(model)
    plain = fastervit.create_model("faster_vit_0_any_res", resolution=resolution, hat=hat, **CHEAP).eval()
    plain.load_state_dict(state)  # strict
    reported = fastervit.create_model("faster_vit_0_any_res", resolution=resolution, hat=hat, **CHEAP).eval()
    report = hatplug.load_checkpoint(reported, state)
    assert report.ok and set(idle) <= set(report.derived)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x)) and torch.equal(reported(x), model(x))
    wrong = {**state, prefix + "global_tokenizer.pos_embed.bias": torch.zeros(3)}
    with pytest.raises(RuntimeError, match="Unexpected key"):
        plain.load_state_dict(wrong)


def test_wrong_architecture_names_keys_and_shapes(tmp_path):
    path = write_official_checkpoint(fastervit.create_model("faster_vit_1_224", **SMALL), tmp_path / "one.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        fastervit.create_model("faster_vit_0_224", checkpoint_path=path, **SMALL)
    message = str(err.value)
    assert "patch_embed.conv_down.0.weight: checkpoint [8, 3, 3, 3] vs model" not in message  # same stem
    assert "missing" in message and "levels.0.blocks.1.conv1.weight" in message  # faster_vit_0 has 2 conv blocks
    assert "unexpected" not in message or "levels." in message
    assert "strict=False" in message


def test_shape_mismatch_is_reported_with_both_shapes(tmp_path):
    source = fastervit.create_model("faster_vit_0_224", dim=32, in_dim=8)
    path = write_official_checkpoint(source, tmp_path / "wide.pth")
    expected = r"levels\.0\.blocks\.0\.conv1\.weight: checkpoint \[32, 32, 3, 3\] vs model \[16, 16, 3, 3\]"
    with pytest.raises(CheckpointMismatchError, match=expected):
        fastervit.create_model("faster_vit_0_224", checkpoint_path=path, **SMALL)


def test_other_window_geometry_is_caught_by_derived_buffers(tmp_path):
    source = fastervit.create_model("faster_vit_0_224", window_size=[7, 7, 14, 7], **SMALL)
    path = write_official_checkpoint(source, tmp_path / "w14.pth")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)relative_position_index.*pass adapt_geometry=True"):
        fastervit.create_model("faster_vit_0_224", checkpoint_path=path, **SMALL)


def test_non_strict_loads_what_fits_and_reports(tmp_path):
    source = randomize_(fastervit.create_model("faster_vit_0_224", **SMALL))
    state = source.state_dict()
    state.pop("head.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "partial.pth")
    model = fastervit.create_model("faster_vit_0_224", checkpoint_path=tmp_path / "partial.pth", strict=False, **SMALL)
    report = model.load_report
    assert report.missing == ["head.weight"] and report.unexpected == ["extra.weight"] and not report.ok
    assert torch.equal(model.levels[2].blocks[0].attn.qkv.weight, source.levels[2].blocks[0].attn.qkv.weight)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Evil.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    Evil.marker = tmp_path / "pwned"
    model = fastervit.create_model("faster_vit_0_224", **SMALL)
    torch.save({"state_dict": model.state_dict(), "payload": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="Nothing was executed"):
        fastervit.create_model("faster_vit_0_224", checkpoint_path=tmp_path / "evil.pth", **SMALL)
    assert not Evil.marker.exists()


def test_truncated_corrupt_and_missing_files(tmp_path):
    model = fastervit.create_model("faster_vit_0_224", **SMALL)
    good = write_official_checkpoint(model, tmp_path / "good.pth")
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all" * 10)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    for name in ("truncated.pth", "garbage.pth", "bad.safetensors"):
        with pytest.raises(CheckpointError, match=name):
            fastervit.create_model("faster_vit_0_224", checkpoint_path=tmp_path / name, **SMALL)
    with pytest.raises(CheckpointError, match="not found"):
        fastervit.create_model("faster_vit_0_224", checkpoint_path=tmp_path / "nope.pth")
    (tmp_path / "notes.json").write_text('{"lr": 0.1}')
    for name in ("garbage.pth", "notes.json"):  # not pickles at all: not "unsafe", just not checkpoints
        with pytest.raises(CheckpointError, match=f"{name} is not a PyTorch checkpoint") as err:
            hatplug.load_checkpoint(model, tmp_path / name)
        assert not isinstance(err.value, UnsafeCheckpointError)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "config": "x"}, tmp_path / "ok.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a dict"):
        hatplug.load_checkpoint(model, tmp_path / "list.pth")


def test_pretrained_offline_error_says_what_where_and_from_where(monkeypatch, tmp_path):
    monkeypatch.setenv("HATPLUG_CHECKPOINT_DIR", str(tmp_path))
    with pytest.raises(PretrainedWeightsNotFoundError) as err:
        fastervit.create_model("faster_vit_0_224", pretrained=True)
    message = str(err.value)
    assert "fastervit_0_224_1k.pth.tar" in message and str(tmp_path) in message
    assert "https://huggingface.co/ahatamiz/FasterViT/resolve/main/fastervit_0_224_1k.pth.tar" in message


@pytest.mark.parametrize("value, offline", [("0", False), ("false", False), ("", False), ("1", True), ("TRUE", True)])
def test_offline_variables_are_read_as_huggingface_hub_reads_them(monkeypatch, tmp_path, value, offline):
    monkeypatch.delenv("HATPLUG_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setenv("HATPLUG_CHECKPOINT_DIR", str(tmp_path))
    tried = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: tried.append(a) or 1 / 0)
    expected = f"offline mode: HF_HUB_OFFLINE={value}" if offline else "download failed: division by zero"
    with pytest.raises(PretrainedWeightsNotFoundError, match=expected):
        fastervit.create_model("faster_vit_0_224", pretrained=True)
    assert len(tried) == (0 if offline else 1)


def test_timm_pretrained_tags_and_misspelt_names_are_refused_by_name():
    tagged = r"unknown pretrained tag 'in1k' for faster_vit_0_224: .*'faster_vit_0_224'"
    with pytest.raises(ValueError, match=tagged):
        timm.create_model("faster_vit_0_224.in1k")
    with pytest.raises(ValueError, match=tagged):
        timm.create_model("faster_vit_0_224", pretrained_cfg="in1k")
    with pytest.raises(ValueError, match=r"'FASTER-VIT_0_224'; did you mean faster_vit_0_224"):
        fastervit.create_model("FASTER-VIT_0_224")
    with pytest.raises(ValueError, match=r"unknown FasterViT model 'resnet50'\. See fastervit.list_models"):
        fastervit.create_model("resnet50")


def test_pretrained_download_failure_is_explained(monkeypatch, tmp_path):
    monkeypatch.delenv("HATPLUG_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(PretrainedWeightsNotFoundError, match="download failed: network is unreachable"):
        fastervit.create_model("faster_vit_1_224", pretrained=True)


def test_pretrained_from_local_cache_and_with_new_head(monkeypatch, tmp_path):
    monkeypatch.setenv("HATPLUG_CHECKPOINT_DIR", str(tmp_path))
    real = fastervit.create_model("faster_vit_0_224")
    randomize_(real)
    write_official_checkpoint(real, tmp_path / "fastervit_0_224_1k.pth.tar")
    model = timm.create_model("faster_vit_0_224", pretrained=True)  # through timm's registry
    assert torch.equal(model.head.weight, real.head.weight)
    fresh_head = fastervit.create_model("faster_vit_0_224", pretrained=True, num_classes=10)
    assert fresh_head.head.weight.shape == (10, 512)
    assert fresh_head.load_report.replaced == ["head.bias", "head.weight"]  # said, not only left out
    assert "not loaded (this model's module has another size, or there is none): head.bias, head.weight" in str(
        fresh_head.load_report
    )
    assert torch.equal(fresh_head.levels[2].blocks[0].attn.qkv.weight, real.levels[2].blocks[0].attn.qkv.weight)
    with pytest.raises(CheckpointMismatchError, match="for another resolution or window size add adapt_geometry"):
        fastervit.create_model("faster_vit_0_224", pretrained=True, img_size=256)
    larger = fastervit.create_model("faster_vit_0_224", pretrained=True, img_size=256, adapt_geometry=True)
    assert larger.load_report.ok and torch.equal(larger.head.weight, real.head.weight)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="did you mean faster_vit_0_224"):
        fastervit.create_model("faster_vit_0_244")
    with pytest.raises(ValueError, match="unknown pretrained tag 'in1k' for faster_vit_0_224.*'faster_vit_0_224'"):
        fastervit.create_model("faster_vit_0_224.in1k")  # timm.create_model refuses it too, in its words


def test_conflicting_or_ignored_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="out_indices selects feature maps: pass it together with features_only=True"):
        fastervit.create_model("faster_vit_0_224", out_indices=(3,), **SMALL)
    with pytest.raises(ValueError, match="got pretrained=True and checkpoint_path: pass one"):
        fastervit.create_model("faster_vit_0_224", pretrained=True, checkpoint_path=tmp_path / "x.pth")
    with pytest.raises(ValueError, match="strict must be True or False, got 'no'"):
        fastervit.create_model("faster_vit_0_224", strict="no", **SMALL)


@pytest.mark.parametrize(
    "override, error, message",
    [
        (dict(depths=[2, 3, 0, 5]), ValueError, r"depths\[2\] must be positive, got 0"),
        (dict(depths=[2, -1, 6, 5]), ValueError, r"depths\[1\] must be positive, got -1"),
        (dict(depths=[2, 3.5, 6, 5]), TypeError, r"depths\[1\] must be an integer, got 3.5"),
        (dict(num_heads=[2, 4, 0, 16]), ValueError, r"num_heads\[2\] must be positive, got 0"),
        (dict(mlp_ratio=0), ValueError, "mlp_ratio must be a positive number"),
        (dict(mlp_ratio=-2.0), ValueError, "mlp_ratio must be a positive number"),
        (dict(drop_path_rate=-0.1), ValueError, r"drop_path_rate must be in \[0, 1\), got -0.1"),
        (dict(attn_drop_rate=1.0), ValueError, r"attn_drop_rate must be in \[0, 1\), got 1.0"),
        (dict(drop_rate=1.5), ValueError, r"drop_rate must be in \[0, 1\], got 1.5"),
    ],
)
def test_architecture_arguments_that_build_a_broken_model_are_refused(override, error, message):
    # each of these built a model before (a stage without blocks, an MLP of width 0, negative drop-path
    # rates) or failed deep inside torch with a message that did not name the argument
    with pytest.raises(error, match=message):
        fastervit.create_model("faster_vit_0_224", **{**SMALL, **override})


def test_img_size_and_resolution_are_one_setting():
    assert fastervit.create_model("faster_vit_0_any_res", img_size=(96, 160), **SMALL).img_size == (96, 160)
    assert fastervit.create_model("faster_vit_0_any_res", resolution=[96, 160], **SMALL).img_size == (96, 160)
    both = fastervit.create_model("faster_vit_0_any_res", img_size=(96, 160), resolution=[96, 160], **SMALL)
    assert both.img_size == (96, 160)  # what timm's get_model_args gives back for a model made with resolution
    with pytest.raises(ValueError, match="pass only one"):
        fastervit.create_model("faster_vit_0_any_res", img_size=96, resolution=128)
    with pytest.raises(TypeError):
        fastervit.create_model("faster_vit_0_224", not_an_option=1)


def test_eval_bias_cache_follows_weight_changes():
    model = randomize_(fastervit.create_model("faster_vit_0_224", **SMALL)).eval()
    x = _small_input(model)
    with torch.no_grad():
        before = model(x)
        assert torch.equal(model(x), before)
        model.levels[2].blocks[0].attn.pos_emb_funct.cpb_mlp[0].weight.add_(0.5)
        after = model(x)
        model.train()
        model.eval()
        recomputed = model(x)
    assert not torch.allclose(before, after)
    assert torch.equal(after, recomputed)
    twin = fastervit.create_model("faster_vit_0_224", **SMALL).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(twin(x), after)


def test_timm_contract():
    model = fastervit.create_model("faster_vit_0_224", **SMALL).eval()
    x = _small_input(model)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, model.num_features, 7, 7)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        model.reset_classifier(0, "")  # timm: no pooling returns the map
        assert model(x).shape == features.shape
        with pytest.raises(ValueError, match="num_classes=0 to get the map"):
            model.reset_classifier(5)  # keeps global_pool=''
        model.reset_classifier(3, "catavgmax")
        assert model(x).shape == (2, 3) and model.head.in_features == 2 * model.num_features
    unpooled = fastervit.create_model("faster_vit_0_224", num_classes=0, global_pool="", **SMALL).eval()
    with torch.no_grad():
        assert unpooled(x).shape == features.shape
    with pytest.raises(ValueError, match="cannot take"):
        fastervit.create_model("faster_vit_0_224", num_classes=10, global_pool="", **SMALL)
    with pytest.raises(ValueError, match="not a pooling type"):
        fastervit.create_model("faster_vit_0_224", global_pool="mean", **SMALL)
    assert model.pretrained_cfg["url"].endswith("fastervit_0_224_1k.pth.tar")
    assert all("cpb_mlp" in n for n in model.no_weight_decay()) and model.no_weight_decay()
    model.set_grad_checkpointing(True)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_whole_model_is_fx_traceable():
    model = randomize_(
        fastervit.create_model("faster_vit_3_any_res", resolution=[96, 160], window_size=[7, 7, 3, 3], **SMALL)
    ).eval()
    graph = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        with inference_fusion(False):  # the traced graph is the plain computation, bit for bit
            torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)
        # eager eval mode runs the folded form (hatplug.layers.fusion): equal up to float32 rounding
        torch.testing.assert_close(graph(x), model(x), rtol=1e-5, atol=1e-5)


def test_aliases_of_one_tensor_must_agree(tmp_path):
    model = fastervit.create_model("faster_vit_0_224", **SMALL)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["levels.2.global_tokenizer.to_global_feature.pos.weight"] += 1
    with pytest.raises(CheckpointMismatchError, match="differs from its alias"):
        hatplug.load_checkpoint(model, state)
    # strict=False: the first name's value loads, and the other name is reported once, as unexpected (it was
    # also listed as loaded and as a "shape mismatch" of two equal shapes, and the second value won)
    first = "levels.2.global_tokenizer.pos_embed.weight"
    report = hatplug.load_checkpoint(model, state, strict=False)
    assert torch.equal(model.levels[2].global_tokenizer.pos_embed.weight, state[first])
    assert report.mismatched == [] and report.unexpected == [
        f"levels.2.global_tokenizer.to_global_feature.pos.weight (differs from its alias {first}, whose value is "
        "loaded)"
    ]
    assert "levels.2.global_tokenizer.to_global_feature.pos.weight" not in report.loaded


def test_pretrained_cfg_overlay_file_is_what_loads(monkeypatch, tmp_path):
    """timm's way to point pretrained=True at other weights: the given file loads, not the published one."""
    monkeypatch.setenv("HATPLUG_CHECKPOINT_DIR", str(tmp_path))
    published, mine = (randomize_(fastervit.create_model("faster_vit_0_224", **SMALL), seed=s) for s in (1, 2))
    write_official_checkpoint(published, tmp_path / "fastervit_0_224_1k.pth.tar")
    write_official_checkpoint(mine, tmp_path / "mine.pth.tar")
    model = timm.create_model(
        "faster_vit_0_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "mine.pth.tar")), **SMALL
    )
    assert torch.equal(model.head.weight, mine.head.weight)
    by_url = timm.create_model(
        "faster_vit_0_224", pretrained=True, pretrained_cfg_overlay=dict(url="https://x.org/mine.pth.tar"), **SMALL
    )  # found in the checkpoint folder under the url's file name, as the published files are
    assert torch.equal(by_url.head.weight, mine.head.weight)
    with pytest.raises(PretrainedWeightsNotFoundError, match="does not exist"):
        timm.create_model("faster_vit_0_224", pretrained=True, pretrained_cfg_overlay=dict(file="nope.pth"), **SMALL)


def test_pretrained_follows_timm_options(monkeypatch, tmp_path):
    """A fine-tuned head in the file loads (it was replaced whenever num_classes differed from the published
    1000, even with the overlay saying 10); timm's cache_dir and pretrained_strict are honoured (both were
    ignored)."""
    monkeypatch.setenv("HATPLUG_CHECKPOINT_DIR", str(tmp_path / "nothing here"))
    tuned = randomize_(fastervit.create_model("faster_vit_0_224", num_classes=10, **CHEAP))
    write_official_checkpoint(tuned, tmp_path / "tuned.pth.tar")
    for overlay in (
        dict(file=str(tmp_path / "tuned.pth.tar"), num_classes=10),
        dict(file=str(tmp_path / "tuned.pth.tar")),
    ):
        model = timm.create_model(
            "faster_vit_0_224", pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay, **CHEAP
        )
        assert torch.equal(model.head.weight, tuned.head.weight) and not model.load_report.replaced
    cache = tmp_path / "cache"
    cache.mkdir()
    write_official_checkpoint(tuned, cache / "fastervit_0_224_1k.pth.tar")  # the published file's name
    from_cache = timm.create_model("faster_vit_0_224", pretrained=True, num_classes=10, cache_dir=cache, **CHEAP)
    assert torch.equal(from_cache.head.weight, tuned.head.weight)
    partial = {k: v for k, v in tuned.state_dict().items() if k != "norm.weight"}
    torch.save(partial, tmp_path / "partial.pth")
    overlay = dict(file=str(tmp_path / "partial.pth"))
    with pytest.raises(CheckpointMismatchError, match="(?s)1 missing: norm.weight.*pass pretrained_strict=False"):
        timm.create_model("faster_vit_0_224", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=10, **CHEAP)
    # strict is checkpoint_path's option: with the published weights it did nothing, silently
    with pytest.raises(ValueError, match="strict=False applies to checkpoint_path.*pretrained_strict=False"):
        fastervit.create_model("faster_vit_0_224", pretrained=True, pretrained_cfg_overlay=overlay, strict=False)
    loose = timm.create_model(
        "faster_vit_0_224", pretrained=True, pretrained_cfg_overlay=overlay, pretrained_strict=False,
        num_classes=10, **CHEAP,
    )  # fmt: skip
    assert loose.load_report.missing == ["norm.weight"] and torch.equal(loose.head.weight, tuned.head.weight)


def test_drop_rate_is_the_official_block_dropout_and_head_drop_rate_the_classifiers():
    model = fastervit.create_model("faster_vit_0_224", drop_rate=0.3, **CHEAP)
    assert model.head_drop.p == 0.0  # the official model has no classifier dropout
    assert model.levels[2].blocks[0].mlp.drop1.p == 0.3 and model.levels[2].blocks[0].attn.proj_drop.p == 0.3
    assert fastervit.create_model("faster_vit_0_224", head_drop_rate=0.2, **CHEAP).head_drop.p == 0.2


def test_pretrained_adapts_the_first_conv_to_in_chans(monkeypatch, tmp_path):
    monkeypatch.setenv("HATPLUG_CHECKPOINT_DIR", str(tmp_path))
    published = randomize_(fastervit.create_model("faster_vit_0_224", **SMALL))
    write_official_checkpoint(published, tmp_path / "fastervit_0_224_1k.pth.tar")
    weight = published.patch_embed.conv_down[0].weight
    gray = fastervit.create_model("faster_vit_0_224", pretrained=True, in_chans=1, **SMALL)
    torch.testing.assert_close(gray.patch_embed.conv_down[0].weight, weight.sum(1, keepdim=True))  # timm's rule
    assert gray.in_chans == 1 and timm.models.get_model_input_config(gray)["input_size"] == (1, 224, 224)
    assert timm.models.get_model_input_config(gray)["fixed_input_size"]


def test_a_checkpoint_for_other_input_channels_says_how_to_adapt_it(tmp_path):
    """in_chans=1 with a 3-channel checkpoint_path: the error named adapt_geometry=True, which fails the same way;
    it now names the channel counts and the fix, and the fix it names (the published-weights path, which adapts
    the first conv as timm does) loads the file."""
    rgb = randomize_(fastervit.create_model("faster_vit_0_224", **SMALL))
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    for extra in ({}, {"adapt_geometry": True}):
        with pytest.raises(CheckpointMismatchError, match="stem takes 3-channel images and this model in_chans=1"):
            fastervit.create_model(
                "faster_vit_0_224", in_chans=1, checkpoint_path=tmp_path / "rgb.pth", **SMALL, **extra
            )
    overlay = dict(file=str(tmp_path / "rgb.pth"))
    gray = fastervit.create_model(
        "faster_vit_0_224", in_chans=1, pretrained=True, pretrained_cfg_overlay=overlay, **SMALL
    )
    weight = rgb.patch_embed.conv_down[0].weight
    torch.testing.assert_close(gray.patch_embed.conv_down[0].weight, weight.sum(1, keepdim=True))


def test_timm_loaders_take_official_files(tmp_path):
    """timm.create_model(checkpoint_path=...) loads without fastervit's filter: the official files' derived
    position-bias tables are dropped where they fit the model's geometry, and refused where they do not."""
    source = randomize_(fastervit.create_model("faster_vit_0_224", **SMALL))
    state = official_state_dict(source)
    assert any(k.endswith("relative_bias") for k in state)
    torch.save(state, tmp_path / "official.pth")
    model = timm.create_model("faster_vit_0_224", checkpoint_path=str(tmp_path / "official.pth"), **SMALL)
    assert torch.equal(model.head.weight, source.head.weight)
    other = fastervit.create_model("faster_vit_0_any_res", resolution=224, window_size=[7, 7, 5, 7], **SMALL)
    with pytest.raises(RuntimeError, match="trained at another window size"):
        other.load_state_dict(state)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.", "encoder."])
def test_checkpoints_of_wrapped_models_load(prefix, tmp_path):
    """Keys saved from DDP, torch.compile and their nestings load; torch.compile(DDP(model)), the order PyTorch
    recommends, saves "_orig_mod.module." keys, whose "module." was left after "_orig_mod." was stripped."""
    source = randomize_(fastervit.create_model("faster_vit_0_224", **SMALL))
    torch.save({"state_dict": {prefix + k: v for k, v in source.state_dict().items()}}, tmp_path / "w.pth")
    model = fastervit.create_model("faster_vit_0_224", checkpoint_path=tmp_path / "w.pth", **SMALL)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in source.state_dict().items())


def test_a_strict_load_that_fails_says_how_to_load_another_geometry(tmp_path):
    """timm.create_model(checkpoint_path=...) loads the file itself, strictly, after building the model, so
    FasterViT's adapt_geometry / strict never reach it: the failure used to be PyTorch's bare key list. It now
    names the loaders that adapt, and the options that did not apply."""
    torch.save(fastervit.create_model("faster_vit_0_224", **SMALL).state_dict(), tmp_path / "w224.pth")
    path = str(tmp_path / "w224.pth")
    geometry = dict(resolution=[100, 150], **SMALL)
    model = fastervit.create_model("faster_vit_0_any_res", checkpoint_path=path, adapt_geometry=True, **geometry)
    assert model.load_report.dropped  # the route that adapts
    for extra in ({}, {"adapt_geometry": True}, {"strict": False}):
        with pytest.raises(RuntimeError, match=r"Unexpected key\(s\)(.|\n)*fastervit\.resize\.load_adapted") as info:
            timm.create_model("faster_vit_0_any_res", checkpoint_path=path, **geometry, **extra)
        if extra:
            key, value = next(iter(extra.items()))
            assert f"created with {key}={value}" in str(info.value) and "pretrained_cfg_overlay" in str(info.value)
        else:
            assert "created with" not in str(info.value)
    assert (
        timm.create_model(
            "faster_vit_0_any_res", pretrained=True, pretrained_cfg_overlay=dict(file=path), **geometry
        ).load_report.dropped
        == model.load_report.dropped
    )  # the timm route the message points to
    model.load_state_dict(model.state_dict())  # a load that fits is untouched


@pytest.mark.parametrize(
    "name, kw",
    [
        ("faster_vit_0_any_res", dict(resolution=[100, 150])),  # non-square window grid: token orders
        ("faster_vit_3_224", dict(hat=[False, False, True, True])),  # propagation, carrier tokens in two levels
    ],
)
def test_timm_device_and_dtype_options(name, kw, tmp_path):
    """timm passes device= and dtype= to every model (FasterViT raised a TypeError). On the meta device the model
    has no storage; to_empty and timm's reinit_non_persistent_buffers make it the same model again: every table
    computed from the geometry is recomputed (checked against buffers filled with junk first)."""
    from timm.models._manipulate import reinit_non_persistent_buffers

    kw = {**SMALL, **kw}
    reference = randomize_(fastervit.create_model(name, **kw)).eval()
    half = timm.create_model(name, dtype=torch.bfloat16, **kw)
    assert {t.dtype for t in half.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    assert {b.dtype for b in half.buffers() if b.is_floating_point()} == {torch.bfloat16}
    model = timm.create_model(name, device="meta", **kw)
    assert all(t.is_meta for t in model.parameters())
    model.to_empty(device="cpu")
    for buf in model.buffers():
        buf.fill_(3)
    assert reinit_non_persistent_buffers(model)
    model.load_state_dict(reference.state_dict())
    for (key, want), (_, got) in zip(reference.named_buffers(), model.eval().named_buffers(), strict=True):
        assert want.dtype == got.dtype and torch.equal(want, got), key
    x = torch.randn(2, 3, *reference.img_size)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert fastervit.create_model(name, device="cpu", **kw).head.weight.device.type == "cpu"

    torch.save(reference.state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="device='meta' builds a model without storage"):
        fastervit.create_model(name, device="meta", checkpoint_path=tmp_path / "w.pth", **kw)
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        fastervit.create_model(name, dtype=torch.int8, **kw)


def test_layer_decay_groups_follow_the_levels():
    """Downsamples and carrier-token makers get the rate of their level, not the head's."""
    from timm.optim._param_groups import param_groups_layer_decay

    model = fastervit.create_model("faster_vit_0_224", **SMALL)
    name_of = {id(p): n for n, p in model.named_parameters()}
    scale = {
        name_of[id(p)]: g["lr_scale"] for g in param_groups_layer_decay(model, layer_decay=0.7) for p in g["params"]
    }
    head = scale["head.weight"]
    for name, value in scale.items():
        if ".downsample." in name or ".global_tokenizer." in name:
            level = int(name.split(".")[1])
            assert value < head
            assert (
                scale[f"levels.{level}.blocks.0.conv1.weight" if level < 2 else f"levels.{level}.blocks.0.norm1.weight"]
                <= value
            )
    assert scale["levels.2.global_tokenizer.pos_embed.weight"] == scale["levels.2.blocks.0.norm1.weight"]


def test_reset_classifier_keeps_dtype_and_device():
    model = fastervit.create_model("faster_vit_0_224", **SMALL).eval().to(torch.bfloat16)
    model.reset_classifier(5)
    assert model.head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224, dtype=torch.bfloat16)).shape == (1, 5)
