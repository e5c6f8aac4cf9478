"""Minor page faults per eval forward (batch 16, 224 px, fp32, one thread), each model in fresh processes.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/page_faults.py [--processes 3] [MODEL ...]

A minor fault is the kernel mapping a fresh page on first touch: memory that glibc took from the system for an
allocation (``mmap`` above its threshold, or heap growth after it trimmed the heap top). Each process builds the
model (random weights), runs two warm-up forwards and prints the faults of each of the next five forwards
(``getrusage``), so the spread between processes shows (the heap's layout differs from process to process).
Last, what a fault costs here: the median time to fill a fresh 53 MB buffer (13.3k new pages) against the same
fill of a reused one.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

DEFAULT_MODELS = ("faster_vit_0_224", "swin_tiny_patch4_window7_224", "convnext_tiny")


def _child(name: str) -> None:
    import timm
    import torch

    import fastervit  # noqa: F401  (registers the FasterViT names with timm)

    torch.set_num_threads(1)
    model = timm.create_model(name).eval()
    x = torch.randn(16, 3, 224, 224)
    faults = []
    with torch.inference_mode():
        model(x), model(x)
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            model(x)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(" ".join(str(f) for f in faults))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per model")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child)
    print("| model | process | minor faults per forward (5 forwards) |\n|:---|---:|:---|")
    for name in args.models:
        for p in range(args.processes):
            out = subprocess.run(
                [sys.executable, __file__, "--child", name], capture_output=True, text=True, check=True
            ).stdout.strip()
            print(f"| {name} | {p + 1} | {out} |")
    _fault_cost()


def _fault_cost(numel: int = 13_300 * 1024, repeats: int = 11) -> None:
    import torch

    torch.set_num_threads(1)
    reused, fresh_times, reused_times = torch.empty(numel), [], []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.empty(numel).fill_(0.0)  # above glibc's mmap threshold: fresh pages every time
        fresh_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        reused.fill_(0.0)
        reused_times.append(time.perf_counter() - start)
    fresh, kept = sorted(fresh_times)[repeats // 2] * 1e3, sorted(reused_times)[repeats // 2] * 1e3
    print(f"\nfill of a fresh {numel * 4 / 1e6:.0f} MB buffer: {fresh:.2f} ms, of a reused one: {kept:.2f} ms")


if __name__ == "__main__":
    main()
