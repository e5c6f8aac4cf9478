"""Tiny configs shared by the recipes tests."""

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import yaml

from recipes.ablate import deep_merge

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "recipes" / "configs" / "synthetic_fastervit.yaml"

TINY = {
    "seed_everything": 7,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 3,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_top_k": -1, "save_last": True},
            }
        ],
    },
    "model": {
        "model_kwargs": {
            "img_size": 64,
            "dim": 16,
            "in_dim": 16,
            "depths": [1, 1, 2, 1],
            "num_heads": [1, 2, 2, 4],
            "window_size": [4, 4, 2, 2],
            "drop_path_rate": 0.2,  # stochastic layers: resuming must restore the RNG too
        },
        "warmup_epochs": 1,
    },
    "data": {
        "init_args": {
            "image_size": 64,
            "train_samples": 48,
            "val_samples": 16,
            "batch_size": 16,
            "num_workers": 0,
            "distractors": 1,
        }
    },
}


def tiny_config(tmp_path: Path, name: str = "tiny", **overrides) -> Path:
    """Write the synthetic FasterViT config shrunk to seconds on CPU, logging under ``tmp_path/name``."""
    config = deep_merge(yaml.safe_load(BASE.read_text()), TINY)
    run_dir = tmp_path / name
    config["trainer"]["default_root_dir"] = str(run_dir)
    config["trainer"]["logger"] = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": ""}},
        {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(run_dir), "name": "tb"},
        },
    ]
    config = deep_merge(config, overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_recipes(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m recipes ...`` in a subprocess with one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "recipes", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


class CrashAtEpoch(pl.Callback):
    """Raises at the start of epoch ``epoch``: an interrupted run, for the resume test."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"simulated crash at the start of epoch {self.epoch}")
