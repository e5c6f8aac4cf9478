"""Safe checkpoint reading and strict, reported state-dict loading.

Checkpoints are read with ``torch.load(weights_only=True)``: pickles may only build tensors, containers,
primitive values and an allow-list of benign types found in training checkpoints
(``argparse.Namespace``, NumPy scalars). Anything else is refused before any of it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .errors import CheckpointError, CheckpointMismatchError, UnsafeCheckpointError

__all__ = [
    "SAFE_GLOBALS",
    "LoadReport",
    "read_checkpoint",
    "ema_entry",
    "extract_state_dict",
    "load_state_dict_file",
    "load_checkpoint",
]

_logger = logging.getLogger(__name__)

SAFE_GLOBALS: list = [
    argparse.Namespace,
    np.dtype,
    (np._core if hasattr(np, "_core") else np.core).multiarray.scalar,
    *{type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "bool")},
]


_SHOWN = 20  # names per list in a LoadReport's text


def _more(items: list, shown: int = _SHOWN) -> str:
    """The tail of a list cut at ``shown`` names: ``" ... and N more"``, or ``""`` when none were left out."""
    return f" ... and {len(items) - shown} more" if len(items) > shown else ""


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else repr(exc)


_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".safetensors")


def directory_error(path: Path) -> CheckpointError:
    """The error for a checkpoint path that is a directory: it names the checkpoint files inside, if any."""
    try:
        inside = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES)
    except OSError:
        inside = []
    found = f"; it holds {', '.join(inside[:5])}{_more(inside, 5)}" if inside else ""
    return CheckpointError(
        f"{path} is a directory, not a checkpoint file: pass the path of the file itself (a .pth, .pth.tar or "
        f".safetensors file){found}; nothing was loaded"
    )


def check_load_target(func: str, model: object, checkpoint: object) -> None:
    """A ``TypeError`` when ``func(model, checkpoint)`` got no module to load into, saying so when the two
    arguments look swapped (a path or state dict as the model and a module as the checkpoint)."""
    if isinstance(model, nn.Module):
        return
    if isinstance(checkpoint, nn.Module) and isinstance(model, (str, os.PathLike, Mapping)):
        raise TypeError(
            f"{func} got a {type(model).__name__} as model and a {type(checkpoint).__name__} as checkpoint: the "
            f"arguments look swapped, call {func}(model, checkpoint)"
        )
    raise TypeError(f"{func}: model must be the nn.Module to load the weights into, got {type(model).__name__}")


def read_checkpoint(path: str | Path) -> object:
    """Read a ``.pth``/``.pth.tar``/``.safetensors`` file without running untrusted code.

    Raises:
        CheckpointError: missing, truncated or corrupt file, or a directory.
        UnsafeCheckpointError: the pickle references a callable or class outside the allow-list.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "w.pth")
    >>> torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    >>> read_checkpoint(path)["state_dict"]["w"]
    tensor([1., 1.])
    """
    path = Path(path)
    if path.is_dir():
        raise directory_error(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path} (check the path; nothing was loaded)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({exc}); re-download or re-export it"
            ) from exc
    with open(path, "rb") as f:
        head = f.read(4)
    if head and not head.startswith((b"PK\x03\x04", b"\x80")):  # neither torch.save's zip nor a pickle
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a torch.save file nor .safetensors; it starts with "
            f"{head!r}); nothing was loaded"
        )
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            reason = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
            raise UnsafeCheckpointError(
                f"refused to load {path}: its pickle references objects outside the safe allow-list, so "
                "loading it could run arbitrary code. Nothing was executed. If you trust the file, re-save "
                f"just its tensors, e.g. as safetensors. Details: {reason or _first_line(exc)}"
            ) from exc
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint ({_first_line(exc)})") from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(
            f"{path} is truncated or corrupt and could not be read ({type(exc).__name__}: {_first_line(exc)}); "
            "re-download it"
        ) from exc


_EMA_KEYS = ("state_dict_ema", "model_ema")  # where timm's train.py (and others) keep the EMA weights


def ema_entry(obj: object) -> str | None:
    """The key under which a training checkpoint holds an EMA copy of the weights (``state_dict_ema`` as timm's
    ``train.py`` writes it, or ``model_ema``), or ``None``.

    >>> ema_entry({"state_dict": {}, "state_dict_ema": {}}), ema_entry({"state_dict": {}})
    ('state_dict_ema', None)
    """
    if not isinstance(obj, Mapping):
        return None
    return next((k for k in _EMA_KEYS if isinstance(obj.get(k), Mapping)), None)


def extract_state_dict(obj: object, source: str = "checkpoint", use_ema: bool = False) -> dict[str, Tensor]:
    """The weights of a checkpoint object: under ``state_dict`` or ``model`` or the object itself (with
    ``use_ema``: its EMA copy, see :func:`ema_entry`), with any ``module.`` (DataParallel/DDP) prefix removed.

    >>> extract_state_dict({"model": {"module.w": torch.zeros(1)}, "epoch": 3})
    {'w': tensor([0.])}
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a dict of tensors")
    if use_ema:
        key = ema_entry(obj)
        if key is None:
            raise CheckpointError(
                f"use_ema=True, but {source} holds no EMA weights (looked for {' / '.join(_EMA_KEYS)}; it has "
                f"{sorted(map(str, obj))[:8]}); pass use_ema=False to load its weights"
            )
        obj = obj[key]
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        ema = ema_entry(obj)
        raise CheckpointError(
            f"{source} has no state dict: expected tensors under 'state_dict' or 'model' (or at the top "
            f"level), found non-tensor entries {sorted(map(str, bad))[:8]}"
            + (f"; it holds EMA weights under {ema!r}: pass use_ema=True to load those" if ema else "")
        )
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def load_state_dict_file(path: str | Path, use_ema: bool = False) -> dict[str, Tensor]:
    """:func:`read_checkpoint` then :func:`extract_state_dict`."""
    return extract_state_dict(read_checkpoint(path), source=str(path), use_ema=use_ema)


