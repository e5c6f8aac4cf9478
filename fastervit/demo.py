"""A two-minute tour of FasterViT: build, load a checkpoint in the official layout, classify, time.

Run with ``python -m fastervit.demo``. With the official ``fastervit_0_224_1k.pth.tar`` in
``$HATPLUG_CHECKPOINT_DIR`` (or torch hub's checkpoint folder) it classifies with the real weights;
otherwise it writes a randomly initialised checkpoint in the official layout and loads that, so the
predictions are meaningless but every step is the real one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import timm
import torch

import fastervit
from fastervit.testing import save_official_checkpoint
from hatplug.errors import PretrainedWeightsNotFoundError


def _throughputs(models: list[torch.nn.Module], batch: torch.Tensor, rounds: int) -> list[float]:
    """Median images/s of each model, measured in alternating rounds so that load spikes hit all alike."""
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            model(batch)  # warm-up: allocations, cached position biases
        for _ in range(rounds):
            for i, model in enumerate(models):
                start = time.perf_counter()
                model(batch)
                times[i].append(time.perf_counter() - start)
    return [batch.shape[0] / statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="faster_vit_0_224")
    parser.add_argument("--peer", default="swin_tiny_patch4_window7_224")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    os.environ.setdefault("HATPLUG_OFFLINE", "1")
    try:
        model = fastervit.create_model(args.model, pretrained=True).eval()
        source = "official pretrained weights"
    except PretrainedWeightsNotFoundError:
        folder = tempfile.mkdtemp(prefix="fastervit-demo-")
        path = save_official_checkpoint(fastervit.create_model(args.model), os.path.join(folder, "demo.pth.tar"))
        model = fastervit.create_model(args.model, checkpoint_path=path).eval()
        source = f"random weights written in the official layout to {path} (no official file found)"
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.model}: {params:.1f}M parameters, loaded {source}")

    # a smooth synthetic "image", normalised like ImageNet inputs
    size = model.pretrained_cfg["input_size"][1:]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij")
    image = torch.stack([torch.sin(4 * xx), torch.cos(3 * yy), xx * yy])[None]
    with torch.inference_mode():
        probs = model(image).softmax(-1)[0]
    info = timm.data.ImageNetInfo()
    print("top-5:", ", ".join(f"{info.index_to_description(i)} ({p:.3f})" for p, i in zip(*probs.topk(5))))

    peer = timm.create_model(args.peer).eval()
    batch = torch.randn(args.batch_size, 3, *size)
    ours, theirs = _throughputs([model, peer], batch, args.rounds)
    threads = torch.get_num_threads()
    print(f"CPU fp32 batch {args.batch_size}, {threads} threads, median of {args.rounds} alternating rounds:")
    print(f"  {args.model:30s} {ours:8.1f} img/s")
    print(f"  {args.peer:30s} {theirs:8.1f} img/s")
    print(f"  ratio {ours / theirs:.2f}x (quick look; `make bench` measures properly)")


if __name__ == "__main__":
    main()
