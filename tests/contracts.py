"""Checks of timm's model contract shared by the tests of several model families."""

import pytest
import torch


def check_forward_intermediates(model: torch.nn.Module, x: torch.Tensor, stages: list, features: torch.Tensor) -> None:
    """``model.forward_intermediates`` against ``stages`` (each stage's output, recorded independently) and
    ``features`` (``forward_features(x)``): all stages, the last two with the final norm, stopping early, and
    the NCHW-only output format. Exact equality: the same computation in the same order."""
    exact = dict(rtol=0, atol=0)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        last_two = model.forward_intermediates(x, indices=2, norm=True, intermediates_only=True)
        early_final, early = model.forward_intermediates(x, indices=[1], stop_early=True)
    torch.testing.assert_close(final, features, **exact)
    assert len(maps) == len(stages)
    for m, s in zip(maps, stages):
        torch.testing.assert_close(m, s, **exact)
    assert len(last_two) == 2
    torch.testing.assert_close(last_two[0], stages[-2], **exact)
    torch.testing.assert_close(last_two[1], features, **exact)  # norm=True: the norm of forward_features
    assert len(early) == 1
    torch.testing.assert_close(early[0], stages[1], **exact)
    torch.testing.assert_close(early_final, stages[1], **exact)  # stopped there: not downsampled, no norm
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")
