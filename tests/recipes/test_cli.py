"""``python -m recipes``: LightningCLI runs, saved configs, fast_dev_run, exact resume, and DDP on CPU."""

import csv
from pathlib import Path

import pytest
import torch
import yaml

from recipes.cli import main

from .helpers import TINY, run_recipes, tiny_config

CHECKPOINT = TINY["trainer"]["callbacks"][0]


def _fit(config, *extra):
    return main(["fit", "--config", str(config), *extra])


def _final(cli) -> dict:
    return {k: cli.trainer.callback_metrics[k].item() for k in ("val/top1", "val/loss")}


def test_run_writes_config_logs_and_checkpoints(tmp_path):
    cli = _fit(tiny_config(tmp_path, trainer={"max_epochs": 1}))
    log_dir = tmp_path / "tiny" / "version_0"
    saved = (log_dir / "config.yaml").read_text()  # SaveConfigCallback: the YAML that ran, next to its results
    assert "faster_vit_0_any_res" in saved and "SyntheticDataModule" in saved
    assert "val/top1" in (log_dir / "metrics.csv").read_text()
    assert list((tmp_path / "tiny" / "tb").rglob("events.out.tfevents.*"))
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    assert 0.0 <= _final(cli)["val/top1"] <= 1.0
    # the saved config runs again as it is
    again = main(["fit", "--config", str(log_dir / "config.yaml"), "--trainer.max_epochs", "1"])
    assert _final(again) == _final(cli)


def test_default_root_dir_on_the_command_line_moves_the_run(tmp_path):
    """The configs name the run's folder twice (trainer.default_root_dir and each logger's save_dir), and the logs,
    checkpoints and config.yaml follow the loggers: --trainer.default_root_dir alone moved nothing."""
    moved = tmp_path / "moved"
    _fit(tiny_config(tmp_path, trainer={"max_epochs": 1}), "--trainer.default_root_dir", str(moved))
    assert not (tmp_path / "tiny").exists()
    assert (moved / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert "val/top1" in (moved / "version_0" / "metrics.csv").read_text()
    assert list((moved / "tb").rglob("events.out.tfevents.*"))
    saved = yaml.safe_load((moved / "version_0" / "config.yaml").read_text())  # it runs again where it ran
    assert saved["trainer"]["default_root_dir"] == str(moved)
    assert [lg["init_args"]["save_dir"] for lg in saved["trainer"]["logger"]] == [str(moved)] * 2
    # a logger that writes elsewhere keeps its folder
    elsewhere = tiny_config(tmp_path, "two", trainer={"logger": [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "two")}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "other")}},
    ]})  # fmt: skip
    cli = main(["--config", str(elsewhere), "--trainer.default_root_dir", str(moved)], run=False)
    assert [lg.save_dir for lg in cli.trainer.loggers] == [str(moved), str(tmp_path / "other")]
    with pytest.raises(SystemExit):  # a bare option is an error, not null
        main(["--config", str(elsewhere), "--trainer.default_root_dir"], run=False)
    # --print_config still shows the option (taken off the command line, it was missing from the printout)
    printed = run_recipes("fit", "--config", str(elsewhere), "--trainer.default_root_dir", str(moved), "--print_config")
    assert printed.returncode == 0 and f"default_root_dir: {moved}" in printed.stdout, printed.stderr[-2000:]


def test_a_model_given_by_class_path_resumes_and_tests_from_its_checkpoint(tmp_path):
    """The CLI copies a checkpoint's hyper-parameters into the config: a model given as an nn.Module class_path must
    stay out of them (recording it as None broke test / resume of such runs)."""
    config = {
        "seed_everything": 0,
        "data": {"class_path": "recipes.data.SyntheticDataModule",
                 "init_args": {"image_size": 32, "train_samples": 8, "val_samples": 4, "batch_size": 4}},
        "model": {"model": {"class_path": "timm.models.vision_transformer.VisionTransformer",
                            "init_args": {"img_size": 32, "patch_size": 16, "embed_dim": 8, "depth": 1, "num_heads": 1,
                                          "num_classes": 2}},
                  "warmup_epochs": 0},
        "trainer": {"max_steps": 1, "accelerator": "cpu", "enable_progress_bar": False, "logger": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path / "run")},
    }  # fmt: skip
    path = tmp_path / "vit.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    checkpoint = next((tmp_path / "run").rglob("*.ckpt"))
    tested = main(["test", "--config", str(path), "--ckpt_path", str(checkpoint)])
    assert 0.0 <= tested.trainer.callback_metrics["test/top1"].item() <= 1.0


