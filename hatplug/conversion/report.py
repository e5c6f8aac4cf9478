"""``hatplug.report``: what :func:`hatplug.convert` changed in a model."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import HatplugError

__all__ = ["BlockRecord", "ConversionReport", "report"]


@dataclass(frozen=True)
class BlockRecord:
    """One converted or skipped block. ``reason`` is set for skipped blocks only."""

    path: str
    stage: int
    family: str
    windows: tuple[int, int] | None = None
    window_size: tuple[int, int] | None = None
    carrier_tokens: str = ""
    propagates: bool = False
    reason: str = ""


@dataclass
class ConversionReport:
    """What a conversion did; ``print(report)`` shows a table.

    Attributes:
        model: class name of the converted model.
        config: the arguments of :func:`hatplug.convert` (what :func:`hatplug.save` stores).
        converted: the converted blocks, in model order.
        skipped: the supported blocks left as they were, each with its reason.
        notes: family-specific remarks (e.g. where carrier tokens are made per block).
        dropped: names of the original parameters the converted model no longer has (a twin that does not
            need some of its block's modules, e.g. EdgeViT's sparse-attention parts at ``init="random"``).
        params_before, params_after, params_new: parameter counts before and after the conversion, and
            of the parts it added.

    >>> import timm, hatplug
    >>> small = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 4))
    >>> swin = timm.create_model("swin_tiny_patch4_window7_224", **small)
    >>> report = hatplug.report(hatplug.convert(swin))
    >>> [block.path for block in report.converted], report.params_new > 0
    (['layers.0.blocks.0', 'layers.1.blocks.0', 'layers.2.blocks.0', 'layers.2.blocks.1'], True)
    >>> [(block.path, block.reason) for block in report.skipped]
    [('layers.3.blocks.0', 'single window at this resolution: the 7x7 window covers the whole map')]
    """

    model: str
    config: dict
    converted: list[BlockRecord] = field(default_factory=list)
    skipped: list[BlockRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    params_new: int = 0

    def __str__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        lines = [f"hatplug.convert({self.model}, {cfg})"]
        rows = [("block", "stage", "family", "windows", "carrier tokens", "status")]
        for r in self.converted:
            windows = "x".join(map(str, r.windows)) if r.windows else "any"
            status = "converted" + (" + propagation" if r.propagates else "")
            rows.append((r.path, str(r.stage), r.family, windows, r.carrier_tokens, status))
        for r in self.skipped:
            rows.append((r.path, str(r.stage), r.family, "", "", f"skipped: {r.reason}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
        lines.append(
            f"{len(self.converted)} blocks converted, {len(self.skipped)} skipped; parameters "
            f"{self.params_before:,} -> {self.params_after:,} (+{self.params_new:,} new, "
            f"{100 * self.params_new / max(self.params_before, 1):.1f}%)"
        )
        if self.dropped:
            lines.append(f"dropped {len(self.dropped)} original parameters: {', '.join(self.dropped)}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def report(model: nn.Module) -> ConversionReport:
    """The :class:`ConversionReport` of a model returned by :func:`hatplug.convert` (or :func:`hatplug.load`).

    Raises:
        HatplugError: ``model`` was not converted.

    >>> import timm, hatplug
    >>> swin = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2), num_heads=(1, 2),
    ...                          window_size=4, img_size=32, num_classes=10)
    >>> rep = hatplug.report(hatplug.convert(swin))
    >>> [(r.path, r.reason) for r in rep.skipped]
    [('layers.1.blocks.0', 'single window at this resolution: the 4x4 window covers the whole map'), \
('layers.1.blocks.1', 'single window at this resolution: the 4x4 window covers the whole map')]
    """
    info = getattr(model, "hatplug_conversion", None)
    if info is None:
        raise HatplugError(f"{type(model).__name__} was not converted: call hatplug.convert(model) first")

    def record(entry: dict) -> BlockRecord:
        entry = dict(entry)
        for key in ("windows", "window_size"):
            if entry.get(key) is not None:
                entry[key] = tuple(entry[key])
        return BlockRecord(**entry)

    return ConversionReport(
        model=info["model"],
        config=dict(info["config"]),
        converted=[record(e) for e in info["converted"]],
        skipped=[record(e) for e in info["skipped"]],
        notes=list(info["notes"]),
        dropped=list(info.get("dropped", ())),
        params_before=info["params_before"],
        params_after=sum(p.numel() for p in model.parameters()),
        params_new=info["params_new"],
    )
