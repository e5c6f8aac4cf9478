"""Where FasterViT-0's CPU time goes, op by op: the numbers behind BENCHMARKS.md section 1.1b.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/op_rates.py

Prints (1) the GFLOP/s of the GEMMs and 3x3 convs that FasterViT-0 runs at batch 16, 224 px, against a
2048^3 SGEMM (the core's practical peak), each the median of interleaved repeats on the same tensors, and
(2) a profiler table of one stage-3 HAT block of ``faster_vit_0_224`` in eval mode (inference folding on), on
the tokens that block receives inside the model, averaged over 20 calls. One torch thread throughout.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from hatplug.bench import build_model

GEMMS = [  # (rows, in, out): 2048^3, then stage 3 (64 windows x 53 tokens) and stage 4 (16 x 49 tokens)
    (2048, 2048, 2048),
    (3392, 256, 768),
    (3392, 256, 256),
    (3392, 256, 1024),
    (3392, 1024, 256),
    (784, 512, 1536),
    (784, 512, 2048),
    (784, 2048, 512),
]
CONVS = [(64, 56), (128, 28)]  # (channels, side) of the 3x3 convs of conv levels 1 and 2, batch 16


def _median_seconds(fns: dict, repeats: int = 9) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def op_rates() -> None:
    fns, flops = {}, {}
    for m, k, n in GEMMS:
        x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        name = f"linear {m}x{k} -> {n}"
        fns[name], flops[name] = (lambda x=x, w=w, b=b: F.linear(x, w, b)), 2 * m * k * n
    for c, side in CONVS:
        x = torch.randn(16, c, side, side).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(c, c, 3, 3), torch.randn(c)
        name = f"conv3x3 {c}ch {side}x{side} (channels-last)"
        fns[name], flops[name] = (lambda x=x, w=w, b=b: F.conv2d(x, w, b, padding=1)), 2 * 16 * c * c * 9 * side**2
    with torch.inference_mode():
        seconds = _median_seconds(fns)
    print(f"{'op':48} {'ms':>8} {'GFLOP/s':>8}")
    for name, s in seconds.items():
        print(f"{name:48} {s * 1e3:8.2f} {flops[name] / s / 1e9:8.1f}")


def hat_block_profile() -> None:
    model, x = build_model("faster_vit_0_224", 224), torch.randn(16, 3, 224, 224)
    block, captured = model.levels[2].blocks[2], {}
    hook = block.register_forward_pre_hook(lambda m, args: captured.setdefault("args", args))
    with torch.inference_mode():
        model(x)
        hook.remove()
        for _ in range(3):
            block(*captured["args"])
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(20):
                block(*captured["args"])
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    torch.set_num_threads(1)
    op_rates()
    hat_block_profile()
