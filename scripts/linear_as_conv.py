"""The same linears as scripts/linear_kernels.py as 1x1 channels-last oneDNN convs (one image, or 16), against
F.linear, interleaved, one thread (BENCHMARKS.md 1.1h).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/linear_as_conv.py
"""

import statistics as st
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)


def run(M, K, N):
    x = torch.randn(M, K)
    W = torch.randn(N, K)
    b = torch.randn(N)
    W4 = W.view(N, K, 1, 1).contiguous(memory_format=torch.channels_last)

    def conv():
        xin = x.view(1, M, 1, K).permute(0, 3, 1, 2)  # NCHW logical, NHWC memory
        return F.conv2d(xin, W4, b).permute(0, 2, 3, 1).reshape(M, N)

    def conv_b16():
        xin = x.view(16, M // 16, 1, K).permute(0, 3, 1, 2)
        return F.conv2d(xin, W4, b).permute(0, 2, 3, 1).reshape(M, N)

    fns = dict(linear=lambda: F.linear(x, W, b), conv1x1=conv, conv1x1_b16=conv_b16)
    res = {k: [] for k in fns}
    with torch.inference_mode():
        ref = fns["linear"]()
        for name, fn in fns.items():
            fn()
            o = fn()
            assert o.is_contiguous(), name
            print(name, f"{(o - ref).abs().max().item():.1e}", end="; ")
        for _ in range(11):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                res[name].append(time.perf_counter() - t)
    print(
        M, K, N, {k: f"{st.median(v) * 1e3:.2f}ms {2 * M * K * N / st.median(v) / 1e9:.0f}GF" for k, v in res.items()}
    )


for M, K, N in [
    (3392, 256, 1024),
    (3392, 1024, 256),
    (3392, 256, 768),
    (3392, 256, 256),
    (784, 512, 2048),
    (784, 2048, 512),
    (784, 512, 1536),
]:
    run(M, K, N)
