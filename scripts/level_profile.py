"""torch.profiler table of one level of FasterViT-0 (batch 16, 224 px, one thread) on the input it gets in a
forward, with its median time; the argument is the level index (2: the stage-3 HAT level of BENCHMARKS.md 1.1h).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/level_profile.py 2
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from hatplug.bench import build_model

torch.set_num_threads(1)
model, x = build_model("faster_vit_0_224", 224), torch.randn(16, 3, 224, 224)
print(type(model), [type(l).__name__ for l in model.levels])
feats = {}


def hook(name):
    def f(m, i, o):
        feats[name] = i[0]

    return f


hs = [model.levels[i].register_forward_hook(hook(i)) for i in range(4)]
with torch.inference_mode():
    model(x)
for h in hs:
    h.remove()
lvl = int(sys.argv[1]) if len(sys.argv) > 1 else 2
m = model.levels[lvl]
inp = feats[lvl]
print(inp.shape, inp.stride())
with torch.inference_mode():
    for _ in range(3):
        m(inp)
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        m(inp)
        ts.append(time.perf_counter() - t)
    ts.sort()
    print("level", lvl, "median ms", ts[3] * 1e3)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        m(inp)
print(
    prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=40, max_shapes_column_width=70
    )
)