def test_fast_dev_run_from_the_command_line(tmp_path):
    result = run_recipes("fit", "--config", str(tiny_config(tmp_path)), "--trainer.fast_dev_run", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fast_dev_run" in result.stderr + result.stdout
    assert not (tmp_path / "tiny" / "version_0" / "metrics.csv").exists()  # fast_dev_run logs nothing
    assert list(tmp_path.rglob("*.ckpt")) == []  # and saves nothing (Lightning wrote last.ckpt at train end)


@pytest.mark.slow
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    """3 epochs straight vs. a run that crashes at the start of epoch 2 and is resumed from its epoch-1 checkpoint."""
    straight = _fit(tiny_config(tmp_path, "straight"))
    crash = {"class_path": "tests.recipes.helpers.CrashAtEpoch", "init_args": {"epoch": 2}}
    crashing = tiny_config(tmp_path, "interrupted", trainer={"callbacks": [CHECKPOINT, crash]})
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(crashing)
    mid = sorted((tmp_path / "interrupted" / "version_0" / "checkpoints").glob("epoch=1-*.ckpt"))
    assert len(mid) == 1
    resumed = _fit(tiny_config(tmp_path, "interrupted"), "--ckpt_path", str(mid[0]))
    assert resumed.trainer.current_epoch == straight.trainer.current_epoch == 3
    assert _final(resumed) == _final(straight)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    # 15 validation samples on 2 processes: Lightning's padding sampler would give both 8 and count one twice
    data = {"data": {"init_args": {"val_samples": 15}}}
    single = tiny_config(tmp_path, "single", trainer={"max_epochs": 1}, **data)
    ddp = tiny_config(tmp_path, "ddp", trainer={"max_epochs": 1, "strategy": "ddp", "devices": 2}, **data)
    for config in (single, ddp):
        result = run_recipes("fit", "--config", str(config))
        assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in result.stderr + result.stdout or "distributed_backend=gloo" in result.stderr

    def schema(name):
        with open(tmp_path / name / "version_0" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        return set(rows[0]), rows

    (single_columns, _), (ddp_columns, ddp_rows) = schema("single"), schema("ddp")
    assert ddp_columns == single_columns
    final = [r for r in ddp_rows if r.get("val/top1")][-1]
    assert 0.0 <= float(final["val/top1"]) <= 1.0 and float(final["val/loss"]) > 0
    # the two processes' metrics are those of one process validating the same weights: each sample once
    checkpoint = tmp_path / "ddp" / "version_0" / "checkpoints" / "last.ckpt"
    alone = main(["validate", "--config", str(single), "--ckpt_path", str(checkpoint)]).trainer.callback_metrics
    assert "val/top5" not in final and "val/top5" not in alone  # two classes: top-5 is 1 by construction
    for key in ("val/loss", "val/top1"):
        assert float(final[key]) == pytest.approx(alone[key].item(), rel=1e-5, abs=1e-7), key


def test_test_and_predict_subcommands_and_loading_without_the_warm_start_file(tmp_path):
    from recipes.module import ImageClassifier

    first = _fit(tiny_config(tmp_path, "first", trainer={"max_epochs": 1}))
    weights = tmp_path / "warm.pt"
    torch.save(first.model.model.state_dict(), weights)
    warm = _fit(tiny_config(tmp_path, "warm", trainer={"max_epochs": 1}, model={"init_checkpoint": str(weights)}))
    checkpoint = tmp_path / "warm" / "version_0" / "checkpoints" / "last.ckpt"
    weights.unlink()  # the checkpoint holds every weight: the warm-start file is not needed to load it
    loaded = ImageClassifier.load_from_checkpoint(checkpoint)
    a, b = warm.model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.hparams.init_checkpoint == str(weights)  # recorded, not read
    with pytest.raises(TypeError, match="cannot be called on an instance"):  # Lightning's guard is kept
        loaded.load_from_checkpoint(checkpoint)
    # resuming the fit: the file is not read either, and the run's saved config still names the warm start
    # (it said null, so running that config.yaml again trained from a random init)
    resumed_config = tiny_config(tmp_path, "warm", trainer={"max_epochs": 2}, model={"init_checkpoint": str(weights)})
    resumed = _fit(resumed_config, "--ckpt_path", str(checkpoint))
    assert resumed.trainer.current_epoch == 2 and resumed.model.hparams.init_checkpoint == str(weights)
    saved = yaml.safe_load((tmp_path / "warm" / "version_1" / "config.yaml").read_text())
    assert saved["model"]["init_checkpoint"] == str(weights)

    tested = main(["test", "--config", str(tiny_config(tmp_path, "warm")), "--ckpt_path", str(checkpoint)])
    metrics = tested.trainer.callback_metrics
    assert metrics["test/top1"].item() == pytest.approx(_final(warm)["val/top1"])  # the held-out split
    assert metrics["test/loss"].item() == pytest.approx(_final(warm)["val/loss"], rel=1e-5)
    predicted = main(["predict", "--config", str(tiny_config(tmp_path, "warm")), "--ckpt_path", str(checkpoint)])
    probs = torch.cat(predicted.trainer.predict_loop.predictions)
    assert probs.shape == (TINY["data"]["init_args"]["val_samples"], 2)
    assert torch.allclose(probs.sum(-1), torch.ones(len(probs)))
    written = torch.load(Path(predicted.trainer.log_dir) / "predictions.pt", weights_only=True)  # not discarded
    assert torch.equal(written["predictions"], probs)
    assert written["indices"].tolist() == list(range(len(probs)))  # the held-out split, in order


@pytest.mark.slow
def test_resume_from_inside_an_epoch_repeats_the_uninterrupted_run(tmp_path):
    """A checkpoint after every step; resuming from one written inside epoch 1 (step 4 of 3 x 3) continues with
    the batches and random numbers the uninterrupted run used next, not with the epoch's first batches."""
    every_step = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"save_top_k": -1, "every_n_train_steps": 1, "filename": "{step}"},
    }
    straight = _fit(tiny_config(tmp_path, "straight", trainer={"callbacks": [every_step]}))
    assert straight.trainer.global_step == 9
    checkpoint = tmp_path / "straight" / "version_0" / "checkpoints" / "step=4.ckpt"
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    assert state["SyntheticDataModule"] == {"train_loader": {"epoch": 1, "batches": 1}}
    resumed = _fit(tiny_config(tmp_path, "resumed"), "--ckpt_path", str(checkpoint))
    assert resumed.trainer.global_step == 9
    assert _final(resumed) == _final(straight)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ckpt_path_last_without_a_checkpoint_keeps_the_warm_start(tmp_path):
    """`--ckpt_path last` in a restart-safe job: on the first launch there is no checkpoint, Lightning trains from
    scratch, and the warm start must happen."""
    first = _fit(tiny_config(tmp_path, "first", trainer={"max_epochs": 1}))
    weights = tmp_path / "warm.pt"
    torch.save(first.model.model.state_dict(), weights)
    config = tiny_config(tmp_path, "job", trainer={"max_epochs": 1, "max_steps": 1},
                         model={"init_checkpoint": str(weights)})  # fmt: skip
    cli = main(["fit", "--config", str(config), "--ckpt_path", "last"], run=True)
    assert cli.model.hparams.init_checkpoint == str(weights)


