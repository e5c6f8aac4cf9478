"""The notebooks in ``notebooks/`` run top to bottom, save the figures they declare, and are committed clean.

Each notebook is executed with nbclient in a kernel that runs this interpreter (a kernelspec written for the
test, so no other ``python3`` kernel on the machine can stand in for it), from the repository root, with
``HATPLUG_NOTEBOOK_OUT`` set to a temporary folder. A notebook lists the PNGs it saves in its metadata
(``metadata.hatplug.figures``); exactly those must appear and be readable images. A new notebook in
``notebooks/`` is picked up by the parametrisation.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import matplotlib.image
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
KERNEL = "hatplug-tests"
CELL_TIMEOUT_S = 150
NOTEBOOK_BUDGET_S = 180
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _kernelspec(folder: Path) -> Path:
    """A Jupyter data folder holding a kernelspec that starts ``sys.executable``; goes on ``JUPYTER_PATH``."""
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    return folder


def test_notebooks_found():
    assert NOTEBOOKS, "no notebooks in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_clean(path):
    """No outputs in git, an opening markdown paragraph, a closing "What to try next", declared figures."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, (
        f"{path.name}: code cells {dirty} have outputs or execution counts; "
        f"clear them before committing: python scripts/strip_notebooks.py notebooks/{path.name}"
    )
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert nb.cells[-1].cell_type == "markdown" and nb.cells[-1].source.startswith("## What to try next")
    figures = nb.metadata.get("hatplug", {}).get("figures")
    assert figures and all(name.endswith(".png") for name in figures), (
        f"{path.name}: list the PNGs it saves in metadata.hatplug.figures"
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs(path, tmp_path, monkeypatch):
    out = tmp_path / "figures"
    monkeypatch.setenv("JUPYTER_PATH", str(_kernelspec(tmp_path / "jupyter")))
    monkeypatch.setenv("HATPLUG_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("HATPLUG_ABLATION_RESULTS", str(tmp_path / "ablation"))  # a fresh smoke run, not runs/
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the rest of the suite: many small ops on shared cores
    nb = nbformat.read(path, as_version=4)
    # a last cell reports which Python ran the notebook
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(ROOT)}})

    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    seconds = time.perf_counter() - start

    print(f"{path.name}: {seconds:.1f} s")
    assert seconds < NOTEBOOK_BUDGET_S, f"{path.name} took {seconds:.0f} s (budget {NOTEBOOK_BUDGET_S} s)"
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.prefix  # the kernel ran this environment's Python
    expected = sorted(nb.metadata["hatplug"]["figures"])
    assert sorted(p.name for p in out.glob("*.png")) == expected
    for name in expected:
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(out / name)
        height, width, channels = image.shape
        assert channels in (3, 4) and height >= 200 and width >= 200, (name, image.shape)
        assert image[..., :3].std() > 0.02, f"{name} is (nearly) blank"
