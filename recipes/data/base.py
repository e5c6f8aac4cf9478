"""What every data module of the recipes shares: the missing-data error, epoch-seeded shuffling, and Mixup/CutMix."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import lightning.pytorch as pl
import torch
from timm.data import Mixup
from torch import Tensor
from torch.utils.data import RandomSampler

__all__ = ["DatasetNotFoundError", "EpochShuffleSampler", "MixupDataModule"]


class DatasetNotFoundError(FileNotFoundError):
    """A real data set is not on disk; the message says what to download and where to put it."""


class EpochShuffleSampler(RandomSampler):
    """A shuffle whose order is a function of ``(seed, epoch)`` only, not of the global RNG.

    Lightning calls :meth:`set_epoch` before every epoch, so a run resumed from a checkpoint sees the same
    batches as an uninterrupted one. It is a :class:`~torch.utils.data.RandomSampler`, so under DDP Lightning
    replaces it with a ``DistributedSampler`` (seeded by ``seed_everything``), as for ``shuffle=True``.

    >>> s = EpochShuffleSampler(range(5), seed=1)
    >>> s.set_epoch(3)
    >>> list(s) == list(s) and sorted(s) == [0, 1, 2, 3, 4]
    True
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class MixupDataModule(pl.LightningDataModule):
    """A data module whose training batches can go through timm's Mixup/CutMix after reaching the device.

    Targets of mixed batches are soft ``(B, num_classes)`` rows; the LightningModule then switches to a
    soft-target cross-entropy (and applies its label smoothing to them). Validation batches are never mixed.

    Args:
        mixup: Mixup alpha (0 disables Mixup).
        cutmix: CutMix alpha (0 disables CutMix).
        mixup_prob: probability of mixing a batch.
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on.
    """

    def __init__(
        self, mixup: float = 0.0, cutmix: float = 0.0, mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5
    ) -> None:
        super().__init__()
        self.mixup, self.cutmix, self.mixup_prob, self.mixup_switch_prob = mixup, cutmix, mixup_prob, mixup_switch_prob
        self._mixup_fn: Mixup | None = None

    @property
    def num_classes(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def mixup_fn(self) -> Mixup | None:
        if self._mixup_fn is None and (self.mixup > 0 or self.cutmix > 0):
            self._mixup_fn = Mixup(
                mixup_alpha=self.mixup,
                cutmix_alpha=self.cutmix,
                prob=self.mixup_prob,
                switch_prob=self.mixup_switch_prob,
                label_smoothing=0.0,  # the LightningModule smooths every target, mixed or not
                num_classes=self.num_classes,
            )
        return self._mixup_fn

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        if self.mixup_fn is not None and self.trainer is not None and self.trainer.training:
            return self.mixup_fn(*batch)
        return batch
