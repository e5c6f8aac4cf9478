"""Minor page faults and time of single eval forwards (batch 16, 224 px, one thread) of FasterViT-0, Swin-T and
ConvNeXt-T, with glibc's default malloc settings or (``--raise-thresholds``) with its trim and mmap thresholds
raised through ``mallopt``, a process-wide setting a library must not make: this only measures what it would give.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/page_faults.py
    OMP_NUM_THREADS=1 .venv/bin/python scripts/page_faults.py --raise-thresholds

Prints, per model, the median over ``--forwards`` timed forwards (after two warm-up ones) of the faults and ms.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import time

import timm
import torch

import fastervit

MODELS = ("faster_vit_0_224", "swin_tiny_patch4_window7_224", "convnext_tiny")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raise-thresholds", action="store_true")
    parser.add_argument("--forwards", type=int, default=5)
    args = parser.parse_args()
    if args.raise_thresholds:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 31)
    torch.set_num_threads(1)
    x = torch.randn(16, 3, 224, 224)
    for name in MODELS:
        model = (fastervit.create_model(name) if name.startswith("faster") else timm.create_model(name)).eval()
        faults, ms = [], []
        with torch.inference_mode():
            for _ in range(2):
                model(x)
            for _ in range(args.forwards):
                before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                model(x)
                ms.append(1000 * (time.perf_counter() - start))
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(f"{name}: {statistics.median(faults):.0f} faults, {statistics.median(ms):.0f} ms per forward")


if __name__ == "__main__":
    main()
