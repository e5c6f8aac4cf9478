"""recipes.ablate: every ablation runs in --smoke form and its result files agree with each other."""

from pathlib import Path

import pytest
import torch
import yaml

import hatplug
from recipes.ablate import PROFILES, Arm, load_ablation, main, run_ablation
from recipes.report import COLUMNS, read_csv, read_markdown

from .helpers import ROOT, TINY

CHECKPOINT = TINY["trainer"]["callbacks"][0]

ABLATIONS = sorted((ROOT / "recipes" / "ablations").glob("*.yaml"))


def _check_outputs(result, expected_arms):
    out = result.out
    csv_rows, md_rows = read_csv(out / "results.csv"), read_markdown(out / "results.md")
    assert [r["arm"] for r in csv_rows] == expected_arms
    assert csv_rows == md_rows  # same rows, same columns, same formatting
    assert list(csv_rows[0]) == COLUMNS
    # one plotted point per row, at (inference throughput, top-1) of that row
    assert [p[0] for p in result.points] == expected_arms
    for (_, x, y), row in zip(result.points, csv_rows):
        assert x == pytest.approx(float(row["infer_imgs_per_sec"]), rel=1e-5)
        assert y == pytest.approx(float(row["top1"]), rel=1e-5)
    assert (out / "pareto.png").stat().st_size > 1000
    for row in csv_rows:
        assert 0 <= float(row["top1"]) <= 1 and float(row["loss"]) > 0
        assert int(row["params"]) > 0 and float(row["gflops"]) > 0
        assert float(row["train_imgs_per_sec"]) > 0 and float(row["infer_imgs_per_sec"]) > 0
    return csv_rows


@pytest.mark.slow
@pytest.mark.parametrize("path", ABLATIONS, ids=[p.stem for p in ABLATIONS])
def test_smoke(path, tmp_path):
    spec, arms = load_ablation(path, smoke=True, out=tmp_path)
    result = run_ablation(path, smoke=True, out=tmp_path)
    expected = []
    for arm in arms:
        expected.append(arm.name)
        size = arm.config["data"]["init_args"]["image_size"]
        expected += [f"{arm.name}@{round(size * f)}" for f in arm.eval_scales]
    rows = _check_outputs(result, expected)
    for arm in arms:
        resolved = yaml.safe_load((tmp_path / "arms" / f"{arm.name}.yaml").read_text())
        assert resolved == arm.config
        assert (tmp_path / "runs" / arm.name / "version_0" / "config.yaml").is_file()  # LightningCLI's copy
        assert (tmp_path / "runs" / arm.name / "model.pt").is_file()
    if path.stem == "resolution":  # the any-res model was rebuilt at each size, so its cost grows with it
        gflops = {r["arm"]: float(r["gflops"]) for r in rows}
        assert gflops["hat"] < gflops["hat@96"] < gflops["hat@128"]
        params = {r["arm"]: r["params"] for r in rows}
        assert params["hat"] == params["hat@128"]


def test_plug_and_play_runner_path_with_a_fake_converter(tmp_path, monkeypatch):
    """`convert:` calls hatplug.convert(model, **convert); `warm_start:` loads that arm's final weights first."""
    calls = []

    def fake_convert(model, **options):
        calls.append((options, {k: v.clone() for k, v in model.state_dict().items()}))
        model.fake_converted = True
        return model

    monkeypatch.setattr(hatplug, "convert", fake_convert)
    path = ROOT / "recipes" / "ablations" / "plug_and_play.yaml"
    result = main([str(path), "--smoke", "--out", str(tmp_path), "--arms", "swin_hat_random,swin_hat_warm"])
    _check_outputs(result, ["swin", "swin_hat_random", "swin_hat_warm"])  # the warm-start source runs first
    # every arm is built once up front (check_arms), then trained
    random, identity = {"ct_size": 2, "init": "random"}, {"ct_size": 2, "init": "identity"}
    assert [options for options, _ in calls] == [random, identity, random, identity]
    swin_final = torch.load(tmp_path / "runs" / "swin" / "model.pt", weights_only=True)
    warm_seen = calls[3][1]
    assert all(torch.equal(warm_seen[k], v) for k, v in swin_final.items())
    random_seen = calls[2][1]
    assert not all(torch.equal(random_seen[k], v) for k, v in swin_final.items())
    arm = yaml.safe_load((tmp_path / "arms" / "swin_hat_warm.yaml").read_text())
    assert arm["model"]["convert"] == {"ct_size": 2, "init": "identity"}
    assert arm["model"]["init_checkpoint"] == str(tmp_path / "runs" / "swin" / "model.pt")


