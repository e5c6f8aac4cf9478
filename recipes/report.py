"""The ablation runner's outputs: ``results.csv``, ``results.md`` and ``pareto.png``, all from the same rows.

>>> rows = [dict(arm="a", top1=0.9, infer_imgs_per_sec=100.0), dict(arm="b", top1=0.8, infer_imgs_per_sec=300.0)]
>>> print(markdown_table(rows))
| arm | top1 | infer_imgs_per_sec |
|---|---|---|
| a | 0.9 | 100 |
| b | 0.8 | 300 |
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["COLUMNS", "markdown_table", "plot_pareto", "read_csv", "read_markdown", "write_csv", "write_markdown"]

COLUMNS = [
    "arm",
    "top1",
    "top5",
    "loss",
    "params",
    "gflops",
    "train_imgs_per_sec",
    "infer_imgs_per_sec",
    "wall_time_s",
    "resolution",
    "ablation",
    "profile",
]
"""Columns of the results, in order. ``gflops`` counts a multiply-add as 2 FLOPs (``torch.utils.flop_counter``),
so it is about twice the multiply-add counts that papers, FasterViT's included, report as FLOPs. ``ablation`` and
``profile`` (``smoke``, ``cpu`` or ``full``) say which run of which ablation a row comes from."""


def _format(value: object) -> str:
    if value is None:
        return ""  # no metric: an empty cell, not "None"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _finite(value: object) -> float | None:
    """``value`` as a float, or None when it is missing, empty, not a number, NaN or infinite."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _columns(rows: Sequence[dict]) -> list[str]:
    present = {k for row in rows for k in row}
    return [c for c in COLUMNS if c in present] + sorted(present - set(COLUMNS))


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """One line per row, columns in :data:`COLUMNS` order (then any others, sorted); floats to 6 significant
    digits, ``None`` and missing values as empty cells.

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "results.csv"
    >>> write_csv([dict(params=1200, arm="a", top1=0.123456789), dict(arm="b", top1=None)], path)
    >>> print(path.read_text(), end="")
    arm,top1,params
    a,0.123457,1200
    b,,
    """
    columns = _columns(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _format(row.get(k, "")) for k in columns})


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV file written by :func:`write_csv`, one dict per line; every value is a string.

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "results.csv"
    >>> write_csv([dict(arm="a", top1=0.9, params=1200)], path)
    >>> read_csv(path)
    [{'arm': 'a', 'top1': '0.9', 'params': '1200'}]
    """
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows as a GitHub markdown table, same columns and formatting as :func:`write_csv`.

    >>> print(markdown_table([dict(top1=0.123456789, arm="a", note="x"), dict(arm="b", top1=None)]))
    | arm | top1 | note |
    |---|---|---|
    | a | 0.123457 | x |
    | b |  |  |
    """
    columns = _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(k, "")) for k in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(rows: Sequence[dict], path: str | os.PathLike, title: str = "", notes: str = "") -> None:
    """Write ``rows`` as :func:`markdown_table` to ``path``, under a ``# title`` heading and a paragraph of
    ``notes`` when they are given.

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "results.md"
    >>> write_markdown([dict(arm="a", top1=0.9)], path, title="attention_type (smoke)", notes="Two epochs.")
    >>> print(path.read_text(), end="")
    # attention_type (smoke)
    <BLANKLINE>
    Two epochs.
    <BLANKLINE>
    | arm | top1 |
    |---|---|
    | a | 0.9 |
    """
    text = (f"# {title}\n\n" if title else "") + (f"{notes.strip()}\n\n" if notes.strip() else "")
    Path(path).write_text(text + markdown_table(rows) + "\n")


def read_markdown(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of the (first) table in a markdown file written by :func:`write_markdown`; values are strings.

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "results.md"
    >>> write_markdown([dict(arm="a", top1=0.9), dict(arm="b", top1=None)], path, title="an ablation")
    >>> read_markdown(path)
    [{'arm': 'a', 'top1': '0.9'}, {'arm': 'b', 'top1': ''}]
    """
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip().startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def plot_pareto(
    rows: Sequence[dict], path: str | os.PathLike, title: str = "", x: str = "infer_imgs_per_sec", y: str = "top1"
) -> list[tuple[str, float, float]]:
    """Scatter accuracy against inference throughput, one labelled point per row, with the Pareto front.

    Returns the plotted points as ``(label, x, y)`` so that callers (and tests) can check them against the
    tables. A row without a number in ``x`` or ``y`` (no validation metric, say) is left out, with a warning that
    names it. Drawn on a bare :class:`matplotlib.figure.Figure`, so no pyplot backend is chosen or changed
    (inline plots in a notebook keep working).

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "pareto.png"
    >>> rows = [dict(arm="fast", top1=0.7, infer_imgs_per_sec=300.0),
    ...         dict(arm="slow", top1=0.9, infer_imgs_per_sec=100)]
    >>> plot_pareto(rows, path, title="an ablation")
    [('fast', 300.0, 0.7), ('slow', 100.0, 0.9)]
    >>> path.read_bytes()[:4] == b"\\x89PNG"
    True
    """
    from matplotlib.figure import Figure

    points, missing = [], []
    for r in rows:
        px, py = _finite(r.get(x)), _finite(r.get(y))
        if px is None or py is None:
            missing.append(str(r["arm"]))
        else:
            points.append((str(r["arm"]), px, py))
    if missing:
        warnings.warn(
            f"{path}: rows {missing} have no number in {x!r} or {y!r} and are left out of the plot (a row without a "
            "validation metric: its data module gave no validation batches)",
            stacklevel=2,
        )
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.subplots()
    ax.scatter([p[1] for p in points], [p[2] for p in points], zorder=3)
    for label, px, py in points:
        ax.annotate(label, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front, best = [], float("-inf")
    for _, px, py in sorted(points, key=lambda p: -p[1]):  # fastest first: keep those more accurate than all faster
        if py > best:
            front.append((px, py))
            best = py
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", zorder=2, label="Pareto front")
        ax.legend(loc="best")
    x_label = "inference throughput (images / s, measured here)" if x == "infer_imgs_per_sec" else x.replace("_", " ")
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"validation {y} accuracy" if y.startswith("top") else y.replace("_", " "))
    ax.set_title(title or "accuracy vs throughput")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return points
