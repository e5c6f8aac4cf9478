"""What every data module of the recipes shares: the missing-data error, epoch-seeded shuffling, and Mixup/CutMix."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sized
from functools import partial

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from PIL import ImageOps
from timm.data import Mixup
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

__all__ = [
    "DatasetNotFoundError",
    "EpochShuffleSampler",
    "MixupDataModule",
    "RecipeDataModule",
    "SeededSamples",
    "eval_loader",
    "train_loader",
    "with_safe_posterize",
]


class DatasetNotFoundError(FileNotFoundError):
    """A real data set is not on disk; the message says what to download and where to put it.

    Raised by a data module's ``setup`` (nothing is downloaded); it is a :class:`FileNotFoundError`.

    >>> from recipes.data import CIFARDataModule
    >>> try:
    ...     CIFARDataModule("/no/such/folder").setup()
    ... except DatasetNotFoundError as error:
    ...     print(isinstance(error, FileNotFoundError), str(error).split(" (")[0])
    True CIFAR10 not found: expected /no/such/folder/cifar-10-batches-py
    """


def check_int(name: str, value: object, least: int, why: str = "") -> None:
    """``ValueError`` naming the argument, its valid range and the value given, unless ``value`` is an integer
    of at least ``least``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        reason = f" ({why})" if why else ""
        raise ValueError(f"{name} must be an integer >= {least}{reason}, got {value!r}")


def check_seed(seed: object) -> None:
    """``data.seed`` must be an integer >= 0 (NumPy's seeding refuses negative ones, which otherwise failed only at
    the first training batch, with nothing naming the option)."""
    check_int("data.seed", seed, 0, "it seeds the shuffle and the augmentation")


def _epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """The seed of one random stream of an epoch: 0 the shuffle, 1 the training loader processes, 2 the
    evaluation loader processes."""
    return seed * 1_000_003 + epoch + stream * 2**48


def _sample_seed(seed: int, epoch: int, index: int) -> np.ndarray:
    """Two 32-bit words seeding the random augmentation of sample ``index`` in ``epoch``."""
    return np.random.SeedSequence([seed % 2**64, epoch, index]).generate_state(2)