def test_a_num_classes_in_the_config_that_the_data_contradicts_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"model\.num_classes is 5 in the config, but the data module has 2"):
        main(["--config", str(tiny_config(tmp_path, model={"num_classes": 5}))], run=False)
    cli = main(["--config", str(tiny_config(tmp_path, "same", model={"num_classes": 2}))], run=False)
    assert cli.model.num_classes == 2  # a saved config.yaml that repeats the linked value still runs
    with pytest.raises(ValueError, match="model_kwargs.num_classes is 10 but num_classes is 2"):
        main(["--config", str(tiny_config(tmp_path, "kw", model={"model_kwargs": {"num_classes": 10}}))], run=False)


def test_model_kwargs_given_one_by_one_on_the_command_line_keep_their_types(tmp_path):
    config = str(tiny_config(tmp_path))
    cli = main(["--config", config, "--model.model_kwargs.drop_path_rate", "0.1",
                "--model.model_kwargs.window_size", "[4, 4, 2, 2]"], run=False)  # fmt: skip
    kwargs = cli.config.model.model_kwargs
    assert kwargs["drop_path_rate"] == 0.1 and kwargs["window_size"] == [4, 4, 2, 2]  # not the strings
    assert kwargs["dim"] == main(["--config", config], run=False).config.model.model_kwargs["dim"]  # merged in
    rates = [b.drop_path.drop_prob for b in cli.model.model.levels[2].blocks if hasattr(b.drop_path, "drop_prob")]
    assert rates and max(rates) > 0


def test_num_classes_on_the_command_line_runs_when_it_matches_the_data_and_is_refused_when_not(tmp_path):
    """jsonargparse answered `--model.num_classes N` (a linked argument) with "int | None is not callable"."""
    config = str(tiny_config(tmp_path))
    cli = main(["--config", config, "--model.num_classes", "2"], run=False)
    assert cli.model.num_classes == 2
    with pytest.raises(ValueError, match=r"model\.num_classes is 3 on the command line, but the data module has 2 .*"
                                         r"drop --model\.num_classes"):  # fmt: skip
        main(["--config", config, "--model.num_classes=3"], run=False)


def test_a_one_class_image_folder_is_refused_by_the_data_module_before_a_model_is_built(tmp_path):
    """Not by torchmetrics, once the linked num_classes (1) reached the model's metrics."""
    from PIL import Image

    from recipes.data import DatasetNotFoundError

    for split in ("train", "val"):
        (tmp_path / "images" / split / "only").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / split / "only" / "0.png")
    data = {"class_path": "recipes.data.ImageFolderDataModule", "init_args": {"root": str(tmp_path / "images")}}
    config = tiny_config(tmp_path)
    spec = yaml.safe_load(config.read_text())
    spec["data"] = data
    config.write_text(yaml.safe_dump(spec))
    with pytest.raises(DatasetNotFoundError, match=r"1 class folder\(s\), \['only'\]: a classifier needs at least two"):
        main(["--config", str(config)], run=False)
