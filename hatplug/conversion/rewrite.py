"""``hatplug.convert``: find the window-attention blocks, build their HAT twins, thread carrier tokens.

How a model is converted:

1. Every module that a registered adapter matches (exact type) is a candidate block; blocks are grouped
   by stage (:meth:`~hatplug.adapters.BlockAdapter.stage_path`) and stages are numbered in model order.
2. A block whose map is a single window at the model's configured input size is skipped: carrier tokens
   summarise windows for other windows, so there is nothing for them to carry.
3. Stages of ``carrier_stream="stage"`` adapters are traced with :class:`HatplugTracer` (through the
   modules that hold the blocks only: the blocks and every other module stay leaves) and the graph is
   rewritten: a ``carrier_tokenizer`` node makes the carrier tokens from the first converted block's
   input, every converted block takes and returns ``(x, ct)``, and the last one propagates them into the
   map. The rewritten stage, a :class:`CarrierStage` (a ``GraphModule``) with the
   stage's children and plain attributes, goes back into its parent, so the model keeps its class and
   methods. Its ``grad_checkpointing`` reaches the HAT blocks; resizing it (timm's ``set_input_size``)
   raises, since its blocks were built for their windows: resize the original and convert again.
4. Blocks of ``carrier_stream="block"`` adapters (Twins, whose stages are loops in ``forward_features``)
   are swapped in place and make their carrier tokens themselves.
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Sequence

import torch.fx
from torch import Tensor, nn

from ..adapters import BlockAdapter, CarrierBlock, ConversionSettings, find_adapter, registered_adapters
from ..errors import ConversionError, UnsupportedModelError, refuse_scripting
from ..layers._cache import HOOK_DICTS, hook_dicts
from ..layers.pos_embed import CachedBias
from .tracer import HatplugTracer

__all__ = ["CarrierSequence", "CarrierStage", "convert", "INIT_MODES"]

INIT_MODES = ("identity", "random")
_PRESERVED = getattr(torch.fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")
CONVERSION_ATTR = "hatplug_conversion"


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


def _attention_like(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.MultiheadAttention) or "attention" in kind.lower() or kind.endswith("Attn"):
            found.append((name, module))
    return found


def _windowed(model: nn.Module, name: str, module: nn.Module) -> bool:
    """Whether an attention module attends within windows / partitions of the map (timm's ``swinv2_cr_*``
    ``WindowMultiHeadAttention``, MaxViT's ``PartitionAttention*``, a block with a ``window_size`` such as
    TinyViT's or SAM's), judged by the class name and the attributes of the module and of its block."""
    kind = type(module).__name__.lower()
    parent_path = name.rpartition(".")[0]
    owners = (module, model.get_submodule(parent_path)) if parent_path else (module,)
    return (
        "window" in kind
        or "partition" in kind
        or any(getattr(owner, attr, None) for owner in owners for attr in ("window_size", "partition_size"))
    )


def _listed(modules: list[tuple[str, nn.Module]]) -> str:
    names = [f"'{name}' ({type(module).__name__})" for name, module in modules]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def unsupported_message(model: nn.Module) -> str:
    lines = [f"hatplug.convert found no block it can convert in {type(model).__name__}."]
    attention = _attention_like(model)
    windowed = [(name, module) for name, module in attention if _windowed(model, name, module)]
    if windowed:
        lines.append(
            f"Its model family is not supported by hatplug.convert: it has windowed attention ({_listed(windowed)}) "
            "that no adapter knows. Supported: timm swin_* / swinv2_* (not swinv2_cr_*, timm's other SwinV2), "
            "twins_svt_* and hatplug's edgevit_*. To add this family, write an adapter for its block (see below)."
        )
    elif attention:
        lines.append(f"It has attention modules that no adapter knows: {_listed(attention)}.")
        lines.append(
            "HAT gives carrier tokens to windowed (local) attention; attention that already spans the whole map "
            "(ViT, PVT, Twins-PCPVT's GlobalSubSampleAttn) has no windows to summarise, and no adapter changes that."
        )
    if any(isinstance(m, torch.fx.GraphModule) for m in model.modules()):  # or holds one: timm's FeatureGraphNet
        lines.append(
            "It is or holds an fx graph (e.g. timm features_only with feature_cls='fx'), whose blocks are inlined: "
            "convert the model first, then extract features from the converted model (timm's "
            "create_feature_extractor)."
        )
    lines.append("Supported block families:")
    for adapter in registered_adapters():
        kinds = ", ".join(f"{t.__module__}.{t.__qualname__}" for t in adapter.source_types)
        lines.append(f"  - {adapter.family}: {kinds}")
    lines.append(
        "To add one, subclass hatplug.BlockAdapter (set `family` and `source_types`, implement "
        "`window_size` and `build`, which returns the block's HAT twin) and pass an instance to "
        "hatplug.register_adapter(); see the BlockAdapter docstring."
    )
    return "\n".join(lines)


def _window_of(adapter: BlockAdapter, path: str, block: nn.Module) -> tuple[int, int]:
    """``adapter.window_size(block)``, with a named error for what is not a pair of positive ints."""
    window = adapter.window_size(block)
    ok = isinstance(window, (tuple, list)) and len(window) == 2
    if not ok or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in window):
        raise ConversionError(
            f"{type(adapter).__name__}.window_size(block) must return (height, width) of the block's windows, two "
            f"positive ints, got {window!r} for '{path}' ({type(block).__name__})"
        )
    return tuple(window)


def _build_twin(
    adapter: BlockAdapter, model: nn.Module, path: str, block: nn.Module, settings: ConversionSettings, propagate: bool
) -> nn.Module:
    """``adapter.build_at(...)`` in the block's train / eval mode, with named errors for twins that would fail only
    at the first forward, deep inside (the report listed their blocks as converted)."""
    twin = adapter.build_at(model, path, block, settings, propagate=propagate)
    name = type(adapter).__name__
    if not isinstance(twin, nn.Module) or twin is block or isinstance(twin, nn.Identity):
        raise ConversionError(
            f"{name}.build returned {'the block itself' if twin is block else type(twin).__name__} for '{path}' "
            f"({type(block).__name__}): it must return the block's HAT twin, a new module (such as a "
            "hatplug.adapters.CarrierBlock) that takes over the block's layers"
        )
    if adapter.carrier_stream == "stage" and isinstance(twin, CarrierBlock):
        window = _window_of(adapter, path, block)
        if tuple(twin.window_size) != window:
            raise ConversionError(
                f"the twin {name} built for '{path}' has {tuple(twin.window_size)} windows, but {name}.window_size "
                f"says {window}: they must agree (the stage's carrier tokens are laid out for the adapter's windows)"
            )
    return _adopt_mode(twin, block)


def _wrapped_attribute(model: nn.Module) -> str | None:
    """The attribute holding the model inside a data-parallel or ``torch.compile`` wrapper, or ``None``."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return "module"
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return "_orig_mod"  # torch.compile's wrapper (not imported: that would import the compiler stack)
    return None


