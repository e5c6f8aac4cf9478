"""Eager against ``torch.compile`` (inductor) for one model on CPU, interleaved in one process.

    OMP_NUM_THREADS=1 python scripts/compile_vs_eager.py faster_vit_0_224 [--freeze] [--repeats 7]

``--freeze`` compiles with ``torch._inductor.config.freezing = True`` (weights treated as constants: BatchNorm
folded into convs, weights prepacked), inductor's setting for CPU inference. One configuration per process:
dynamo may reuse a graph compiled for another instance of the same class, so two configurations in one
process would not be two compilations. Prints one markdown row: compile time, median eager and compiled
step times and their ratio, and the largest difference between the two outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._inductor.config as inductor_config

from hatplug.bench import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--freeze", action="store_true", help="inductor freezing (constant weights)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()

    torch.manual_seed(0)
    model = build_model(args.model, args.img_size)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    inductor_config.freezing = args.freeze
    with torch.inference_mode():
        compiled = torch.compile(model)
        start = time.perf_counter()
        out = compiled(x)
        compile_s = time.perf_counter() - start
        diff = (out - model(x)).abs().max().item()
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.repeats):
            for name, fn in (("eager", model), ("compiled", compiled)):
                start = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - start)
    eager, comp = (statistics.median(times[k]) * 1e3 for k in ("eager", "compiled"))
    print("| model | freezing | threads | compile (s) | eager (ms) | compiled (ms) | compiled / eager | max diff |")
    print("|:---|:---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.model} | {args.freeze} | {torch.get_num_threads()} | {compile_s:.0f} | {eager:.0f} | {comp:.0f} "
        f"| {comp / eager:.2f} | {diff:.1e} |"
    )


if __name__ == "__main__":
    main()
