"""Milliseconds per FasterViT-0 eval forward (batch 16, 224 px, one thread) spent copying 3x3 conv weights, from
the profiler's ``aten::clone`` events of 4-D tensors with 3x3 kernels (oneDNN copied each NCHW weight into
channels-last on every call before the folded weights were cached in that layout).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/weight_copies.py [--forwards 3]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import profile

import fastervit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forwards", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = fastervit.create_model("faster_vit_0_224").eval()
    x = torch.randn(16, 3, 224, 224)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        with profile(record_shapes=True) as prof:
            for _ in range(args.forwards):
                model(x)
    events = prof.events()
    shapes = [e.input_shapes[0] if e.input_shapes else [] for e in events]
    copies = [e for e, s in zip(events, shapes) if e.name == "aten::clone" and len(s) == 4 and s[2:] == [3, 3]]
    print(f"weight copies per forward: {len(copies) / args.forwards:.0f}, "
          f"{sum(e.cpu_time_total for e in copies) / 1000 / args.forwards:.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
