"""The LightningModule of every recipe: a classifier, its loss, its metrics and its optimiser; nothing else.

>>> import torch
>>> from recipes.models import TINY_FASTERVIT
>>> module = ImageClassifier("faster_vit_0_any_res", dict(img_size=64, **TINY_FASTERVIT), num_classes=3)
>>> module(torch.randn(2, 3, 64, 64)).shape
torch.Size([2, 3])
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from difflib import get_close_matches
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from timm.optim import create_optimizer_v2, list_optimizers
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

import hatplug
from hatplug.checkpoint import load_checkpoint

from .models import create_model

__all__ = ["ImageClassifier", "convert_model", "warmup_cosine", "weights_from_checkpoint"]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, warmup_start: float, min_ratio: float) -> float:
    """LR multiplier: linear from ``warmup_start`` to 1 over ``warmup_steps``, then cosine down to ``min_ratio``.

    >>> [round(warmup_cosine(s, 2, 10, 0.0, 0.0), 3) for s in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def convert_model(model: nn.Module, options: dict) -> nn.Module:
    """``hatplug.convert(model, **options)``: retrofit HAT into ``model`` (the plug-and-play ablation).

    Looked up when called, so a converter installed after import (or a test double) is used. ``model`` itself is
    not changed (unless ``options`` has ``inplace=True``).

    >>> import timm
    >>> swin = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2), num_heads=(1, 2),
    ...                          window_size=4, img_size=32, num_classes=2).eval()
    >>> hat = convert_model(swin, {"ct_size": 1, "init": "identity"}).eval()
    >>> [block.path for block in hatplug.report(hat).converted]
    ['layers.0.blocks.0', 'layers.0.blocks.1']
    >>> x = torch.randn(1, 3, 32, 32)  # init="identity": the same function as the original until trained
    >>> hat is swin, torch.allclose(hat(x), swin(x), atol=1e-5)
    (False, True)
    """
    convert = getattr(hatplug, "convert", None)
    convert = getattr(convert, "convert", convert)  # the package or its function
    if not callable(convert):
        raise RuntimeError(
            "this recipe asks for `convert: ...` but hatplug.convert is not available in this installation; "
            "update hatplug or drop the `convert` option"
        )
    converted = convert(model, **options)
    return model if converted is None else converted


_WEIGHTS_FROM_CHECKPOINT = False


@contextmanager
def weights_from_checkpoint() -> Iterator[None]:
    """Inside this block :class:`ImageClassifier` does not read its ``init_checkpoint`` (it still records it):
    every weight is about to come from a checkpoint (``load_from_checkpoint``, the CLI's ``--ckpt_path``), so
    the warm-start file need not exist any more, and the saved config and hyper-parameters still say which
    warm start the run began from.

    >>> with weights_from_checkpoint():  # the warm-start file is gone; its path is still recorded
    ...     module = ImageClassifier(nn.Linear(4, 2), num_classes=2, init_checkpoint="/no/such/run/model.pt")
    >>> module.hparams.init_checkpoint
    '/no/such/run/model.pt'
    >>> ImageClassifier(nn.Linear(4, 2), num_classes=2, init_checkpoint="/no/such/run/model.pt")
    Traceback (most recent call last):
    ...
    hatplug.errors.CheckpointError: checkpoint file not found: /no/such/run/model.pt (check the path; nothing ...
    """
    global _WEIGHTS_FROM_CHECKPOINT
    previous, _WEIGHTS_FROM_CHECKPOINT = _WEIGHTS_FROM_CHECKPOINT, True
    try:
        yield
    finally:
        _WEIGHTS_FROM_CHECKPOINT = previous


class _Float32Mean(MeanMetric):
    """A ``MeanMetric`` whose sums stay float32 when the module is cast (``precision="bf16-true"`` moves the whole
    LightningModule to bfloat16, states included, and a bfloat16 sample count stalls at 8192)."""

    def _apply(self, fn, *args, **kwargs):
        this = super()._apply(fn, *args, **kwargs)
        if not this._dtype_convert and this.mean_value.dtype != torch.float32:
            this.set_dtype(torch.float32)
        return this


class ImageClassifier(pl.LightningModule):
    """Image classification with any timm / FasterViT / recipe model.

    Args:
        model: a model name (see :func:`recipes.models.create_model`) or a ready ``nn.Module``. A checkpoint cannot
            rebuild a module it was given: load one with ``ImageClassifier.load_from_checkpoint(path, model=<a
            module of the same architecture>)``.
        model_kwargs: builder arguments when ``model`` is a name (``img_size``, ``window_size`` ...).
        num_classes: classifier outputs; the CLI links it from the data module.
        convert: if given, ``hatplug.convert(model, **convert)`` runs after building (and warm-starting).
        init_checkpoint: weights loaded into the built model before conversion (a warm start): a plain state
            dict, an official checkpoint, or a Lightning checkpoint of this module. Every tensor must fit,
            except the classifier: one for another number of classes (fine-tuning a 1000-class checkpoint)
            is left at its new init, and the log says so. Only used when training starts from scratch:
            ``load_from_checkpoint`` and ``--ckpt_path`` restore all weights without reading this file.
        label_smoothing: applied to every target, hard or (after Mixup/CutMix) soft.
        optimizer: a timm optimizer name (``timm.optim.list_optimizers()``, optionally as
            ``"lookahead_<name>"``), e.g. ``"adamw"`` (FasterViT's) or ``"lamb"``; built by timm's
            ``create_optimizer_v2``, with no weight decay on norms, biases and the model's ``no_weight_decay()``.
            A name timm does not have is refused here, with the closest names it has.
        lr: peak learning rate.
        weight_decay: decoupled weight decay.
        warmup_epochs: linear warm-up length (fractions allowed), from ``warmup_lr``.
        warmup_lr: learning rate at step 0.
        min_lr: learning rate at the end of the cosine decay.

    Gradient clipping and mixed precision are Trainer settings (``gradient_clip_val``, ``precision``). With your own
    ``Trainer``, add :class:`recipes.callbacks.RNGStateCheckpoint` to its callbacks (the CLI does) for a resume from
    inside an epoch that repeats the uninterrupted run.

    >>> module = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), num_classes=2, lr=3e-4)
    >>> images, target = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 1, 0])
    >>> module(images).shape, module.loss(module(images), target).shape  # logits, scalar loss
    (torch.Size([4, 2]), torch.Size([]))
    >>> module.predict_step((images, target), 0).sum(-1).allclose(torch.ones(4))  # class probabilities
    True
    >>> module.hparams.optimizer, module.hparams.lr, module.hparams.warmup_epochs
    ('adamw', 0.0003, 1.0)
    """

    def __init__(
        self,
        model: str | nn.Module = "faster_vit_0_any_res",
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        convert: dict[str, Any] | None = None,
        init_checkpoint: str | os.PathLike | None = None,
        label_smoothing: float = 0.0,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-6,
    ) -> None:
        super().__init__()
        for name, value in (("lr", lr), ("warmup_lr", warmup_lr), ("min_lr", min_lr)):
            if not (value > 0 if name == "lr" else value >= 0):
                raise ValueError(f"{name} must be {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"label_smoothing must be in [0, 1) (0: none; FasterViT trains with 0.1), got {label_smoothing!r}"
            )
        _check_optimizer(optimizer)
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        if isinstance(model, nn.Module):
            self.model = model
        else:
            kwargs = dict(model_kwargs or {})
            if num_classes is not None:
                if kwargs.get("num_classes", num_classes) != num_classes:
                    raise ValueError(
                        f"model_kwargs.num_classes is {kwargs['num_classes']} but num_classes is {num_classes} (the "
                        "CLI links it from the data module): remove num_classes from model_kwargs"
                    )
                kwargs["num_classes"] = num_classes
            self.model = create_model(model, **kwargs)
        if init_checkpoint is not None and not _WEIGHTS_FROM_CHECKPOINT:
            new_head: list[str] = []  # classifier keys left at their init, filled by _warm_start_state
            load_checkpoint(
                self.model,
                init_checkpoint,
                strict=True,
                filter_fn=partial(_warm_start_state, new_head=new_head),
                ignore_missing=new_head.__contains__,
                mismatch_hint="The checkpoint does not fit this model: build it with the model / model_kwargs "
                "of the run that wrote it.",
            )
        if convert is not None:
            self.model = convert_model(self.model, convert)
        num_classes = num_classes or getattr(self.model, "num_classes", None)
        if not num_classes:
            raise ValueError("num_classes is unknown: pass num_classes (the CLI links it from the data module)")
        self.num_classes = num_classes
        # micro: the fraction of images classified right (torchmetrics' default, macro, averages per-class
        # recall instead, which differs from top-1 accuracy on any split whose classes are not equally large)
        self.train_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        # top-5 only where it can be below 1: with 5 classes or fewer every label is among the top 5 (the shipped
        # two-class ablations logged a top5 of 1 for every arm)
        top5 = num_classes > 5
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if top5 else None
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if top5 else None
        # the evaluation loss as a metric, a mean over samples also when processes hold different numbers (a
        # distributed evaluation counts each sample once, see recipes.data.base.eval_loader): Lightning's
        # sync_dist mean divides the summed batch sizes by the process count in integers (15 / 2 -> 7)
        self.val_loss, self.test_loss = _Float32Mean(), _Float32Mean()

    @_restricted_classmethod  # like Lightning's: calling it on an instance is an error, not a silent no-op
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """Lightning's ``load_from_checkpoint``; the checkpoint holds every weight, so the warm-start file
        that its run started from (``init_checkpoint``) is not read and need not exist any more."""
        if "model" not in kwargs and hparams_file is None and not _names_its_model(checkpoint_path):
            # the module was given a ready nn.Module, which its hyper-parameters leave out: without model=... the
            # default model was built and the load failed on hundreds of missing keys
            raise ValueError(
                f"{checkpoint_path} is a checkpoint of an ImageClassifier built from a ready nn.Module, which a "
                "checkpoint cannot rebuild: load it with ImageClassifier.load_from_checkpoint(path, model=<a module of "
                "the same architecture>)"
            )
        with weights_from_checkpoint():
            return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy with label smoothing; ``target`` holds class ids or (Mixup/CutMix) soft rows."""
        eps = self.hparams.label_smoothing
        if target.ndim == 1:
            return F.cross_entropy(logits, target, label_smoothing=eps)
        target = target * (1.0 - eps) + eps / self.num_classes
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, target = batch
        logits = self(images)
        loss = self.loss(logits, target)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        if target.ndim == 1:  # accuracy is undefined for mixed targets
            self.train_top1(logits, target)
            self.log("train/top1", self.train_top1, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, stage: str, batch: tuple[Tensor, Tensor]) -> None:
        images, target = batch
        logits = self(images)
        top1, top5 = getattr(self, f"{stage}_top1"), getattr(self, f"{stage}_top5")
        top1(logits, target)
        progress = stage == "val"
        loss = getattr(self, f"{stage}_loss")
        loss(F.cross_entropy(logits, target).float(), weight=target.shape[0])
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=progress)
        self.log(f"{stage}/top1", top1, on_epoch=True, prog_bar=progress)
        if top5 is not None:
            top5(logits, target)
            self.log(f"{stage}/top5", top5, on_epoch=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """``python -m recipes test``: the validation metrics on the data module's test split (its labelled
        held-out split, which for the built-in data modules is the validation split)."""
        self._evaluate("test", batch)

    def predict_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> Tensor:
        """``python -m recipes predict`` / ``Trainer.predict``: class probabilities ``(B, num_classes)`` of a
        batch of images (or of an ``(images, target)`` batch, whose target is not used)."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=-1)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = create_optimizer_v2(self.model, opt=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(total, round(hp.warmup_epochs * _steps_per_epoch(self.trainer))) if hp.warmup_epochs else 0
        schedule = partial(
            warmup_cosine,
            warmup_steps=warmup,
            total_steps=total,
            warmup_start=hp.warmup_lr / hp.lr,
            min_ratio=hp.min_lr / hp.lr,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _check_optimizer(name: str) -> None:
    """``ValueError`` for an optimizer name that :meth:`ImageClassifier.configure_optimizers` cannot build (it
    would fail only once training starts), naming the closest names timm has.

    >>> _check_optimizer("adma")
    Traceback (most recent call last):
    ...
    ValueError: optimizer 'adma' is not a timm optimizer (did you mean ...'adam'?): use a name from ...
    """
    known = list_optimizers()
    parts = str(name).lower().split("_")  # as create_optimizer_v2 reads it: [lookahead_]<name>
    if parts[-1] in known and (len(parts) == 1 or parts[:-1] == ["lookahead"]):
        return
    close = get_close_matches(str(name).lower(), known + [f"lookahead_{k}" for k in known], n=3)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise ValueError(
        f"optimizer {name!r} is not a timm optimizer{hint}: use a name from timm.optim.list_optimizers() (e.g. "
        "'adamw', FasterViT's, or 'lamb'), optionally as 'lookahead_<name>'"
    )


def _steps_per_epoch(trainer: pl.Trainer) -> float:
    """Optimiser steps in one training epoch (after ``limit_train_batches`` and gradient accumulation). The
    warm-up is measured in epochs of these, whether ``max_epochs`` or ``max_steps`` ends the run."""
    batches = trainer.num_training_batches  # set once estimated_stepping_batches has loaded the data ...
    if not math.isfinite(batches):
        trainer.fit_loop.setup_data()  # ... which it skips when max_steps alone ends the run (max_epochs=-1)
        batches = trainer.num_training_batches
    if trainer.limit_train_batches == 0:
        return 0  # no training batches: no steps to warm up
    if not math.isfinite(batches):
        raise ValueError(
            "warmup_epochs needs a training set of known length (this dataloader has no __len__); "
            "set warmup_epochs=0 or use a map-style data set"
        )
    return math.ceil(batches / trainer.accumulate_grad_batches)


def _names_its_model(checkpoint_path) -> bool:
    """Whether the Lightning checkpoint at ``checkpoint_path`` records a model name (``True`` as well where it cannot
    be read cheaply here: a remote path, or hyper-parameters that ``weights_only`` loading refuses, are left to
    Lightning). Memory-mapped, so the weights are not read."""
    if not isinstance(checkpoint_path, (str, os.PathLike)) or not os.path.isfile(checkpoint_path):
        return True
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # not a zip checkpoint, or hyper-parameters of types weights_only refuses
        return True
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    return not isinstance(hparams, dict) or "model" in hparams


def _strip_prefix(state: dict[str, Tensor], model: nn.Module, prefix: str) -> dict[str, Tensor]:
    """Lightning checkpoints of :class:`ImageClassifier` store the weights as ``model.<key>``."""
    if state and all(k.startswith(prefix) or k.startswith(("train_", "val_")) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _warm_start_state(state: dict[str, Tensor], model: nn.Module, new_head: list[str]) -> dict[str, Tensor]:
    """The warm-start checkpoint's tensors for ``model``: Lightning's ``model.`` prefix stripped, and the
    classifier left out (its keys appended to ``new_head``) when it was trained for another number of classes."""
    state = _strip_prefix(state, model, prefix="model.")
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    path = next((name for name, module in model.named_modules() if module is head and name), None)
    if path is None:
        return state
    own = model.state_dict()
    keys = [k for k in own if k.startswith(path + ".")]
    if any(k in state and state[k].shape != own[k].shape for k in keys):
        shapes = {k: tuple(state[k].shape) for k in keys if k in state}
        rank_zero_info(
            f"init_checkpoint: classifier {path} was trained for another number of classes {shapes}; it keeps "
            f"its new init ({getattr(model, 'num_classes', '?')} classes), every other tensor is loaded"
        )
        new_head.extend(keys)
        state = {k: v for k, v in state.items() if k not in keys}
    return state
