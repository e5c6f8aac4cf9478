"""CIFAR-10 / CIFAR-100 from a local copy (torchvision's layout); nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

from timm.data import create_transform
from torchvision.datasets import CIFAR10, CIFAR100

from .base import DatasetNotFoundError, MixupDataModule, check_seed, with_safe_posterize

__all__ = ["CIFARDataModule"]

_VARIANTS = {"cifar10": (CIFAR10, 10), "cifar100": (CIFAR100, 100)}
_MEAN, _STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CIFARDataModule(MixupDataModule):
    """CIFAR-10/100 with timm transforms, read with ``torchvision.datasets.CIFAR*(download=False)``.

    Args:
        root: folder that holds ``cifar-10-batches-py/`` (or ``cifar-100-python/``), as torchvision unpacks it.
        variant: ``"cifar10"`` or ``"cifar100"``.
        image_size: images are resized to this (32 keeps them as they are).
        batch_size, num_workers: loader settings.
        auto_augment: timm auto-augment string for training, or ``None``.
        re_prob: random-erasing probability.
        mixup, cutmix, mixup_prob, mixup_switch_prob: see :class:`~recipes.data.base.MixupDataModule`.
        seed: shuffling seed.

    >>> CIFARDataModule("/no/such/folder").setup()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    recipes.data.base.DatasetNotFoundError: CIFAR10 not found: expected /no/such/folder/cifar-10-batches-py ...
    """

    def __init__(
        self,
        root: str | os.PathLike = "data",
        variant: str = "cifar10",
        image_size: int = 32,
        batch_size: int = 128,
        num_workers: int = 0,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__(mixup, cutmix, mixup_prob, mixup_switch_prob)
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {sorted(_VARIANTS)}, got {variant!r}")
        self.root, self.variant, self.image_size = Path(root), variant, image_size
        check_seed(seed)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.auto_augment, self.re_prob = auto_augment, re_prob
        self.train_set = self.val_set = None

    @property
    def num_classes(self) -> int:
        return _VARIANTS[self.variant][1]

    def setup(self, stage: str | None = None) -> None:
        cls = _VARIANTS[self.variant][0]
        folder = self.root / cls.base_folder
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"{cls.__name__} not found: expected {folder} (the python version of the data set). Download "
                f"{cls.url} and unpack it into {self.root}, e.g. `tar -xzf {cls.filename} -C {self.root}`."
            )
        train_tf = with_safe_posterize(create_transform(
            self.image_size, is_training=True, scale=(0.5, 1.0), auto_augment=self.auto_augment,
            re_prob=self.re_prob, re_mode="pixel", interpolation="bicubic", mean=_MEAN, std=_STD,
        ))  # fmt: skip
        val_tf = create_transform(
            self.image_size, is_training=False, crop_pct=1.0, interpolation="bicubic", mean=_MEAN, std=_STD
        )
        self.train_set = cls(str(self.root), train=True, transform=train_tf, download=False)
        self.val_set = cls(str(self.root), train=False, transform=val_tf, download=False)