def test_spec_errors(tmp_path):
    base = ROOT / "recipes" / "configs" / "synthetic_fastervit.yaml"

    def write(spec):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"name": "bad", "base": str(base), **spec}))
        return path

    with pytest.raises(ValueError, match="unknown keys"):
        load_ablation(write({"arms": [{"name": "a"}], "smokey": {}}))
    with pytest.raises(ValueError, match="arm 'a' has unknown keys"):
        load_ablation(write({"arms": [{"name": "a", "overide": {}}]}))
    with pytest.raises(ValueError, match="must be an earlier arm"):
        load_ablation(write({"arms": [{"name": "a", "warm_start": "b"}, {"name": "b"}]}))
    with pytest.raises(ValueError, match="unique"):
        load_ablation(write({"arms": [{"name": "a"}, {"name": "a"}]}))
    with pytest.raises(ValueError, match="no arms named"):
        run_ablation(write({"arms": [{"name": "a"}], "smoke": {}}), smoke=True, out=tmp_path / "out", arms=["z"])
    # throughput settings: an unknown key was ignored (the default batch was measured), iters 0 gave rates of 0
    for key, settings, message in [
        ("smoke_benchmark", {"batchsize": 8}, r"smoke_benchmark has unknown keys \['batchsize'\]"),
        ("benchmark", {"iters": 0}, r"benchmark\.iters must be an integer >= 1, got 0"),
        ("benchmark", {"warmup": -1}, r"benchmark\.warmup must be an integer >= 0"),
        ("cpu_benchmark", [64], r"cpu_benchmark must be a mapping"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_ablation(write({"arms": [{"name": "a"}], key: settings}))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"a_file is a file: pass a folder for --out"):
        load_ablation(write({"arms": [{"name": "a"}]}), out=tmp_path / "a_file")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "an ablation is a mapping"),
        ("name: x\narms: [{name: a}]\n", "missing the required key 'base'"),
        ("name: x\nbase: BASE\n", "missing the required key 'arms'"),
        ("base: BASE\narms: [{name: a}]\n", "missing the required key 'name'"),
        ("name: x\nbase: nowhere.yaml\narms: [{name: a}]\n", "base config 'nowhere.yaml' not found"),
        ("name: x\nbase: BASE\narms: [a, b]\n", "arm 0 must be a mapping with a string 'name'"),
        ("name: x\nbase: BASE\narms: [{overrides: {}}]\n", "arm 0 must be a mapping with a string 'name'"),
        ("name: x\nbase: BASE\narms: []\n", "'arms' must be a non-empty list"),
        ("name: x\nbase: BASE\narms: [{name: a, eval_scales: [x]}]\n", "'eval_scales' must be a list of numbers"),
        ("name: x\nbase: BASE\noverrides: [1, 2]\narms: [{name: a}]\n", "'overrides' must be a mapping"),
    ],
)
def test_spec_shape_errors_name_the_problem(text, message, tmp_path):
    base = ROOT / "recipes" / "configs" / "synthetic_fastervit.yaml"
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("BASE", str(base)))
    with pytest.raises(ValueError, match=message):
        load_ablation(path)


def test_a_shipped_ablation_by_name_and_a_missing_one():
    assert [a.name for a in load_ablation("attention_type", smoke=True)[1]][:2] == ["window_only", "swin"]
    with pytest.raises(FileNotFoundError, match=r"no ablation YAML at attention_typ; .*'attention_type'"):
        load_ablation("attention_typ")


