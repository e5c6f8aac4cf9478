"""The HAT linears of FasterViT-0 at batch 16 (``op_rates.GEMMS``: stage 3, 3392 rows; stage 4, 784 rows) through
other kernels than ``F.linear``: a bare ``mm`` (no bias), MKL's packed weights, oneDNN's linear (plain and with a
reordered weight) and a 1x1 channels-last oneDNN conv (over the rows as one image, or as 16). Interleaved medians
on the same tensors, one thread; prints each kernel's time relative to ``F.linear`` and its largest difference
from it (BENCHMARKS.md 1.1h).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/linear_kernels.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from op_rates import GEMMS, _median_seconds  # this folder is on sys.path when the script runs


def kernels(m: int, k: int, n: int) -> dict:
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
    reordered = torch.ops.mkldnn._reorder_linear_weight(w, m)
    w1x1 = w.view(n, k, 1, 1).contiguous(memory_format=torch.channels_last)

    def conv(images: int):  # the rows as `images` channels-last maps of one row each
        return lambda: F.conv2d(x.view(images, m // images, 1, k).permute(0, 3, 1, 2), w1x1, b).permute(0, 2, 3, 1)

    return {
        "F.linear": lambda: F.linear(x, w, b),
        "mm (no bias)": lambda: torch.mm(x, w.t()),
        "MKL packed": lambda: torch.ops.mkl._mkl_linear(x, packed, w, b, m),
        "oneDNN linear": lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""),
        "oneDNN reordered": lambda: torch.ops.mkldnn._linear_pointwise(x, reordered, b, "none", [], ""),
        "1x1 conv, 1 image": conv(1),
        "1x1 conv, 16 images": conv(16),
    }


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'linear':24} {'kernel':22} {'ms':>8} {'x F.linear':>10} {'max diff':>9}")
    for m, k, n in GEMMS[1:]:  # not the 2048^3 reference
        fns = kernels(m, k, n)
        with torch.inference_mode():
            want = fns["F.linear"]()
            diffs = {name: (fn().reshape(m, n) - want).abs().max().item() for name, fn in fns.items()}
            seconds = _median_seconds(fns)
        for name, t in seconds.items():
            ratio = t / seconds["F.linear"]
            print(f"{f'{m}x{k} -> {n}':24} {name:22} {t * 1e3:8.2f} {ratio:10.3f} {diffs[name]:9.1e}")


if __name__ == "__main__":
    main()