def _skip_reason(adapter: BlockAdapter, model: nn.Module, path: str, block: nn.Module, ct_size: int) -> str | None:
    window = _window_of(adapter, path, block)
    grid = adapter.window_grid(model, path, block)
    if grid is not None and grid[0] * grid[1] == 1:
        where = adapter.resolution(model, path)
        return f"single window {where}: the {window[0]}x{window[1]} window covers the whole map"
    if ct_size > min(window):
        return f"window {window[0]}x{window[1]} is smaller than ct_size={ct_size}"
    return None


class CarrierStage(torch.fx.GraphModule):
    """A stage rewritten by :func:`convert`: a ``GraphModule`` that threads carrier tokens through its HAT
    blocks; setting ``grad_checkpointing`` (as timm's ``set_grad_checkpointing`` does) reaches those blocks."""

    def __prepare_scriptable__(self) -> None:  # torch.jit.script: a named error, not a parser trace
        refuse_scripting(self, f"{type(self).__name__} (a stage rewritten by hatplug.convert)")

    # torch.fx copies and unpickles a GraphModule as a plain GraphModule without its forward hooks: a stage
    # comes back as a stage (group_matcher's rules, grad checkpointing, the refused resize) with the hooks
    # convert moved onto it
    def __reduce__(self) -> tuple:
        _, (body, import_block) = super().__reduce__()
        base = next(c for c in type(self).__mro__ if c in (CarrierSequence, CarrierStage))
        return _rebuild_stage, ({**body, "_graphmodule_cls_name": type(self).__name__}, import_block, base)

    def __copy__(self) -> CarrierStage:
        base = next(c for c in type(self).__mro__ if c in (CarrierSequence, CarrierStage))
        copied = base(self, self.graph, class_name=type(self).__name__)
        _adopt_children(self, copied)
        copied.meta = getattr(self, "meta", {})
        _restore_preserved(copied)
        return _with_hooks(copied, self.__dict__)

    def __deepcopy__(self, memo: dict) -> CarrierStage:
        copied = super().__deepcopy__(memo)
        copied.__class__.__name__ = type(self).__name__  # fx names a copy "GraphModule"; each has its own class
        return _with_hooks(copied, {name: copy.deepcopy(getattr(self, name), memo) for name in HOOK_DICTS})

    @property
    def grad_checkpointing(self) -> bool:
        return self.__dict__.get("_grad_checkpointing", False)

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        self.__dict__["_grad_checkpointing"] = bool(enable)
        for module in self.modules():
            if isinstance(module, CarrierBlock):
                module.grad_checkpointing = bool(enable)