def read_weights(checkpoint: str | Path | Mapping, use_ema: bool = False) -> tuple[str, dict[str, Tensor], str | None]:
    """``(source, state dict, EMA entry left unused)`` of a checkpoint file or object: the loaders' common first
    step. The last item names an EMA copy the checkpoint holds besides the weights loaded (``use_ema=False``)."""
    is_file = isinstance(checkpoint, (str, Path))
    source = str(checkpoint) if is_file else "state dict"
    obj = read_checkpoint(checkpoint) if is_file else checkpoint
    state = extract_state_dict(obj, source=source, use_ema=use_ema)
    unused = None if use_ema else ema_entry(obj)
    if unused is not None:
        _logger.info(f"{source}: loading its weights, not the EMA copy under {unused!r} (use_ema=True loads that)")
    return source, state, unused


@dataclass
class LoadReport:
    """What a state-dict load did. ``ok`` is True when every learned tensor matched. The lists hold state-dict
    keys: a tensor a model registers under two names (FasterViT's carrier-token conv also has its official
    alias) is counted under each.

    >>> report = LoadReport(loaded=["weight"], missing=["bias"])
    >>> report.ok
    False
    >>> print(report)
    loaded 1 state-dict keys, dropped 0 derived or unused
    1 missing: bias
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, checkpoint, model
    derived: list[str] = field(default_factory=list)  # dropped: recomputable buffers, tensors nothing uses
    # the checkpoint's tensors of a module this model replaces (a classifier of another size) or does not have
    # (num_classes=0): not loaded; the model keeps its own initialisation
    replaced: list[str] = field(default_factory=list)
    unused_ema: str | None = None  # the checkpoint's EMA copy of the weights, not loaded (use_ema=False)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def truncated(self) -> bool:
        """Whether ``str(report)`` leaves out names: it shows at most 20 per list (the attributes hold all)."""
        return max(len(self.missing), len(self.unexpected), len(self.mismatched)) > _SHOWN

    def ema_note(self) -> list[str]:
        """The report line on an EMA copy the checkpoint holds and the load left out (none if it had none)."""
        if self.unused_ema is None:
            return []
        return [
            f"not loaded: the checkpoint's EMA weights under {self.unused_ema!r} (use_ema=True loads those "
            "instead, as timm's loader does by default)"
        ]

    def cut_note(self) -> str:
        """The line an error adds under this report's text when a list was cut: where every name is."""
        if not self.truncated:
            return ""
        name = "hatplug.LoadReport" if type(self) is LoadReport else type(self).__name__
        return (
            f"\n(lists cut at {_SHOWN} names: the error's .report, a {name}, has every one in .missing, .unexpected "
            "and .mismatched)"
        )

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} state-dict keys, dropped {len(self.derived)} derived or unused"]
        if self.replaced:
            kept = ", ".join(self.replaced)
            lines.append(f"not loaded (this model's module has another size, or there is none): {kept}")
        lines += self.ema_note()
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"{len(keys)} {title}: " + ", ".join(keys[:_SHOWN]) + _more(keys))
        for key, ckpt_shape, model_shape in self.mismatched[:_SHOWN]:
            lines.append(f"shape mismatch {key}: checkpoint {list(ckpt_shape)} vs model {list(model_shape)}")
        if len(self.mismatched) > _SHOWN:
            lines.append(f"shape mismatch{_more(self.mismatched)}")
        return "\n".join(lines)


