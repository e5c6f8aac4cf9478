"""Interleaved A/B of an eval forward between two checkouts of this repository: the before/after measurement a
change to a hot path needs (same machine, same minutes, alternating order, one process per run).

    git worktree add /tmp/before <commit>
    OMP_NUM_THREADS=1 .venv/bin/python scripts/ab_checkouts.py /tmp/before . --runs 6

Each run is a fresh process that imports ``fastervit`` from its checkout, builds ``--model`` (random weights),
does two warm-up forwards and times ``--forwards`` eval forwards at ``--batch``; with ``--what bias-cache`` it
times instead a cached call of the model's position-bias modules (``CachedBias``, eval, no grad: 2000 rounds
over all of them, per call), with ``--what set-input-size`` calls of ``set_input_size`` (to 256 px and back);
``--forwards`` is the number of timings per run either way. The runs alternate between
the checkouts (A B, B A, ...). Prints the median and best per checkout, the ratio of the medians and the median
of the per-round ratios (B's median forward over A's in the same round), which a drift of the machine's speed
over the minutes of the measurement moves less than the ratio of the overall medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PREAMBLE = r"""
import json, sys, time
import torch
sys.path.insert(0, sys.argv[1])  # this checkout's packages before the installed ones
torch.set_num_threads(1)
import fastervit
assert fastervit.__file__.startswith(sys.argv[1]), fastervit.__file__
times = []
"""

RUN = r"""
model = fastervit.create_model(sys.argv[2]).eval()
x = torch.randn(int(sys.argv[3]), 3, *model.img_size)
with torch.no_grad():
    model(x)
    model(x)
    for _ in range(int(sys.argv[4])):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
"""

RUN_BIAS_CACHE = r"""
from hatplug.layers.pos_embed import CachedBias
model = fastervit.create_model(sys.argv[2]).eval()
biases = [m for m in model.modules() if isinstance(m, CachedBias)]
with torch.no_grad():
    for m in biases:
        m()
    for _ in range(int(sys.argv[4])):
        start = time.perf_counter()
        for _ in range(2000):
            for m in biases:
                m()
        times.append((time.perf_counter() - start) / 2000 / len(biases))
"""

RUN_SET_INPUT_SIZE = r"""
model = fastervit.create_model(sys.argv[2])
for i in range(int(sys.argv[4])):
    start = time.perf_counter()
    model.set_input_size(256 if i % 2 == 0 else 224)
    times.append(time.perf_counter() - start)
"""

SNIPPETS = {"forward": (RUN, "ms", 1e3), "bias-cache": (RUN_BIAS_CACHE, "us per call", 1e6),
            "set-input-size": (RUN_SET_INPUT_SIZE, "ms", 1e3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="first checkout (e.g. a git worktree of the commit before)")
    parser.add_argument("b", type=Path, help="second checkout")
    parser.add_argument("--model", default="faster_vit_0_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--forwards", type=int, default=3, help="timed forwards per run")
    parser.add_argument("--runs", type=int, default=6, help="runs per checkout")
    parser.add_argument("--what", choices=sorted(SNIPPETS), default="forward", help="what each run times")
    args = parser.parse_args()
    snippet, unit, scale = SNIPPETS[args.what]
    roots = {str(args.a.resolve()): [], str(args.b.resolve()): []}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rounds = []
    for run in range(args.runs):
        order = list(roots) if run % 2 == 0 else list(reversed(roots))
        per_root = {}
        for root in order:
            code = PREAMBLE + snippet + "print(json.dumps(times))\n"
            command = [sys.executable, "-c", code, root, args.model, str(args.batch), str(args.forwards)]
            out = subprocess.run(command, capture_output=True, text=True, env=env, cwd="/", check=True)
            times = json.loads(out.stdout.strip().splitlines()[-1])
            roots[root] += times
            per_root[root] = statistics.median(times)
        first, second = roots
        rounds.append(per_root[second] / per_root[first])
    medians = []
    for root, times in roots.items():
        medians.append(statistics.median(times))
        print(
            f"{root}: median {medians[-1] * scale:.1f} {unit}, best {min(times) * scale:.1f} {unit} "
            f"({len(times)} timings)"
        )
    batch = f", batch {args.batch}" if args.what == "forward" else ""  # the other modes take no batch
    print(f"{args.model}, {args.what}{batch}: second / first median = {medians[1] / medians[0]:.3f}")
    print(
        f"per-round second / first: median {statistics.median(rounds):.3f} "
        f"(rounds: {', '.join(f'{r:.3f}' for r in rounds)})"
    )


if __name__ == "__main__":
    main()
