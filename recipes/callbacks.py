"""Callbacks the recipes add to every run."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

__all__ = ["LabelledProgressBar", "PredictionWriter", "RNGStateCheckpoint"]


class LabelledProgressBar(TQDMProgressBar):
    """Lightning's progress bar with a label before the epoch, e.g. ``arm 2/9 swin_hat_random | epoch 3/4``.

    The ablation runner gives every arm one, so the bar says which arm and which epoch is running.

    >>> LabelledProgressBar("arm 2/9 swin_hat_random").label
    'arm 2/9 swin_hat_random'
    """

    def __init__(self, label: str, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.label = label

    def describe(self, trainer: pl.Trainer) -> str:
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        return f"{self.label} | epoch {trainer.current_epoch + 1}{epochs}"

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self.describe(trainer))


class RNGStateCheckpoint(pl.Callback):
    """Stores the Python, NumPy, torch (and, once CUDA is in use, CUDA) RNG states in every checkpoint and
    restores them on resume.

    Lightning checkpoints do not hold RNG states, so drop path, dropout and Mixup draw different numbers
    after a resume than in an uninterrupted run. With this callback (and the epoch-seeded shuffling of the
    data modules) a resumed single-process run is identical to an uninterrupted one. Under DDP each rank
    restores rank 0's states.

    >>> cb = RNGStateCheckpoint()
    >>> state = cb.state_dict()
    >>> a, b = torch.rand(1), np.random.rand(); cb.load_state_dict(state)
    >>> bool(torch.rand(1) == a), np.random.rand() == b
    (True, True)
    """

    def state_dict(self) -> dict[str, Any]:
        # plain Python values and tensors only, so that checkpoints stay loadable with weights_only=True
        name, keys, pos, has_gauss, cached = np.random.get_state()
        numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)}
        numpy_state.update(has_gauss=int(has_gauss), cached_gaussian=float(cached))
        state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout / drop path on the GPU
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        s = state_dict["numpy"]
        np.random.set_state(
            (s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"])
        )
        torch.set_rng_state(state_dict["torch"])
        cuda = state_dict.get("cuda")
        if cuda is not None and torch.cuda.is_available():
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
            else:  # e.g. testing a multi-GPU run's checkpoint on one GPU: nothing to repeat exactly
                rank_zero_warn(
                    f"the checkpoint holds the RNG states of {len(cuda)} CUDA devices, this process sees "
                    f"{torch.cuda.device_count()}: CUDA random numbers start afresh (a resumed fit repeats the "
                    "uninterrupted one only with the same CUDA_VISIBLE_DEVICES)"
                )


class PredictionWriter(BasePredictionWriter):
    """Writes what ``predict`` returned to ``<log dir>/predictions.pt``: ``{"predictions": (N, ...) tensor,
    "indices": (N,) sample indices into the predicted data set}`` (one file per process under DDP,
    ``predictions-rank<r>.pt``). The recipes CLI adds it to every run, so ``python -m recipes predict`` keeps
    the class probabilities it computes (LightningCLI itself discards them).

    >>> PredictionWriter().filename(rank=0, world_size=1), PredictionWriter().filename(rank=1, world_size=2)
    ('predictions.pt', 'predictions-rank1.pt')
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    @staticmethod
    def filename(rank: int, world_size: int) -> str:
        return "predictions.pt" if world_size == 1 else f"predictions-rank{rank}.pt"

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence, batch_indices: Sequence
    ) -> None:
        if not predictions:
            return
        if isinstance(predictions[0], list):  # several predict dataloaders: not what the recipes make
            raise ValueError("PredictionWriter writes one predict dataloader's outputs; got several")
        indices = _flatten(batch_indices)  # Lightning nests them per dataloader, then per batch
        out = Path(trainer.log_dir or trainer.default_root_dir) / self.filename(trainer.global_rank, trainer.world_size)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"predictions": torch.cat([p.cpu() for p in predictions]), "indices": torch.tensor(indices)}, out)
        rank_zero_info(f"predictions written to {out}")


def _flatten(nested: Any) -> list[int]:
    if isinstance(nested, (list, tuple)):
        return [i for item in nested for i in _flatten(item)]
    return [int(nested)]
