"""Interleaved A/B of three CPU ideas for FasterViT-0 that BENCHMARKS.md 1.1b lists as dropped.

    OMP_NUM_THREADS=1 python scripts/onednn_fusion_ab.py [--repeats 15]

On FasterViT-0's shapes at batch 16 (224 px), channels-last, fp32, one thread, each row times the current
eager form against an alternative, on the same tensors, repeats interleaved; medians in ms:
1. a conv block (conv3x3 -> GELU -> conv3x3 + residual) against oneDNN post-op fusion
   (``torch.ops.mkldnn._convolution_pointwise``: GELU, then the residual add, fused into the convs);
2. the MLP's first layer + GELU against ``torch.ops.mkldnn._linear_pointwise`` with a GELU post-op;
3. the two blocks of conv level 1 on the whole batch against the same blocks on batch chunks (maps that stay
   in cache). The largest difference between the two outputs of each row is printed too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

MK = torch.ops.mkldnn
ONE = [1, 1]


def conv_block(x, w1, b1, w2, b2):
    y = torch._C._nn.gelu_(F.conv2d(x, w1, b1, 1, 1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return F.conv2d(y, w2, b2, 1, 1).add_(x)


def conv_block_postops(x, w1, b1, w2, b2):
    y = MK._convolution_pointwise(x, w1, b1, ONE, ONE, ONE, 1, "gelu", [], "none")
    return MK._convolution_pointwise.binary(y, x, w2, b2, ONE, ONE, ONE, 1, "add", 1.0, None, [], None)


def linear_gelu(x, w, b):
    return torch._C._nn.gelu_(F.linear(x, w, b))


def linear_gelu_postop(x, w, b):
    return MK._linear_pointwise(x, w, b, "gelu", [], "none")


def _chunked(chunk: int):
    def run(x, *weights):
        return torch.cat([conv_block(conv_block(part, *weights), *weights) for part in x.split(chunk)])

    return run


def _ab(name: str, fns: dict, args: tuple, repeats: int) -> None:
    ref = next(iter(fns.values()))(*args)
    diff = max((f(*args) - ref).abs().max().item() for f in fns.values())
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn(*args)
            times[key].append(time.perf_counter() - start)
    cells = ", ".join(f"{k} {statistics.median(v) * 1e3:.1f}" for k, v in times.items())
    print(f"| {name} | {cells} | {diff:.1e} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("| what | times (ms, median) | max diff |")
    print("|:---|:---|---:|")
    with torch.inference_mode():
        for C, S in ((64, 56), (128, 28)):
            x = torch.randn(16, C, S, S).contiguous(memory_format=torch.channels_last)
            weights = (torch.randn(C, C, 3, 3) * 0.05, torch.randn(C) * 0.1, torch.randn(C, C, 3, 3) * 0.05,
                       torch.randn(C) * 0.1)  # fmt: skip
            fns = {"eager": conv_block, "post-ops": conv_block_postops}
            _ab(f"conv block {C} ch {S}x{S}", fns, (x, *weights), args.repeats)
        for M, K, N in ((16 * 4 * 53, 256, 1024), (16 * 49, 512, 2048)):
            lin = (torch.randn(M, K), torch.randn(N, K) * 0.05, torch.randn(N) * 0.1)
            _ab(f"fc1 + GELU {M}x{K} -> {N}", {"eager": linear_gelu, "post-op": linear_gelu_postop}, lin, args.repeats)
        x = torch.randn(16, 64, 56, 56).contiguous(memory_format=torch.channels_last)
        weights = (torch.randn(64, 64, 3, 3) * 0.05, torch.randn(64) * 0.1, torch.randn(64, 64, 3, 3) * 0.05,
                   torch.randn(64) * 0.1)  # fmt: skip
        fns = {"batch 16": _chunked(16), **{f"chunks of {n}": _chunked(n) for n in (8, 4, 2, 1)}}
        _ab("conv level 1 (2 blocks)", fns, (x, *weights), max(args.repeats // 2, 3))


if __name__ == "__main__":
    main()