class CarrierSequence(CarrierStage):
    """A rewritten stage that was an ``nn.Sequential`` / ``nn.ModuleList`` itself (EdgeViT's ``blocks1``..):
    ``stage[i]``, ``len(stage)`` and iteration still give its entries (the ``carrier_tokenizer`` the rewrite
    adds is not one of them); a slice is an ``nn.ModuleList`` of them, which holds but cannot run them (their
    HAT blocks take carrier tokens)."""

    def _entries(self) -> list[nn.Module]:
        return [self._modules[name] for name in self._hatplug_entries]

    def __getitem__(self, index: int | slice) -> nn.Module:
        entries = self._entries()
        if isinstance(index, slice):
            return nn.ModuleList(entries[index])
        return entries[operator.index(index)]

    def __len__(self) -> int:
        return len(self._hatplug_entries)

    def __iter__(self):
        return iter(self._entries())


def _rebuild_stage(body: dict, import_block: str, base: type[CarrierStage] = CarrierStage) -> CarrierStage:
    """Unpickle a :class:`CarrierStage` as ``torch.fx`` unpickles a ``GraphModule`` (its code re-traced)."""
    from torch.fx.graph_module import _deserialize_graph_module, _forward_from_src

    forward = _forward_from_src(import_block + (body.get("_code") or body["code"]), {})
    stage = _deserialize_graph_module(forward, body, graph_module_cls=base)
    stage.meta = body.get("meta", stage.meta)  # torch.fx keeps a fresh one: copies of the stage need this one
    return _with_hooks(_restore_preserved(stage), body)


def _restore_preserved(stage: CarrierStage) -> CarrierStage:
    """Set the plain attributes the stage keeps in its ``meta`` (see :func:`_copy_plain_attributes`) on it."""
    for key, value in stage.meta.get(_PRESERVED, {}).items():
        setattr(stage, key, value)
    return stage


def _adopt_children(source: nn.Module, target: CarrierStage) -> None:
    """Give ``target`` the children, parameters and buffers of ``source`` itself. ``GraphModule`` copies only what
    its graph uses, into plain Modules; the originals keep containers' types (``stage.blocks[0]``) and the
    state dict its keys."""
    for name, child in source.named_children():
        setattr(target, name, child)
    for name, param in source.named_parameters(recurse=False):
        setattr(target, name, param)
    for name, buf in source.named_buffers(recurse=False):
        target.register_buffer(name, buf, persistent=name not in source._non_persistent_buffers_set)


def _with_hooks(stage: CarrierStage, source: dict) -> CarrierStage:
    """``stage`` with the non-empty hook dicts of ``source`` (a stage's ``__dict__`` or copies of it)."""
    for name in HOOK_DICTS:
        if source.get(name):
            setattr(stage, name, source[name])
    return stage