class SeededSamples(Dataset):
    """A training set whose every sample is drawn with the Python, NumPy and torch RNGs seeded from
    ``(seed, epoch, index)``, and those RNGs left as they were afterwards.

    Random augmentation (timm's crops, flips, RandAugment, random erasing) is then a function of the sample
    and the epoch alone: the same for any ``num_workers``, whichever loader process draws the sample, and the
    same in a run resumed inside an epoch as in the uninterrupted run. The training loader sets ``epoch``
    before each pass.

    >>> class Draws(Dataset):  # stands in for a data set with random augmentation
    ...     def __len__(self):
    ...         return 3
    ...     def __getitem__(self, index):
    ...         return torch.rand(1).item()
    >>> data = SeededSamples(Draws(), seed=0)
    >>> first = [data[i] for i in range(3)]
    >>> first == [data[i] for i in (0, 1, 2)] and len(set(first)) == 3
    True
    >>> data.epoch = 1
    >>> [data[i] for i in range(3)] != first
    True
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self._length = len(dataset)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list:
        """The samples of one batch (what DataLoader asks for): the caller's RNG states are saved and put back
        once per batch, as that is what costs (about 0.2 ms); seeding costs about 0.04 ms a sample."""
        with torch.random.fork_rng(devices=[]):  # the caller's torch RNG (dropout's, with num_workers=0) is kept
            python_state, numpy_state = random.getstate(), np.random.get_state()
            try:
                return [self._draw(index) for index in indices]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)

    def _draw(self, index: int):
        words = _sample_seed(self.seed, self.epoch, index)
        key = int(words[0]) << 32 | int(words[1])
        random.seed(key)
        np.random.seed(words)
        torch.default_generator.manual_seed(key)  # the CPU generator only: torch.manual_seed also visits CUDA
        return self.dataset[index]


def _warn_epoch_restarts(epoch: int) -> None:
    rank_zero_warn(
        f"resuming inside epoch {epoch} under a distributed strategy: Lightning's DistributedSampler starts the "
        "epoch again from its first batch; resume from an end-of-epoch checkpoint to repeat the uninterrupted run",
        category=PossibleUserWarning,
    )


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
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, samples_done: int) -> None:
        """Make the next pass over ``epoch`` (if the next pass is that epoch) leave out its first
        ``samples_done`` indices, which a run interrupted inside that epoch had trained on already."""
        self._resume = (epoch, samples_done)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None  # one pass only
        yield from order[skip:]


class _Deferred:
    """An iterator made on the first ``next()``; see :class:`_EpochLoader`."""

    def __init__(self, make: Callable[[], Iterator]) -> None:
        self._make, self._iterator = make, None

    def __iter__(self) -> _Deferred:
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._make()
        return next(self._iterator)


class _EpochLoader(DataLoader):
    """The training DataLoader: deferred iterators, loader-process seeds per epoch, and a resume point inside
    an epoch.

    Lightning makes the training iterator of a fit's first epoch (and of the first epoch after a resume)
    before it calls the sampler's ``set_epoch``, and a multi-process iterator draws its loader-process seeds
    and prefetches indices as soon as it exists, so that epoch would get the seeds and order of the epoch
    set before. Deferred to the first batch asked for, both follow the epoch Lightning sets: the ``generator``
    that seeds the loader processes is reseeded from ``(epoch_seed, sampler.epoch)`` then, and a
    :class:`SeededSamples` data set gets ``sampler.epoch``, whichever sampler Lightning put in
    (``EpochShuffleSampler``, or a ``DistributedSampler`` under DDP).

    :meth:`position` is the epoch and how many of its batches training has run (``progress``; 0 once the
    epoch is complete); :meth:`resume` makes the next pass over that epoch start after them, so
    that a run resumed from a checkpoint written inside an epoch sees the batches the uninterrupted run saw
    next. ``epoch_seed`` and ``progress`` are constructor arguments so that they survive Lightning's
    re-instantiation of the loader with another sampler.
    """

    def __init__(self, *args, epoch_seed: int = 0, progress: Callable[[], int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_seed, self.progress = epoch_seed, progress

    def __iter__(self) -> Iterator:
        return _Deferred(self._start)

    def _start(self) -> Iterator:
        epoch = int(getattr(self.sampler, "epoch", 0))
        if self.generator is not None:
            self.generator.manual_seed(_epoch_seed(self.epoch_seed, epoch, stream=1))
        if isinstance(self.dataset, SeededSamples):
            self.dataset.epoch = epoch  # before the loader processes copy it
        return super().__iter__()

    # not state_dict / load_state_dict: Lightning would checkpoint and restore the loader itself too, a
    # second copy of the position the data module saves (RecipeDataModule.state_dict)
    def position(self) -> dict[str, int]:
        if self.progress is None or not hasattr(self.sampler, "epoch"):
            return {}
        return {"epoch": int(self.sampler.epoch), "batches": int(self.progress())}

    def resume(self, state: dict[str, int]) -> None:
        if state and state.get("batches") and isinstance(self.sampler, EpochShuffleSampler):
            self.sampler.resume_at(state["epoch"], state["batches"] * self.batch_size)


class RecipeDataModule(pl.LightningDataModule):
    """What every recipe data module shares: the loaders of the ``train_set`` and ``val_set`` that its
    ``setup`` makes, the held-out split as the test and predict data, and, in a checkpoint, where its
    training loader stood in the epoch.

    Lightning restores a data module's state before it asks for the loaders (it restores the loaders' own
    state only when they are made after the restore, which ``estimated_stepping_batches`` in
    ``configure_optimizers`` prevents), so the resume point travels here and :func:`train_loader` hands it
    to the new loader of a fit that resumes from a checkpoint.

    A subclass gives ``num_classes``, ``batch_size``, ``num_workers`` and ``seed`` and makes the two sets in
    ``setup``:

    >>> from torch.utils.data import TensorDataset
    >>> class Tiny(RecipeDataModule):
    ...     num_classes, batch_size, num_workers, seed = 2, 2, 0, 0
    ...     def setup(self, stage=None):
    ...         self.train_set = self.val_set = TensorDataset(torch.randn(5, 3, 8, 8), torch.arange(5) % 2)
    >>> dm = Tiny()
    >>> dm.setup("fit")
    >>> len(dm.train_dataloader()), len(dm.val_dataloader())  # whole training batches only; every sample evaluated
    (2, 3)
    >>> images, target = next(iter(dm.test_dataloader()))
    >>> images.shape, target.tolist()
    (torch.Size([2, 3, 8, 8]), [0, 1])
    """

    def train_dataloader(self) -> DataLoader:
        """``train_set`` in whole, shuffled batches (:func:`train_loader`), pinned when CUDA is present."""
        return train_loader(self, self.train_set, pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        """``val_set`` in order (:func:`eval_loader`), pinned when CUDA is present."""
        return eval_loader(self, self.val_set, pin_memory=torch.cuda.is_available())

    def test_dataloader(self) -> DataLoader:
        """The labelled held-out split (validation: the data sets here have no other labelled split)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The held-out split's ``(images, target)`` batches; ``predict_step`` returns class probabilities."""
        return self.val_dataloader()

    def state_dict(self) -> dict:
        trainer = self.trainer
        loader = trainer.train_dataloader if trainer is not None else None  # the one in use (DDP: rebuilt)
        state = loader.position() if isinstance(loader, _EpochLoader) else {}
        return {"train_loader": state} if state else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending_train_state = state_dict.get("train_loader") or None


