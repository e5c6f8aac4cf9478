"""Identity of the tensors a cached value was derived from (the eval-mode bias and folding caches).

A storage address and an in-place version counter do not identify a tensor over time: a new weight can be
given the address of a freed one, and a fresh tensor's version is 0 again. A weak reference to each source
does: it is dead, or points at another object, once the source was replaced, and it keeps nothing alive.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from torch import Tensor

__all__ = ["source_refs", "same_sources"]


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
