"""The one cache of eval-mode values derived from weights: folded conv / linear weights
(:mod:`hatplug.layers.fusion`) and position biases (:class:`hatplug.layers.CachedBias`).

A storage address and an in-place version counter do not identify a tensor over time: a new weight can be
given the address of a freed one, and a fresh tensor's version is 0 again. A weak reference to each source
does: it is dead, or points at another object, once the source was replaced, and it keeps nothing alive.

Fused optimizers (``torch.optim.AdamW(..., fused=True)`` and the like) update weights in place without
bumping their version counters, so the key also holds a count of optimizer steps, kept by a global
``torch.optim`` step hook (one Python call per step): any optimizer step invalidates every cached value.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["HOOK_DICTS", "FoldedTensors", "hook_dicts", "must_run_below", "refill_buffer"]

_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def source_refs(tensors: Sequence[Tensor | None]) -> tuple[weakref.ref | None, ...]:
    return tuple(None if t is None else weakref.ref(t) for t in tensors)


def same_sources(refs: Sequence[weakref.ref | None], tensors: Sequence[Tensor | None]) -> bool:
    """Whether ``tensors`` are, object for object, the tensors ``refs`` were taken of (and those still live)."""
    if len(refs) != len(tensors):
        return False
    for ref, t in zip(refs, tensors):
        if (ref is None) != (t is None) or (ref is not None and ref() is not t):
            return False
    return True


def refill_buffer(module: torch.nn.Module, name: str, value: Tensor | None) -> None:
    """Put ``value`` into ``module``'s buffer ``name`` on that buffer's device (and in its dtype, for a float
    buffer): how ``init_non_persistent_buffers`` (timm's hook for buffers computed from the geometry, called by
    ``timm.models.reinit_non_persistent_buffers`` after ``to_empty``) restores a table. No-op for a ``None``
    buffer."""
    current = module._buffers.get(name)
    if current is None or value is None:
        return
    dtype = current.dtype if current.is_floating_point() and value.is_floating_point() else value.dtype
    module._buffers[name] = value.to(device=current.device, dtype=dtype)


HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)
"""The attributes of ``nn.Module`` that hold per-module hooks."""


def hook_dicts(module: torch.nn.Module) -> list[dict]:
    """``module``'s non-empty hook dicts (see :data:`HOOK_DICTS`)."""
    return [d for d in (getattr(module, name, None) for name in HOOK_DICTS) if d]


def must_run_below(module: torch.nn.Module, folding: bool = False) -> bool:
    """Whether a submodule of ``module`` must be called as itself, so that no cached or folded value may stand in
    for its call: one with hooks, or any while global module hooks are registered (those must see every module
    run); with ``folding``, also one in training mode under an eval-mode parent (test-time BatchNorm adaptation,
    MC dropout) or a BatchNorm without running statistics (it normalises with the batch's). A plain walk over
    ``_modules`` (about 25 us for a FasterViT HAT block; ``module.modules()`` takes several times that)."""
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    stack = list(module._modules.values())
    while stack:
        m = stack.pop()
        if m is None:
            continue
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return True
        # a BatchNorm without running statistics has them registered as None (a dict lookup, not isinstance)
        if folding and (
            m.training or m._buffers.get("running_mean", 0) is None or m._buffers.get("running_var", 0) is None
        ):
            return True
        stack.extend(m._modules.values())
    return False


class FoldedTensors:
    """Cache of tensors derived from some source tensors (parameters, BN statistics).

    ``get(sources, compute, extra)`` returns ``compute()``'s tuple, recomputed whenever a source changed or
    ``extra`` (anything else the value depends on) differs: the key is each source's identity (weak references),
    storage address, in-place version counter, shape and dtype, ``extra`` and the number of optimizer steps taken
    so far. The result is
    computed outside inference mode and without autograd, so it is a plain constant usable anywhere. Sources that
    are inference tensors (made under ``torch.inference_mode``) have no version counter: then nothing is cached
    and ``compute()`` runs on every call.
    Not a module and not a buffer: it never appears in ``state_dict``.
    """

    __slots__ = ("_entry",)

    def __init__(self) -> None:
        # (key, weak references to the sources, value) in one attribute, replaced whole: a thread that reads it
        # while another stores a new entry sees the old entry or the new one, never a key with another's value
        self._entry: tuple | None = None

    @staticmethod
    def _key_of(sources: Sequence[Tensor | None], extra: tuple) -> tuple:
        # no device: a tensor object that moves gets another allocation (data_ptr; host and device addresses never
        # coincide under unified addressing), and a new tensor object fails same_sources; torch.Size compares as
        # a tuple (tuple(t.shape) and t.device cost 0.4 and 0.26 us a source, half the key)
        return (_optimizer_steps, *extra) + tuple(
            None if t is None else (t.data_ptr(), t._version, t.shape, t.dtype) for t in sources
        )

    def get(
        self,
        sources: Sequence[Tensor | None],
        compute: Callable[[], tuple[Tensor | None, ...]],
        extra: tuple = (),
    ) -> tuple[Tensor | None, ...]:
        try:
            key = self._key_of(sources, extra)
        except RuntimeError:
            if not any(t is not None and t.is_inference() for t in sources):
                raise
            # tensors made under torch.inference_mode (a model built or moved there) keep no version counter,
            # so an in-place change to them could not be seen: derive the value anew on every call, keep nothing
            self.clear()
            with torch.inference_mode(False), torch.no_grad():
                return compute()
        entry = self._entry
        # the same key is not enough: a replaced tensor can get the freed one's address and version 0
        if entry is None or entry[0] != key or not same_sources(entry[1], sources):
            with torch.inference_mode(False), torch.no_grad():
                value = compute()
            entry = self._entry = (key, source_refs(sources), value)
        return entry[2]

    @property
    def cached(self) -> tuple[Tensor | None, ...] | None:
        """The value held now (``None`` when empty)."""
        entry = self._entry
        return None if entry is None else entry[2]

    @property
    def empty(self) -> bool:
        return self._entry is None

    def clear(self) -> None:
        self._entry = None

    def __deepcopy__(self, memo: dict) -> FoldedTensors:
        return FoldedTensors()  # the copy has other storages: it folds again on first use

    def __getstate__(self) -> dict:
        return {"derived": None}  # pickling (torch.save(model)) stores no derived tensors

    def __setstate__(self, state: dict) -> None:
        self.clear()
