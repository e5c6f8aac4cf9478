"""Throughput of a converted Swin against the original, and the time hatplug.convert takes.

    .venv/bin/python scripts/bench_convert.py                 # swin_tiny, batch 16, CPU fp32
    .venv/bin/python scripts/bench_convert.py --threads 1 --repeats 9
    .venv/bin/python scripts/bench_convert.py --threads 1 --unfused   # + the conversions without inference fusion

Forward passes of the original and of its conversions (init="identity", init="random") are interleaved, one
batch each per round, each round starting one model later than the previous one, so that load from other
processes hits all of them alike; the median over rounds is reported. "original+sdpa" is the same original
with timm's fused attention switched on (``fused_attn = True`` on its attention modules; timm leaves it off
for Swin by default): the converted blocks' attention runs in fused SDPA kernels in eval mode, so this row
shows how much of their speed is that kernel rather than the conversion. convert() is timed on
swin_base_patch4_window7_224 (a deep copy plus the conversion, as by default).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

import hatplug
from hatplug.layers import inference_fusion


class _Unfused(torch.nn.Module):
    """A converted model run with hatplug's inference-only forms off: its attention as in training (the
    code before they existed), for a before/after in the same run."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with inference_fusion(False):
            return self.model(x)


def throughput(
    name: str, batch: int, repeats: int, warmup: int, unfused: bool = False
) -> tuple[dict[str, float], dict[str, float]]:
    """Median img/s of each model, and the median over rounds of each model's time relative to the original's
    in the same round (robust to load that drifts between rounds)."""
    torch.manual_seed(0)
    models = {"original": timm.create_model(name).eval()}
    fused = copy.deepcopy(models["original"])
    for module in fused.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    models["original+sdpa"] = fused
    for init in ("identity", "random"):
        models[init] = hatplug.convert(models["original"], init=init).eval()
        if unfused:
            models[f"{init}:unfused"] = _Unfused(models[init]).eval()
    x = torch.randn(batch, 3, *models["original"].pretrained_cfg["input_size"][1:])
    times: dict[str, list[float]] = {k: [] for k in models}
    keys = list(models)
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                model(x)
        for r in range(repeats):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                start = time.perf_counter()
                models[key](x)
                times[key].append(time.perf_counter() - start)
    speed = {k: batch / statistics.median(v) for k, v in times.items()}
    ratio = {k: statistics.median(o / t for o, t in zip(times["original"], v)) for k, v in times.items()}
    return speed, ratio


def convert_time(name: str, repeats: int) -> float:
    model = timm.create_model(name)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        hatplug.convert(model)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="swin_tiny_patch4_window7_224")
    parser.add_argument("--convert-model", default="swin_base_patch4_window7_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--unfused",
        action="store_true",
        help="also run each conversion with inference_fusion(False) (the attention as in training)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, CPU fp32")
    ips, ratio = throughput(args.model, args.batch, args.repeats, args.warmup, args.unfused)
    print(f"{args.model}, batch {args.batch}, median of {args.repeats} interleaved rounds:")
    for key, value in ips.items():
        print(f"  {key:16s} {value:8.1f} img/s  ({ratio[key]:.3f}x the original's throughput, paired by round)")
    seconds = convert_time(args.convert_model, 3)
    print(f"hatplug.convert({args.convert_model}): {seconds:.2f} s (median of 3, deep copy included)")


if __name__ == "__main__":
    main()