def test_profile_errors(tmp_path):
    path = tmp_path / "p.yaml"
    base = ROOT / "recipes" / "configs" / "synthetic_fastervit.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "base": str(base), "smoke": {}, "arms": [{"name": "a"}]}))
    with pytest.raises(ValueError, match="has no 'cpu' profile .*defines \\['smoke'\\]"):
        load_ablation(path, profile="cpu")
    with pytest.raises(ValueError, match="unknown profile 'gpu'"):
        load_ablation(path, profile="gpu")
    with pytest.raises(ValueError, match="cannot be combined"):
        run_ablation(path, smoke=True, profile="cpu", out=tmp_path / "out")
    with pytest.raises(SystemExit):  # argparse: --smoke and --profile are alternatives
        main([str(path), "--smoke", "--profile", "cpu"])


def test_command_line_config_errors_are_one_line(tmp_path, capsys):
    """A profile the YAML lacks, a missing or broken YAML, an unknown arm: argparse's usage line and status 2."""
    path = tmp_path / "p.yaml"
    base = ROOT / "recipes" / "configs" / "synthetic_fastervit.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "base": str(base), "smoke": {}, "arms": [{"name": "a"}]}))
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    for argv in (
        [str(path), "--profile", "cpu"],
        [str(tmp_path / "nope.yaml")],
        [str(tmp_path / "broken.yaml")],
        [str(path), "--smoke", "--arms", "zzz"],
        [str(path), "--smok"],  # a misspelt option, not the abbreviation of --smoke it was taken for
        [str(path), "--smoke", "--out", str(path)],  # a file, not a folder (a FileExistsError traceback)
    ):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "has no 'cpu' profile" in err and "Traceback" not in err
    assert "no arms named ['zzz']; it has ['a']" in err
    assert "unrecognized arguments: --smok" in err and "is a file: pass a folder for --out" in err


def test_profile_merge_order(tmp_path):
    """base < overrides < profile < arm overrides < arm profile overrides; other profiles are ignored."""
    path = tmp_path / "p.yaml"
    base = ROOT / "recipes" / "configs" / "synthetic_fastervit.yaml"
    spec = {
        "name": "p", "base": str(base),
        "overrides": {"model": {"lr": 1.0, "weight_decay": 1.0}},
        "cpu": {"model": {"lr": 2.0, "warmup_epochs": 7}}, "smoke": {"model": {"lr": 3.0}},
        "arms": [{"name": "a", "overrides": {"model": {"lr": 4.0}}, "cpu_overrides": {"model": {"weight_decay": 5.0}},
                  "smoke_overrides": {"model": {"weight_decay": 6.0}}}],
    }  # fmt: skip
    path.write_text(yaml.safe_dump(spec))
    model = load_ablation(path, profile="cpu")[1][0].config["model"]
    assert (model["lr"], model["weight_decay"], model["warmup_epochs"]) == (4.0, 5.0, 7)
    model = load_ablation(path)[1][0].config["model"]
    assert (model["lr"], model["weight_decay"], model["warmup_epochs"]) == (
        4.0,
        1.0,
        yaml.safe_load(base.read_text())["model"]["warmup_epochs"],
    )


def test_every_ablation_resolves_in_every_form_it_defines():
    for path in ABLATIONS:
        spec = yaml.safe_load(path.read_text())
        assert "smoke" in spec, f"{path.name} needs a smoke form for CI"
        for profile in [None, *(p for p in PROFILES if p in spec)]:
            spec, arms = load_ablation(path, profile=profile, out=Path("/tmp/x"))
            assert arms and all(a.config["model"]["model"] for a in arms)


@pytest.mark.parametrize("profile", [None, "smoke", "cpu"])
def test_plug_and_play_compares_like_with_like(profile):
    """Each HAT arm trains the same base architecture, data and schedule as its base arm; only `convert` differs."""
    spec, arms = load_ablation(ROOT / "recipes" / "ablations" / "plug_and_play.yaml", profile=profile)
    by_name = {a.name: a.config for a in arms}
    for name, config in by_name.items():
        if "_hat_" not in name:
            assert "convert" not in config["model"]
            continue
        base = by_name[name.split("_hat_")[0]]
        model = {k: v for k, v in config["model"].items() if k not in ("convert", "init_checkpoint")}
        assert model == base["model"] and config["data"] == base["data"]
        assert _schedule(config["trainer"]) == _schedule(base["trainer"])