def _batches_done(datamodule: pl.LightningDataModule) -> int:
    """Training batches of the current epoch that the trainer has run (those a checkpoint written now covers);
    0 once the epoch is complete, as there is then nothing of it to leave out."""
    trainer = datamodule.trainer
    if trainer is None:
        return 0
    done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
    return 0 if done >= trainer.num_training_batches else done


class MixupDataModule(RecipeDataModule):
    """A data module whose training batches can go through timm's Mixup/CutMix after reaching the device.

    Targets of mixed batches are soft ``(B, num_classes)`` rows; the LightningModule then switches to a
    soft-target cross-entropy (and applies its label smoothing to them). Validation batches are never mixed.

    Args:
        mixup: Mixup alpha (0 disables Mixup).
        cutmix: CutMix alpha (0 disables CutMix).
        mixup_prob: probability of mixing a batch.
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on.

    A subclass gives ``num_classes`` (and, as a :class:`RecipeDataModule`, its sets and loader settings):

    >>> class TinyMix(MixupDataModule):
    ...     num_classes = 3
    >>> images, target = TinyMix(mixup=0.8, cutmix=1.0).mixup_fn(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    >>> images.shape, target.shape, target.sum(-1).allclose(torch.ones(4))  # soft targets, one row per image
    (torch.Size([4, 3, 8, 8]), torch.Size([4, 3]), True)
    >>> TinyMix().mixup_fn is None  # mixup=0 and cutmix=0 (the defaults): batches are left alone
    True
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


def _posterize(img, bits_to_keep: int, **_):
    """timm's RandAugment posterize, for Pillow versions that refuse 0 bits (Pillow 13 does): at the top
    magnitude the increasing-level op keeps 0 bits, which older Pillow turned into a black image and newer
    Pillow turns into a ``ValueError`` that ends training. 0 bits give the black image again."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def with_safe_posterize(transform):
    """``transform`` (timm's ``create_transform``) with the posterize ops of its RandAugment / AutoAugment
    replaced by :func:`_posterize`, in this transform only (timm's op table is left alone).

    >>> from PIL import Image
    >>> from timm.data import create_transform
    >>> transform = with_safe_posterize(create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1"))
    >>> [op.name for step in transform.transforms for op in getattr(step, "ops", ()) if op.aug_fn is _posterize]
    ['PosterizeIncreasing']
    >>> transform(Image.new("RGB", (40, 40))).shape
    torch.Size([3, 32, 32])
    """
    for step in getattr(transform, "transforms", ()):
        for op in getattr(step, "ops", ()):
            if str(getattr(op, "name", "")).startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def train_loader(datamodule: pl.LightningDataModule, dataset: Sized, pin_memory: bool = False) -> DataLoader:
    """The training loader of every recipe data module (``batch_size``, ``num_workers`` and ``seed`` are
    attributes of each): whole batches only, in an order that is a function of ``(seed, epoch)`` and with
    each sample's augmentation a function of ``(seed, epoch, index)`` (:class:`SeededSamples`), so the
    batches do not depend on ``num_workers`` and a run resumed from a checkpoint, at the end of an epoch or
    inside one, repeats the uninterrupted one. Loader processes start afresh every epoch (not persistent).

    >>> from torch.utils.data import TensorDataset
    >>> dm = pl.LightningDataModule()
    >>> dm.batch_size, dm.num_workers, dm.seed = 4, 0, 0
    >>> data = TensorDataset(torch.arange(10))
    >>> loader = train_loader(dm, data)
    >>> len(loader)  # whole batches only: 10 samples make 2 batches of 4
    2
    >>> first = [batch.tolist() for (batch,) in loader]
    >>> first == [batch.tolist() for (batch,) in loader], len(set(sum(first, [])))  # same seed and epoch: same order
    (True, 8)
    """
    world = getattr(datamodule.trainer, "world_size", 1) if datamodule.trainer is not None else 1
    if len(dataset) < datamodule.batch_size * world:
        raise ValueError(
            f"the training split has {len(dataset)} samples, fewer than one batch of {datamodule.batch_size}"
            + (f" on each of {world} processes" if world > 1 else "")
            + ": training keeps whole batches only (drop_last), so not one step would run. Lower "
            "data.batch_size or use more training data."
        )
    if getattr(datamodule, "mixup_fn", None) is not None and datamodule.batch_size % 2:
        raise ValueError(
            f"Mixup/CutMix pairs each image with another of its batch and needs an even batch size, got "
            f"data.batch_size={datamodule.batch_size}; make it even or set data.mixup=0 and data.cutmix=0"
        )
    loader = _EpochLoader(
        SeededSamples(dataset, seed=datamodule.seed),
        batch_size=datamodule.batch_size,
        sampler=EpochShuffleSampler(dataset, seed=datamodule.seed),
        num_workers=datamodule.num_workers,
        drop_last=True,
        pin_memory=pin_memory,
        generator=torch.Generator(),
        epoch_seed=datamodule.seed,
        progress=partial(_batches_done, datamodule),
    )
    pending, datamodule._pending_train_state = getattr(datamodule, "_pending_train_state", None), None
    trainer = datamodule.trainer
    if pending and trainer is not None and trainer.state.fn == "fit" and trainer.ckpt_path:  # resuming a fit
        if world > 1 and pending.get("batches"):
            _warn_epoch_restarts(pending["epoch"])  # Lightning swaps this loader's sampler for its own
        else:
            loader.resume(pending)
    return loader


