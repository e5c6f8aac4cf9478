"""The HAT linears of FasterViT-0 at batch 16 (stage 3: 3392 rows, stage 4: 784) through F.linear, a bare
mm, MKL's packed weights and oneDNN's linear (plain and with a reordered weight), interleaved, one thread;
prints the max difference to F.linear and the median ms of each (BENCHMARKS.md 1.1h).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/linear_kernels.py
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
    pw = torch.ops.mkl._mkl_reorder_linear_weight(W, M)
    dw = torch.ops.mkldnn._reorder_linear_weight(W, M) if hasattr(torch.ops.mkldnn, "_reorder_linear_weight") else None
    fns = dict(
        linear=lambda: F.linear(x, W, b),
        mm=lambda: torch.mm(x, W.t()),
        mkl_packed=lambda: torch.ops.mkl._mkl_linear(x, pw, W, b, M),
        dnnl=lambda: torch.ops.mkldnn._linear_pointwise(x, W, b, "none", [], ""),
    )
    if dw is not None:
        fns["dnnl_packed"] = lambda: torch.ops.mkldnn._linear_pointwise(x, dw, b, "none", [], "")
    res = {k: [] for k in fns}
    with torch.inference_mode():
        ref = fns["linear"]()
        for name, fn in fns.items():
            try:
                fn()
                fn()
                print(name, (fn() - ref).abs().max().item() if name != "mm" else "", end="; ")
            except Exception as e:
                print(name, "ERR", str(e)[:80])
                res.pop(name)
        for _ in range(11):
            for name, fn in fns.items():
                if name not in res:
                    continue
                t = time.perf_counter()
                fn()
                res[name].append(time.perf_counter() - t)
    print()
    print(
        M,
        K,
        N,
        {k: round(st.median(v) * 1e3, 2) for k, v in res.items()},
        "GFLOP/s linear",
        round(2 * M * K * N / st.median(res["linear"]) / 1e9),
    )


for M, K, N in [(3392, 256, 1024), (3392, 1024, 256), (3392, 256, 768), (784, 512, 2048), (784, 2048, 512)]:
    run(M, K, N)
