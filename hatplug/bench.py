"""Inference throughput and resolution-scaling benchmarks: ``python -m hatplug.bench``.

Two modes, both measuring every model of a run in the same process, round-robin over repeats, so that
drift of a shared machine (other processes, thermal state) hits all peers alike:

* **throughput** (default): samples per second at one batch size and image size, in timm's
  ``benchmark.py`` CSV columns, with each model's speed relative to a ``--baseline`` (and ``--peers``).
* **resolution sweep** (``--sweep 224,320,...``): each model rebuilt for each input size, latency per
  image at a small batch, cost per pixel normalised to the smallest size, and the fitted growth
  exponent ``t ~ pixels**k`` (``k = 1``: linear in pixels, ``k = 2``: quadratic, global attention).

Sizes are a square side (``224``) or height x width (``800x1333``), in ``--img-size`` and ``--sweep``
alike. ``--models`` takes timm names (FasterViT and hatplug models are registered) and, for a model timm
does not know, ``package.module:function`` (called as ``function(img_size=...)``).

Presets bundle the settings we publish in BENCHMARKS.md; any flag given beside a preset overrides it::

    python -m hatplug.bench --preset cpu                     # FasterViT-0/1/2 vs Swin-T, ConvNeXt-T
    python -m hatplug.bench --preset sweep --plot sweep.png  # 224 ... 1024 px
    python -m hatplug.bench --preset gpu --repeats 20        # fp16, channels_last, batch 128, CUDA

The same functions run in Python:

>>> from hatplug.bench import benchmark
>>> results = benchmark(["faster_vit_0_224"], batch_size=1, warmup=0, repeats=1, iters=1)
>>> results[0].model, results[0].ratio_vs_baseline
('faster_vit_0_224', 1.0)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import difflib
import gc
import importlib
import inspect
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn

import fastervit
import hatplug  # noqa: F401  (registers hatplug's own models with timm)
from hatplug.errors import HatplugError
from hatplug.layers.fusion import inference_fusion

__all__ = [
    "PRESETS",
    "BenchResult",
    "DeviceUnavailableError",
    "SweepPoint",
    "benchmark",
    "build_model",
    "fit_growth_exponent",
    "growth_exponents",
    "machine_info",
    "main",
    "plot_sweep",
    "sweep_figure",
    "resolution_sweep",
    "size_label",
    "results_to_csv",
    "parse_size",
    "results_to_markdown",
    "sweep_to_csv",
    "sweep_to_markdown",
]

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}

Size = int | tuple[int, int]
"""An input size: a square side, or ``(height, width)``."""


def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _pixels(size: Size) -> int:
    h, w = _hw(size)
    return h * w


def _canonical(size: Size) -> Size:
    """A square ``(h, h)`` becomes ``h``, so the same size is written and deduplicated one way."""
    h, w = _hw(size)
    if h < 1 or w < 1:
        raise ValueError(f"image sizes must be positive, got {size!r}")
    return h if h == w else (h, w)


def size_label(size: Size) -> str:
    """``"224"`` for a square side, ``"224x448"`` for height x width (the form ``--img-size`` takes).

    >>> size_label(224), size_label((224, 448)), size_label((320, 320))
    ('224', '224x448', '320')
    """
    h, w = _hw(size)
    return str(h) if h == w else f"{h}x{w}"


def parse_size(text: str) -> Size:
    """``"224"`` -> ``224``; ``"224x448"`` -> ``(224, 448)`` (height x width).

    >>> parse_size("224"), parse_size("800x1333"), parse_size("320x320")
    (224, (800, 1333), 320)
    """
    parts = text.strip().lower().split("x")
    try:
        if len(parts) not in (1, 2):
            raise ValueError(text)
        return _canonical((int(parts[0]), int(parts[-1])))
    except ValueError as exc:
        raise ValueError(f"bad image size {text!r}: give a side (224) or height x width (224x448)") from exc


SWIN_T, SWIN_S = "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224"
PRESETS: dict[str, dict] = {
    # Iterations sized so that the five models finish in 3-6 minutes on 2 CPU cores.
    "cpu": dict(
        models=["faster_vit_0_224", "faster_vit_1_224", "faster_vit_2_224", SWIN_T, "convnext_tiny"],
        baseline=SWIN_T,
        peers=[SWIN_T, "convnext_tiny"],
        device="cpu",
        amp="none",
        channels_last=False,
        batch_size=16,
        img_size=224,
        warmup=1,
        repeats=7,
        iters=1,
    ),
    "gpu": dict(
        models=[f"faster_vit_{i}_224" for i in range(5)] + [SWIN_T, SWIN_S, "convnext_tiny", "convnext_small"],
        baseline=SWIN_T,
        peers=[SWIN_T, "convnext_tiny"],
        device="cuda",
        amp="fp16",
        channels_last=True,
        batch_size=128,
        img_size=224,
        warmup=10,
        repeats=10,
        iters=20,
    ),
    "sweep": dict(
        sweep=[224, 320, 448, 640, 800, 1024],
        sweep_models=["faster_vit_0_any_res", SWIN_T, "vit_small_patch16_224"],
        device="cpu",
        amp="none",
        channels_last=False,
        batch_size=1,
        warmup=1,
        repeats=5,
        iters=8,
    ),
}
_BENCH_DEFAULTS = dict(
    models=["faster_vit_0_224", SWIN_T, "convnext_tiny"],
    device="cpu",
    amp="none",
    channels_last=False,
    compile=False,
    batch_size=16,
    img_size=224,
    warmup=2,
    repeats=5,
    iters=2,
)
_SWEEP_DEFAULTS = dict(
    _BENCH_DEFAULTS,
    sweep_models=PRESETS["sweep"]["sweep_models"],
    batch_size=1,
    warmup=1,
    repeats=5,
    iters=8,
)

CSV_COLUMNS = [
    "model",
    "infer_samples_per_sec",
    "infer_step_time",
    "infer_batch_size",
    "infer_img_size",
    "param_count",
    "device",
    "amp",
    "channels_last",
    "compiled",
    "torch_threads",
    "baseline",
    "ratio_vs_baseline",
    "spread_pct",
    "repeats",
    "iters",
    "samples_per_sec_runs",
]
SWEEP_COLUMNS = [
    "model",
    "img_size",
    "pixels",
    "infer_batch_size",
    "ms_per_image",
    "ms_per_megapixel",
    "cost_per_pixel_rel",
    "param_count",
    "device",
    "amp",
    "channels_last",
    "compiled",
    "torch_threads",
    "skipped",
    "ms_per_image_runs",
]


class DeviceUnavailableError(HatplugError, RuntimeError):
    """The requested device (e.g. ``cuda``) is not available to this torch build or machine."""


# ---- measurement -------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    """Throughput of one model in a :func:`benchmark` run.

    ``samples_per_sec_runs`` holds one value per repeat, in the run's round-robin order, so ratios
    between models can be paired repeat by repeat. ``ratio_vs_baseline`` is the median of those paired
    ratios against ``baseline`` (exactly 1.0 for the baseline itself).
    """

    model: str
    samples_per_sec_runs: list[float]
    batch_size: int
    img_size: Size
    param_count: float  # millions
    device: str
    amp: str
    channels_last: bool
    compiled: bool
    iters: int
    baseline: str = ""
    ratio_vs_baseline: float = float("nan")
    threads: int = field(default_factory=torch.get_num_threads)  # torch's CPU threads when it was measured

    @property
    def samples_per_sec(self) -> float:
        return statistics.median(self.samples_per_sec_runs)

    @property
    def step_time_ms(self) -> float:
        """Milliseconds per batch at the median throughput."""
        return 1000.0 * self.batch_size / self.samples_per_sec

    @property
    def spread_pct(self) -> float:
        """``(max - min) / median`` of the per-repeat throughputs, in percent: the run's noise."""
        runs = self.samples_per_sec_runs
        return 100.0 * (max(runs) - min(runs)) / self.samples_per_sec

    def ratio_to(self, other: BenchResult) -> float:
        """Median over repeats of ``self / other`` throughput, pairing the repeats of one run (see
        :func:`paired_ratio`)."""
        return paired_ratio(self.samples_per_sec_runs, other.samples_per_sec_runs)

    def as_row(self) -> dict[str, str]:
        """The CSV row (strings, rounded as written): the markdown table shows these same strings."""
        return {
            "model": self.model,
            "infer_samples_per_sec": f"{self.samples_per_sec:.2f}",
            "infer_step_time": f"{self.step_time_ms:.3f}",  # timm rounds to 3 decimals
            "infer_batch_size": str(self.batch_size),
            "infer_img_size": size_label(self.img_size),
            "param_count": f"{self.param_count:.2f}",
            "device": self.device,
            "amp": self.amp,
            "channels_last": str(self.channels_last),
            "compiled": str(self.compiled),
            "torch_threads": str(self.threads),
            "baseline": self.baseline,
            "ratio_vs_baseline": f"{self.ratio_vs_baseline:.3f}",
            "spread_pct": f"{self.spread_pct:.1f}",
            "repeats": str(len(self.samples_per_sec_runs)),
            "iters": str(self.iters),
            # every repeat, in run order: the paired ratios can be recomputed from the CSV alone
            "samples_per_sec_runs": ";".join(f"{v:.6g}" for v in self.samples_per_sec_runs),
        }