def _adopt_mode(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give the modules a conversion adds ``old``'s train / eval mode; those ``new`` took over keep theirs."""
    modes = {id(m): m.training for m in old.modules()}
    for module in new.modules():
        module.training = modes.get(id(module), old.training)
    return new


def _has_hooks(module: nn.Module) -> bool:
    return bool(hook_dicts(module))


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    """``new`` replaces ``old`` with the same inputs and outputs: it takes over ``old``'s hooks (the same
    dicts, so that the handles the user holds still remove them)."""
    for name in HOOK_DICTS:
        if getattr(old, name, None):
            setattr(new, name, getattr(old, name))


def _refuse_resize(*args, **kwargs) -> None:
    """``set_input_size`` of a converted model and of its rewritten stages: refused before anything changes."""
    raise ConversionError(
        "a converted model cannot change its input size or window (its carrier-token stages are built for one "
        "geometry), so nothing was changed: call set_input_size on the original model and convert it again. "
        "Trained weights move over with hatplug.load_checkpoint(new_model, path, strict=False) from a "
        "hatplug.save file: it loads every tensor that still fits and reports the rest (the carrier-token tensors "
        "of a stage that gains or loses windows, position tables that timm resized); hatplug.load needs the "
        "saved geometry"
    )


def _copy_plain_attributes(source: nn.Module, target: CarrierStage, **extra) -> None:
    """Give the rewritten stage the stage's plain attributes (``input_resolution``, ``grad_checkpointing``...)
    that the parent's code may read, and ``extra`` ones of its own, kept through ``copy.deepcopy`` (a GraphModule
    rebuilds itself on copy)."""
    preserved = {
        key: value
        for key, value in vars(source).items()
        if not key.startswith("_") and key != "training" and not isinstance(value, (nn.Module, Tensor))
    }
    if hasattr(source, "set_input_size"):
        preserved["set_input_size"] = _refuse_resize
    target.meta[_PRESERVED] = {**preserved, **extra}
    _restore_preserved(target)


def _rewrite_stage(
    model: nn.Module,
    stage_path: str,
    blocks: list[tuple[str, nn.Module]],
    adapter: BlockAdapter,
    settings: ConversionSettings,
    propagate: bool,
) -> None:
    """Thread one carrier-token stream through ``blocks`` (paths in ``model``) of the stage at ``stage_path``."""
    stage = model.get_submodule(stage_path)
    where = f"stage '{stage_path}' ({type(stage).__name__})"
    if not stage_path:
        raise ConversionError(f"{where} is the model itself, which cannot be rewritten without losing its class")
    relative = {path[len(stage_path) + 1 :]: block for path, block in blocks}
    # the graph must see the blocks, so it traces through the modules between the stage and them (Swin's
    # ``blocks``, EdgeViT's LGL blocks): these are no longer called as modules. Every other module of the
    # stage (a downsample, a norm, EdgeViT's local aggregation) stays one call, and keeps running its hooks
    between = {".".join(name.split(".")[:i]) for name in relative for i in range(1, name.count(".") + 1)}
    hooked = sorted(f"{stage_path}.{name}" for name in between if _has_hooks(stage.get_submodule(name)))
    if hooked:
        raise ConversionError(
            f"hooks registered on {hooked} would be lost: carrier tokens are threaded through these modules to "
            f"the blocks they hold, so the converted {where} no longer calls them as modules. Remove the hooks "
            "(handle.remove()), convert, and hook the stage or its blocks instead"
        )
    if isinstance(stage, nn.ModuleList):  # no forward: the model's own forward loops over it
        raise ConversionError(
            f"{where} has no forward of its own: the model's forward loops over it, so there is no stage module to "
            "thread carrier tokens through. Convert this family with an adapter whose carrier_stream is 'block' "
            "(each block makes its own carrier tokens, as hatplug.adapters.TwinsAdapter does), or override the "
            "adapter's stage_path to name the module whose forward runs the loop."
        )
    tracer = HatplugTracer(adapter.source_types, trace_into=between)
    try:
        graph = tracer.trace(stage)
    except Exception as exc:
        raise ConversionError(
            f"cannot trace {where} to thread carrier tokens through its blocks: {type(exc).__name__}: {exc}. "
            "Make the module that fails a tracer leaf (timm.layers.register_notrace_module), or convert this "
            "family with an adapter whose carrier_stream is 'block' (each block makes its own carrier tokens)."
        ) from exc

    calls = [n for n in graph.nodes if n.op == "call_module" and n.target in relative]
    called = [n.target for n in calls]
    problems = [f"'{t}' is called {called.count(t)} times" for t in relative if called.count(t) != 1]
    problems += [f"'{n.target}' is called with {len(n.args)} args / kwargs {sorted(n.kwargs)}" for n in calls if
                 len(n.args) != 1 or n.kwargs]  # fmt: skip
    if problems:
        raise ConversionError(
            f"{where}: carrier tokens can only be threaded through blocks that its forward calls once each "
            f"with one input; {'; '.join(problems)}"
        )

    first = calls[0]
    tokenizer = adapter.make_tokenizer(relative[first.target], settings)
    stage.add_module("carrier_tokenizer", tokenizer.train(relative[first.target].training))
    with graph.inserting_before(first):
        ct = graph.create_node("call_module", "carrier_tokenizer", (first.args[0],), name="carrier_tokens")
    for i, node in enumerate(calls):
        block = relative[node.target]
        last = propagate and i == len(calls) - 1
        path = f"{stage_path}.{node.target}"  # the block's path in the model, as per-block conversion gives it
        twin = _build_twin(adapter, model, path, block, settings, last)
        _set_submodule(stage, node.target, twin)
        prefix = node.name
        with graph.inserting_after(node):
            pair = graph.create_node("call_module", node.target, (node.args[0], ct), name=f"{prefix}_hat")
        with graph.inserting_after(pair):
            x_out = graph.create_node("call_function", operator.getitem, (pair, 0), name=f"{prefix}_x")
        with graph.inserting_after(x_out):
            ct = graph.create_node("call_function", operator.getitem, (pair, 1), name=f"{prefix}_ct")
        node.replace_all_uses_with(x_out)
        graph.erase_node(node)
    graph.erase_node(ct)  # the stream ends with the stage
    graph.lint()

    sequence = isinstance(stage, (nn.Sequential, nn.ModuleList))
    rewritten = (CarrierSequence if sequence else CarrierStage)(stage, graph, class_name=type(stage).__name__)
    _adopt_children(stage, rewritten)
    # a sequence stage keeps its entries' names (without the carrier tokenizer) for indexing
    entries = [name for name in stage._modules if name != "carrier_tokenizer"]
    _copy_plain_attributes(stage, rewritten, **({"_hatplug_entries": entries} if sequence else {}))
    rewritten.training = stage.training
    _move_hooks(stage, rewritten)  # same inputs and outputs: timm's FeatureHookNet hooks its stages
    _set_submodule(model, stage_path, rewritten)


def _check_hooks_kept(model: nn.Module, named_before: list[tuple[str, nn.Module]]) -> None:
    """Refuse a conversion that dropped a module holding hooks the converted model no longer runs."""
    live = {id(d) for m in model.modules() for d in hook_dicts(m)}  # hooks moved to a replacement stay live
    alive = {id(m) for m in model.modules()}
    lost = [
        path or "(the model)"
        for path, m in named_before
        if id(m) not in alive and any(id(d) not in live for d in hook_dicts(m))
    ]
    if lost:
        raise ConversionError(
            f"hooks registered on {lost} would be lost: the conversion replaces these modules with HAT versions "
            "whose inputs and outputs differ. Remove the hooks (handle.remove()), convert, and register them on "
            "the converted model; for timm features_only models use the default feature_cls, not 'hook'"
        )


def _first_block(stage: CarrierStage) -> str:
    """Path in ``stage`` of its first converted block: the one its ``carrier_tokenizer`` feeds."""
    tokenizer = next(n for n in stage.graph.nodes if n.op == "call_module" and n.target == "carrier_tokenizer")
    return next(iter(tokenizer.users)).target


class _GroupMatcher:
    """``group_matcher`` of a converted model: the model's own rules, with each rewritten stage's
    ``carrier_tokenizer`` put in the group of the stage's first block (timm's layer-wise lr decay would
    otherwise give it the head's rate). An object rather than a closure, so that the model still pickles."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, coarse: bool = False) -> dict:
        model = self.model
        matcher = type(model).group_matcher(model, coarse=coarse)
        for path, module in model.named_modules():
            if not isinstance(module, CarrierStage):
                continue
            first = f"{path}.{_first_block(module)}"
            name = next((f"{first}.{n}" for n, _ in model.get_submodule(first).named_parameters()), None)
            rule = None if name is None else _tokenizer_rule(matcher, name, path)
            if rule is not None:
                key, spec = rule
                matcher[key] = [spec] + (
                    [(matcher[key], None)] if isinstance(matcher[key], str) else list(matcher[key])
                )
        return matcher


class _NoWeightDecay:
    """``no_weight_decay`` of a converted model: the model's own set plus the parameters of the HAT position
    MLPs that :func:`convert` added, the rule FasterViT follows (and timm follows for SwinV2's continuous
    bias), so that the new parts train alike in every family. An object rather than a closure, so that the
    model still pickles."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self) -> set[str]:
        model = self.model
        own = set(type(model).no_weight_decay(model))
        return own | {
            f"{path}.{name}"
            for path, module in model.named_modules()
            if isinstance(module, CachedBias)
            for name, _ in module.named_parameters()
        }


def _ancestors(paths) -> set[str]:
    """The paths of the modules holding the modules at ``paths`` (``""``: the model)."""
    return {".".join(path.split(".")[:i]) for path in paths for i in range(path.count(".") + 1)}


def _patch_holders(model: nn.Module, converted: list[dict]) -> None:
    """Give the model and every module in it that holds converted blocks (the timm model inside a wrapper, a
    detector's backbone...) the converted model's ``set_input_size`` (refused before timm's resize touches
    the patch embedding), ``group_matcher`` and ``no_weight_decay``, wherever the user calls them."""
    streams = _ancestors(b["path"] for b in converted if b["carrier_tokens"] == "stage stream")
    for path in sorted(_ancestors(b["path"] for b in converted)):
        module = model.get_submodule(path)
        if isinstance(module, CarrierStage):
            continue  # its own set_input_size refuses already
        if path in streams and hasattr(module, "set_input_size"):
            module.set_input_size = _refuse_resize
        if path in streams and hasattr(type(module), "group_matcher"):
            module.group_matcher = _GroupMatcher(module)
        if hasattr(type(module), "no_weight_decay"):
            module.no_weight_decay = _NoWeightDecay(module)


def _converted_part(model: nn.Module) -> str | None:
    """Path of the first module of ``model`` that a conversion made or marked (``""``: the model), or ``None``."""
    for path, module in model.named_modules():
        if getattr(module, CONVERSION_ATTR, None) is not None or isinstance(module, (CarrierStage, CarrierBlock)):
            return path
    return None


def _tokenizer_rule(matcher: dict, name: str, stage_path: str) -> tuple[str, tuple] | None:
    """The rule (in the group ``key`` of ``matcher``) that gives ``<stage_path>.carrier_tokenizer.*`` the
    grouping timm derives for the parameter ``name``: the first rule that matches it, its captured numbers
    as a fixed suffix."""
    for key, spec in matcher.items():
        if spec is None:
            continue
        for pattern, suffix in [(spec, None)] if isinstance(spec, str) else spec:
            found = re.match(pattern, name)
            if found:
                ordinal = tuple(float(g) for g in found.groups()) + tuple(suffix or ())
                return key, (rf"^{re.escape(stage_path)}\.carrier_tokenizer\.", ordinal)
    return None


def convert(
    model: nn.Module,
    *,
    ct_size: int = 2,
    stages: Sequence[int] | None = None,
    init: str = "identity",
    propagate: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Replace the window-attention blocks of ``model`` by HAT blocks that reuse their weights.

    Supported: timm Swin v1 and SwinV2 (every block; carrier tokens made once per stage and threaded
    through it), timm Twins-SVT (its ``LocallyGroupedAttn``; each converted attention makes its own
    carrier tokens, see :mod:`hatplug.adapters.twins`) and hatplug's EdgeViT (its global sparse attention
    blocks), plus whatever :func:`hatplug.register_adapter` added.

    Args:
        model: the model; it is not changed unless ``inplace``.
        ct_size: carrier tokens per window side.
        stages: indices of the stages to convert (stages holding supported blocks, in model order), or
            ``None`` for all.
        init: ``"identity"``: the converted model computes the original function until training opens
            the per-head gates (``hat_gate``) between the original window softmax and the joint softmax
            over carrier tokens and window tokens; ``"random"``: the paper's HAT (joint softmax) at once,
            new parts initialised as in FasterViT.
        propagate: in the last converted block of each stage, add the nearest-upsampled carrier tokens
            to the window tokens (FasterViT's propagation; scale 0 at ``init="identity"``).
        inplace: convert ``model`` itself instead of a deep copy.

    Returns:
        The converted model: the same class, with its methods (``forward_features``, ``forward_head``,
        ``reset_classifier``, ``forward_intermediates``...), its original weights (the report lists any a
        twin does not use) and each block's train / eval mode; the new parameters are trainable. Hooks on
        a rewritten stage or on a block whose twin keeps its signature move to the replacement; hooks on a
        module replaced by one with other inputs are refused. Inside a rewritten stage, the modules between
        the stage and its blocks (Swin's ``blocks`` container, EdgeViT's LGL blocks) carry the carrier tokens
        and are no longer called as modules: hooks on them are refused, and hooks added to them later never
        run (hook the stage or the blocks); every other module there still runs, hooks included. For timm's
        optimizer factory, ``group_matcher`` puts each stage's carrier tokenizer with the stage's first block
        and ``no_weight_decay`` adds the new position MLPs (as FasterViT does); ``set_input_size`` is refused
        before anything changes. All three are replaced on every module holding converted blocks (a
        wrapped timm backbone too). :func:`hatplug.report` says what changed.

    Raises:
        UnsupportedModelError: nothing in ``model`` is a supported block.
        ConversionError: a stage cannot be traced or rewritten, or the model (or a module in it) was
            converted already.
        ValueError: bad arguments.

    >>> import timm, torch, hatplug
    >>> swin = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2), num_heads=(1, 2),
    ...                          window_size=4, img_size=64, num_classes=10).eval()
    >>> hat = hatplug.convert(swin)
    >>> type(hat).__name__, [b.path for b in hatplug.report(hat).converted]
    ('SwinTransformer', ['layers.0.blocks.0', 'layers.0.blocks.1', 'layers.1.blocks.0', 'layers.1.blocks.1'])
    >>> x = torch.randn(2, 3, 64, 64)
    >>> with torch.no_grad():
    ...     (hat(x) - swin(x)).abs().max().item() < 1e-5  # init="identity": the original function
    True
    """
    if init not in INIT_MODES:
        raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
    if not isinstance(ct_size, int) or isinstance(ct_size, bool) or ct_size < 1:
        raise ValueError(f"ct_size must be a positive int, got {ct_size!r}")
    for name, flag in (("propagate", propagate), ("inplace", inplace)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if stages is not None and (
        isinstance(stages, (str, bytes))
        or not isinstance(stages, Sequence)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in stages)
    ):
        raise ValueError(f"stages must be a list of stage indices (ints) or None, got {stages!r}")
    if stages is not None and len(set(stages)) != len(stages):
        raise ValueError(f"stages lists a stage more than once: {list(stages)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes an nn.Module (e.g. timm.create_model(...)), got {type(model).__name__}")
    inner = _wrapped_attribute(model)
    if inner is not None:
        raise ConversionError(
            f"convert() takes the model, not a {type(model).__name__} around it (a converted wrapper is saved and "
            f"loaded under the wrapper's name and keys, which no model matches): convert model.{inner}, then wrap "
            "the converted model"
        )
    done = _converted_part(model)
    if done == "":
        raise ConversionError(f"{type(model).__name__} was converted already (see hatplug.report(model))")
    if done is not None:
        raise ConversionError(
            f"'{done}' ({type(model.get_submodule(done)).__name__}) in {type(model).__name__} was converted "
            "already: wrap the original model and convert the wrapper, or use the converted model as it is"
        )
    if not any(find_adapter(m) is not None for m in model.modules()):
        raise UnsupportedModelError(unsupported_message(model))
    if inplace and any(_has_hooks(m) for m in model.modules()):
        # hooks on a module that is replaced by a twin with other inputs are refused (below); find out on a
        # copy, before the model itself changes
        convert(copy.deepcopy(model), ct_size=ct_size, stages=stages, init=init, propagate=propagate)
    if not inplace:
        model = copy.deepcopy(model)

    named_before = list(model.named_modules())
    params_named_before = list(model.named_parameters())
    original = {id(p) for _, p in params_named_before}
    params_before = sum(p.numel() for p in model.parameters())
    settings = ConversionSettings(ct_size=ct_size, init=init)

    # group the candidate blocks by stage, in model order
    groups: dict[str, list[tuple[str, nn.Module, BlockAdapter]]] = {}
    for path, module in model.named_modules():
        adapter = find_adapter(module)
        if adapter is not None:
            groups.setdefault(adapter.stage_path(model, path), []).append((path, module, adapter))
    if stages is not None:
        unknown = sorted(set(stages) - set(range(len(groups))))
        if unknown:
            raise ValueError(
                f"stages {unknown} do not exist: {type(model).__name__} has {len(groups)} stages with "
                f"supported blocks, {list(range(len(groups)))}: {list(groups)}"
            )

    converted, skipped, notes = [], [], []
    per_block: dict[str, list[int]] = {}
    for index, (stage_path, entries) in enumerate(groups.items()):
        adapters = {type(a) for _, _, a in entries}
        if len(adapters) > 1:
            kinds = sorted(a.__name__ for a in adapters)
            raise ConversionError(f"stage '{stage_path}' mixes blocks of several adapters: {kinds}")
        adapter = entries[0][2]
        todo = []
        for path, block, _ in entries:
            if stages is not None and index not in stages:
                reason = f"stage {index} not selected (stages={list(stages)})"
            else:
                reason = _skip_reason(adapter, model, path, block, ct_size)
            if reason:
                skipped.append({"path": path, "stage": index, "family": adapter.family, "reason": reason})
            else:
                todo.append((path, block))
        if not todo:
            continue
        if adapter.carrier_stream == "stage":
            _rewrite_stage(model, stage_path, todo, adapter, settings, propagate)
            mode = "stage stream"
        else:
            for path, block in todo:
                twin = _build_twin(adapter, model, path, block, settings, propagate)
                _move_hooks(block, twin)  # the twin keeps the block's signature
                _set_submodule(model, path, twin)
            mode = "per block"
            per_block.setdefault(adapter.family, []).append(index)
        for i, (path, block) in enumerate(todo):
            grid = adapter.window_grid(model, path, block)
            converted.append(
                {
                    "path": path,
                    "stage": index,
                    "family": adapter.family,
                    "windows": list(grid) if grid is not None else None,
                    "window_size": list(adapter.window_size(block)),
                    "carrier_tokens": mode,
                    "propagates": propagate and (mode == "per block" or i == len(todo) - 1),
                }
            )

    if not converted:
        reasons = sorted({f"stage {b['stage']}: {b['reason']}" for b in skipped})
        fixes = {
            "single window": "a larger input size or smaller windows (a single window has no other to talk to)",
            "smaller than ct_size": "a smaller ct_size",
            "not selected": "other stages=",
        }
        wanted = [fix for key, fix in fixes.items() if any(key in b["reason"] for b in skipped)]
        raise ConversionError(
            f"no block of {type(model).__name__} was converted, every candidate was skipped: {'; '.join(reasons)}. "
            f"Try {' or '.join(wanted) or 'another model'}."
        )
    _check_hooks_kept(model, named_before)
    _patch_holders(model, converted)
    for family, indices in per_block.items():
        notes.append(
            f"{family} (stages {', '.join(map(str, indices))}): the model's own forward loops over the blocks, with "
            "no stage module to rewrite, so each converted block makes its own carrier tokens from its input and "
            "propagates them into its output"
        )
    params_new = sum(p.numel() for p in model.parameters() if id(p) not in original)
    kept = {id(p) for p in model.parameters()}
    dropped = [name for name, p in params_named_before if id(p) not in kept]
    setattr(
        model,
        CONVERSION_ATTR,
        {
            "config": {"ct_size": ct_size, "stages": None if stages is None else list(stages), "init": init,
                       "propagate": propagate},
            "model": type(model).__name__,
            "converted": converted,
            "skipped": skipped,
            "notes": notes,
            "dropped": dropped,
            "params_before": params_before,
            "params_new": params_new,
        },
    )  # fmt: skip
    return model
