"""Per-call cost of the eval-mode caches and of a converted Swin-T forward: the numbers behind the CHANGELOG's
"measured per cached call" notes (run before and after a change, interleaved, on the same machine).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/eval_overheads.py

Prints the best of 7 repeats of: a cached position bias (``pos_embed()`` and the attention's continuous bias of
a stage-3 block of ``faster_vit_0_224``), one ``FoldedTensors.get`` hit (a conv block's folded weights), the
check whether a block may run folded (``fusion_active``, a walk over its submodules) for a HAT and a conv block,
one ``stream_dtype`` call as a HAT block's folded form makes it, FasterViT's input checks and the shape checks of
``window_partition`` / ``window_reverse`` (each forward runs them once per call), the checks that the layers a
folded form reads are stock ones (``runs_as``; per block) and for hooks under a cached bias (per bias), the input
checks of a HAT block, its attention and a carrier tokenizer (per call), and an
eval forward of ``hatplug.convert(swin_tiny_patch4_window7_224)`` at batch 8, 224 px (random weights).
"""

from __future__ import annotations

import timeit

import timm
import torch

import fastervit
import hatplug
from hatplug.layers._cache import must_run_below
from hatplug.layers.fusion import FoldedTensors, fusion_active, mlp_hidden, stream_dtype
from hatplug.layers.hat import _attention_runs_as_stock
from hatplug.layers.windows import _check_fold, _check_windows


def main() -> None:
    torch.manual_seed(0)
    model = fastervit.create_model("faster_vit_0_224").eval()
    block, conv_block = model.levels[2].blocks[0], model.levels[0].blocks[0]
    sources = (conv_block.conv1.weight, conv_block.conv1.bias, conv_block.conv2.weight, conv_block.conv2.bias)
    cache = FoldedTensors()  # a cache of its own: the block's keeps its folded weights
    swin = hatplug.convert(timm.create_model("swin_tiny_patch4_window7_224").eval())
    x = torch.randn(8, 3, 224, 224)
    probe = torch.zeros(1)
    stage_map = torch.zeros(8, 256, 14, 14)  # stage 3 of faster_vit_0_224
    windows = torch.zeros(32, 49, 256)
    tokens, carriers, joined = torch.zeros(32, 49, 256), torch.zeros(8, 16, 256), torch.zeros(32, 53, 256)
    with torch.inference_mode():
        calls = {
            "pos_embed() (cached)": block.pos_embed,
            "continuous position bias (cached)": block.attn.pos_emb_funct,
            "FoldedTensors.get (hit)": lambda: cache.get(sources, lambda: (None,)),
            "fusion_active(HAT block)": lambda: fusion_active(block, probe),
            "fusion_active(conv block)": lambda: fusion_active(conv_block, probe),
            "stream_dtype (a HAT block's call)": lambda: stream_dtype(probe, probe, probe, block.gamma3, block.gamma4),
            "FasterViT input checks (_check_input)": lambda: model._check_input(x),
            "window_partition's shape check": lambda: _check_windows(stage_map, 7),
            "window_reverse's shape check": lambda: _check_fold(windows, 7, 14, 14),
            "stock-layer checks (HAT block)": lambda: _attention_runs_as_stock(block.attn) and mlp_hidden(block.mlp),
            "stock-layer checks (conv block)": conv_block._foldable,
            "stock-layer checks (stem)": model.patch_embed._foldable,
            "must_run_below(position bias)": lambda: must_run_below(block.pos_embed),
            "HAT block input check": lambda: block._check_input(tokens, carriers),
            "attention token check": lambda: block.attn._check_tokens(joined),
            "carrier tokenizer input check": lambda: model.levels[2].global_tokenizer._check_input(stage_map),
        }
        for name, fn in calls.items():
            fn()
            print(f"{name:40} {min(timeit.repeat(fn, number=5000, repeat=7)) / 5000 * 1e6:8.2f} us")
        swin(x)
        seconds = min(timeit.repeat(lambda: swin(x), number=1, repeat=7))
        print(f"{'converted Swin-T, eval, batch 8':40} {seconds * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