@dataclass
class SweepPoint:
    """Latency of one model built for one input size in a :func:`resolution_sweep`.

    ``skipped`` is empty when measured, otherwise the reason (the model cannot be built or run at this
    size); then the timings are ``nan``. ``cost_per_pixel_rel`` is the time per pixel divided by that of
    the model's smallest measured size.
    """

    model: str
    img_size: Size
    batch_size: int
    ms_per_image_runs: list[float] = field(default_factory=list)
    param_count: float = float("nan")
    device: str = "cpu"
    amp: str = "none"
    channels_last: bool = False
    compiled: bool = False
    skipped: str = ""
    cost_per_pixel_rel: float = float("nan")
    threads: int = field(default_factory=torch.get_num_threads)  # torch's CPU threads when it was measured

    @property
    def pixels(self) -> int:
        return _pixels(self.img_size)

    @property
    def ms_per_image(self) -> float:
        return statistics.median(self.ms_per_image_runs) if self.ms_per_image_runs else float("nan")

    @property
    def ms_per_megapixel(self) -> float:
        return self.ms_per_image * 1e6 / self.pixels

    def as_row(self) -> dict[str, str]:
        """The CSV row (strings, rounded as written); the markdown table shows these same strings."""
        measured = not self.skipped
        return {
            "model": self.model,
            "img_size": size_label(self.img_size),
            "pixels": str(self.pixels),
            "infer_batch_size": str(self.batch_size),
            "ms_per_image": f"{self.ms_per_image:.2f}" if measured else "",
            "ms_per_megapixel": f"{self.ms_per_megapixel:.2f}" if measured else "",
            "cost_per_pixel_rel": f"{self.cost_per_pixel_rel:.3f}" if measured else "",
            "param_count": f"{self.param_count:.2f}" if not math.isnan(self.param_count) else "",
            "device": self.device,
            "amp": self.amp,
            "channels_last": str(self.channels_last),
            "compiled": str(self.compiled),
            "torch_threads": str(self.threads),
            "skipped": self.skipped,
            "ms_per_image_runs": ";".join(f"{v:.6g}" for v in self.ms_per_image_runs),
        }


UNFUSED_SUFFIX = ":unfused"


