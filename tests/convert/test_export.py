"""A converted Swin through the deployment paths: torch.compile (fullgraph: no graph break), torch.export,
torch.jit.trace, ONNX.

The model is a tiny Swin converted at both inits, with open gates and propagation scales so that the
carrier-token path carries weight. Tolerances as FasterViT's export tests: 1e-5 for compile / jit.trace,
1e-4 for onnxruntime.
"""

import functools

import pytest
import torch

import hatplug

from ..conftest import ONNX_EXPORTERS, ignore_onnx_warnings, onnx_session
from .conftest import FAMILIES, make_model, open_gates

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.trace(_method)?` is deprecated:FutureWarning"),
]
EXACT = dict(rtol=1e-5, atol=1e-5)


@functools.cache
def _converted(init):
    torch.manual_seed(0)
    model = open_gates(hatplug.convert(make_model(FAMILIES["swin"], 64), init=init)).eval()
    return model, torch.randn(2, 3, 64, 64)


@pytest.fixture(params=["identity", "random"])
def converted(request):
    return _converted(request.param)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    # fullgraph=True fails on any graph break. Compiled for the default init only (Dynamo takes ~15 s per model
    # on CPU); the other init's attention (SDPA with the shift mask) goes through jit.trace and ONNX below.
    model, x = _converted("identity")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), **EXACT)


def test_jit_trace_matches_eager(converted):
    model, x = converted
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        xb = torch.randn(3, *x.shape[1:])
        torch.testing.assert_close(traced(xb), model(xb), **EXACT)


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ONNX_EXPORTERS)
@ignore_onnx_warnings
def test_onnx_export_matches_onnxruntime(converted, exporter):
    # The carrier pooling kernel depends on the map size, so the export is for this image size (any batch).
    # dynamo at init="random": onnxscript's SDPA takes 4D inputs, so the shift mask is repeated per image there
    model, x = converted
    session = onnx_session(model, x, exporter)
    for batch in (1, 3):
        xb = torch.randn(batch, *x.shape[1:])
        (logits,) = session.run(None, {"images": xb.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), model(xb), rtol=1e-4, atol=1e-4)


def test_torch_export_with_a_dynamic_batch_matches_eager():
    model, x = _converted("random")
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    with torch.no_grad():
        xb = torch.randn(3, *x.shape[1:])
        torch.testing.assert_close(program.module()(xb), model(xb), **EXACT)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_jit_script_names_the_rewritten_stage_and_the_export_paths():
    model, _ = _converted("identity")
    refused = hatplug.errors.NotScriptableError
    with pytest.raises(refused, match=r"(?s)rewritten by hatplug\.convert.*torch\.jit\.trace"):
        torch.jit.script(model)
    edgevit = hatplug.convert(make_model(FAMILIES["edgevit"], 64))
    with pytest.raises(refused, match=r"Sequential \(a stage rewritten by hatplug\.convert\)"):
        torch.jit.script(edgevit)