def _derived_shapes(model: nn.Module) -> dict[str, tuple]:
    """Checkpoint keys that modules recompute from their weights, with the shape the model implies."""
    shapes = {}
    for prefix, module in model.named_modules():
        fn = getattr(module, "derived_state_shapes", None)
        if fn is not None:
            for name, shape in fn().items():
                shapes[f"{prefix}.{name}" if prefix else name] = tuple(shape)
    return shapes


def drop_derived(module: nn.Module, state_dict: dict, prefix: str) -> list[tuple[str, tuple, tuple]]:
    """Remove from ``state_dict`` the keys ``module.derived_state_shapes()`` names that have the shape it
    gives (what its ``_load_from_state_dict`` does before loading), and return ``(key, shape in the
    state dict, expected shape)`` of those that do not fit, which are left in place."""
    misfits = []
    for name, shape in getattr(module, "derived_state_shapes", dict)().items():
        value = state_dict.get(prefix + name)
        if value is None:
            continue
        if tuple(value.shape) == tuple(shape):
            del state_dict[prefix + name]
        else:
            misfits.append((prefix + name, tuple(value.shape), tuple(shape)))
    return misfits


def _fill_aliases(
    state: dict[str, Tensor], own: dict[str, Tensor], report: LoadReport
) -> tuple[dict[str, Tensor], set[str]]:
    """Keys that name one shared tensor (e.g. FasterViT's ``pos_embed`` / ``to_global_feature.pos``) are
    filled from whichever the checkpoint has, as deduplicating savers (``safetensors.save_model``) keep one.
    A name whose value differs from the first name's is reported as unexpected and takes the first's value;
    those names are returned too (a load must not count them as loaded from the file)."""
    groups: dict[tuple, list[str]] = {}
    for key, tensor in own.items():
        if tensor.numel():
            groups.setdefault((tensor.data_ptr(), tuple(tensor.shape), tensor.dtype), []).append(key)
    state, conflicted = dict(state), set()
    for keys in groups.values():
        present = [k for k in keys if k in state]
        if len(keys) < 2 or not present:
            continue
        first = state[present[0]]
        for key in present[1:]:
            if state[key].shape != first.shape or not torch.equal(state[key], first):
                # one tensor cannot take two values: the first name's is loaded, this one is reported (only)
                report.unexpected.append(f"{key} (differs from its alias {present[0]}, whose value is loaded)")
                del state[key]
                conflicted.add(key)
        for key in keys:
            state.setdefault(key, first)
    return state, conflicted