def _schedule(trainer: dict) -> dict:
    """A trainer config without what names the arm (its folder, loggers and progress-bar label)."""
    kept = {k: v for k, v in trainer.items() if k not in ("default_root_dir", "logger", "callbacks")}
    kept["callbacks"] = [c for c in trainer.get("callbacks", []) if "ProgressBar" not in c["class_path"]]
    return kept


def test_arms_are_checked_before_any_trains_and_reruns_keep_earlier_rows(tmp_path, capsys):
    source = ROOT / "recipes" / "ablations" / "attention_type.yaml"
    spec = yaml.safe_load(source.read_text())
    spec["base"] = str(source.parent / spec["base"])
    spec["arms"] = spec["arms"][:2]  # window_only, swin
    path = tmp_path / "two_arms.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    bad = yaml.safe_load(path.read_text())
    bad["arms"][1]["overrides"]["model"]["model_kwargs"]["mixer_kwargs"] = {"widnow_size": 2}
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=r"arm 'swin' cannot be built .*widnow_size.*fix its options"):
        run_ablation(bad_path, smoke=True, out=out)
    assert not (out / "runs").exists()  # window_only did not train first

    run_ablation(path, smoke=True, out=out, arms=["swin"])
    first = {row["arm"]: row for row in read_csv(out / "results.csv")}
    assert (first["swin"]["ablation"], first["swin"]["profile"]) == ("attention_type", "smoke")
    with open(out / "results.csv", "a") as f:  # a row of another ablation run into the same folder
        f.write("full,0.5,1,0.7,1,1,1,1,1,64,hat_components,smoke\n")
    capsys.readouterr()
    result = run_ablation(path, smoke=True, out=out, arms=["window_only"])
    rows = read_csv(out / "results.csv")
    assert [row["arm"] for row in rows] == ["window_only", "swin"]  # the YAML's order, the earlier row kept
    assert rows[1] == first["swin"]
    dropped = "['full'] (results of the ablation 'hat_components', not 'attention_type')"
    assert f"not keeping these rows of {out / 'results.csv'}: {dropped}" in capsys.readouterr().out
    assert [r["arm"] for r in read_markdown(out / "results.md")] == ["window_only", "swin"]
    assert [label for label, _, _ in result.points] == ["window_only", "swin"]


def test_kept_rows_keep_their_numbers(tmp_path):
    from recipes.ablate import _earlier_rows
    from recipes.report import write_csv

    path = tmp_path / "results.csv"
    write_csv([{"arm": "a", "top1": 0.5, "params": 28_312_456, "resolution": 224},
               {"arm": "a@320", "top1": 0.25, "params": 28_312_456, "resolution": 320},
               {"arm": "b", "top1": 0.75, "params": 1, "resolution": 224}], path)  # fmt: skip
    kept = _earlier_rows(path, rerun={"b"})
    assert [row["arm"] for row in kept] == ["a", "a@320"]  # "<arm>@<size>" rows go with their arm
    assert kept[0] == {"arm": "a", "top1": 0.5, "params": 28_312_456, "resolution": 224}
    write_csv(kept, path)
    assert "28312456" in path.read_text()