class _Unfused(nn.Module):
    """Runs a model with inference-time folding off (:func:`hatplug.layers.fusion.inference_fusion`), i.e.
    exactly as the plain modules compute it: the "before" of a folding A/B measured in the same run."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with inference_fusion(False):
            return self.model(x)


def _takes_img_size(function: Callable) -> bool:
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): pass the size and let it say
        return True
    return any(p.name == "img_size" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def build_model(name: str, img_size: Size | None = None) -> nn.Module:
    """Create ``name`` through timm (FasterViT and hatplug models included), for ``img_size`` if given.

    ``img_size`` is a square side or ``(height, width)``. FasterViT variants are built for that resolution
    (their stages are sized at construction);
    timm transformers get ``img_size=``; fully convolutional timm models (ConvNeXt, ResNet), which take
    no ``img_size``, are built as they are since they run at any size. Returns the model in eval mode.
    A name ending in ``:unfused`` gives the model running with inference-time folding switched off
    (the plain modules, as before folding existed), to measure folding against it in one run. Any other
    name of the form ``package.module:function`` measures a model that timm does not know (another
    implementation, your own network): the function is imported and called as ``function(img_size=...)``
    (without arguments when ``img_size`` is ``None`` or the function takes no ``img_size``: it then builds
    its own default size, as timm models without the argument do) and must return an ``nn.Module``.

    >>> build_model("faster_vit_0_any_res", img_size=320).img_size
    (320, 320)
    >>> build_model("faster_vit_0_any_res", img_size=(224, 448)).img_size
    (224, 448)
    >>> type(build_model("faster_vit_0_224:unfused")).__name__
    '_Unfused'
    """
    if name.endswith(UNFUSED_SUFFIX):
        return _Unfused(build_model(name[: -len(UNFUSED_SUFFIX)], img_size)).eval()
    if _is_import_path(name):
        factory = _factory(name)
        model = factory(img_size=img_size) if img_size is not None and _takes_img_size(factory) else factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} returned {type(model).__name__}, not an nn.Module")
        return model.eval()
    if img_size is None:
        return timm.create_model(name).eval()
    img_size = _canonical(img_size)
    if name.split(".")[0] in fastervit.list_models():
        return fastervit.create_model(name, resolution=list(_hw(img_size))).eval()
    try:
        return timm.create_model(name, img_size=img_size).eval()
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        return timm.create_model(name).eval()


def _is_import_path(name: str) -> bool:
    """``package.module:function`` (not a timm hub name such as ``hf-hub:timm/...``)."""
    module_name, sep, attr = name.rpartition(":")
    return bool(sep) and attr.isidentifier() and all(part.isidentifier() for part in module_name.split("."))


def _factory(name: str):
    """The callable named by ``package.module:function``, with an error that says what is missing."""
    module_name, _, attr = name.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if timm.is_model(module_name):  # a model name with a misspelt suffix, not an import path
            raise BenchInputError(
                f"{name!r}: {module_name!r} is a model name and {attr!r} not a suffix this tool knows; did you mean "
                f"{module_name + UNFUSED_SUFFIX!r} (the model with inference-time folding off)?"
            ) from exc
        raise BenchInputError(
            f"{name!r}: cannot import {module_name!r} ({exc}); put its directory on PYTHONPATH"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise BenchInputError(f"{name!r}: module {module_name!r} has no function {attr!r}")
    return factory


def _check_names(models: Sequence[str]) -> None:
    models = [m[: -len(UNFUSED_SUFFIX)] if m.endswith(UNFUSED_SUFFIX) else m for m in models]
    for name in models:
        if _is_import_path(name):
            _factory(name)
    unknown = [m for m in models if not _is_import_path(m) and not timm.is_model(m)]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise BenchInputError(
            f"unknown model name(s): {'; '.join(hints)}. Names are timm's (timm.list_models()), "
            "FasterViT's (fastervit.list_models()) or hatplug's, or 'package.module:function' for another model."
        )


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceUnavailableError(f"{device!r} is not a device name: use cpu, cuda or cuda:N ({exc})") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceUnavailableError(f"device {str(device)!r}: hatplug.bench measures cpu and cuda devices only")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {str(device)!r} requested but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). Run on a machine with an NVIDIA "
            "GPU, or benchmark the CPU with --preset cpu / --device cpu."
        )
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: str):
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def _prepare(model: nn.Module, device: torch.device, channels_last: bool, compile: bool) -> nn.Module:
    model = model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
    return torch.compile(model) if compile else model


def _random_input(batch_size: int, img_size: Size, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = torch.randn(batch_size, 3, *_hw(img_size), device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _timed(model: nn.Module, x: torch.Tensor, iters: int, device: torch.device, amp: str) -> float:
    """Seconds for ``iters`` forwards, synchronised at both ends."""
    with torch.inference_mode(), _autocast(device, amp):
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        _sync(device)
        return time.perf_counter() - start


def _param_millions(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _round_robin(names: Sequence[str], repeat: int) -> list[str]:
    """``names`` rotated by ``repeat``: each model takes each position of the run in turn."""
    k = repeat % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


def benchmark(
    models: Sequence[str],
    *,
    batch_size: int = 16,
    img_size: Size = 224,
    device: str | torch.device = "cpu",
    amp: str = "none",
    channels_last: bool = False,
    compile: bool = False,
    warmup: int = 2,
    repeats: int = 5,
    iters: int = 2,
    baseline: str | None = None,
) -> list[BenchResult]:
    """Measure inference throughput of several models, interleaved, and rate them against a baseline.

    Every model is built (random weights, eval mode), warmed up with ``warmup`` forwards, then timed
    ``repeats`` times for ``iters`` forwards of a random ``(batch_size, 3, height, width)`` batch
    under ``torch.inference_mode`` (and autocast when ``amp`` is ``"fp16"``/``"bf16"``). Each repeat
    visits all models, starting one model later than the previous repeat.

    Args:
        models: timm names (FasterViT and hatplug models are registered on import of this module).
        batch_size, img_size: input shape; ``img_size`` is a square side or ``(height, width)``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; CUDA timings are synchronised.
        amp: ``"none"``, ``"fp16"`` or ``"bf16"`` autocast.
        channels_last: NHWC weights and inputs.
        compile: ``torch.compile`` each model (compilation happens in the warm-up, at least one forward).
        warmup, repeats, iters: forwards before timing (at least one runs: it checks that the model runs at
            this size); timed repeats; forwards per repeat.
        baseline: model the ratios refer to; defaults to the first model.

    Returns:
        One :class:`BenchResult` per model, in the order given.

    >>> rows = benchmark(["faster_vit_0_224"], batch_size=1, warmup=0, repeats=2, iters=1)
    >>> len(rows[0].samples_per_sec_runs), rows[0].samples_per_sec > 0
    (2, True)
    """
    models = list(dict.fromkeys(models))
    if not models:
        raise BenchInputError("no models to benchmark")
    baseline = baseline or models[0]
    if baseline not in models:
        raise BenchInputError(f"baseline {baseline!r} is not among the benchmarked models {models}")
    _check_counts(repeats, iters, warmup)
    _check_names(models)
    img_size = _canonical(img_size)
    dev = _resolve_device(device)
    torch.manual_seed(0)
    x = _random_input(batch_size, img_size, dev, channels_last)
    built = {}
    for name in models:  # every model is built and run once before any timing, so a failure loses nothing
        try:
            built[name] = _prepare(build_model(name, img_size), dev, channels_last, compile)
            _timed(built[name], x, max(warmup, 1), dev, amp)  # also compiles, outside the timed repeats
        except Exception as exc:
            raise BenchInputError(
                f"{name} cannot run a batch of {batch_size} at {size_label(img_size)} ({_skip_reason(exc)}); leave "
                "it out of --models or choose another --img-size / --batch-size"
            ) from exc
    params = {name: _param_millions(m) for name, m in built.items()}
    runs: dict[str, list[float]] = {name: [0.0] * repeats for name in models}
    for r in range(repeats):
        for name in _round_robin(models, r):
            runs[name][r] = iters * batch_size / _timed(built[name], x, iters, dev, amp)
    results = [
        BenchResult(
            model=name,
            samples_per_sec_runs=runs[name],
            batch_size=batch_size,
            img_size=img_size,
            param_count=params[name],
            device=str(dev),
            amp=amp,
            channels_last=channels_last,
            compiled=compile,
            iters=iters,
            baseline=baseline,
        )
        for name in models
    ]
    base = next(r for r in results if r.model == baseline)
    for result in results:
        result.ratio_vs_baseline = 1.0 if result is base else result.ratio_to(base)
    return results


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over paired repeats of ``a[i] / b[i]``, taken on the log scale: for an odd count that is the
    plain median of the ratios, for an even one the geometric mean of the middle two, so that the ratio of B
    to A is always the reciprocal of the ratio of A to B (the arithmetic mean of the middle two is not).

    >>> a, b = [100, 100], [50, 300]
    >>> round(paired_ratio(a, b), 4), round(paired_ratio(b, a), 4), round(paired_ratio(a, b) * paired_ratio(b, a), 12)
    (0.8165, 1.2247, 1.0)
    """
    return math.exp(statistics.median(math.log(x / y) for x, y in zip(a, b)))


