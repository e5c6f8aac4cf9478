"""Adapters: one per family of window-attention blocks that :func:`hatplug.convert` can convert.

Each adapter reads a block's geometry and weights and builds its HAT twin. Built in: timm Swin v1,
timm SwinV2, timm Twins-SVT (``LocallyGroupedAttn``) and hatplug's EdgeViT (``GlobalSparseBlock``).
:func:`register_adapter` adds one; adapters registered later take precedence.

>>> [a.family for a in registered_adapters()][:2]
['timm Swin v1', 'timm SwinV2']
"""

from __future__ import annotations

from torch import nn

from .base import BlockAdapter, CarrierBlock, ConversionSettings, block_rates, init_new_weights, padded_grid
from .edgevit import EdgeViTAdapter, EdgeViTCarrierAttention, EdgeViTHATBlock
from .swin import SwinAdapter, SwinCarrierAttention, SwinHATBlock, shifted_window_mask
from .swinv2 import SwinV2Adapter, SwinV2CarrierAttention, SwinV2HATBlock
from .twins import TwinsAdapter, TwinsHATAttention

__all__ = [
    "BlockAdapter",
    "CarrierBlock",
    "ConversionSettings",
    "EdgeViTAdapter",
    "EdgeViTCarrierAttention",
    "EdgeViTHATBlock",
    "SwinAdapter",
    "SwinCarrierAttention",
    "SwinHATBlock",
    "SwinV2Adapter",
    "SwinV2CarrierAttention",
    "SwinV2HATBlock",
    "TwinsAdapter",
    "TwinsHATAttention",
    "block_rates",
    "find_adapter",
    "init_new_weights",
    "padded_grid",
    "register_adapter",
    "registered_adapters",
    "shifted_window_mask",
    "unregister_adapter",
]

_ADAPTERS: list[BlockAdapter] = []


def register_adapter(adapter: BlockAdapter | type[BlockAdapter]) -> BlockAdapter:
    """Teach :func:`hatplug.convert` a new kind of block. Accepts an adapter instance, or an adapter class
    (then it is instantiated, and returned, so that this works as a class decorator). A later registration
    for the same block type takes precedence over earlier ones; :func:`unregister_adapter` removes one.
    ``tests/convert/test_register_adapter.py`` shows a complete adapter for a new block.

    Raises:
        TypeError: ``adapter`` is not a :class:`BlockAdapter` or lists no ``source_types``.

    Example (a copy of timm's Swin block under your own class name, converted like timm's):
        >>> import hatplug
        >>> from timm.models.swin_transformer import SwinTransformerBlock
        >>> from hatplug.adapters.swin import SwinAdapter
        >>> class MyBlock(SwinTransformerBlock): ...
        >>> @hatplug.register_adapter
        ... class MyAdapter(SwinAdapter):
        ...     family = "my Swin"
        ...     source_types = (MyBlock,)
        >>> type(hatplug.adapters.registered_adapters()[-1]).__name__
        'MyAdapter'
        >>> hatplug.adapters.unregister_adapter(MyAdapter)
    """
    if isinstance(adapter, type) and not issubclass(adapter, BlockAdapter):
        raise TypeError(f"register_adapter expects a hatplug.adapters.BlockAdapter, got the class {adapter.__name__}")
    instance = adapter() if isinstance(adapter, type) else adapter
    if not isinstance(instance, BlockAdapter):
        raise TypeError(f"register_adapter expects a hatplug.adapters.BlockAdapter, got {type(instance).__name__}")
    name = type(instance).__name__
    if not instance.source_types or not instance.family:
        raise TypeError(f"{name} must set `family` and the block classes in `source_types`")
    types = instance.source_types
    if not isinstance(types, tuple) or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise TypeError(
            f"{name}.source_types must be a tuple of nn.Module classes (the block types it converts), got "
            f"{types!r}; for one class write source_types = (MyBlock,)"
        )
    cls = type(instance)
    missing = ["window_size"] if cls.window_size is BlockAdapter.window_size else []
    missing += ["build"] if cls.build is BlockAdapter.build and cls.build_at is BlockAdapter.build_at else []
    if missing:
        raise TypeError(f"{name} must implement {' and '.join(missing)} (see hatplug.BlockAdapter)")
    if instance.carrier_stream not in ("stage", "block"):
        raise TypeError(f"{type(instance).__name__}.carrier_stream must be 'stage' or 'block'")
    _ADAPTERS.append(instance)
    return adapter if isinstance(adapter, type) else instance


def unregister_adapter(adapter: BlockAdapter | type[BlockAdapter]) -> None:
    """Remove a registered adapter (an instance, or every instance of a class)."""
    _ADAPTERS[:] = [a for a in _ADAPTERS if not (a is adapter or (isinstance(adapter, type) and type(a) is adapter))]


def registered_adapters() -> list[BlockAdapter]:
    """The adapters in registration order."""
    return list(_ADAPTERS)


def find_adapter(module: nn.Module) -> BlockAdapter | None:
    """The adapter that converts ``module``, or ``None``."""
    for adapter in reversed(_ADAPTERS):
        if adapter.matches(module):
            return adapter
    return None


for _adapter in (SwinAdapter(), SwinV2Adapter(), TwinsAdapter(), EdgeViTAdapter()):
    register_adapter(_adapter)