def _tiny_spec(tmp_path, arms, trainer=None):
    base = ROOT / "recipes" / "configs" / "synthetic_fastervit.yaml"
    smoke_trainer = {"accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 1, "num_sanity_val_steps": 0,
                     "enable_model_summary": False, "enable_progress_bar": False, **(trainer or {})}  # fmt: skip
    spec = {
        "name": "tiny",
        "base": str(base),
        "smoke": {
            "trainer": smoke_trainer,
            # FasterViT's own name for the input size, as a user of fastervit.create_model would write it
            # (the base config's img_size set to null)
            "model": {"model_kwargs": {"img_size": None, "resolution": 32, "dim": 16, "in_dim": 16,
                                       "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4],
                                       "window_size": [4, 4, 2, 2]}},  # fmt: skip
            "data": {"init_args": {"image_size": 32, "train_samples": 16, "val_samples": 16, "batch_size": 8,
                                   "num_workers": 0, "distractors": 0, "grid": 2, "min_cell_distance": 1}},  # fmt: skip
        },
        "smoke_benchmark": {"batch_size": 2, "warmup": 0, "iters": 1},
        "arms": arms,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_arm_options_and_eval_scales_are_checked_before_any_arm_trains(tmp_path, capsys):
    typo = _tiny_spec(tmp_path, [{"name": "a"}, {"name": "b", "overrides": {"trainer": {"max_epoch": 3}}}])
    with pytest.raises(SystemExit) as stop:
        main([str(typo), "--smoke", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "arm 'b': Subcommand 'fit' does not accept option 'trainer.max_epoch'" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "runs").exists()  # arm a did not train first
    # at 64 px stage 3 (window 2) has four windows and so carrier tokens, which the 32 px model (one window)
    # has not: its trained weights cannot be evaluated there
    grows = _tiny_spec(tmp_path, [{"name": "a", "eval_scales": [2.0]}])
    with pytest.raises(ValueError, match=r"arm 'a': eval scale 2.0 \(64 px\) cannot be evaluated.*global_tokenizer"):
        run_ablation(grows, smoke=True, out=tmp_path / "out")
    assert not (tmp_path / "out" / "runs").exists()


def test_eval_scale_rows_use_the_arm_setup_and_a_trained_row_outlives_a_failing_scale(tmp_path, monkeypatch):
    import recipes.ablate as ablate

    no_ct = {"model": {"model_kwargs": {"hat": [False, False, False, False]}}}
    path = _tiny_spec(
        tmp_path,
        [{"name": "a", "overrides": no_ct, "eval_scales": [1.0, 2.0]}, {"name": "b", "eval_scales": [1.0]}],
        trainer={"limit_val_batches": 1},  # LightningCLI reads an int 1 as 1.0: every batch (two here)
    )
    real = ablate._evaluate_at

    def evaluate_at(arm, *args):
        if arm.name == "b":
            raise RuntimeError("scale evaluation failed")
        return real(arm, *args)

    monkeypatch.setattr(ablate, "_evaluate_at", evaluate_at)
    with pytest.raises(RuntimeError, match="scale evaluation failed"):
        run_ablation(path, smoke=True, out=tmp_path / "out")
    rows = {row["arm"]: row for row in read_csv(tmp_path / "out" / "results.csv")}
    assert list(rows) == ["a", "a@32", "a@64", "b"]  # b trained: its row is kept
    # the model rebuilt at the training size on the same validation batches scores exactly the same
    for key in ("top1", "top5", "loss", "params", "gflops"):
        assert rows["a@32"][key] == rows["a"][key], key
    assert float(rows["a@64"]["gflops"]) > float(rows["a"]["gflops"])  # the model was rebuilt at 64 px


def test_checking_arms_from_a_notebook_does_not_warn_about_its_argv(monkeypatch, recwarn):
    from recipes.ablate import check_arms

    monkeypatch.setattr("sys.argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel.json"])  # what Jupyter has
    _, arms = load_ablation(ROOT / "recipes" / "ablations" / "hat_components.yaml", smoke=True)
    check_arms(arms[:2])
    assert not [w for w in recwarn if "args parameter" in str(w.message)]


def test_a_typo_in_an_arm_model_option_fails_before_any_arm_trains(tmp_path, capsys):
    """The check of every arm builds its ImageClassifier, which refuses an optimizer timm lacks and a label
    smoothing outside [0, 1); they used to fail only once that arm started training."""
    for name, model, message in [
        ("typo", {"optimizer": "adma"}, "arm 'b' cannot be built (ValueError: optimizer 'adma' is not a timm"),
        ("smooth", {"label_smoothing": 1.5}, "arm 'b' cannot be built (ValueError: label_smoothing must be in [0, 1)"),
    ]:
        path = _tiny_spec(tmp_path, [{"name": "a"}, {"name": "b", "overrides": {"model": model}}])
        with pytest.raises(SystemExit) as stop:
            main([str(path), "--smoke", "--out", str(tmp_path / name)])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "fix its options in the ablation YAML" in err and "Traceback" not in err
        assert not (tmp_path / name).exists()  # arm a did not train first


def test_ablation_yaml_reads_as_the_cli_does_and_warm_starts_are_checked_up_front(tmp_path):
    """``1e-3`` is a float (PyYAML alone reads a string, which the arm then failed on), ``callbacks`` may be one
    mapping or null and ``convert`` null, as LightningCLI / ImageClassifier take them; a warm start that does not
    fit and a missing ``init_checkpoint`` fail in the check before any arm trains, not after the first arms ran."""
    from recipes.ablate import check_arms

    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
    arms = [
        {"name": "a", "overrides": {"model": {"lr": "LR"}, "trainer": {"callbacks": checkpoint}}},
        {"name": "b", "convert": None, "overrides": {"trainer": {"callbacks": None}}},
    ]
    path = _tiny_spec(tmp_path, arms)
    path.write_text(path.read_text().replace("lr: LR", "lr: 1e-3"))
    _, (a, b) = load_ablation(path, smoke=True, out=tmp_path / "out")
    assert a.config["model"]["lr"] == 0.001 and a.config["trainer"]["callbacks"] == [checkpoint]
    from recipes.ablate import _load_yaml

    (tmp_path / "values.yaml").write_text("lr: 1e-3\ntag: 2024-01-01\n")  # the CLI keeps a date a string too
    assert _load_yaml(tmp_path / "values.yaml") == {"lr": 0.001, "tag": "2024-01-01"}
    assert b.config["trainer"]["callbacks"] == [] and b.config["model"]["convert"] is None
    check_arms([a, b])
    wider = {"model": {"model_kwargs": {"dim": 32}}}
    path = _tiny_spec(tmp_path, [{"name": "a"}, {"name": "b", "warm_start": "a", "overrides": wider}])
    with pytest.raises(ValueError, match=r"arm 'b' cannot be built \(warm start from arm 'a': CheckpointMismatch"):
        check_arms(load_ablation(path, smoke=True, out=tmp_path / "out")[1])
    path = _tiny_spec(tmp_path, [{"name": "a"}, {"name": "b", "warm_start": "a"}])
    check_arms(load_ablation(path, smoke=True, out=tmp_path / "out")[1])  # the same model: fits
    missing = str(tmp_path / "no" / "such.pt")
    path = _tiny_spec(tmp_path, [{"name": "a"}, {"name": "b", "overrides": {"model": {"init_checkpoint": missing}}}])
    with pytest.raises(ValueError, match=r"arm 'b' cannot be built .*such\.pt"):
        check_arms(load_ablation(path, smoke=True, out=tmp_path / "out")[1])
    assert not (tmp_path / "out").exists()


def test_arm_checkpoint_folders_are_the_arms_own(tmp_path):
    """A ModelCheckpoint with its own dirpath in the shared config wrote every arm's checkpoints into one folder
    (last.ckpt, last-v1.ckpt, ...): each arm's now goes under its run folder, and the runner says so."""
    callback = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True, "dirpath": "checkpoints"}}  # fmt: skip
    absolute = {**callback, "init_args": {"dirpath": str(tmp_path / "ckpts")}}
    path = _tiny_spec(tmp_path, [{"name": "a"}, {"name": "b", "overrides": {"trainer": {"callbacks": [absolute]}}}],
                      trainer={"callbacks": [callback]})  # fmt: skip
    _, arms = load_ablation(path, smoke=True, out=tmp_path / "out")
    dirs = [Path(arm.config["trainer"]["callbacks"][0]["init_args"]["dirpath"]) for arm in arms]
    assert dirs == [tmp_path / "out" / "runs" / name / "checkpoints" for name in ("a", "b")]
    assert arms[0].config["trainer"]["callbacks"][0]["init_args"]["save_last"] is True
    assert ("trainer.callbacks[0].init_args.dirpath", "checkpoints") in arms[0].redirected
    assert ("trainer.callbacks[0].init_args.dirpath", str(tmp_path / "ckpts")) in arms[1].redirected