class BenchInputError(HatplugError, ValueError):
    """A benchmark that cannot run as asked (unknown model, a model that fails at the size, bad counts): the
    command line answers with ``error: <message>`` and exit status 2, as for bad flags."""


def _check_counts(repeats: int, iters: int, warmup: int) -> None:
    if repeats < 1 or iters < 1 or warmup < 0:
        raise BenchInputError(f"need repeats >= 1, iters >= 1, warmup >= 0; got {repeats}, {iters}, {warmup}")


def _skip_reason(exc: BaseException) -> str:
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0][:200] if message else ''}".rstrip(": ")


def resolution_sweep(
    models: Sequence[str],
    sizes: Sequence[Size],
    *,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    amp: str = "none",
    channels_last: bool = False,
    compile: bool = False,
    warmup: int = 1,
    repeats: int = 5,
    iters: int = 8,
) -> list[SweepPoint]:
    """Latency per image of each model rebuilt for each input size, all interleaved.

    A size is a square side or ``(height, width)``; sizes are ordered by their pixel count.

    Every model is built for every size first (see :func:`build_model`) and warmed up; then each of
    the ``repeats`` visits every (size, model) pair round-robin, so drift of a shared machine cancels
    both between models and between sizes. ``iters`` forwards per repeat are used at the smallest
    size; larger sizes use ``max(1, round(iters * smallest_pixels / pixels))`` so every pair does
    about the same work. A model that cannot be built or run at a size is recorded with ``skipped``
    set to the reason and the sweep goes on. All built models are held at once: about the sum of
    their weights plus one forward's activations.

    Returns:
        One :class:`SweepPoint` per (size, model), sizes ascending, with ``cost_per_pixel_rel`` filled in
        (per-repeat ratios to the model's smallest measured size, median over repeats).

    >>> pts = resolution_sweep(["faster_vit_0_any_res"], [96, (64, 96), 64], warmup=0, repeats=1, iters=1)
    >>> [(p.img_size, p.skipped) for p in pts], pts[0].cost_per_pixel_rel
    ([(64, ''), ((64, 96), ''), (96, '')], 1.0)
    """
    models = list(dict.fromkeys(models))
    sizes = sorted({_canonical(s) for s in sizes}, key=lambda s: (_pixels(s), _hw(s)))
    if not models or not sizes:
        raise BenchInputError(f"need at least one model and one size, got models={models} sizes={sizes}")
    _check_counts(repeats, iters, warmup)
    _check_names(models)
    dev = _resolve_device(device)
    common = dict(batch_size=batch_size, device=str(dev), amp=amp, channels_last=channels_last, compiled=compile)
    torch.manual_seed(0)
    inputs = {size: _random_input(batch_size, size, dev, channels_last) for size in sizes}
    size_iters = {size: max(1, round(iters * _pixels(sizes[0]) / _pixels(size))) for size in sizes}
    points = [SweepPoint(model=name, img_size=size, **common) for size in sizes for name in models]
    built: dict[int, nn.Module] = {}  # index into points -> model
    for i, point in enumerate(points):
        try:
            model = _prepare(build_model(point.model, point.img_size), dev, channels_last, compile)
            point.param_count = _param_millions(model)
            _timed(model, inputs[point.img_size], max(warmup, 1), dev, amp)  # a size that cannot run fails here
            built[i] = model
        except Exception as exc:  # whatever the model raises at this size: recorded, the sweep goes on
            point.skipped = _skip_reason(exc)
            gc.collect()
    if not built:  # an empty table, CSV and plot are not a result
        reasons = "; ".join(f"{p.model} at {size_label(p.img_size)}: {p.skipped}" for p in points)
        raise BenchInputError(f"no (model, size) pair of the sweep could run: {reasons}")
    for r in range(repeats):
        for i in _round_robin(list(built), r):
            point = points[i]
            n = size_iters[point.img_size]
            seconds = _timed(built[i], inputs[point.img_size], n, dev, amp)
            point.ms_per_image_runs.append(1000.0 * seconds / (n * batch_size))
    del built
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    _fill_relative_cost(points)
    return points


