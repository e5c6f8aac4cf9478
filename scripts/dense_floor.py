"""How fast each model could run if everything but its GEMMs and convolutions took no time (CPU, one thread).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/dense_floor.py [--rounds 9] [MODEL ...]

For each model (random weights, eval, ``torch.inference_mode``, batch 16, 224 px) the script records the aten
ops of one forward with a ``TorchDispatchMode``, keeps the dense ones (convolutions, linears, matrix products:
``conv2d``, ``linear``, ``matmul``, ``mm``, ``addmm``, ``addmm_``, ``bmm``, ...; under inference mode the mode
sees ``conv2d`` and ``linear`` before they decompose) with copies of their arguments, and then, round after
round, times (a) a whole forward and (b) a replay of those dense ops on their own, one after the other. It prints
the medians and the dense ops' share of the forward, and for the first model (FasterViT-0 by default) the
throughput ratio to each other model that it would reach with zero time outside its dense ops ("floor"), beside
the ratio it reaches now (from the same rounds). Fused attention (SDPA) counts as not dense: its GEMMs are a few
percent of the FLOPs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

DENSE = {"conv2d", "convolution", "linear", "matmul", "mm", "addmm", "addmm_", "bmm", "baddbmm"}
DEFAULT_MODELS = ("faster_vit_0_224", "swin_tiny_patch4_window7_224", "convnext_tiny")


def _clone(a):
    return a.clone(memory_format=torch.preserve_format) if isinstance(a, torch.Tensor) else a


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket.__name__ in DENSE:
            self.ops.append((func, [_clone(a) for a in args], {k: _clone(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def _replay(ops) -> float:
    """Seconds to run ``ops`` one after the other (an in-place op runs on a copy of its target, made beforehand)."""
    calls = [
        (func, [args[0].clone(), *args[1:]] if func.overloadpacket.__name__.endswith("_") else args, kwargs)
        for func, args, kwargs in ops
    ]
    start = time.perf_counter()
    for func, args, kwargs in calls:
        func(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    from hatplug.bench import build_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(16, 3, 224, 224)
    models = {name: build_model(name, 224) for name in args.models}  # outside inference mode, as in hatplug.bench
    dense = {}
    with torch.inference_mode():
        for name, model in models.items():
            model(x)
            rec = _Recorder()
            with rec:
                model(x)
            dense[name] = rec.ops
            _replay(rec.ops)
        full = {n: [] for n in models}
        floor = {n: [] for n in models}
        for r in range(args.rounds):
            for name in list(models)[r % len(models) :] + list(models)[: r % len(models)]:
                start = time.perf_counter()
                models[name](x)
                full[name].append(time.perf_counter() - start)
                floor[name].append(_replay(dense[name]))
    print(f"{'model':32} {'forward ms':>10} {'dense ms':>9} {'dense %':>8} {'dense ops':>9}")
    for name in models:
        f, d = statistics.median(full[name]), statistics.median(floor[name])
        print(f"{name:32} {f * 1e3:10.1f} {d * 1e3:9.1f} {100 * d / f:8.1f} {len(dense[name]):9d}")
    first, *peers = list(models)
    for peer in peers:
        now = statistics.median(p / f for p, f in zip(full[peer], full[first]))
        best = statistics.median(p / d for p, d in zip(full[peer], floor[first]))
        print(f"{first} / {peer}: now {now:.3f}x, floor (dense ops only) {best:.3f}x")


if __name__ == "__main__":
    main()