def eval_loader(datamodule: pl.LightningDataModule, dataset: Sized, pin_memory: bool = False) -> DataLoader:
    """The validation / test / predict loader: in order, every sample, and loader-process seeds from its own
    generator, so that evaluating never draws from the global RNG (which training's dropout uses).

    Under a distributed strategy each process evaluates every ``world_size``-th sample
    (Lightning's ``UnrepeatedDistributedSampler``), so each sample is counted exactly once. Lightning's own
    ``DistributedSampler``, which it would put in otherwise, repeats samples to give every process as many, and
    those repeats were counted in the metrics. The processes' metrics are summed over samples when synced
    (torchmetrics states, ``sync_dist`` means weighted by batch size), so the result is the single-process one.

    >>> from torch.utils.data import TensorDataset
    >>> dm = pl.LightningDataModule()
    >>> dm.batch_size, dm.num_workers, dm.seed = 4, 0, 0
    >>> [batch.tolist() for (batch,) in eval_loader(dm, TensorDataset(torch.arange(10)))]
    [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    """
    sampler = _eval_sampler(datamodule.trainer, dataset)
    return DataLoader(
        dataset,
        batch_size=datamodule.batch_size,
        num_workers=datamodule.num_workers,
        pin_memory=pin_memory,
        sampler=sampler,
        generator=torch.Generator().manual_seed(_epoch_seed(datamodule.seed, 0, stream=2)),
    )


def _eval_sampler(trainer: pl.Trainer | None, dataset: Sized) -> UnrepeatedDistributedSampler | None:
    """Every ``world_size``-th sample for this process where Lightning would put in its padding
    ``DistributedSampler`` under a DDP strategy (with ``use_distributed_sampler``), else ``None`` (in order, or
    Lightning's sampler: FSDP and DeepSpeed need the same number of batches on every process)."""
    world = getattr(trainer, "world_size", 1) if trainer is not None else 1
    connector = getattr(trainer, "_accelerator_connector", None)
    if world <= 1 or not getattr(connector, "use_distributed_sampler", True):
        return None
    if not isinstance(getattr(trainer, "strategy", None), DDPStrategy):
        # FSDP / DeepSpeed stage 3 gather parameters in every forward: processes with different numbers of
        # batches would wait for each other forever. Lightning's padding sampler, repeats and all.
        return None
    if len(dataset) < world:
        # a process without a sample would run no step, and the others would wait for it at the first sync
        raise ValueError(
            f"the evaluation split has {len(dataset)} samples, fewer than the {world} processes evaluating it, so "
            "one would get none; evaluate on fewer devices (Trainer(devices=...)) or use more samples"
        )
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=trainer.global_rank, shuffle=False)