def _fill_relative_cost(points: Sequence[SweepPoint]) -> None:
    """Cost per pixel relative to the model's smallest measured size, paired repeat by repeat."""
    reference: dict[str, SweepPoint] = {}
    for p in sorted(points, key=lambda p: p.pixels):
        if p.skipped:
            continue
        ref = reference.setdefault(p.model, p)
        per_pixel = [t / p.pixels for t in p.ms_per_image_runs]
        p.cost_per_pixel_rel = (
            1.0 if p is ref else paired_ratio(per_pixel, [t0 / ref.pixels for t0 in ref.ms_per_image_runs])
        )


def fit_growth_exponent(pixels: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of ``log(time)`` against ``log(pixels)``: ``k`` in ``time ~ pixels**k``.

    Returns ``nan`` with fewer than two distinct sizes.

    >>> round(fit_growth_exponent([1e4, 4e4, 9e4], [2.0, 32.0, 162.0]), 6)
    2.0
    """
    pairs = [(math.log(p), math.log(t)) for p, t in zip(pixels, times) if p > 0 and t > 0]
    if len({lp for lp, _ in pairs}) < 2:
        return float("nan")
    mx = sum(lp for lp, _ in pairs) / len(pairs)
    my = sum(lt for _, lt in pairs) / len(pairs)
    sxy = sum((lp - mx) * (lt - my) for lp, lt in pairs)
    sxx = sum((lp - mx) ** 2 for lp, _ in pairs)
    return sxy / sxx


def growth_exponents(points: Iterable[SweepPoint]) -> dict[str, float]:
    """:func:`fit_growth_exponent` of each model's measured sweep points (skipped ones left out).

    >>> pts = [SweepPoint("m", s, 1, ms_per_image_runs=[s * s / 1e3]) for s in (100, 200, 400)]
    >>> round(growth_exponents(pts)["m"], 6)
    1.0
    """
    by_model: dict[str, list[SweepPoint]] = {}
    for p in points:
        by_model.setdefault(p.model, [])
        if not p.skipped:
            by_model[p.model].append(p)
    return {
        name: fit_growth_exponent([p.pixels for p in pts], [p.ms_per_image for p in pts])
        for name, pts in by_model.items()
    }


# ---- reporting ---------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | torch.device = "cpu") -> dict[str, str]:
    """What a benchmark number depends on: date, CPU, cores, threads, load, torch/timm, GPU.

    >>> sorted(machine_info())[:3]
    ['cores', 'cpu', 'date']
    """
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": _cpu_model(),
        "cores": f"{usable} usable of {cores}",
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "timm": timm.__version__,
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):
        info["load_avg"] = " ".join(f"{v:.2f}" for v in os.getloadavg()) + " (1/5/15 min)"
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = str(torch.version.cuda)
    return info


def _format_header(info: dict[str, str], settings: str) -> str:
    lines = [f"- {key}: {value}" for key, value in info.items()]
    return "\n".join(lines + [f"- settings: {settings}"])


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if r else ":---" for r in right) + "|"]
    out.extend("| " + " | ".join(row) + " |" for row in rows)
    return "\n".join(out)


def _short(name: str) -> str:
    return name.split("_patch")[0] if name.startswith(("swin", "vit")) else name


def results_to_markdown(results: Sequence[BenchResult], peers: Sequence[str] = ()) -> str:
    """Markdown table of a :func:`benchmark` run: the CSV's numbers, plus a column per peer ratio.

    The ``x <peer>`` columns are paired (per-repeat) ratios like ``ratio_vs_baseline``.

    >>> r = BenchResult("a", [10.0, 12.0], 1, 224, 1.0, "cpu", "none", False, False, 1, "a", 1.0)
    >>> print(results_to_markdown([r]).splitlines()[2])
    | a | 11.00 | 90.909 | 1 | 224 | 1.00 | 1.000 | 18.2 |
    """
    by_name = {r.model: r for r in results}
    peers = [p for p in dict.fromkeys(peers) if p in by_name and (not results or p != results[0].baseline)]
    baseline = results[0].baseline if results else ""
    shorts = [_short(n) for n in [baseline, *peers]]
    # short names only where no two models of the table share one (vit_small_patch16 / _patch32 both "vit_small")
    every_short = [_short(r.model) for r in results]
    distinct = all(every_short.count(n) == 1 for n in shorts)
    names = shorts if distinct else [baseline, *peers]
    header = ["model", "samples/s", "step (ms)", "batch", "img", "params (M)"] + [f"x {n}" for n in names]
    header += ["spread %"]
    rows = []
    for r in results:
        row = r.as_row()
        cells = [row[c] for c in CSV_COLUMNS[:6]] + [row["ratio_vs_baseline"]]
        cells += [f"{r.ratio_to(by_name[p]):.3f}" for p in peers] + [row["spread_pct"]]
        rows.append(cells)
    return _markdown_table(header, rows, [False] + [True] * (len(header) - 1))


def results_to_csv(results: Sequence[BenchResult], path: str | os.PathLike, peers: Sequence[str] = ()) -> None:
    """Write a :func:`benchmark` run as CSV in timm ``benchmark.py`` columns (:data:`CSV_COLUMNS`), plus a
    ``ratio_vs_<peer>`` column (paired, like ``ratio_vs_baseline``) for each of ``peers`` that was measured.

    >>> import tempfile, os
    >>> r = BenchResult("a", [10.0], 1, 224, 1.0, "cpu", "none", False, False, 1, "a", 1.0)
    >>> p = os.path.join(tempfile.mkdtemp(), "r.csv"); results_to_csv([r], p)
    >>> open(p).read().splitlines()[1].split(",")[:3]
    ['a', '10.00', '100.000']
    """
    by_name = {r.model: r for r in results}
    peers = [p for p in dict.fromkeys(peers) if p in by_name]
    rows = [{**r.as_row(), **{f"ratio_vs_{p}": f"{r.ratio_to(by_name[p]):.3f}" for p in peers}} for r in results]
    _write_csv(path, CSV_COLUMNS + [f"ratio_vs_{p}" for p in peers], rows)


def sweep_to_csv(points: Sequence[SweepPoint], path: str | os.PathLike) -> None:
    """Write a :func:`resolution_sweep` as CSV (:data:`SWEEP_COLUMNS`), skipped points included.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "s.csv"); sweep_to_csv([SweepPoint("m", 64, 1, skipped="x")], p)
    >>> open(p).read().splitlines()[1].split(",")[-2:]  # skipped (why), and no repeats
    ['x', '']
    """
    _write_csv(path, SWEEP_COLUMNS, [p.as_row() for p in points])


def _write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[dict[str, str]]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def sweep_to_markdown(points: Sequence[SweepPoint]) -> str:
    """Markdown tables of a sweep: one row per (model, size), then the fitted exponent per model.

    >>> pts = [SweepPoint("m", s, 1, ms_per_image_runs=[s * s / 1e3]) for s in (100, 200)]
    >>> _fill_relative_cost(pts); print(sweep_to_markdown(pts).splitlines()[3])
    | m | 200 | 40000 | 40.00 | 1000.00 | 1.000 |  |
    """
    header = ["model", "img", "pixels", "ms/image", "ms/MP", "cost/pixel rel.", "skipped"]
    rows = []
    for p in sorted(points, key=lambda p: (p.model, p.pixels)):
        row = p.as_row()
        rows.append(
            [row[c] for c in ("model", "img_size", "pixels", "ms_per_image", "ms_per_megapixel")]
            + [row["cost_per_pixel_rel"], row["skipped"]]
        )
    table = _markdown_table(header, rows, [False, True, True, True, True, True, False])
    fits = growth_exponents(points)
    last = {}
    for p in sorted(points, key=lambda p: p.pixels):
        if not p.skipped:
            last[p.model] = p
    fit_rows = [
        [name, _exponent(k), size_label(last[name].img_size) if name in last else "", _rel(last.get(name))]
        for name, k in fits.items()
    ]
    fit_table = _markdown_table(
        ["model", "growth exponent k (t ~ pixels^k)", "largest size", "cost/pixel there, rel. to smallest"],
        fit_rows,
        [False, True, True, True],
    )
    return table + "\n\n" + fit_table


def _exponent(k: float, digits: int = 3) -> str:
    return "n/a (fewer than 2 measured sizes with distinct pixel counts)" if math.isnan(k) else f"{k:.{digits}f}"


def _rel(point: SweepPoint | None) -> str:
    return "" if point is None else f"{point.cost_per_pixel_rel:.3f}"


def plot_sweep(points: Sequence[SweepPoint], path: str | os.PathLike, title: str = "") -> None:
    """Save a PNG of a sweep: latency per image (log) and relative cost per pixel against input size (log).

    >>> import tempfile, os
    >>> pts = [SweepPoint("m", s, 1, ms_per_image_runs=[s * s / 1e3]) for s in (100, 200)]
    >>> _fill_relative_cost(pts); p = os.path.join(tempfile.mkdtemp(), "s.png"); plot_sweep(pts, p)
    >>> open(p, "rb").read(8) == b"\\x89PNG\\r\\n\\x1a\\n"
    True
    """
    fig = sweep_figure(points, title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def sweep_figure(points: Sequence[SweepPoint], title: str = ""):
    """The matplotlib ``Figure`` that :func:`plot_sweep` saves (latency panel first, cost panel second)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone
    from matplotlib.ticker import (
        FixedFormatter,
        FixedLocator,
        LogLocator,
        NullFormatter,
        NullLocator,
        ScalarFormatter,
    )

    fits = growth_exponents(points)
    measured = [p for p in points if not p.skipped]
    ticks: dict[float, list[str]] = {}  # x position (square root of the pixel count) -> size labels there
    for p in sorted(measured, key=lambda p: p.pixels):
        labels = ticks.setdefault(math.sqrt(p.pixels), [])
        if size_label(p.img_size) not in labels:
            labels.append(size_label(p.img_size))
    fig = Figure(figsize=(12, 4.8))
    ax_t, ax_c = fig.subplots(1, 2)
    for name in dict.fromkeys(p.model for p in points):
        pts = sorted((p for p in measured if p.model == name), key=lambda p: p.pixels)
        if not pts:
            continue
        label = f"{name} (k = {_exponent(fits[name], 2)})" if not math.isnan(fits[name]) else f"{name} (one size)"
        side = [math.sqrt(p.pixels) for p in pts]
        ax_t.plot(side, [p.ms_per_image for p in pts], marker="o", label=label)
        ax_c.plot(side, [p.cost_per_pixel_rel for p in pts], marker="o", label=label)
    ax_c.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="linear in pixels (k = 1)")
    firsts = {min(p.pixels for p in measured if p.model == m) for m in {p.model for p in measured}}
    if len(firsts) == 1:  # every model's cost is relative to the same size
        reference = "relative to " + "/".join(next(iter(ticks.values()))) + " px"
    else:
        reference = "relative to each model's smallest measured size"
    ax_t.set_yscale("log")  # latency spans decades; relative cost per pixel stays within a few x
    ax_t.yaxis.set_major_formatter(ScalarFormatter())
    latencies = [p.ms_per_image for p in measured]
    spans_a_decade = bool(latencies) and max(latencies) >= 10 * min(latencies)
    # within one decade there may be no power of ten on the axis at all: label the minor ticks then; over one to
    # three decades powers of ten alone leave one or two numbers (1.3-36 ms: only "10"): label 1, 2, 5 x 10^n
    ax_t.yaxis.set_minor_formatter(NullFormatter() if spans_a_decade else ScalarFormatter())
    if spans_a_decade and max(latencies) < 1000 * min(latencies):
        ax_t.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax_c.set_ylim(bottom=0)
    for ax, ylabel in (
        (ax_t, "latency per image (ms)"),
        (ax_c, f"time per pixel, {reference}"),
    ):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(list(ticks)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FixedFormatter(["\n".join(labels) for labels in ticks.values()]))
        ax.set_xlabel("input size (side, or height x width; placed at the square root of the pixel count)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_title("Latency per image")
    ax_c.set_title("Cost per pixel (k = fitted growth exponent, t ~ pixels^k)")
    ax_t.legend(fontsize=8)
    ax_c.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ---- command line ------------------------------------------------------------------------------------


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _size(text: str) -> Size:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _size_list(text: str) -> list[Size]:
    sizes = [_size(t) for t in _csv_list(text)]
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given; e.g. --sweep 224,320,448")
    return sizes


def _describe(preset: dict) -> str:
    def show(value) -> str:
        if isinstance(value, list):
            return ",".join(size_label(v) if isinstance(v, tuple) else str(v) for v in value)
        return size_label(value) if isinstance(value, tuple) else str(value)

    flags = []
    for key, value in preset.items():
        flag = key.replace("_", "-")
        flags.append(
            (f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else f"--{flag} {show(value)}"
        )
    return " ".join(flags)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hatplug.bench",
        description="Inference throughput (default) or resolution-scaling (--sweep) benchmark of timm, "
        "FasterViT and hatplug models, measured interleaved in one process.",
        epilog="presets (flags given beside --preset override its values):\n"
        + "\n".join(f"  {name}: {_describe(preset)}" for name, preset in PRESETS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="a published configuration (see below)")
    p.add_argument(
        "--models",
        type=_csv_list,
        help="comma-separated timm model names (throughput mode); NAME:unfused runs NAME with inference-time "
        "folding off (hatplug.layers.fusion), for a before/after in one run; package.module:function measures "
        "the model that function(img_size=...) returns (a model timm does not know)",
    )
    p.add_argument("--baseline", help="model the ratio column refers to (default: the first model)")
    p.add_argument("--peers", type=_csv_list, help="models to print extra ratio columns against")
    p.add_argument("--batch-size", type=int, help="default 16 (throughput), 1 (sweep)")
    p.add_argument(
        "--img-size", type=_size, help="input side (224) or height x width (224x448), default 224 (throughput mode)"
    )
    p.add_argument("--device", help="cpu (default), cuda, cuda:N")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), help="autocast dtype, default none (fp32)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="NHWC layout")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile")
    p.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads for the run (default: torch's choice, usually one per core); 1 avoids "
        "OpenMP barrier stalls when other processes share the cores",
    )
    p.add_argument(
        "--warmup",
        type=int,
        help="untimed forwards per model before timing (at least 1 runs: it checks the model); default "
        f"{_BENCH_DEFAULTS['warmup']}, sweep {_SWEEP_DEFAULTS['warmup']}",
    )
    p.add_argument(
        "--repeats",
        type=int,
        help="timed repeats (median reported), interleaved over models; default "
        f"{_BENCH_DEFAULTS['repeats']}, sweep {_SWEEP_DEFAULTS['repeats']}",
    )
    p.add_argument(
        "--iters",
        type=int,
        help=f"forwards per timed repeat; default {_BENCH_DEFAULTS['iters']}, sweep {_SWEEP_DEFAULTS['iters']} "
        "(presets set their own)",
    )
    p.add_argument(
        "--sweep", type=_size_list, help="resolution sweep over these sizes (sides or HxW), e.g. 224,320,448,224x448"
    )
    p.add_argument("--sweep-models", type=_csv_list, help="models of the sweep")
    p.add_argument("--csv", type=Path, help="write the results as CSV")
    p.add_argument("--markdown", type=Path, help="write the report (header + tables) as markdown")
    p.add_argument("--plot", type=Path, help="sweep only: write a PNG plot")
    return p


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Command-line flags over the preset over the mode's defaults."""
    preset = PRESETS.get(args.preset, {})
    given = {k: v for k, v in vars(args).items() if v is not None and k != "preset"}
    if "sweep" in given and preset and not preset.get("sweep"):
        parser.error(f"--sweep with --preset {args.preset}: that preset measures throughput; use --preset sweep")
    sweep = given.get("sweep", preset.get("sweep"))
    settings = {**(_SWEEP_DEFAULTS if sweep else _BENCH_DEFAULTS), **preset, **given}
    if not sweep:
        for flag in ("sweep_models", "plot"):
            if flag in given:
                parser.error(f"--{flag.replace('_', '-')} needs --sweep (or --preset sweep)")
        unknown = [p for p in given.get("peers", ()) if p not in settings["models"]]
        if unknown:
            parser.error(f"--peers {','.join(unknown)}: not among the benchmarked models {settings['models']}")
        if "peers" not in given and settings.get("peers"):  # a preset's columns for the models still benchmarked
            settings["peers"] = [p for p in settings["peers"] if p in settings["models"]]
        if "baseline" not in given and settings.get("baseline") not in settings["models"]:
            settings["baseline"] = None  # the preset's baseline is not benchmarked: the first model is
    else:
        moved = (("models", "--sweep-models"), ("img_size", "--sweep"), ("baseline", None), ("peers", None))
        for flag, instead in moved:
            if flag in given:
                hint = f"; use {instead}" if instead else " (a sweep rates each model against its own smallest size)"
                parser.error(f"--{flag.replace('_', '-')} is not used with --sweep{hint}")
    for key in ("batch_size", "repeats", "iters", "threads"):
        if key in given and given[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, got {given[key]}")
    if "warmup" in given and given["warmup"] < 0:
        parser.error(f"--warmup must be at least 0, got {given['warmup']}")
    outputs = [flag for flag in ("csv", "markdown", "plot") if given.get(flag) is not None]
    for i, flag in enumerate(outputs):
        same = next((o for o in outputs[:i] if Path(given[o]).resolve() == Path(given[flag]).resolve()), None)
        if same:
            parser.error(
                f"--{same} and --{flag} name the same file {given[flag]}: the second would overwrite the first"
            )
    for flag in ("csv", "markdown", "plot"):  # before the run, not after minutes of measuring
        if given.get(flag) is not None:
            problem = _unwritable(Path(given[flag]))
            if problem:
                parser.error(f"--{flag} {given[flag]}: {problem}")
    return settings


def _unwritable(path: Path) -> str:
    """Why ``path`` cannot be written as a file ('' if it can), found before minutes of measuring. Leaves nothing
    behind (a run refused later, e.g. for a misspelt model, must not leave empty folders): missing folders are
    made when the file is written, so the nearest existing one must be a folder where a file can be created,
    which a temporary file tries (``os.access`` says yes to root anywhere, /proc included)."""
    if path.is_dir():
        return "is a folder; give a file name"
    parent = path.absolute().parent
    folder = parent
    while not folder.exists():
        folder = folder.parent
    problem = "cannot create its folder" if folder != parent else f"its folder {parent} is not writable"
    if not folder.is_dir():
        return f"cannot create its folder ({folder} is a file)"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"{problem} ({exc})"
    return ""


def _settings_line(s: dict, sweep: bool) -> str:
    parts = [
        f"device={s['device']}",
        f"amp={s['amp']}",
        f"channels_last={s['channels_last']}",
        f"compile={s['compile']}",
        f"batch={s['batch_size']}",
    ]
    if not sweep:
        parts.append(f"img={size_label(s['img_size'])}")
    parts += [f"warmup={max(s['warmup'], 1)}", f"repeats={s['repeats']}", f"iters={s['iters']}"]
    if sweep:
        parts.append("(iters scaled by smallest_pixels/pixels per size, min 1)")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m hatplug.bench``); returns the exit status.

    >>> main(["--models", "faster_vit_0_224", "--batch-size", "1", "--warmup", "0", "--repeats", "1",
    ...       "--iters", "1"])  # doctest: +ELLIPSIS
    # hatplug benchmark: inference throughput
    ...
    0
    """
    parser = _parser()
    args = parser.parse_args(argv)
    s = _resolve(args, parser)
    command = "python -m hatplug.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        device = _resolve_device(s["device"])
    except DeviceUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    try:
        if s.get("threads"):
            torch.set_num_threads(s["threads"])
        _run(s, command, machine_info(device))
    except BenchInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    return 0


def _run(s: dict, command: str, info: dict[str, str]) -> None:
    sweep = s.get("sweep")
    started = time.perf_counter()
    run = dict(device=s["device"], amp=s["amp"], channels_last=s["channels_last"], compile=s["compile"])
    run.update(batch_size=s["batch_size"], warmup=s["warmup"], repeats=s["repeats"], iters=s["iters"])
    if sweep:
        points = resolution_sweep(s["sweep_models"], sweep, **run)
        body = sweep_to_markdown(points)
        title = "# hatplug benchmark: resolution sweep"
    else:
        results = benchmark(s["models"], img_size=s["img_size"], baseline=s.get("baseline"), **run)
        body = results_to_markdown(results, s.get("peers", ()))
        title = "# hatplug benchmark: inference throughput"
    if hasattr(os, "getloadavg"):
        info["load_avg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg()) + " (1/5/15 min)"
    info["wall_time"] = f"{time.perf_counter() - started:.0f} s"
    report = f"{title}\n\n`{command}`\n\n{_format_header(info, _settings_line(s, bool(sweep)))}\n\n{body}\n"
    print(report)
    if s.get("csv") and sweep:
        sweep_to_csv(points, s["csv"])
    elif s.get("csv"):
        results_to_csv(results, s["csv"], s.get("peers", ()))
    if s.get("markdown"):
        Path(s["markdown"]).parent.mkdir(parents=True, exist_ok=True)
        Path(s["markdown"]).write_text(report)
    if sweep and s.get("plot"):
        plot_sweep(
            points,
            s["plot"],
            title=f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} on {info['torch_threads']} "
            f"thread(s), batch {s['batch_size']}, {'fp32' if s['amp'] == 'none' else s['amp']}, {info['date']}",
        )


if __name__ == "__main__":
    sys.exit(main())
