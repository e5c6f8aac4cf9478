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
from functools import partial

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

import hatplug
from hatplug.checkpoint import load_checkpoint

from .models import create_model

__all__ = ["ImageClassifier", "convert_model", "warmup_cosine"]


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

    Looked up when called, so a converter installed after import (or a test double) is used.
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


class ImageClassifier(pl.LightningModule):
    """Image classification with any timm / FasterViT / recipe model.

    Args:
        model: a model name (see :func:`recipes.models.create_model`) or a ready ``nn.Module``.
        model_kwargs: builder arguments when ``model`` is a name (``img_size``, ``window_size`` ...).
        num_classes: classifier outputs; the CLI links it from the data module.
        convert: if given, ``hatplug.convert(model, **convert)`` runs after building (and warm-starting).
        init_checkpoint: weights loaded into the built model before conversion (a warm start): a plain state
            dict, an official checkpoint, or a Lightning checkpoint of this module.
        label_smoothing: applied to every target, hard or (after Mixup/CutMix) soft.
        optimizer: ``"adamw"`` or ``"lamb"`` (timm's implementations; no weight decay on norms, biases and
            the model's ``no_weight_decay()``).
        lr: peak learning rate.
        weight_decay: decoupled weight decay.
        warmup_epochs: linear warm-up length (fractions allowed), from ``warmup_lr``.
        warmup_lr: learning rate at step 0.
        min_lr: learning rate at the end of the cosine decay.

    Gradient clipping and mixed precision are Trainer settings (``gradient_clip_val``, ``precision``).
    """

    def __init__(
        self,
        model: str | nn.Module = "faster_vit_0_any_res",
        model_kwargs: dict | None = None,
        num_classes: int | None = None,
        convert: dict | None = None,
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
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        if isinstance(model, nn.Module):
            self.model = model
        else:
            kwargs = dict(model_kwargs or {})
            if num_classes is not None:
                kwargs["num_classes"] = num_classes
            self.model = create_model(model, **kwargs)
        if init_checkpoint is not None:
            strip = partial(_strip_prefix, prefix="model.")
            load_checkpoint(self.model, init_checkpoint, strict=True, filter_fn=strip)
        if convert is not None:
            self.model = convert_model(self.model, convert)
        num_classes = num_classes or getattr(self.model, "num_classes", None)
        if not num_classes:
            raise ValueError("num_classes is unknown: pass num_classes (the CLI links it from the data module)")
        self.num_classes = num_classes
        self.train_top1 = MulticlassAccuracy(num_classes, top_k=1)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1)
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes))

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

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, target = batch
        logits = self(images)
        self.val_top1(logits, target)
        self.val_top5(logits, target)
        self.log("val/loss", F.cross_entropy(logits, target), on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/top1", self.val_top1, on_epoch=True, prog_bar=True)
        self.log("val/top5", self.val_top5, on_epoch=True)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = create_optimizer_v2(self.model, opt=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup_epochs * total / max(1, self.trainer.max_epochs or 1))
        schedule = partial(
            warmup_cosine,
            warmup_steps=warmup,
            total_steps=total,
            warmup_start=hp.warmup_lr / hp.lr,
            min_ratio=hp.min_lr / hp.lr,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _strip_prefix(state: dict[str, Tensor], model: nn.Module, prefix: str) -> dict[str, Tensor]:
    """Lightning checkpoints of :class:`ImageClassifier` store the weights as ``model.<key>``."""
    if state and all(k.startswith(prefix) or k.startswith(("train_", "val_")) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state
