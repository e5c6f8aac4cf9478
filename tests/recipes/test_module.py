"""recipes.module.ImageClassifier: model building, loss, schedule, warm start and conversion hooks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hatplug
from recipes.models import TINY_FASTERVIT, create_model
from recipes.module import ImageClassifier, convert_model, warmup_cosine

KWARGS = dict(img_size=64, **TINY_FASTERVIT)


def test_builds_by_name_or_takes_a_module():
    by_name = ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=4)
    assert by_name.model.num_classes == 4 and by_name.num_classes == 4
    given = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), num_classes=3)
    assert given(torch.randn(2, 3, 2, 2)).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("no_such_model")


def test_create_model_suggests_close_names():
    # case and dashes ignored, as fastervit.create_model does; recipe, FasterViT and timm names all suggested
    with pytest.raises(ValueError, match=r"unknown model 'Window-Probe' \(did you mean 'window_probe'\?\)"):
        create_model("Window-Probe")
    with pytest.raises(ValueError, match=r"did you mean 'fastervit_mixer'"):
        create_model("fastervit_mixr")
    with pytest.raises(ValueError, match=r"did you mean 'faster_vit_0_any_res'"):
        create_model("FasterViT-0-any-res")
    with pytest.raises(ValueError, match=r"did you mean 'swin_tiny_patch4_window7_224'"):
        create_model("swin_tiny_patch4_windw7_224")
    with pytest.raises(ValueError, match="unknown model") as error:
        create_model("qqqqqqqq")
    assert "did you mean" not in str(error.value)


def test_loss_hard_soft_and_smoothing():
    module = ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=4, label_smoothing=0.1)
    logits, target = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    hard = module.loss(logits, target)
    assert torch.allclose(hard, F.cross_entropy(logits, target, label_smoothing=0.1))
    # a one-hot soft target (what Mixup gives with lambda = 1) is smoothed the same way
    assert torch.allclose(module.loss(logits, F.one_hot(target, 4).float()), hard)


def test_warmup_cosine_schedule():
    values = [warmup_cosine(s, warmup_steps=5, total_steps=25, warmup_start=0.1, min_ratio=0.01) for s in range(26)]
    assert values[0] == pytest.approx(0.1) and values[5] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values[:5], values[1:6]))
    assert all(a >= b for a, b in zip(values[5:], values[6:]))
    assert values[-1] == pytest.approx(0.01)


@pytest.mark.parametrize("opt", ["adamw", "lamb"])
def test_optimizers(opt):
    module = ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=2, optimizer=opt, lr=1e-3, warmup_epochs=1)

    module.trainer = _FakeTrainer(total=20, batches_per_epoch=5)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert type(optimizer).__name__.lower() == opt
    no_decay = [g for g in optimizer.param_groups if g["weight_decay"] == 0]
    assert no_decay and any(p.ndim == 1 for g in no_decay for p in g["params"])
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(lrs) == pytest.approx(1e-3, rel=0.01) and lrs.index(max(lrs)) == 5  # 1 of 4 epochs of warm-up


class _FakeTrainer:
    """What configure_optimizers reads of a Trainer."""

    def __init__(self, total: int, batches_per_epoch: int, accumulate: int = 1) -> None:
        self.estimated_stepping_batches, self.num_training_batches = total, batches_per_epoch
        self.accumulate_grad_batches, self.limit_train_batches = accumulate, 1.0


def _lrs(module: ImageClassifier, steps: int) -> list[float]:
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize(
    "total, batches, accumulate, peak_at",
    [
        (12, 4, 1, 8),  # max_steps=12 ends the run inside epoch 3: still 2 epochs x 4 steps of warm-up
        (120, 4, 1, 8),  # max_epochs=30 with max_steps unset: the same warm-up
        (6, 8, 2, 6),  # gradient accumulation halves the steps of an epoch; a warm-up longer than the run is cut
    ],
)
def test_warmup_is_counted_in_epochs_of_optimiser_steps(total, batches, accumulate, peak_at):
    module = ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=2, lr=1e-3, warmup_lr=1e-5, warmup_epochs=2)
    module.trainer = _FakeTrainer(total, batches, accumulate)
    lrs = _lrs(module, min(total, peak_at + 1))
    assert lrs[0] == pytest.approx(1e-5)
    assert all(a < b for a, b in zip(lrs[:peak_at], lrs[1:peak_at]))  # rising through the warm-up
    if peak_at < total:
        assert lrs[peak_at] == pytest.approx(1e-3)


def test_bad_learning_rates_are_named():
    for kwargs, message in [(dict(lr=0.0), "lr must be > 0"), (dict(min_lr=-1e-6), "min_lr must be >= 0"),
                            (dict(warmup_epochs=-1), "warmup_epochs must be >= 0")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=2, **kwargs)


def test_top1_is_the_fraction_of_images_classified_right():
    """Not torchmetrics' default macro average (the mean of per-class recalls), which differs on uneven splits."""
    module = ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=3)
    target = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 2])
    predicted = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # 8 of 10 right; per-class recalls 1, 0, 0
    logits = F.one_hot(predicted, 3).float()
    for metric in (module.val_top1, module.train_top1, module.test_top1):
        metric.update(logits, target)
        assert metric.compute().item() == pytest.approx((predicted == target).float().mean().item()) == 0.8


