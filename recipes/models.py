"""Models of the recipes: build any model by name, and the ablation backbones built from hatplug's mixers.

:func:`create_model` resolves a name in this order: the recipe models below (``fastervit_mixer``,
``window_probe``), the FasterViT family (:func:`fastervit.create_model`), then timm (which also knows
EdgeViT once :mod:`hatplug.models` is imported).

>>> import torch
>>> m = create_model("fastervit_mixer", mixer="swin", img_size=64, num_classes=2, **TINY_FASTERVIT)
>>> m(torch.randn(1, 3, 64, 64)).shape
torch.Size([1, 2])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from difflib import get_close_matches

import timm
import torch
from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import fastervit
import hatplug.models  # noqa: F401  (registers EdgeViT with timm)
from hatplug.mixers import create_mixer

__all__ = ["TINY_FASTERVIT", "MixerLevel", "WindowProbe", "create_model", "fastervit_mixer", "window_probe"]

TINY_FASTERVIT = dict(dim=16, in_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=[4, 4, 2, 2])
"""A FasterViT-0-shaped model small enough for CPU smoke tests (stage 3 at 64 px: 4x4 tokens, 2x2 windows)."""


class MixerLevel(nn.Module):
    """A FasterViT level whose token mixer was swapped: ``mixer`` (NCHW -> NCHW) then the level's ``downsample``.

    :func:`fastervit_mixer` puts one in place of FasterViT's stage 3; any NCHW -> NCHW module can be the mixer.

    >>> mixer = create_mixer("swin", dim=8, depth=1, num_heads=1, input_resolution=(4, 4), window_size=2)
    >>> level = MixerLevel(mixer, downsample=nn.Conv2d(8, 16, 2, stride=2))
    >>> x = torch.randn(1, 8, 4, 4)
    >>> level(x).shape, level.forward_blocks(x).shape
    (torch.Size([1, 16, 2, 2]), torch.Size([1, 8, 4, 4]))
    """

    def __init__(self, mixer: nn.Module, downsample: nn.Module | None) -> None:
        super().__init__()
        self.mixer = mixer
        self.downsample = downsample
        self.grad_checkpointing = False  # FasterViT.set_grad_checkpointing sets it on every level

    @property
    def grad_checkpointing(self) -> bool:
        return self._grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        """Passed on to a mixer that checkpoints its own blocks (the HAT and window stages); any other mixer is
        checkpointed whole (it was not checkpointed at all)."""
        self._grad_checkpointing = bool(enable)
        if hasattr(self.mixer, "set_grad_checkpointing"):
            self.mixer.set_grad_checkpointing(enable)

    def forward_blocks(self, x: Tensor) -> Tensor:
        """The level without its downsample (FasterViT's ``forward_intermediates`` taps here)."""
        if self._grad_checkpointing and self.training and not hasattr(self.mixer, "set_grad_checkpointing"):
            return checkpoint(self.mixer, x, use_reentrant=False)
        return self.mixer(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


def fastervit_mixer(
    mixer: str = "hat",
    mixer_kwargs: dict | None = None,
    *,
    dim: int = 64,
    in_dim: int = 64,
    depths: Sequence[int] = (2, 3, 6, 5),
    num_heads: Sequence[int] = (2, 4, 8, 16),
    window_size: Sequence[int] = (7, 7, 7, 7),
    ct_size: int = 2,
    mlp_ratio: float = 4.0,
    layer_scale: float | None = None,
    drop_path_rate: float = 0.2,
    img_size: int | Sequence[int] = 224,
    num_classes: int = 1000,
) -> nn.Module:
    """A FasterViT-0-like classifier whose stage 3 is the :mod:`hatplug.mixers` mixer ``mixer``.

    Everything but stage 3 is FasterViT (``faster_vit_0_any_res`` with the given sizes; stage 4 keeps window
    attention, without carrier tokens, as in FasterViT-0). Stage 3 gets the same depth, heads, window size and
    drop-path rates whatever the mixer. ``mixer_kwargs`` go to the mixer (e.g. ``{"ct_attention": False}`` for
    ``"hat"``, ``{"sr_ratio": 2}`` for ``"twins"``, ``{"window_size": 2}`` to give EdgeViT another delegate
    stride); ``ct_size`` is passed to the ``"hat"`` mixer only.

    >>> m = fastervit_mixer("twins", img_size=64, num_classes=2, **TINY_FASTERVIT)
    >>> type(m.levels[2].mixer).__name__
    'TwinsStage'
    """
    mixer_kwargs = dict(mixer_kwargs or {})
    model = fastervit.create_model(
        "faster_vit_0_any_res",
        resolution=img_size,
        dim=dim,
        in_dim=in_dim,
        depths=list(depths),
        num_heads=list(num_heads),
        window_size=list(window_size),
        ct_size=ct_size,
        mlp_ratio=mlp_ratio,
        layer_scale=layer_scale,
        drop_path_rate=drop_path_rate,
        num_classes=num_classes,
    )
    level = model.levels[2]
    rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()[sum(depths[:2]) : sum(depths[:3])]
    stage_kwargs = dict(
        dim=dim * 4,
        depth=depths[2],
        num_heads=num_heads[2],
        input_resolution=level.input_resolution,
        window_size=window_size[2],
        drop_path=rates,
        mlp_ratio=mlp_ratio,
        layer_scale=layer_scale,
    )
    if mixer == "hat":
        stage_kwargs["ct_size"] = ct_size
    new_level = MixerLevel(create_mixer(mixer, **{**stage_kwargs, **mixer_kwargs}), level.downsample)
    new_level.mixer.apply(model._init_weights)
    model.levels[2] = new_level
    return model


class WindowProbe(nn.Module):
    """Patchify -> one mixer stage -> LayerNorm -> global average pool -> linear head.

    The patch embedding is a ``patch_size`` strided conv, so a token sees only its own patch and tokens of
    different windows can exchange information only through the mixer. With ``mixer="window"`` the pooled
    feature is a sum of per-window features; see :mod:`recipes.data.synthetic` for why that cannot solve the
    "same shape" task, while ``mixer="hat"`` can.

    >>> WindowProbe("hat", img_size=64, num_classes=2)(torch.randn(2, 3, 64, 64)).shape
    torch.Size([2, 2])
    """

    def __init__(
        self,
        mixer: str = "hat",
        img_size: int = 64,
        patch_size: int = 4,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 2,
        window_size: int = 4,
        num_classes: int = 2,
        mixer_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        side = img_size // patch_size
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.stage = create_mixer(
            mixer, dim=dim, depth=depth, num_heads=num_heads, input_resolution=(side, side), window_size=window_size,
            **(mixer_kwargs or {}),
        )  # fmt: skip
        self.norm = LayerNorm2d(dim)
        self.head = nn.Linear(dim, num_classes)
        self.num_classes = num_classes

    def get_classifier(self) -> nn.Module:
        """The linear head (timm's name; a warm start from another number of classes leaves it at its init)."""
        return self.head

    def forward_features(self, x: Tensor) -> Tensor:
        return self.norm(self.stage(self.patch_embed(x)))  # (B, C, H/p, W/p)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def window_probe(**kwargs) -> WindowProbe:
    """Build a :class:`WindowProbe` (the name :func:`create_model` knows it by); ``kwargs`` are its arguments.

    >>> probe = create_model("window_probe", mixer="window", img_size=32, dim=8, depth=1, num_classes=2)
    >>> type(probe).__name__, probe(torch.randn(2, 3, 32, 32)).shape
    ('WindowProbe', torch.Size([2, 2]))
    """
    return WindowProbe(**kwargs)


RECIPE_MODELS: dict[str, Callable[..., nn.Module]] = {"fastervit_mixer": fastervit_mixer, "window_probe": window_probe}


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name: a recipe model, a FasterViT variant, or any timm model.

    ``kwargs`` are the builder's own arguments (e.g. ``resolution``/``img_size``, ``num_classes``,
    ``window_size`` ...). ``pretrained=True`` works as in timm / :func:`fastervit.create_model`.

    >>> create_model("faster_vit_0_any_res", resolution=64, num_classes=3, **TINY_FASTERVIT).num_classes
    3
    >>> create_model("Window-Probe")  # an unknown name: the closest known names, ignoring case and dashes
    Traceback (most recent call last):
    ...
    ValueError: unknown model 'Window-Probe' (did you mean 'window_probe'?): not one of ...
    """
    if name in RECIPE_MODELS:
        return RECIPE_MODELS[name](**kwargs)
    if name in fastervit.list_models():
        return fastervit.create_model(name, **kwargs)
    if timm.is_model(name):
        return timm.create_model(name, **kwargs)
    close = _close_names(name)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise ValueError(
        f"unknown model {name!r}{hint}: not one of {sorted(RECIPE_MODELS)}, fastervit.list_models(), or "
        "timm.list_models()"
    )


def _close_names(name: object, n: int = 3) -> list[str]:
    """Up to ``n`` names :func:`create_model` knows that are closest to ``name``, ignoring case and dashes (as
    :func:`fastervit.create_model` does).

    >>> _close_names("Window-Probe")
    ['window_probe']
    """
    known = list(dict.fromkeys([*RECIPE_MODELS, *fastervit.list_models(), *timm.list_models()]))
    by_key = {}
    for known_name in known:
        by_key.setdefault(known_name.lower().replace("-", "_"), known_name)
    close = get_close_matches(str(name).lower().replace("-", "_"), list(by_key), n=n)
    return [by_key[key] for key in close]
