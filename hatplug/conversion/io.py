"""``hatplug.save`` / ``hatplug.load``: a converted model as tensors plus its conversion config.

No module is pickled (a pickled ``GraphModule`` does not reload reliably): :func:`save` writes the state
dict as safetensors with the config of :func:`hatplug.convert` in the file's metadata, and :func:`load`
converts a fresh base model with that config and loads the tensors strictly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import directory_error, load_checkpoint
from ..errors import CheckpointError, HatplugError
from .rewrite import convert

__all__ = ["load", "save"]

FORMAT = "hatplug.convert/1"


def save(model: nn.Module, path: str | Path) -> Path:
    """Write a converted model's state dict and its conversion config to one safetensors file.

    ``model`` may be inside the wrappers of training (``torch.compile``, DDP, timm's ``ModelEmaV3``): the
    converted model inside is written, under its own keys. ``path`` must end in ``.safetensors``.

    Raises:
        TypeError: ``model`` is not a module or ``path`` not a path (or the two are swapped).
        HatplugError: ``model`` was not converted.
        CheckpointError: ``path`` is a directory, does not end in ``.safetensors``, or cannot be written.

    >>> import tempfile, os, timm, torch, hatplug
    >>> def base():
    ...     return timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2), num_heads=(1, 2),
    ...                              window_size=4, img_size=64, num_classes=10).eval()
    >>> hat = hatplug.convert(base(), init="random")
    >>> path = hatplug.save(hat, os.path.join(tempfile.mkdtemp(), "swin_hat.safetensors"))
    >>> restored = hatplug.load(path, base()).eval()
    >>> x = torch.randn(1, 3, 64, 64)
    >>> torch.equal(restored(x), hat(x))
    True
    """
    _check_arguments("save", "model", "the converted model", model, path, model_first=True)
    model = _unwrapped(model)
    info = getattr(model, "hatplug_conversion", None)
    if info is None:
        inner = next((name for name, m in model.named_modules() if name and hasattr(m, "hatplug_conversion")), None)
        if inner is not None:  # a converted model inside another module (nn.Sequential, a wrapper of one's own)
            raise HatplugError(
                f"{type(model).__name__} was not converted itself; its submodule {inner!r} was: save that one, "
                f"hatplug.save(model.get_submodule({inner!r}), path), and rebuild the outer module around "
                "hatplug.load's result"
            )
        raise HatplugError(
            f"{type(model).__name__} was not converted: hatplug.save stores converted models; use "
            "torch.save(model.state_dict(), path) for others"
        )
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"cannot save to {path}: it is a directory; pass a file path, e.g. {path / 'model.safetensors'}"
        )
    if path.suffix != ".safetensors":
        # loaders pick the format by suffix: hatplug.load_checkpoint would read a .pth as a torch.save pickle
        raise CheckpointError(
            f"cannot save to {path}: hatplug.save writes a safetensors file, and its name must end in .safetensors "
            f"so that loaders read it as one; use {path.with_suffix('.safetensors')}"
        )
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot save to {path}: the folder {path.parent} does not exist (create it first)")
    # clones: safetensors refuses tensors that share memory (aliases) and non-contiguous views
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "model": info["model"], "config": json.dumps(info["config"])}
    try:
        save_file(state, str(path), metadata=metadata)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot save to {path}: {exc} (check that the folder is writable)") from exc
    return path


def _check_arguments(func: str, model_name: str, what: str, model: object, path: object, model_first: bool) -> None:
    """A ``TypeError`` naming the argument of ``hatplug.<func>`` that is not a module / path, or saying that the
    two look swapped (a path where the module goes and a module where the path goes)."""
    call = f"hatplug.{func}({model_name}, path)" if model_first else f"hatplug.{func}(path, {model_name})"
    if isinstance(model, nn.Module) and isinstance(path, (str, os.PathLike)):
        return
    if isinstance(path, nn.Module) and isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"hatplug.{func} got a {type(model).__name__} as {model_name} and a {type(path).__name__} as path: the "
            f"arguments look swapped, call {call}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"{call}: {model_name} must be an nn.Module ({what}), got {type(model).__name__}")
    raise TypeError(f"{call}: path must be a str or os.PathLike, got {type(path).__name__}")


def _unwrapped(model: nn.Module) -> nn.Module:
    """The converted model inside the wrappers that training puts around it: ``torch.compile``'s (whose state
    dict keys start with ``_orig_mod.``) and those that hold it as ``.module`` (DDP, timm's ``ModelEmaV3``)."""
    while True:
        inner = model._modules.get("_orig_mod")
        if inner is None and getattr(model, "hatplug_conversion", None) is None:
            inner = model._modules.get("module")
        if inner is None:
            return model
        model = inner


def read_config(path: str | Path) -> dict:
    """The conversion config stored by :func:`save` (``ct_size``, ``stages``, ``init``, ``propagate``)."""
    if Path(path).is_dir():
        raise directory_error(Path(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        pickled = Path(path).is_file() and Path(path).read_bytes()[:4].startswith((b"PK\x03\x04", b"\x80"))
        hint = (
            ": it is a torch.save file; load it into a model converted with the options it was trained with, "
            "hatplug.load_checkpoint(hatplug.convert(base_model, ...), path)"
            if pickled
            else ""
        )
        raise CheckpointError(
            f"{path} is not a readable safetensors file written by hatplug.save ({exc}){hint}"
        ) from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} was not written by hatplug.save (no '{FORMAT}' metadata)")
    return config_from_metadata(path, metadata)


def config_from_metadata(path: str | Path, metadata: dict) -> dict:
    """:func:`read_config`'s result from the metadata of a file written by :func:`save` (already read)."""
    try:
        config = json.loads(metadata["config"])
        model = metadata["model"]
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: its hatplug.save metadata is damaged ({type(exc).__name__}: {exc})") from exc
    allowed = {"ct_size", "stages", "init", "propagate"}
    if not isinstance(config, dict) or set(config) - allowed:
        raise CheckpointError(
            f"{path}: its conversion config {config!r} is not one hatplug.save writes (keys {sorted(allowed)})"
        )
    return {"model": model, **config}


def load(path: str | Path, base_model: nn.Module) -> nn.Module:
    """Rebuild a model saved by :func:`save`: convert ``base_model`` (a fresh, unconverted model of the same
    architecture; it is not changed) with the stored config, then load the tensors strictly with
    :func:`hatplug.checkpoint.load_checkpoint`.

    Raises:
        TypeError: ``base_model`` is not a module or ``path`` not a path (or the two are swapped).
        CheckpointError: the file is not a hatplug save, or its model class differs from ``base_model``'s.
        CheckpointMismatchError: the tensors do not fit the converted model (other architecture or sizes).
    """
    _check_arguments(
        "load", "base_model", "a fresh model of the converted architecture", base_model, path, model_first=False
    )
    config = read_config(path)
    saved_model = config.pop("model")
    if saved_model != type(base_model).__name__:
        raise CheckpointError(
            f"{path} holds a converted {saved_model}, but base_model is a {type(base_model).__name__}: pass the "
            f"{saved_model} the file was converted from"
        )
    model = convert(base_model, **config)
    load_checkpoint(
        model,
        load_file(str(path), device="cpu"),
        strict=True,
        mismatch_hint="base_model must be built as the model that was converted and saved (the same timm name and "
        "arguments: num_classes, img_size, embed_dim, depths...); nothing was loaded",
    )
    return model