def test_warm_start_from_a_checkpoint_with_another_head(tmp_path):
    source = ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=5)
    path = tmp_path / "five_classes.pt"
    torch.save(source.model.state_dict(), path)
    torch.manual_seed(1)
    module = ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=2, init_checkpoint=str(path))
    torch.manual_seed(1)
    fresh = ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=2).model.state_dict()
    own, theirs = module.model.state_dict(), source.model.state_dict()
    head = {k for k in own if k.startswith("head.")}
    assert head and all(torch.equal(own[k], fresh[k]) for k in head)  # the new head keeps its init
    assert all(torch.equal(own[k], theirs[k]) for k in own if k not in head)  # everything else was loaded
    probe = {"img_size": 32, "dim": 8, "depth": 1}  # the window probe too (it had no get_classifier: refused)
    torch.save(ImageClassifier("window_probe", probe, num_classes=5).model.state_dict(), path)
    probe_head = ImageClassifier("window_probe", probe, num_classes=2, init_checkpoint=str(path)).model.head
    assert probe_head.out_features == 2
    other_width = ImageClassifier("faster_vit_0_any_res", {**KWARGS, "dim": 24}, num_classes=5)
    torch.save(other_width.model.state_dict(), path)
    with pytest.raises(hatplug.CheckpointMismatchError, match="model / model_kwargs of the run that wrote it"):
        ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=5, init_checkpoint=str(path))


def test_a_checkpoint_of_a_module_built_from_an_nn_module_names_what_to_pass(tmp_path):
    """A module given as an nn.Module is not in the saved hyper-parameters: loading its checkpoint without
    model=... built the default FasterViT and failed on hundreds of missing keys."""
    import lightning as L

    from recipes.data import SyntheticDataModule

    def net():
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))

    module = ImageClassifier(net(), num_classes=2, warmup_epochs=0)
    data = SyntheticDataModule(image_size=32, train_samples=4, val_samples=4, batch_size=4)
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    path = tmp_path / "module.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"load_from_checkpoint\(path, model=<a module of the same architecture>\)"):
        ImageClassifier.load_from_checkpoint(path)
    loaded = ImageClassifier.load_from_checkpoint(path, model=net())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), module(x))
    assert ImageClassifier(net(), num_classes=2).hparams.lr == 1e-3  # the other settings are still recorded


def test_warm_start_and_convert(tmp_path, monkeypatch):
    source = ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=2)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": source.state_dict()}, path)  # a Lightning-style checkpoint: keys "model.*"
    calls = []

    def fake_convert(model, **options):
        calls.append((options, {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    monkeypatch.setattr(hatplug, "convert", fake_convert)
    module = ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=2, init_checkpoint=str(path),
                             convert={"ct_size": 2, "init": "identity"})  # fmt: skip
    ((options, seen),) = calls
    assert options == {"ct_size": 2, "init": "identity"}
    assert all(torch.equal(seen[k], v) for k, v in source.model.state_dict().items())  # loaded before converting
    assert module.hparams.convert == {"ct_size": 2, "init": "identity"}


def test_convert_missing_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(hatplug, "convert")
    with pytest.raises(RuntimeError, match="hatplug.convert is not available"):
        convert_model(nn.Linear(2, 2), {"ct_size": 2})


def test_warmup_when_max_steps_alone_ends_the_run():
    """max_epochs unset: Lightning's estimated_stepping_batches returns max_steps without loading the data, so
    the epoch length must be found another way (it used to raise)."""
    import lightning.pytorch as pl

    from recipes.data import SyntheticDataModule

    data = SyntheticDataModule(image_size=64, train_samples=32, val_samples=8, batch_size=8, grid=4)
    module = ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=2, warmup_epochs=0.5)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, data)
    assert trainer.global_step == 2 and trainer.max_epochs == -1
    schedule = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert schedule.keywords["warmup_steps"] == 2 and schedule.keywords["total_steps"] == 2  # half of 4 batches


