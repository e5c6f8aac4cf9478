"""FasterViT-0's window attentions (stage 3: 64 windows x 8 heads x 53 tokens; stage 4; carrier tokens) by SDPA
and by an explicit baddbmm / softmax / bmm with the head-split copy it needs, from the qkv output, interleaved,
one thread (BENCHMARKS.md 1.1h).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/sdpa_vs_explicit.py
"""

import statistics as st
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)


def run(B, H, N, D):
    C = H * D
    qkv = torch.randn(B, N, 3 * C)
    mask = torch.randn(1, H, N, N)
    s = D**-0.5

    def sdpa():
        q, k, v = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, N, C)

    def explicit_bmm():
        t = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).reshape(3, B * H, N, D)  # one copy
        q, k, v = t.unbind(0)
        a = torch.baddbmm(mask.expand(B, H, N, N).reshape(B * H, N, N), q, k.transpose(1, 2), alpha=s)
        a = a.softmax(-1)
        o = torch.bmm(a, v)
        return o.view(B, H, N, D).transpose(1, 2).reshape(B, N, C)

    def explicit_bmm2():
        t = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).reshape(3, B * H, N, D)  # one copy
        q, k, v = t.unbind(0)
        a = torch.bmm(q, k.transpose(1, 2)).view(B, H, N, N)
        a = torch.add(mask, a, alpha=s) if False else a.mul_(s).add_(mask)
        a = torch.softmax(a, -1)
        o = torch.bmm(a.view(B * H, N, N), v)
        return o.view(B, H, N, D).transpose(1, 2).reshape(B, N, C)

    fns = dict(sdpa=sdpa, explicit_bmm=explicit_bmm, explicit_bmm2=explicit_bmm2)
    res = {k: [] for k in fns}
    with torch.inference_mode():
        ref = sdpa()
        for fn in fns.values():
            print((fn() - ref).abs().max().item(), end=" ")
        for _ in range(15):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                res[name].append(time.perf_counter() - t)
    print(B, H, N, D, {k: round(st.median(v) * 1e3, 2) for k, v in res.items()})


run(64, 8, 53, 32)
run(16, 16, 49, 32)
run(16, 8, 16, 32)