def test_kept_rows_are_the_same_ablation_and_profile_and_not_stale(tmp_path):
    """--arms keeps only rows of this ablation and profile, of arms the YAML has, and not of arms warm-started
    from an arm that runs again; the others are returned by why they were dropped."""
    from recipes.ablate import _kept_rows
    from recipes.report import write_csv

    _, arms = load_ablation(ROOT / "recipes" / "ablations" / "plug_and_play.yaml", smoke=True, out=tmp_path)
    rows = [("swin", "plug_and_play", "smoke"), ("swin_hat_random", "plug_and_play", "smoke"),
            ("swin_hat_warm", "plug_and_play", "smoke"), ("twins", "plug_and_play", "cpu"),
            ("twins_hat_random", "plug_and_play", "full"), ("full", "hat_components", "smoke"),
            ("gone", "plug_and_play", "smoke"), ("twins@128", "plug_and_play", "smoke"),
            ("edgevit", "", "")]  # fmt: skip
    path = tmp_path / "results.csv"
    write_csv([{"arm": arm, "top1": 0.5, "ablation": ablation, "profile": form} for arm, ablation, form in rows], path)
    kept, dropped = _kept_rows(path, "plug_and_play", "smoke", arms, rerun={"swin"})
    assert [row["arm"] for row in kept] == ["swin_hat_random"] and kept[0]["top1"] == 0.5
    assert {tuple(labels): why.split(":")[0].split(",")[0] for why, labels in dropped.items()} == {
        ("swin_hat_warm",): "warm-started from 'swin'",
        ("twins",): "results of the 'cpu' form",
        ("twins_hat_random",): "results of the 'full' form",
        ("full",): "results of the ablation 'hat_components'",
        ("gone",): "arms that 'plug_and_play' no longer has",
        ("twins@128",): "eval sizes that the arm's eval_scales no longer give",
        ("edgevit",): "no ablation / profile recorded",
    }
    # a warm start two arms deep: c starts from b, which starts from a; a runs again, so b and c are stale
    chain = [Arm("a", {}), Arm("b", {}, warm_start="a"), Arm("c", {}, warm_start="b"), Arm("d", {})]
    write_csv([{"arm": name, "ablation": "x", "profile": "full"} for name in "bcd"], path)
    kept, dropped = _kept_rows(path, "x", "full", chain, rerun={"a"})
    assert [row["arm"] for row in kept] == ["d"] and list(dropped.values()) == [["b", "c"]]
    assert "from 'a', which runs again: add them to --arms" in next(iter(dropped))


