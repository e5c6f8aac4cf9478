"""The classifier-head arguments of hatplug's models and FasterViT, checked one way, by timm's conventions."""

from __future__ import annotations

import operator

__all__ = ["TIMM_POOL_TYPES", "check_head", "drop_pool_of_pruned_head"]

TIMM_POOL_TYPES = ("avg", "max", "avgmax", "catavgmax", "fast", "fastavg", "fastmax", "fastavgmax", "fastcatavgmax")


def check_head(global_pool: str, num_classes: int, pool_types: tuple[str, ...] = TIMM_POOL_TYPES) -> int:
    """``num_classes`` as an int, once ``(global_pool, num_classes)`` is a head timm would build: a pooling
    type among ``pool_types``, or ``''``, which keeps the ``(B, C, H, W)`` map and so needs ``num_classes=0``.

    >>> check_head("avg", 10)
    10
    >>> check_head("", 10)
    Traceback (most recent call last):
    ...
    ValueError: global_pool='' keeps the (B, C, H, W) map, which a linear head of num_classes=10 cannot take: \
pass num_classes=0 to get the map, or a pooling type such as 'avg'
    """
    if isinstance(num_classes, bool) or not hasattr(num_classes, "__index__") or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0: no classifier, features only), got {num_classes!r}")
    if not isinstance(global_pool, str) or global_pool.lower() not in ("", *pool_types):
        raise ValueError(
            f"global_pool={global_pool!r} is not a pooling type: use one of {pool_types} or '' (no pooling)"
        )
    if not global_pool and num_classes > 0:
        raise ValueError(
            f"global_pool='' keeps the (B, C, H, W) map, which a linear head of num_classes={num_classes} cannot "
            "take: pass num_classes=0 to get the map, or a pooling type such as 'avg'"
        )
    return operator.index(num_classes)


def drop_pool_of_pruned_head(kwargs: dict) -> dict:
    """Builder arguments without ``global_pool=""`` where ``features_only`` is set: "no pooling", as timm's backbones
    take it, for a head that the feature wrapper prunes (or, with hooks, never returns), so that :func:`check_head`
    does not ask for ``num_classes=0``. ``kwargs`` itself is not changed.

    >>> drop_pool_of_pruned_head({"features_only": True, "global_pool": ""})
    {'features_only': True}
    >>> drop_pool_of_pruned_head({"global_pool": ""})  # a classifier: check_head still judges it
    {'global_pool': ''}
    """
    if kwargs.get("features_only") and kwargs.get("global_pool") == "":
        return {k: v for k, v in kwargs.items() if k != "global_pool"}
    return kwargs
