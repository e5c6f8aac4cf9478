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
