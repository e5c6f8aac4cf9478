import os

import pytest
import torch

# No test may reach the network: pretrained=True must fail fast with instructions instead.
os.environ.setdefault("HATPLUG_OFFLINE", "1")

# The suite is many small models and ops: one intra-op thread avoids the per-op thread synchronisation that
# made it several times slower on 2 shared cores (measured: 11 min -> about 1 min for the parity tests).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every parameter and BN statistic non-trivial values (layer scales ~0.5, not 1e-5),
    so that a wrong path cannot hide behind an almost-identity initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "gamma" in name:
                p.copy_(0.5 + 0.1 * noise)
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.add_(0.02 * noise)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(1 + 0.2 * torch.rand(b.shape, generator=g))
    return model


ONNX_EXPORTERS = ["torchscript", "dynamo"]


def ignore_onnx_warnings(test):
    """The TorchScript exporter's deprecation warnings (deprecated since torch 2.9, still supported) and both
    exporters' notes on constant folding: none says anything about the exported graph, which the tests check."""
    for message in (
        "ignore:You are using the legacy TorchScript-based ONNX export",
        "ignore:Constant folding",
        "ignore:The feature will be removed:DeprecationWarning",
    ):
        test = pytest.mark.filterwarnings(message)(test)
    return test


def onnx_session(model: torch.nn.Module, x: torch.Tensor, exporter: str):
    """An onnxruntime session of ``model`` exported at ``x``'s image size with a dynamic batch, by torch's
    TorchScript exporter (opset 17) or its torch.export-based one (``dynamo=True``, the default since 2.9)."""
    import io

    import onnxruntime as ort

    buffer = io.BytesIO()
    names = dict(input_names=["images"], output_names=["logits"])
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=64)
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False, **names)
        program.save(buffer)
    else:
        axes = {"images": {0: "batch"}, "logits": {0: "batch"}}
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17, dynamic_axes=axes, **names)
    return ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
