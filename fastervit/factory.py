"""The registered FasterViT variants, ``create_model``, and official-checkpoint handling."""

from __future__ import annotations

import difflib
import logging
import operator
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._hub import _EXT_PRIORITY, _PREFERRED_FILES
from timm.models._input import update_model_input_size
from timm.models._manipulate import adapt_input_conv
from torch import Tensor, nn

from hatplug.checkpoint import LoadReport, load_checkpoint
from hatplug.errors import CheckpointMismatchError, PretrainedWeightsNotFoundError
from hatplug.models.heads import drop_pool_of_pruned_head

from .model import FasterViT, _is_integer, _to_2tuple, check_output_fmt
from .resize import AdaptReport, load_adapted

_logger = logging.getLogger(__name__)

__all__ = ["create_model", "list_models", "checkpoint_filter_fn", "pretrained_file", "CHECKPOINT_DIR_ENV"]

CHECKPOINT_DIR_ENV = "HATPLUG_CHECKPOINT_DIR"
OFFLINE_ENVS = ("HATPLUG_OFFLINE", "HF_HUB_OFFLINE")
_HUB = "https://huggingface.co/ahatamiz/FasterViT/resolve/main/"

_F, _T = False, True
_BASE = dict(mlp_ratio=4, ct_size=2, window_size=[7, 7, 7, 7], hat=[_F, _F, _T, _F])
_LS = dict(layer_scale=1e-5, layer_scale_conv=None, do_propagation=True)
_ARCHS = {  # architecture of each size: ../shared/REFERENCE.md section 1
    "0": dict(_BASE, depths=[2, 3, 6, 5], dim=64, in_dim=64, num_heads=[2, 4, 8, 16], drop_path_rate=0.2),
    "1": dict(_BASE, depths=[1, 3, 8, 5], dim=80, in_dim=32, num_heads=[2, 4, 8, 16], drop_path_rate=0.2),
    "2": dict(_BASE, depths=[3, 3, 8, 5], dim=96, in_dim=64, num_heads=[2, 4, 8, 16], drop_path_rate=0.2),
    "3": dict(_BASE, **_LS, depths=[3, 3, 12, 5], dim=128, in_dim=64, num_heads=[2, 4, 8, 16], drop_path_rate=0.3),
    "4": dict(_BASE, **_LS, depths=[3, 3, 12, 5], dim=196, in_dim=64, num_heads=[4, 8, 16, 32], drop_path_rate=0.3),
    "5": dict(_BASE, **_LS, depths=[3, 3, 12, 5], dim=320, in_dim=64, num_heads=[4, 8, 16, 32], drop_path_rate=0.3),
    "6": dict(_BASE, **_LS, depths=[3, 3, 16, 8], dim=320, in_dim=64, num_heads=[4, 8, 16, 32], drop_path_rate=0.5),
}
_21K_WINDOWS = {224: [7, 7, 14, 7], 384: [7, 7, 24, 12], 512: [7, 7, 32, 16], 768: [7, 7, 48, 24]}
_21K_FILES = {
    224: "fastervit_4_21k_224_w14",
    384: "fastervit_4_21k_384_w24",
    512: "fastervit_4_21k_512_w32",
    768: "fastervit_4_21k_768_w48",
}
_21K_CROP = {224: 0.95, 384: 1.0, 512: 1.0, 768: 0.93}

# name -> (model kwargs, pretrained cfg)
_VARIANTS: dict[str, tuple[dict, dict]] = {}


def _cfg(file: str, size: int, crop_pct: float, crop_mode: str) -> dict:
    return dict(
        url=_HUB + file + ".pth.tar",
        num_classes=1000,
        input_size=(3, size, size),
        pool_size=None,
        crop_pct=crop_pct,
        crop_mode=crop_mode,
        interpolation="bicubic",
        fixed_input_size=True,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        first_conv="patch_embed.conv_down.0",
        classifier="head",
        license="NVIDIA Source Code License-NC (weights)",
    )


for _size, _arch in _ARCHS.items():
    _c = _cfg(f"fastervit_{_size}_224_1k", 224, 0.875 if _size == "0" else 1.0, "center")
    _VARIANTS[f"faster_vit_{_size}_224"] = (dict(_arch, resolution=224), _c)
    _VARIANTS[f"faster_vit_{_size}_any_res"] = (dict(_arch, resolution=[541, 960] if _size == "2" else [576, 960]), _c)