def test_final_metrics_cover_the_whole_validation_split_and_the_arm_loggers_are_kept(tmp_path, capsys):
    """limit_val_batches limits validation while training only: a result row is measured on every validation
    image (they were on the first batches, and with 0 the runner crashed on a row without top1). An arm's own
    loggers are kept (pointed at its folder, which the arm's line says), and `logger: false` is honoured."""
    import torch.nn.functional as F

    from recipes.ablate import _build

    mine = {"class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(tmp_path / "elsewhere"), "name": "mine"}}  # fmt: skip
    path = _tiny_spec(tmp_path, [
        {"name": "a", "overrides": {"trainer": {"limit_val_batches": 0.5, "logger": [mine]}}},  # 1 of 2 batches
        {"name": "b", "overrides": {"trainer": {"limit_val_batches": 0, "logger": False,  # no validation, no logs
                                                "callbacks": [CHECKPOINT]}}},  # (LearningRateMonitor needs a logger)
    ])  # fmt: skip
    out = tmp_path / "out"
    spec, arms = load_ablation(path, smoke=True, out=out)
    result = run_ablation(path, smoke=True, out=out)
    rows = {row["arm"]: row for row in read_csv(out / "results.csv")}
    for arm in arms:
        datamodule, module = _build(arm)
        module.model.load_state_dict(torch.load(out / "runs" / arm.name / "model.pt", weights_only=True))
        datamodule.setup("validate")
        images, labels = map(list, zip(*(datamodule.val_set[i] for i in range(len(datamodule.val_set)))))
        with torch.no_grad():
            logits = module.eval()(torch.stack(images))
        labels = torch.tensor(labels)
        assert float(rows[arm.name]["loss"]) == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-4)
        assert float(rows[arm.name]["top1"]) == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert [label for label, _, _ in result.points] == ["a", "b"]
    assert (out / "runs" / "a" / "mine" / "version_0" / "metrics.csv").is_file()  # the user's logger, in a's folder
    assert not (tmp_path / "elsewhere").exists()
    assert (out / "runs" / "b" / "config.yaml").is_file() and not list((out / "runs" / "b").glob("version_*"))
    assert (out / "runs" / "b" / "checkpoints" / "last.ckpt").is_file()
    printed = capsys.readouterr().out
    replaced = f"replacing runs/synthetic_fastervit of trainer.default_root_dir; {tmp_path / 'elsewhere'} of CSVLogger"
    assert f"arm 1/2: a (outputs in {out / 'runs' / 'a'}, {replaced}.save_dir)" in printed


