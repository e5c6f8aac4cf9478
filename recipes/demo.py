"""``make demo``: the plug-and-play ablation on the built-in data set, on the CPU, and its results table.

    python -m recipes.demo [--out runs/demo] [--arms swin,swin_hat_warm] [--threads 1]

Runs ``recipes/ablations/plug_and_play.yaml`` in its ``cpu`` profile (timm Swin, Twins-SVT and EdgeViT at a
small width, each against its ``hatplug.convert`` from random init and warm-started from the trained base, on
the two-colour "same or different?" form of the synthetic task at 64 px) and prints the results table that
``results.md`` holds, with the machine and the date. About five minutes on two cores; every number printed is
measured by the run.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

import torch

from hatplug.bench import machine_info

from .ablate import ABLATIONS, AblationResult, _select, run_ablation
from .report import markdown_table

__all__ = ["main"]

ABLATION = ABLATIONS / "plug_and_play.yaml"
SHOWN = ["arm", "top1", "loss", "params", "gflops", "train_imgs_per_sec", "infer_imgs_per_sec", "wall_time_s"]
"""Columns printed (``results.csv`` has them all; top-5 of a two-class task is always 1)."""


def summary(result: AblationResult, wall_s: float) -> str:
    """The printed report: where the results are, the machine, and the table of :data:`SHOWN` columns."""
    info = machine_info()
    rows = [{k: row.get(k, "") for k in SHOWN} for row in result.rows]
    lines = [
        f"plug-and-play ablation, cpu profile: {len(result.rows)} arms in {wall_s / 60:.1f} min",
        f"machine: {info['cpu']}, {info['cores']} cores, torch threads: {info['torch_threads']}; {info['date']}",
        f"files: {result.out}/results.csv, results.md, pareto.png, arms/*.yaml, runs/<arm>/",
        "",
        markdown_table(rows),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> AblationResult:
    """``make demo`` / ``python -m recipes.demo``: run the plug-and-play ablation in its ``cpu`` profile into
    ``--out``, print :func:`summary`, and return the :class:`~recipes.ablate.AblationResult` (``argv`` as on the
    command line; ``None`` reads ``sys.argv``). An unknown arm name ends the program with exit status 2.

    Example (shell; all nine arms take about five minutes on two cores)::

        make demo
        python -m recipes.demo --out runs/demo --arms swin,swin_hat_warm
        python -m recipes.demo --threads 2
    """
    parser = argparse.ArgumentParser(prog="python -m recipes.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--arms", default=None, help="comma-separated subset of arms (default: all nine)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see below)")
    args = parser.parse_args(argv)
    # The demo's models are small (32-192 channels at 64 px): many short ops, where a second thread gains little
    # and, when any other job holds a core, OpenMP's barrier waits made a 2-thread run 20-40x slower (measured on
    # the 2-core CI machine: 0.16 vs 7 steps/s). One thread keeps the demo at about 5 minutes there.
    torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric"):  # keep the demo's output to progress and results
        logging.getLogger(name).setLevel(logging.WARNING)
    start = time.perf_counter()
    arms = args.arms.split(",") if args.arms else None
    try:  # an unknown arm name: one line and exit status 2, as in python -m recipes.ablate
        _select(ABLATION, args.out, arms, "cpu")
    except ValueError as error:
        parser.error(str(error))
    result = run_ablation(ABLATION, profile="cpu", out=args.out, arms=arms)
    print("\n" + summary(result, time.perf_counter() - start), flush=True)
    return result


if __name__ == "__main__":
    main()