for _res, _windows in _21K_WINDOWS.items():
    _arch = dict(_ARCHS["4"], window_size=_windows, hat=[_F, _F, _F, _F], drop_path_rate=0.42)
    _c = _cfg(_21K_FILES[_res], _res, _21K_CROP[_res], "squash")
    _VARIANTS[f"faster_vit_4_21k_{_res}"] = (dict(_arch, resolution=_res), _c)
    _VARIANTS[f"faster_vit_4_21k_{_res}_any_res"] = (dict(_arch, resolution=[576, 960], drop_path_rate=0.3), _c)

default_cfgs = generate_default_cfgs({name: cfg for name, (_, cfg) in _VARIANTS.items()})


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map an official (or timm-saved) FasterViT state dict onto this implementation's keys.

    The official layout is ours, so this only strips wrappers: leading ``encoder.`` (the official
    detection/segmentation backbones), ``_orig_mod.`` (``torch.compile``) and ``module.`` (DDP), in any order
    and nesting, and, when every key has it, ``model.``
    (the state dict of a ``features_only`` backbone, whose FasterViT is its ``model``).

    Example:
        >>> import fastervit
        >>> model = fastervit.create_model("faster_vit_0_224")
        >>> saved = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # from a torch.compile'd model
        >>> list(fastervit.checkpoint_filter_fn(saved, model)) == list(model.state_dict())
        True
    """
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:  # in any order and nesting: torch.compile(DDP(model)) saves "_orig_mod.module."
            stripped = False
            for prefix in ("_orig_mod.", "module.", "encoder."):
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    if out and all(key.startswith("model.") for key in out):  # FasterViT itself has no submodule "model"
        out = {key[len("model.") :]: value for key, value in out.items()}
    return out


def pretrained_file(name: str, url: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local path of the official checkpoint of ``name`` (or of ``url``'s file), downloading it when allowed.

    Looks in ``$HATPLUG_CHECKPOINT_DIR`` and then in ``cache_dir`` (timm's ``create_model(cache_dir=...)``) or,
    without one, torch hub's checkpoint folder. If the file is in neither, it is downloaded into the latter
    unless ``HATPLUG_OFFLINE`` or ``HF_HUB_OFFLINE`` is on (1, true, yes or on); if that is not possible the error
    says which file, where to put it and where it is published.

    Example (a file already in ``cache_dir``; nothing is downloaded):
        >>> import pathlib, tempfile, fastervit
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "fastervit_0_224_1k.pth.tar").write_bytes(b"")  # stands in for the official file
        >>> fastervit.pretrained_file("faster_vit_0_224", cache_dir=folder) == folder / "fastervit_0_224_1k.pth.tar"
        True
    """
    url = url or _VARIANTS[_canonical(name)][1]["url"]
    file_name = url.rsplit("/", 1)[-1]
    folders = [Path(os.environ[CHECKPOINT_DIR_ENV])] if os.environ.get(CHECKPOINT_DIR_ENV) else []
    folders.append(Path(cache_dir).expanduser() if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints")
    for folder in folders:
        if (folder / file_name).is_file():
            return folder / file_name
    hint = (
        f"pretrained weights for {name!r} not found: looked for {file_name} in "
        f"{', '.join(str(f) for f in folders)}. Download {url} and put it in one of those folders "
        f"(or set {CHECKPOINT_DIR_ENV}), or pass checkpoint_path=... . The weights are published by NVIDIA "
        f"under a non-commercial licence."
    )
    offline = [env for env in OFFLINE_ENVS if _env_true(env)]
    if offline:
        raise PretrainedWeightsNotFoundError(hint + f" (offline mode: {offline[0]}={os.environ[offline[0]]})")
    folders[-1].mkdir(parents=True, exist_ok=True)
    target = folders[-1] / file_name
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as exc:  # no network, HTTP error, disk full: all end the same way
        raise PretrainedWeightsNotFoundError(hint + f" (download failed: {exc})") from exc
    return target


def _env_true(name: str) -> bool:
    """Whether environment variable ``name`` is switched on, read as huggingface_hub reads HF_HUB_OFFLINE: 1, ON,
    YES or TRUE (any case); unset, empty, 0, false, no or off are off."""
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a FasterViT model name is a string such as 'faster_vit_0_224', got {name!r}")
    name, _, tag = name.partition(".")  # timm-style "name.tag"
    if tag and name in _VARIANTS:
        raise ValueError(
            f"unknown pretrained tag {tag!r} for {name}: each FasterViT variant has one set of published weights, "
            f"under the plain name; create {name!r}"
        )
    if name not in _VARIANTS:
        close = difflib.get_close_matches(name.lower().replace("-", "_"), list(_VARIANTS), n=3)
        raise ValueError(
            f"unknown FasterViT model {name!r}"
            + (f"; did you mean {', '.join(close)}?" if close else ".")
            + " See fastervit.list_models()."
        )
    return name


def _create(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    strict: bool = True,
    adapt_geometry: bool = False,
    **kwargs,
) -> nn.Module:
    name = _canonical(name)
    arch, cfg = _VARIANTS[name]
    # what timm.models.get_model_args / save_for_hf rebuild the model from (timm.create_model records its own)
    model_args = {k: v for k, v in kwargs.items() if k not in _NOT_MODEL_ARGS}
    # timm calls the input size img_size, the official code resolution: accept either, both only if they agree
    # (timm's get_model_args adds img_size to the resolution a model was created with)
    img_size, resolution = kwargs.pop("img_size", None), kwargs.pop("resolution", None)
    if img_size is not None and resolution is not None and _to_2tuple(img_size) != _to_2tuple(resolution):
        raise ValueError(f"got img_size={img_size} and resolution={resolution}; pass only one")
    feature_cfg = _take_feature_cfg(kwargs)
    feature_cls = kwargs.pop("feature_cls", feature_cfg.pop("feature_cls", "getter"))
    output_stride = kwargs.pop("output_stride", None)
    if output_stride is not None and (not _is_integer(output_stride) or output_stride != 32):
        raise ValueError(
            f"output_stride={output_stride!r}: FasterViT has no dilated variant, its last map is at stride 32 (pass "
            "output_stride=32 or leave it out; for a stride-16 map take out_indices=(2,) with features_only=True)"
        )
    if feature_cls != "getter":
        raise ValueError(
            f"feature_cls={feature_cls!r} is not supported by FasterViT: its features are taken by "
            "forward_intermediates (feature_cls='getter', the default), since a level's feature map is the "
            "output of its blocks before the downsample, which no single module returns"
        )
    num_levels = len(kwargs.get("depths", arch["depths"]))
    if "out_indices" in kwargs:
        if not kwargs.get("features_only"):
            raise ValueError("out_indices selects feature maps: pass it together with features_only=True")
        _check_out_indices(kwargs["out_indices"], num_levels)
        kwargs["out_indices"] = _plain_indices(kwargs["out_indices"])
    for flag, value in (("pretrained", pretrained), ("strict", strict), ("adapt_geometry", adapt_geometry)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be True or False, got {value!r}")
    if pretrained and not strict:
        raise ValueError(
            "strict=False applies to checkpoint_path=...; for the published weights (pretrained=True) pass "
            "pretrained_strict=False (timm's name) to load what fits"
        )
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    if device is not None and torch.device(device).type == "meta" and (pretrained or checkpoint_path is not None):
        raise ValueError(
            "device='meta' builds a model without storage, so no weights can be loaded into it: build it on a real "
            "device, or load after model.to_empty(device=...) and timm's reinit_non_persistent_buffers(model) "
            "(timm.models._manipulate), which recomputes the geometry tables"
        )
    if pretrained and checkpoint_path is not None:
        raise ValueError(
            "got pretrained=True and checkpoint_path: pass one (checkpoint_path loads your file instead of the "
            "published weights)"
        )
    out_indices = kwargs.pop("out_indices", tuple(range(num_levels)))
    pruned = (
        _PrunedKeys(out_indices, num_levels, bool(feature_cfg.get("norm"))) if kwargs.get("features_only") else None
    )
    kwargs = drop_pool_of_pruned_head({**arch, **kwargs})
    default = kwargs.pop("resolution")
    kwargs["img_size"] = img_size if img_size is not None else resolution if resolution is not None else default
    # the any-resolution variants are published with the 224 weights: moving those is a geometry change
    adapt_pretrained = adapt_geometry or name.endswith("_any_res")

    # timm.create_model's options for pretrained weights (build_model_with_cfg would take and ignore them here)
    cache_dir, pretrained_strict = kwargs.pop("cache_dir", None), kwargs.pop("pretrained_strict", True)
    if not isinstance(pretrained_strict, bool):
        raise ValueError(f"pretrained_strict must be True or False, got {pretrained_strict!r}")
    merged = _pretrained_cfg(name, kwargs)
    source = _pretrained_source(name, merged, cache_dir) if pretrained else None

    def build(device=None, dtype=None, **model_kwargs) -> FasterViT:
        # weights go in here, before build_model_with_cfg wraps a features_only model (which prunes the
        # norm and the head)
        with torch.device(device) if device is not None else nullcontext():
            model = FasterViT(**model_kwargs)
        if device is not None and torch.device(device).type != "meta":
            model.to(device)  # the carrier-token orders are computed on the CPU (on meta, to_empty places them)
        if dtype is not None:
            model.to(dtype)
        if pretrained:
            model.load_report = _load_pretrained(model, source, merged, adapt_pretrained, pretrained_strict)
        if checkpoint_path is not None:
            with _input_channels_hint(model):
                model.load_report = _load_file(model)
        return model

    def _load_file(model: FasterViT) -> LoadReport:
        if adapt_geometry:
            return load_adapted(model, checkpoint_path, strict, filter_fn=checkpoint_filter_fn, ignore_missing=pruned)
        return load_checkpoint(
            model,
            checkpoint_path,
            strict=strict,
            filter_fn=checkpoint_filter_fn,
            ignore_missing=pruned,
            mismatch_hint="If the checkpoint was trained at another resolution, window size or number of "
            "classes, pass adapt_geometry=True (keeps every tensor that fits, re-initialises the classifier "
            "and the carrier-token tensors that do not, and reports which); otherwise strict=False loads "
            "the matching tensors anyway.",
        )

    model = build_model_with_cfg(
        build,
        name,
        pretrained=False,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices, **feature_cfg),
        **kwargs,
    )
    model._model_args = dict(getattr(model, "_model_args", {}), **model_args)
    inner = getattr(model, "model", model)  # the FasterViT inside a features_only wrapper
    if model is not inner:
        if hasattr(inner, "load_report"):
            model.load_report = _without_pruned(inner.load_report, pruned)
        model.set_input_size = partial(_set_backbone_input_size, model)
        # timm's training helpers, which the wrapper lacks; the names it gives parameters begin with "model."
        model.set_grad_checkpointing = inner.set_grad_checkpointing
        model.no_weight_decay = partial(_prefixed_no_weight_decay, inner)
        model.group_matcher = partial(_prefixed_group_matcher, inner)
        model.register_load_state_dict_pre_hook(_ClassifierKeysIntoBackbone(pruned))
    return model


_STEM = "patch_embed.conv_down.0.weight"


@contextmanager
def _input_channels_hint(model: FasterViT) -> Iterator[None]:
    """A checkpoint whose stem takes another number of input channels than ``in_chans``: the mismatch error says
    so and how to adapt it (the generic hint, adapt_geometry=True, fails the same way)."""
    try:
        yield
    except CheckpointMismatchError as error:
        stem = next((m for m in getattr(error.report, "mismatched", []) if m[0] == _STEM), None)
        if stem is None or len(stem[1]) != 4 or stem[1][1] == stem[2][1]:
            raise
        raise CheckpointMismatchError(
            f"{error}\nThe checkpoint's stem takes {stem[1][1]}-channel images and this model in_chans="
            f"{model.in_chans}: build it with in_chans={stem[1][1]}, or adapt the first conv as timm does for "
            "pretrained weights (timm.models.adapt_input_conv on the checkpoint's "
            f"{_STEM!r}, or pretrained=True with pretrained_cfg_overlay=dict(file=<this file>), which does that).",
            report=error.report,
        ) from None


def _without_pruned(report: LoadReport, pruned: _PrunedKeys) -> LoadReport:
    """The load report of a ``features_only`` backbone: tensors of the modules the wrapper then pruned (the levels
    after the last one returned, the norm, the head) count as dropped (an ``AdaptReport``'s ``dropped``, a
    ``LoadReport``'s unused ``derived``), not as loaded, replaced or new."""
    gone = [key for key in (*report.loaded, *report.replaced) if pruned(key)]
    report.loaded = [key for key in report.loaded if not pruned(key)]
    report.replaced = [key for key in report.replaced if not pruned(key)]
    if isinstance(report, AdaptReport):
        report.new = [key for key in report.new if not pruned(key)]
        report.dropped = [*report.dropped, *gone]
    else:
        report.derived = [*report.derived, *gone]
    return report


def _prefixed_no_weight_decay(inner: FasterViT) -> set[str]:
    return {f"model.{name}" for name in inner.no_weight_decay()}


def _prefixed_group_matcher(inner: FasterViT, coarse: bool = False) -> dict:
    def prefix(pattern: str) -> str:
        return r"^model\." + pattern[1:] if pattern.startswith("^") else r"model\." + pattern

    matcher = {}
    for group, spec in inner.group_matcher(coarse).items():
        if isinstance(spec, str):
            matcher[group] = prefix(spec)
        else:
            matcher[group] = [(prefix(pattern), suffix) for pattern, suffix in spec]
    return matcher


_FEATURE_CFG_KEYS = ("feature_cls", "out_indices", "norm", "output_fmt")


def _take_feature_cfg(kwargs: dict) -> dict:
    """Pop timm's ``feature_cfg`` from ``kwargs``: the options of FasterViT's feature wrapper (timm's
    ``FeatureGetterNet`` over ``forward_intermediates``) to pass on, with ``out_indices`` moved to ``kwargs``."""
    cfg = kwargs.pop("feature_cfg", None)
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise TypeError(f"feature_cfg must be a dict, got {type(cfg).__name__}")
    if not kwargs.get("features_only"):
        raise ValueError("feature_cfg configures feature maps: pass it together with features_only=True")
    cfg = dict(cfg)
    ignored = sorted({"return_dict", "out_map"} & set(cfg))
    if ignored:  # FeatureGetterNet takes them and does nothing with them ("not supported" in timm's docstring)
        raise ValueError(
            f"feature_cfg: {', '.join(ignored)} would be ignored (timm's FeatureGetterNet, which FasterViT's "
            "features use, does not support them); the maps come back as a list in level order, so name them "
            "yourself, e.g. dict(zip(names, backbone(x)))"
        )
    unknown = sorted(set(cfg) - set(_FEATURE_CFG_KEYS))
    if unknown:
        raise ValueError(
            f"feature_cfg: {', '.join(unknown)} not options of FasterViT's feature wrapper (timm's FeatureGetterNet "
            f"over forward_intermediates), which takes {', '.join(_FEATURE_CFG_KEYS)}"
        )
    check_output_fmt(cfg.get("output_fmt", "NCHW"), where="feature_cfg: ")
    if "out_indices" in cfg:
        if "out_indices" in kwargs and not _same_indices(kwargs["out_indices"], cfg["out_indices"]):
            raise ValueError(
                f"got out_indices={kwargs['out_indices']!r} and feature_cfg out_indices={cfg['out_indices']!r}: "
                "pass one"
            )
        kwargs["out_indices"] = cfg.pop("out_indices")
    return cfg


def _same_indices(a, b) -> bool:
    return (list(a) if not _is_integer(a) else a) == (list(b) if not _is_integer(b) else b)


def _plain_indices(out_indices):
    """``out_indices`` with NumPy / torch integers (also a NumPy array) as Python ints, for timm's helpers."""
    if _is_integer(out_indices):
        return operator.index(out_indices)
    return tuple(operator.index(i) if _is_integer(i) else i for i in out_indices)


def _check_out_indices(out_indices, num_levels: int) -> None:
    """A ``ValueError`` naming the problem for ``out_indices`` that timm would assert on or take wrongly: outside
    the model's levels, empty, repeated or out of order."""
    if isinstance(out_indices, bool):
        raise ValueError(f"out_indices must be an int or a sequence of level indices, got {out_indices!r}")
    if _is_integer(out_indices):
        if not 1 <= out_indices <= num_levels:
            raise ValueError(f"out_indices={out_indices} asks for the last {out_indices} levels of {num_levels}")
        return
    chosen = list(out_indices)
    if not chosen:
        raise ValueError("out_indices is empty: list the levels to return, e.g. (1, 2, 3), or leave it out for all")
    bad = [i for i in chosen if not _is_integer(i) or not -num_levels <= i < num_levels]
    if bad:
        raise ValueError(
            f"out_indices={tuple(chosen)}: {bad} not level indices of this model, which has {num_levels} levels "
            f"(0..{num_levels - 1}, or -{num_levels}..-1 from the end)"
        )
    levels, _ = feature_take_indices(num_levels, chosen)  # negatives resolved
    if levels != sorted(set(levels)):
        raise ValueError(
            f"out_indices={tuple(chosen)} must name distinct levels in increasing order (the maps come back in "
            "level order, and feature_info must list them the same way), e.g. (1, 2, 3)"
        )


class _PrunedKeys:
    """Keys that a ``features_only`` backbone for ``out_indices`` prunes (the levels after the last one it
    returns, that level's downsample, the head, and the final norm unless ``feature_cfg=dict(norm=True)`` keeps
    it for the last level's map): a checkpoint saved from such a backbone lacks them, and the FasterViT built
    before the wrapping need not find them. A class, not a closure, so that a backbone holding it still pickles."""

    def __init__(self, out_indices, num_levels: int, keep_norm: bool = False) -> None:
        _, last = feature_take_indices(num_levels, out_indices)
        levels = tuple(f"levels.{j}." for j in range(last + 1, num_levels))
        norm = () if keep_norm and last == num_levels - 1 else ("norm.",)  # as prune_intermediate_layers does
        self.prefixes = (*norm, "head.", f"levels.{last}.downsample.", *levels)

    def __call__(self, key: str) -> bool:
        return key.startswith(self.prefixes)


class _ClassifierKeysIntoBackbone:
    """``load_state_dict`` pre-hook of a ``features_only`` wrapper: a state dict of the FasterViT itself (an
    official or timm checkpoint, which ``timm.create_model(..., checkpoint_path=...)`` loads into the wrapper)
    is moved under ``model.``, less the parts the wrapper pruned; the wrapper's own state dict passes as it is."""

    def __init__(self, pruned: _PrunedKeys) -> None:
        self.pruned = pruned

    def __call__(self, module, state_dict, prefix, *args) -> None:
        keys = [k for k in state_dict if k.startswith(prefix)]
        if not keys or any(k.startswith(prefix + "model.") for k in keys):
            return
        body = checkpoint_filter_fn({k[len(prefix) :]: state_dict.pop(k) for k in keys}, module)
        for key, value in body.items():
            if not self.pruned(key):
                state_dict[prefix + "model." + key] = value


_NOT_MODEL_ARGS = ("device", "dtype", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_model_args")


def _set_backbone_input_size(backbone: nn.Module, img_size=None, window_size=None) -> None:
    """``set_input_size`` of a ``features_only`` backbone: the FasterViT inside is rebuilt, and the wrapper's
    own record of the input size (timm's ``get_model_input_config`` / ``get_model_args``) follows it."""
    inner = backbone.model
    inner.set_input_size(img_size, window_size)
    update_model_input_size(backbone, inner.img_size, window_size=inner.window_size)
    backbone._model_args.pop("resolution", None)  # img_size is the size now


def _pretrained_cfg(name: str, kwargs: dict) -> dict:
    """The variant's pretrained config with a ``pretrained_cfg`` / ``pretrained_cfg_overlay`` given to
    ``timm.create_model`` (timm's way to point at other weights) merged in."""
    cfg = dict(_VARIANTS[name][1])
    for key in ("pretrained_cfg", "pretrained_cfg_overlay"):
        given = kwargs.get(key)
        if isinstance(given, str):  # timm passes the tag of "name.tag" as pretrained_cfg
            _canonical(f"{name}.{given}")  # no variant has tagged weights: refused, naming the plain name
        elif isinstance(given, dict):
            cfg.update(given)
        elif given is not None:
            if not hasattr(given, "to_dict"):
                raise TypeError(f"{key} must be a dict or a timm PretrainedCfg, got {type(given).__name__}")
            cfg.update(given.to_dict())
    return cfg


def _pretrained_source(name: str, cfg: dict, cache_dir: str | os.PathLike | None) -> Path:
    """The file ``pretrained=True`` loads: the ``file`` of the (merged) pretrained ``cfg``, else its ``url``'s
    file (:func:`pretrained_file`)."""
    if cfg.get("file"):
        path = Path(cfg["file"]).expanduser()
        if cfg.get("source") == "local-dir" and path.is_dir():  # timm.create_model("local-dir:<folder>")
            return _checkpoint_in(path)
        if not path.is_file():
            raise PretrainedWeightsNotFoundError(f"pretrained_cfg file {str(path)!r} does not exist")
        return path
    if cfg.get("hf_hub_id") or cfg.get("state_dict") is not None:
        raise ValueError(
            "FasterViT loads pretrained weights from a file or a URL: give pretrained_cfg_overlay=dict(file=...) "
            "or checkpoint_path=... instead of hf_hub_id / state_dict"
        )
    return pretrained_file(name, cfg["url"], cache_dir)


def _checkpoint_in(folder: Path) -> Path:
    """The weights of a model folder (timm's ``save_for_hf`` layout), chosen as timm's
    ``load_state_dict_from_path`` chooses them: a file named as timm names them, else the first by suffix."""
    for name in _PREFERRED_FILES:
        if (folder / name).is_file():
            return folder / name
    for suffix in _EXT_PRIORITY:
        found = sorted(folder.glob("*" + suffix))
        if found:
            return found[0]
    raise PretrainedWeightsNotFoundError(
        f"no weights in {str(folder)!r}: expected one of {', '.join(_PREFERRED_FILES)} (what timm's save_for_hf "
        f"writes) or a {'/'.join(_EXT_PRIORITY)} file"
    )


def _adapt_to_model(state: dict[str, Tensor], model: nn.Module, cfg: dict) -> dict[str, Tensor]:
    """timm's pretrained conventions: the first conv summed / repeated to the model's ``in_chans``
    (``adapt_input_conv``)."""
    key = cfg["first_conv"] + ".weight"
    in_chans = model.patch_embed.conv_down[0].in_channels
    if key in state and state[key].shape[1] != in_chans:
        state = {**state, key: adapt_input_conv(in_chans, state[key])}
    return state


def _load_pretrained(model: nn.Module, source: Path, cfg: dict, adapt_geometry: bool, strict: bool) -> LoadReport:
    def published(state: dict[str, Tensor], m: nn.Module) -> dict[str, Tensor]:
        return _adapt_to_model(checkpoint_filter_fn(state, m), m, cfg)

    if adapt_geometry:  # also replaces a classifier of another size
        return load_adapted(model, source, strict=strict, filter_fn=published)
    replaced: list[str] = []

    def drop_other_head(state: dict[str, Tensor], m: nn.Module) -> dict[str, Tensor]:
        # a classifier is replaced where the checkpoint's does not fit this model's (another num_classes, or
        # none): decided by the tensors themselves, so that a fine-tuned head in the file loads
        state = published(state, m)
        own = dict(m.named_parameters())
        replaced.extend(k for k in state if k.startswith("head.") and (k not in own or own[k].shape != state[k].shape))
        return {k: v for k, v in state.items() if k not in replaced}

    report = load_checkpoint(
        model,
        source,
        strict=strict,
        filter_fn=drop_other_head,
        ignore_missing=lambda k: k in replaced,
        mismatch_hint="pretrained=True loads the published weights into this architecture: for another "
        "resolution or window size add adapt_geometry=True; to load what fits into another width or depth pass "
        "pretrained_strict=False (the rest keep their init).",
    )
    report.replaced = sorted(replaced)
    if replaced:
        _logger.info("classifier not loaded from %s (another size, or none here): %s", source, ", ".join(replaced))
    return report


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    strict: bool = True,
    adapt_geometry: bool = False,
    **kwargs,
) -> nn.Module:
    """Build a registered FasterViT variant, as a classifier or (``features_only=True``) a backbone.

    Args:
        name: one of :func:`list_models`, e.g. ``"faster_vit_0_224"``.
        pretrained: load the official ImageNet weights (see :func:`pretrained_file`; timm's ``cache_dir``,
            ``pretrained_cfg_overlay=dict(file=...)`` and ``pretrained_strict`` apply). The ``*_any_res``
            variants load the 224 weights through :func:`fastervit.resize.load_adapted`, whatever their
            ``resolution``. A classifier whose size differs from the file's keeps its initialisation and is
            listed in ``model.load_report.replaced`` (with ``adapt_geometry`` or an ``*_any_res`` variant: in
            ``load_report.new`` / ``.dropped``); one of the same size (a fine-tuned head in your file) loads.
        checkpoint_path: a local checkpoint to load: official ``.pth.tar`` training checkpoints (weights
            under ``state_dict`` or ``model``, ``module.`` prefixes allowed), plain state dicts or
            ``.safetensors``. Read without unpickling arbitrary objects.
        strict: with ``checkpoint_path``, raise on any missing, unexpected or mis-shaped tensor. With
            ``strict=False`` load what fits; the report is logged and kept as ``model.load_report``.
        adapt_geometry: the weights were trained for another ``resolution``, ``window_size`` or
            ``ct_size``: transfer them with :func:`fastervit.resize.load_adapted` (nothing is resized;
            carrier-token modules that the new geometry adds keep their initialisation, those it removes
            are dropped, a classifier of another size is replaced). ``model.load_report`` says which.
            Without weights to load, ``strict`` and ``adapt_geometry`` do nothing (timm records them with the
            model's arguments, so a model rebuilt from ``timm.models.get_model_args`` gets them back). Note that
            ``timm.create_model(..., checkpoint_path=...)`` loads the file itself, strictly, after building the
            model, so these two do not reach it; through timm, ``pretrained=True,
            pretrained_cfg_overlay=dict(file=path)`` loads a file with FasterViT's loader.
        **kwargs: timm's ``device`` (the model is built there; on ``"meta"`` without storage: then
            ``model.to_empty(device=...)`` and timm's ``reinit_non_persistent_buffers(model)`` make it usable) and
            ``dtype`` (a float dtype the model is cast to once initialised); official model arguments
            (``resolution``, ``window_size``, ``ct_size``, ``dim``,
            ``depths``, ``hat``, ``num_classes``, ``drop_path_rate``, ...), and timm's ``features_only``
            with ``out_indices`` (default: every level): the model then returns the listed levels'
            maps before their downsample, NCHW at strides 4, 8, 16, 32 with ``dim * 2**i`` channels, and
            its ``feature_info`` describes them.

    Example:
        >>> import fastervit, torch
        >>> model = fastervit.create_model("faster_vit_0_any_res", resolution=[200, 320]).eval()
        >>> model(torch.randn(1, 3, 200, 320)).shape
        torch.Size([1, 1000])
        >>> backbone = fastervit.create_model("faster_vit_0_any_res", resolution=[200, 320], features_only=True)
        >>> [tuple(f.shape[1:]) for f in backbone(torch.randn(1, 3, 200, 320))]
        [(64, 50, 80), (128, 25, 40), (256, 13, 20), (512, 7, 10)]
        >>> backbone.feature_info.channels(), backbone.feature_info.reduction()
        ([64, 128, 256, 512], [4, 8, 16, 32])
    """
    return _create(
        name,
        pretrained=pretrained,
        checkpoint_path=checkpoint_path,
        strict=strict,
        adapt_geometry=adapt_geometry,
        **kwargs,
    )


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered variants matching a glob ``pattern``.

    >>> list_models("faster_vit_4_21k_*")[:2]
    ['faster_vit_4_21k_224', 'faster_vit_4_21k_224_any_res']
    """
    import fnmatch

    return sorted(n for n in _VARIANTS if fnmatch.fnmatch(n, pattern))


def _make_entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return _create(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"FasterViT variant ``{name}`` (see :func:`fastervit.create_model`)."
    return entrypoint


for _name in _VARIANTS:
    setattr(sys.modules[__name__], _name, register_model(_make_entrypoint(_name)))
