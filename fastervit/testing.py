"""Helpers that write checkpoints in the official FasterViT layout (for tests, demos and export to the
official code base)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from hatplug.checkpoint import _derived_shapes

__all__ = ["official_state_dict", "save_official_checkpoint"]


def official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` plus the recomputable buffers the official code also stores
    (``relative_coords_table``, ``relative_position_index`` and the cached ``relative_bias``).

    >>> import fastervit
    >>> model = fastervit.create_model("faster_vit_0_224")
    >>> len(official_state_dict(model)) - len(model.state_dict())
    68
    """
    state = dict(model.state_dict())
    for key, _shape in _derived_shapes(model).items():
        module_path, name = key.rsplit(".", 1)
        if name not in ("relative_bias", "relative_coords_table", "relative_position_index"):
            continue  # a level's idle carrier-token conv: only the any-resolution code stores one
        module = model.get_submodule(module_path)
        if name == "relative_bias":
            with torch.no_grad():
                state[key] = module.compute().detach().clone()
        else:
            state[key] = getattr(module, name).clone()
    return state


def save_official_checkpoint(model: nn.Module, path: str | Path, epoch: int = 0) -> Path:
    """Write ``model`` as the official training script does: a dict with ``module.``-prefixed weights under
    ``state_dict`` plus training metadata (an ``argparse.Namespace`` of arguments, an optimizer stub).

    >>> import fastervit, tempfile, os
    >>> model = fastervit.create_model("faster_vit_0_224")
    >>> path = save_official_checkpoint(model, os.path.join(tempfile.mkdtemp(), "w.pth.tar"))
    >>> fastervit.create_model("faster_vit_0_224", checkpoint_path=path).load_report.ok
    True
    """
    path = Path(path)
    state = {f"module.{k}": v for k, v in official_state_dict(model).items()}
    torch.save(
        {
            "state_dict": state,
            "epoch": epoch,
            "args": argparse.Namespace(model=type(model).__name__, epochs=epoch),
            "optimizer": {"state": {}, "param_groups": []},
        },
        path,
    )
    return path