def test_arm_loggers_keep_their_options_and_write_into_the_arm_folder(tmp_path):
    base = ROOT / "recipes" / "configs" / "synthetic_fastervit.yaml"
    tensorboard = {"class_path": "TensorBoardLogger", "init_args": {"save_dir": "/tmp/tb", "name": "x", "version": 3}}
    spec = {
        "name": "loggers", "base": str(base),
        "overrides": {"trainer": {"default_root_dir": "/tmp/my_root", "logger": [tensorboard]}},
        "arms": [{"name": "a"}, {"name": "b", "overrides": {"trainer": {"logger": False, "callbacks": [CHECKPOINT]}}},
                 {"name": "c", "overrides": {"trainer": {"logger": None}}}],
    }  # fmt: skip
    path = tmp_path / "loggers.yaml"
    path.write_text(yaml.safe_dump(spec))
    a, b, c = load_ablation(path, out=tmp_path / "out")[1]
    run_dir = str(tmp_path / "out" / "runs" / "a")
    assert a.config["trainer"]["logger"] == [
        {"class_path": "TensorBoardLogger", "init_args": {"save_dir": run_dir, "name": "x", "version": 3}}
    ]
    assert a.config["trainer"]["default_root_dir"] == run_dir
    assert a.redirected == [("trainer.default_root_dir", "/tmp/my_root"), ("TensorBoardLogger.save_dir", "/tmp/tb")]
    assert b.config["trainer"]["logger"] is False and b.redirected == [("trainer.default_root_dir", "/tmp/my_root")]
    assert [entry["class_path"].rpartition(".")[2] for entry in c.config["trainer"]["logger"]] == [
        "CSVLogger", "TensorBoardLogger"
    ]  # fmt: skip
    spec["arms"][1]["overrides"]["trainer"].pop("callbacks")  # the base config's LearningRateMonitor is back
    path.write_text(yaml.safe_dump(spec))
    needs = r"arm 'b' sets trainer.logger: false, but its callbacks \['LearningRateMonitor'\] need a logger; give"
    with pytest.raises(ValueError, match=needs):
        load_ablation(path, out=tmp_path / "out")


def test_pareto_plot_leaves_out_a_row_without_a_metric_and_says_so(tmp_path):
    from recipes.report import plot_pareto

    rows = [{"arm": "a", "top1": None, "infer_imgs_per_sec": 10.0},
            {"arm": "b", "top1": 0.5, "infer_imgs_per_sec": 20.0},
            {"arm": "c", "top1": "", "infer_imgs_per_sec": 30.0}]  # fmt: skip
    with pytest.warns(UserWarning, match=r"rows \['a', 'c'\] have no number in 'infer_imgs_per_sec' or 'top1'"):
        points = plot_pareto(rows, tmp_path / "pareto.png")
    assert points == [("b", 20.0, 0.5)] and (tmp_path / "pareto.png").is_file()