def _layout_hint(state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> str:
    """How to make a checkpoint none of whose keys fits match: the prefix the model's keys have and the
    checkpoint's lack (a wrapper that holds the model as a submodule, such as timm's ``features_only``
    backbones: ``.model``), or the one the checkpoint's have and the model's lack."""
    for ours, theirs, verb in ((own, state, "have"), (state, own, "lack")):
        for key in ours:
            suffix = next((k for k in theirs if key.endswith("." + k)), None)
            if suffix is None:
                continue
            prefix = key[: -len(suffix)]
            fits = sum(prefix + k in ours for k in theirs)
            if 2 * fits >= len(theirs):
                if verb == "have":
                    return (
                        f"the model's keys begin with {prefix!r}, which the checkpoint's lack ({fits} of its "
                        f"{len(state)} tensors fit under it): load it into that submodule, e.g. "
                        f"load_checkpoint(model.{prefix[:-1]}, ...) (a features_only backbone holds its model as "
                        "`.model`; fastervit.create_model(..., features_only=True, checkpoint_path=...) maps the "
                        "keys and drops what the backbone pruned), or add the prefix to the checkpoint's keys."
                    )
                return (
                    f"the checkpoint's keys begin with {prefix!r}, which the model's lack ({fits} of its "
                    f"{len(state)} tensors fit without it): strip that prefix from its keys."
                )
            break
    return "strip or add the prefix that differs, or load it into the model it was saved from."


_STRICT_HINT = "Pass strict=False to load the matching tensors anyway (the rest keep their init)."
# a refused load changes nothing: the report under it says what the load would have done
_NOTHING_LOADED = "nothing was loaded (the model is unchanged); the report says what loading would do. "


def _check_conversion_config(model: nn.Module, path: Path, strict: bool) -> None:
    """A file written by ``hatplug.save`` records the ``hatplug.convert`` options, some of which no tensor shape
    shows (``ct_size``): its tensors into a model converted with other options, or into an unconverted model,
    would load (or be refused) without a word on the cause. Refused with ``strict``; logged without."""
    if path.suffix != ".safetensors" or not path.is_file():
        return
    from .conversion.io import FORMAT, _unwrapped, config_from_metadata

    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # not readable as safetensors: read_checkpoint says why
        return
    if metadata.get("format") != FORMAT:
        return
    saved = config_from_metadata(path, metadata)
    saved_model = saved.pop("model")
    info = getattr(_unwrapped(model), "hatplug_conversion", None)
    here = type(_unwrapped(model)).__name__ if info is None else info["model"]
    if saved_model != here:  # before the options: no option makes one family's file fit another
        problem = (
            f"{path} holds a {saved_model} converted by hatplug.convert({_options(saved)}), and this model is a "
            f"{here}: load the file into a {saved_model}, e.g. hatplug.load(path, <a {saved_model} as it was "
            "created before the conversion>)"
        )
    elif info is None:
        problem = (
            f"{path} holds a {saved_model} converted by hatplug.convert({_options(saved)}), and this "
            f"{type(model).__name__} is not converted: rebuild it with hatplug.load(path, base_model), which converts "
            "a fresh base model with those options and loads every tensor"
        )
    else:
        ours = json.loads(json.dumps(info["config"]))
        differ = {k: (v, ours.get(k)) for k, v in saved.items() if ours.get(k) != v}
        if not differ:
            return
        problem = (
            f"{path} was saved from a model converted with other options than this one: "
            + ", ".join(f"{k}={a!r} in the file, {b!r} here" for k, (a, b) in differ.items())
            + " (the tensors may fit, the function does not); convert with the file's options, or rebuild it with "
            "hatplug.load(path, base_model)"
        )
    if strict:
        raise CheckpointMismatchError("nothing was loaded (the model is unchanged): " + problem)
    _logger.warning(problem + "; loading what fits anyway (strict=False)")


def _options(config: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items())


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | Path | Mapping[str, Tensor],
    strict: bool = True,
    filter_fn: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]] | None = None,
    ignore_missing: Callable[[str], bool] | None = None,
    mismatch_hint: str | None = None,
    use_ema: bool = False,
) -> LoadReport:
    """Load weights into ``model`` and say exactly what happened.

    Buffers that modules recompute from their weights (FasterViT's ``relative_bias``,
    ``relative_coords_table``, ``relative_position_index``) may be present or absent; when present
    their shapes are checked against the model's geometry and they are dropped.

    Args:
        model: the target.
        checkpoint: a file path or a state dict.
        strict: raise :class:`CheckpointMismatchError` on any missing, unexpected or mis-shaped tensor
            (the message lists the keys and both shapes). With ``strict=False`` load what fits, log the
            rest, and return the report.
        filter_fn: maps the checkpoint's state dict onto the model's layout first (timm-style).
        ignore_missing: keys for which absence is expected (e.g. a replaced classifier).
        mismatch_hint: what the strict mismatch error suggests (default: ``strict=False``).
        use_ema: load a training checkpoint's EMA copy of the weights (``state_dict_ema`` / ``model_ema``)
            instead of its weights. timm's loader does that by default; here the weights are loaded unless asked,
            and the report says when an EMA copy was left out.

    Returns:
        A :class:`LoadReport`.

    >>> net = nn.Linear(2, 2)
    >>> print(load_checkpoint(net, {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}))
    loaded 2 state-dict keys, dropped 0 derived or unused
    """
    check_load_target("load_checkpoint", model, checkpoint)
    if isinstance(checkpoint, (str, Path)):
        _check_conversion_config(model, Path(checkpoint), strict)
    source, state, unused_ema = read_weights(checkpoint, use_ema)
    if filter_fn is not None:
        state = filter_fn(state, model)

    report = LoadReport(unused_ema=unused_ema)
    derived = _derived_shapes(model)
    own = model.state_dict(keep_vars=True)  # keys, shapes and shared storage only (no copies)
    state, conflicted = _fill_aliases(state, own, report)
    to_load = {}
    for key, value in state.items():
        if key in derived and key not in own:
            if tuple(value.shape) == derived[key]:
                report.derived.append(key)
            else:
                report.mismatched.append((key, tuple(value.shape), derived[key]))
        elif key not in own:
            report.unexpected.append(key)
        elif value.shape != own[key].shape:
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            to_load[key] = value
    for key in own:
        expected_absent = key.endswith("num_batches_tracked") or (ignore_missing is not None and ignore_missing(key))
        if key not in state and not expected_absent:
            report.missing.append(key)
    report.loaded = sorted(k for k in to_load if k not in conflicted)

    if not report.ok:
        message = f"checkpoint {source} does not match {type(model).__name__}:\n{report}"
        every_name = report.cut_note()
        if state and own and not report.loaded:  # strict=False is for a partial fit, not for none at all
            raise CheckpointMismatchError(
                _NOTHING_LOADED
                + message
                + every_name
                + f"\nNot one of its {len(state)} tensors fits, even with strict=False: the keys have another "
                f"layout (e.g. {next(iter(state))!r} against the model's {next(iter(own))!r}); "
                + _layout_hint(state, own),
                report=report,
            )
        if strict:
            raise CheckpointMismatchError(
                _NOTHING_LOADED + message + every_name + "\n" + (mismatch_hint or _STRICT_HINT), report=report
            )
        _logger.warning(message)
    model.load_state_dict(to_load, strict=False)
    return report
