"""What the ablation runner measures on the machine it runs on: parameters, FLOPs and throughput.

>>> from recipes.models import TINY_FASTERVIT, create_model
>>> model = create_model("faster_vit_0_any_res", img_size=64, num_classes=2, **TINY_FASTERVIT)
>>> gflops(model, 64) > 0, count_params(model) > 0
(True, True)
>>> throughput(model, 64, batch_size=2, warmup=1, iters=1, train=True) > 0
True
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "gflops", "throughput"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once).

    >>> linear = nn.Linear(3, 2)  # 3 x 2 weights + 2 biases
    >>> count_params(linear), count_params(nn.Sequential(linear, nn.ReLU(), linear))
    (8, 8)
    """
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


def gflops(model: nn.Module, image_size: int | tuple[int, int], device: str | torch.device = "cpu") -> float:
    """GFLOPs of one forward pass on one image (``torch.utils.flop_counter``: a multiply-add counts 2).

    >>> conv = nn.Conv2d(3, 8, 3, padding=1)  # 8 x 8 outputs x 8 channels x 27 multiply-adds each
    >>> round(gflops(conv, 8) * 1e9), round(gflops(conv, (8, 16)) * 1e9)
    (27648, 55296)
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    model = copy.deepcopy(model).to(device).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, h, w, device=device, dtype=_input_dtype(model)))
    return counter.get_total_flops() / 1e9


def throughput(
    model: nn.Module,
    image_size: int | tuple[int, int],
    batch_size: int,
    warmup: int = 3,
    iters: int = 10,
    train: bool = False,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> float:
    """Images per second of inference (``train=False``) or of a full training step (forward, backward, AdamW).

    Runs on a copy of ``model`` with random images: ``warmup`` untimed iterations, then ``iters`` timed
    ones, synchronising the device around the timed loop. ``amp_dtype`` enables autocast.

    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))  # for 8 x 8 images
    >>> rates = [throughput(model, 8, batch_size=2, warmup=1, iters=2, train=t) for t in (False, True)]
    >>> [type(r).__name__ for r in rates], all(r > 0 for r in rates)  # images / s vary from run to run
    (['float', 'float'], True)
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    device = torch.device(device)
    model = copy.deepcopy(model).to(device).train(train)
    images = torch.randn(batch_size, 3, h, w, device=device, dtype=_input_dtype(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6) if train else None

    def step() -> None:
        if train:
            with _autocast(device, amp_dtype):
                loss = model(images).float().logsumexp(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.inference_mode(), _autocast(device, amp_dtype):
                model(images)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return batch_size * iters / (time.perf_counter() - start)


def _input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of random input images: that of the model's floating-point weights (a model trained with
    ``precision="bf16-true"`` holds bfloat16 weights and refuses float32 images), float32 for a model without."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
