"""Tiny models of every supported family, built so that each keeps the paths a conversion touches:
several windows (with padding where the map is not a multiple of the window), shifted windows, a stage
that is a single window (skipped), and more than one converted block per stage."""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
from torch import nn

import hatplug  # noqa: F401  (registers hatplug's EdgeViT with timm)

from ..conftest import randomize_


@dataclass(frozen=True)
class Family:
    name: str
    make: Callable[[int], nn.Module]  # input size -> a fresh model for that size
    sizes: tuple[int, int]  # two input sizes the converted model must run at
    converted: int  # blocks converted at sizes[0]
    skipped: int


def _swin(size: int, window_size: int = 4, **kw) -> nn.Module:
    return timm.create_model(
        "swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2, 2, 1), num_heads=(1, 2, 2, 4),
        window_size=window_size, img_size=size, num_classes=10, **kw,
    )  # fmt: skip


def _swinv2(size: int, **kw) -> nn.Module:
    return timm.create_model(
        "swinv2_tiny_window8_256", embed_dim=16, depths=(2, 2, 2, 1), num_heads=(1, 2, 2, 4), window_size=4,
        img_size=size, num_classes=10, **kw,
    )  # fmt: skip


def _twins(size: int, **kw) -> nn.Module:
    # Twins accepts any size divisible by 32; img_size sets what the adapter checks for single windows
    return timm.create_model(
        "twins_svt_small", embed_dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), img_size=size,
        num_classes=10, **kw,
    )  # fmt: skip


def _edgevit(size: int, **kw) -> nn.Module:
    # size-agnostic; single windows are judged at its pretrained_cfg input size (224)
    return timm.create_model("edgevit_xxs", num_classes=10, **kw)


FAMILIES = {
    # 64 px: stage maps 16 / 8 / 4 / 2 -> 4x4 and 2x2 windows, then single windows
    "swin": Family("swin", _swin, (64, 96), converted=4, skipped=3),
    "swinv2": Family("swinv2", _swinv2, (64, 96), converted=4, skipped=3),
    # 128 px: LSA maps 32 / 16 / 8 / 4 with 7x7 windows -> 5x5, 3x3, 2x2 (padded), single
    "twins": Family("twins", _twins, (128, 160), converted=3, skipped=1),
    # 224 px config: maps 56 / 28 / 14 / 7 with 7x7 windows -> 8x8, 4x4, 2x2, single; run at 128 and 160
    "edgevit": Family("edgevit", _edgevit, (128, 160), converted=5, skipped=2),
}


def make_model(family: Family, size: int, seed: int = 0) -> nn.Module:
    """An eval-mode model of ``family`` for ``size`` with non-trivial weights (as a trained one would have)."""
    torch.manual_seed(seed)
    return randomize_(family.make(size), seed=seed + 1).eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def new_parameters(converted: nn.Module, original: nn.Module) -> dict[str, nn.Parameter]:
    keys = set(original.state_dict())
    return {n: p for n, p in converted.named_parameters() if n not in keys}


def open_gates(model: nn.Module, value: float = 0.5) -> nn.Module:
    """Set every gate and propagation scale to ``value`` (plus noise), so all new parts matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("hat_gate", "propagation_scale")):
                p.copy_(value + 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine threads that wait for each
    other made them 10-50x slower (EdgeViT-XXS at 128 px: 3.4 s per forward with 2 threads, 0.07 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=list(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]
