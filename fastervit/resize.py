"""Moving FasterViT weights to another geometry: input size, window size, carrier-token grid.

No learned tensor of FasterViT depends on the geometry, so a transfer never resizes one:

* the relative attention bias and the absolute position embeddings are MLPs evaluated on normalised
  coordinates, so a 7x7 or a 12x12 window, 16 or 60 carrier tokens all use the same ``cpb_mlp`` weights;
* carrier tokens come from a depthwise 3x3 conv followed by average pooling, which has no weights;
* everything else is convolutions, norms and linear layers over channels.

What the geometry does change:

* the derived buffers that official checkpoints store (``relative_bias``, ``relative_coords_table``,
  ``relative_position_index``): the model recomputes them for its own geometry, so they are ignored;
* which carrier-token modules exist: a HAT stage has carrier tokens (``global_tokenizer``, ``hat_*``,
  ``gamma1``/``gamma2``) only where it has more than one window (counted as the official code does, from
  ``floor(size / 2**(i+2))``), and a carrier-token position embedding
  (``hat_pos_embed``) only where its window grid is square. Tensors of such modules that the target
  lacks are dropped; those the checkpoint lacks keep the target's initialisation;
* the classifier, when the number of classes differs: it keeps the target's initialisation.

Anything else that does not match (another width, depth or head count) is not a geometry change and is
reported as missing, unexpected or mismatched, as a strict load would.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from hatplug.checkpoint import (
    _NOTHING_LOADED,
    _SHOWN,
    LoadReport,
    _fill_aliases,
    _more,
    check_load_target,
    read_weights,
)
from hatplug.errors import CheckpointMismatchError

__all__ = ["AdaptReport", "adapt_checkpoint", "load_adapted", "summarise_keys", "CARRIER_TOKEN_MODULES"]

_logger = logging.getLogger(__name__)

# Modules of a HAT level that exist or not depending on the geometry (see the module docstring).
CARRIER_TOKEN_MODULES = frozenset(
    {"global_tokenizer", "hat_norm1", "hat_norm2", "hat_attn", "hat_mlp", "hat_pos_embed", "gamma1", "gamma2"}
)
# Buffers that official checkpoints store but the model recomputes from its geometry and weights.
_DERIVED_BUFFERS = frozenset({"relative_bias", "relative_coords_table", "relative_position_index"})


def _geometry_dependent(key: str) -> bool:
    return any(part in CARRIER_TOKEN_MODULES for part in key.split("."))


def _classifier(key: str) -> bool:
    return key.startswith("head.")


def summarise_keys(keys: Iterable[str]) -> str:
    """A short description of state-dict keys, grouped by module with block indices folded.

    >>> summarise_keys(["levels.2.blocks.0.hat_attn.qkv.weight", "levels.2.blocks.1.hat_attn.qkv.bias", "head.bias"])
    'head (1), levels.2.blocks.*.hat_attn (2)'
    >>> summarise_keys(["blocks.0.hat_attn.qkv.weight", "blocks.1.hat_attn.qkv.weight"])  # keys within a level
    'blocks.*.hat_attn (2)'
    """
    groups: dict[str, int] = {}
    for key in sorted(keys):
        parts = key.split(".")
        cut = next((j for j, part in enumerate(parts) if part in CARRIER_TOKEN_MODULES), len(parts) - 2)
        group = re.sub(r"(^|\.)blocks\.\d+(\.|$)", r"\1blocks.*\2", ".".join(parts[: cut + 1]))
        groups[group] = groups.get(group, 0) + 1
    return ", ".join(f"{group} ({count})" for group, count in groups.items())


@dataclass
class AdaptReport(LoadReport):
    """What :func:`adapt_checkpoint` did. ``loaded`` tensors are reused as is; none is ever resized.

    Attributes (besides :class:`~hatplug.checkpoint.LoadReport`'s):
        new: learned tensors of the target that the checkpoint lacks (carrier-token modules the new
            geometry adds, a classifier of another size): they keep the target's initialisation.
        dropped: learned tensors of the checkpoint that the target has no module for (carrier-token
            modules the new geometry removes, a classifier of another size, the modules a ``features_only``
            backbone prunes).

    Example (224 weights moved to a 320x480 model with 3 classes):
        >>> import fastervit
        >>> from fastervit.resize import adapt_checkpoint
        >>> source = fastervit.create_model("faster_vit_0_224")
        >>> target = fastervit.create_model("faster_vit_0_any_res", resolution=[320, 480], num_classes=3)
        >>> tensors, report = adapt_checkpoint(source.state_dict(), target)
        >>> len(report.loaded), report.ok
        (388, True)
        >>> for line in str(report).splitlines()[1:]:  # 320x480: stage 3's window grid is not square
        ...     print(line)
        newly initialised 2: head (2)
        dropped 20: head (2), levels.2.blocks.*.hat_pos_embed (18)
    """

    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"reused as is {len(self.loaded)} state-dict keys; resized none (no learned tensor depends on the "
            f"geometry); ignored {len(self.derived)} derived buffers (recomputed for the new geometry)",
            f"newly initialised {len(self.new)}: {summarise_keys(self.new) or '-'}",
            f"dropped {len(self.dropped)}: {summarise_keys(self.dropped) or '-'}",
            *self.ema_note(),
        ]
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"{len(keys)} {title} (not a geometry change): {summarise_keys(keys)}")
        for key, ckpt_shape, model_shape in self.mismatched[:_SHOWN]:
            lines.append(f"shape mismatch {key}: checkpoint {list(ckpt_shape)} vs model {list(model_shape)}")
        if len(self.mismatched) > _SHOWN:
            lines.append(f"shape mismatch{_more(self.mismatched)}")
        return "\n".join(lines)


def adapt_checkpoint(
    state_dict: Mapping[str, Tensor], model: nn.Module, ignore_missing: Callable[[str], bool] | None = None
) -> tuple[dict[str, Tensor], AdaptReport]:
    """Map a FasterViT state dict trained for one geometry onto ``model``, built for another.

    A pure function in the manner of timm's ``checkpoint_filter_fn``: it returns the tensors to load
    (every one reused as is) and a report; it neither loads nor raises. The state dict must already be in
    this implementation's key layout (see :func:`fastervit.checkpoint_filter_fn`).

    Args:
        state_dict: the source weights, e.g. of ``faster_vit_0_224``.
        model: the target, e.g. ``faster_vit_0_any_res`` built for ``resolution=[320, 480]``.
        ignore_missing: keys of ``model`` the checkpoint need not have and that are not reported (the parts a
            ``features_only`` backbone prunes, when the checkpoint was saved from one).

    Returns:
        ``(state, report)``: ``state`` holds only keys of ``model`` with matching shapes; ``report.ok`` is
        False when something other than the geometry differs.

    Example:
        >>> import fastervit
        >>> source = fastervit.create_model("faster_vit_0_224")
        >>> target = fastervit.create_model("faster_vit_0_any_res", resolution=[320, 320], window_size=[7, 7, 5, 5])
        >>> state, report = adapt_checkpoint(source.state_dict(), target)
        >>> report.ok, len(report.new), len(report.dropped), len(state) == len(source.state_dict())
        (True, 0, 0, True)
    """
    own = model.state_dict(keep_vars=True)  # keys, shapes and shared storage only (no copies)
    state: dict[str, Tensor] = {}
    report = AdaptReport()
    state_dict, conflicted = _fill_aliases(state_dict, own, report)  # a conv stored under one of its two names
    for key, value in state_dict.items():
        if key in own:
            if value.shape == own[key].shape:
                state[key] = value
            elif _classifier(key):
                report.dropped.append(key)
            else:
                report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        elif key.rsplit(".", 1)[-1] in _DERIVED_BUFFERS:
            report.derived.append(key)
        elif _geometry_dependent(key) or _classifier(key):
            report.dropped.append(key)
        else:
            report.unexpected.append(key)
    mismatched = {key for key, _, _ in report.mismatched}
    for key in own:
        if key in state or key in mismatched or key.endswith("num_batches_tracked"):
            continue
        if ignore_missing is not None and ignore_missing(key):
            continue
        if _geometry_dependent(key) or _classifier(key):
            report.new.append(key)
        else:
            report.missing.append(key)
    report.loaded = sorted(k for k in state if k not in conflicted)
    return state, report


def load_adapted(
    model: nn.Module,
    checkpoint: str | Path | Mapping[str, Tensor],
    strict: bool = True,
    filter_fn: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]] | None = None,
    ignore_missing: Callable[[str], bool] | None = None,
    use_ema: bool = False,
) -> AdaptReport:
    """Load weights trained for another geometry into ``model`` with :func:`adapt_checkpoint`.

    Args:
        model: a full FasterViT (load before wrapping it as a ``features_only`` backbone).
        checkpoint: a file (read safely, see :func:`hatplug.checkpoint.read_checkpoint`) or a state dict.
        strict: raise :class:`~hatplug.errors.CheckpointMismatchError` when something other than the
            geometry differs; with False load what fits and log the rest.
        filter_fn: maps the checkpoint onto this layout first, e.g. :func:`fastervit.checkpoint_filter_fn`.
        ignore_missing: see :func:`adapt_checkpoint`.
        use_ema: load a training checkpoint's EMA weights instead (see :func:`hatplug.load_checkpoint`).

    Returns:
        The :class:`AdaptReport`.

    Example:
        >>> import fastervit, torch
        >>> source = fastervit.create_model("faster_vit_0_224")
        >>> target = fastervit.create_model("faster_vit_0_any_res", resolution=[320, 480])
        >>> print(load_adapted(target, source.state_dict()))  # doctest: +NORMALIZE_WHITESPACE
        reused as is 390 state-dict keys; resized none (no learned tensor depends on the geometry); ignored 0 derived
        buffers (recomputed for the new geometry)
        newly initialised 0: -
        dropped 18: levels.2.blocks.*.hat_pos_embed (18)
    """
    check_load_target("load_adapted", model, checkpoint)
    inner = getattr(model, "model", None)
    if inner is not None and not hasattr(model, "levels") and hasattr(inner, "levels"):
        raise TypeError(
            f"load_adapted takes the FasterViT itself, got a {type(model).__name__} around one (a features_only "
            "backbone): pass backbone.model, or create the backbone with checkpoint_path=..., adapt_geometry=True "
            "(the weights then load before the classifier is pruned)"
        )
    source, state, unused_ema = read_weights(checkpoint, use_ema)
    if filter_fn is not None:
        state = filter_fn(state, model)
    state, report = adapt_checkpoint(state, model, ignore_missing)
    report.unused_ema = unused_ema
    if not report.ok:
        message = f"checkpoint {source} does not fit {type(model).__name__} even allowing for the geometry:\n{report}"
        message += report.cut_note()
        if strict:
            raise CheckpointMismatchError(
                _NOTHING_LOADED + message + "\nCheck that the checkpoint is of the same variant (width, depths, "
                "heads); pass strict=False to load the matching tensors anyway.",
                report=report,
            )
        _logger.warning(message)
    model.load_state_dict(state, strict=False)
    return report