def test_top5_is_measured_only_where_it_can_be_below_one():
    """With 5 classes or fewer every label is among the top 5: no top-5 metric (the two-class ablations reported
    a top5 of 1 for every arm); with more it is top-5 accuracy."""
    probe = {"img_size": 32, "dim": 8, "depth": 1}
    few, many = (ImageClassifier("window_probe", probe, num_classes=n) for n in (5, 6))
    assert few.val_top5 is None and few.test_top5 is None
    assert many.val_top5.top_k == 5 and many.test_top5.top_k == 5
    logits, target = torch.tensor([[6.0, 5, 4, 3, 2, 1], [6.0, 5, 4, 3, 2, 1]]), torch.tensor([4, 5])
    many.val_top5(logits, target)
    assert many.val_top5.compute().item() == 0.5  # label 4 is 5th, label 5 is 6th


def test_measuring_a_model_with_half_precision_weights():
    """An arm trained with ``precision="bf16-true"`` holds bfloat16 weights: the ablation runner's GFLOPs and
    throughput measurements feed it bfloat16 images (they fed float32 ones, and the arm crashed after training)."""
    from recipes.measure import gflops, throughput

    model = create_model("faster_vit_0_any_res", **KWARGS, num_classes=3)
    counted = gflops(model, 64)
    half = model.to(torch.bfloat16)
    assert gflops(half, 64) == counted
    assert all(throughput(half, 64, batch_size=1, warmup=0, iters=1, train=t) > 0 for t in (False, True))


def test_the_evaluation_loss_mean_stays_float32_in_a_bfloat16_module():
    """precision="bf16-true" casts the whole LightningModule, metric states included: a bfloat16 sample count stops
    at 8192 (12,800 samples gave a mean of 1.617 for a true 0.995)."""
    module = ImageClassifier("window_probe", {"img_size": 32, "dim": 8, "depth": 1}, num_classes=2)
    module.to(torch.bfloat16)
    assert module.val_loss.mean_value.dtype == torch.float32
    torch.manual_seed(0)
    losses = torch.rand(400) * 2
    for value in losses:
        module.val_loss(value.to(torch.bfloat16), weight=32)
    expected = losses.to(torch.bfloat16).float().mean()
    torch.testing.assert_close(module.val_loss.compute(), expected, rtol=1e-5, atol=1e-6)
    assert module.val_loss.weight.item() == 12800


def test_gflops_count_every_gemm_of_the_folded_eval_path():
    """torch's FlopCounterMode does not count in-place GEMMs (``addmm_``), which the folded eval path uses for
    its residual projections; the count must still be that of the plain forward (the folding steps aside while
    the counter's module hooks are on), here checked against a train-mode count and by hand for the head."""
    from recipes.measure import gflops

    model = create_model("faster_vit_0_any_res", **KWARGS, num_classes=3).eval()
    counted = gflops(model, 64)
    with hatplug.layers.inference_fusion(False):
        assert gflops(model, 64) == counted
    flops = {}
    for mode in (True, False):  # train mode never folds; drop path is 0 in KWARGS, so the ops are the same
        with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            model.train(mode)(torch.randn(1, 3, 64, 64))
        flops[mode] = counter.get_total_flops()
    assert counted * 1e9 == flops[True] == flops[False]
    assert counted * 1e9 > 2 * model.head.in_features * 3  # at least the head's multiply-adds


def test_an_optimizer_timm_lacks_or_a_label_smoothing_outside_0_1_is_refused_when_built():
    """Checked in __init__, so that the ablation runner's check of every arm (which builds the module) finds the
    typo before any arm trains, instead of configure_optimizers / the loss failing once training starts."""
    with pytest.raises(ValueError, match=r"optimizer 'adma' is not a timm optimizer \(did you mean .*'adam'"):
        ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=2, optimizer="adma")
    with pytest.raises(ValueError, match=r"'lookahed_adamw' .*did you mean 'lookahead_adamw'"):
        ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=2, optimizer="lookahed_adamw")
    for smoothing in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"label_smoothing must be in \[0, 1\) .*got {smoothing}"):
            ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=2, label_smoothing=smoothing)
    module = ImageClassifier("faster_vit_0_any_res", KWARGS, num_classes=2, optimizer="Lookahead_LAMB")
    module.trainer = _FakeTrainer(total=4, batches_per_epoch=2)
    optimizer = module.configure_optimizers()["optimizer"]  # what the check lets through, timm builds
    assert type(optimizer).__name__ == "Lookahead" and type(optimizer._base_optimizer).__name__ == "Lamb"
