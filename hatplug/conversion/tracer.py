"""A ``torch.fx`` tracer that knows timm: its no-trace modules stay leaves and its no-trace functions are
autowrapped, as in ``timm.layers.get_graph_node_names``. Stochastic depth stays a module so that the graph
keeps following ``train()`` / ``eval()``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx
from timm.layers import DropPath, get_notrace_functions, get_notrace_modules
from torch import nn

__all__ = ["HatplugTracer", "symbolic_trace"]


class HatplugTracer(torch.fx.Tracer):
    """Tracer with timm's leaf modules and autowrapped functions, plus ``leaf_types``.

    Args:
        leaf_types: more module classes to keep as single ``call_module`` nodes (the blocks being replaced).
        trace_into: if given, the only submodules (qualified names relative to the traced root) whose forward
            is traced through; every other submodule stays a ``call_module`` node, so that it still runs as a
            module (its hooks with it). ``None``: fx's default (``torch.nn`` modules are leaves, others are
            traced through).
    """

    def __init__(self, leaf_types: Iterable[type[nn.Module]] = (), *, trace_into: Iterable[str] | None = None) -> None:
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.leaf_types = (*get_notrace_modules(), DropPath, *leaf_types)
        self.trace_into = None if trace_into is None else frozenset(trace_into)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types):
            return True
        if self.trace_into is not None:
            return module_qualified_name not in self.trace_into
        return super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(module: nn.Module, leaf_types: Iterable[type[nn.Module]] = ()) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace`` with :class:`HatplugTracer`, e.g. to check that a converted model stays
    traceable (timm's fx feature extraction needs it).

    >>> import timm, torch
    >>> model = timm.create_model("twins_svt_small", embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1),
    ...                           num_heads=(1, 1, 1, 1), num_classes=0, img_size=64).eval()
    >>> graph = symbolic_trace(model)
    >>> x = torch.randn(1, 3, 64, 64)
    >>> torch.equal(graph(x), model(x))
    True
    """
    tracer = HatplugTracer(leaf_types)
    graph = tracer.trace(module)
    name = module.__class__.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)
