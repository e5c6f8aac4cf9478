"""The README's Python examples run as written: each ```python block, in order, in one namespace, in a temporary
folder. Only what cannot run offline is swapped: ``pretrained=True`` builds random weights, and the official
checkpoint file the README loads is written first in the official layout."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import fastervit
from fastervit.testing import save_official_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    blocks = _python_blocks()
    assert len(blocks) >= 4 and any("hatplug.convert(" in b for b in blocks)
    assert any("fastervit.create_model(" in b for b in blocks)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_official_checkpoint(fastervit.create_model("faster_vit_2_224"), "fastervit_2_224_1k.pth.tar")
    namespace: dict = {}
    with torch.inference_mode(False):
        for block in blocks:
            code = block.replace("pretrained=True", "pretrained=False")
            exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README

    assert "converted" in capsys.readouterr().out  # print(hatplug.report(hat))
    assert type(namespace["hat"]).__name__ == "SwinTransformer" and (tmp_path / "swin_hat.safetensors").is_file()
    assert namespace["logits"].shape == (1, 1000)
    maps = namespace["maps"]
    assert [tuple(m.shape[-2:]) for m in maps] == [(800 // s, 1344 // s) for s in (4, 8, 16, 32)]
    assert namespace["model"].img_size == (640, 1024) and (tmp_path / "fastervit.onnx").stat().st_size > 1e6
    assert namespace["y"].shape == (2, 256, 28, 40)
