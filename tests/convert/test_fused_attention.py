"""The inference form of converted window attention (fused SDPA kernels; hatplug.layers.fusion) against the
training form, for both init modes, open gates, shifted windows and padding; and identity at closed gates."""

import pytest
import torch

import hatplug
import hatplug.layers.attention as attention
from hatplug.layers.fusion import inference_fusion

from .conftest import FAMILIES, make_model, open_gates

TOL = dict(rtol=1e-5, atol=1e-5)


def _outputs(model, x):
    with torch.no_grad():
        fused = model(x)
        with inference_fusion(False):
            plain = model(x)
    return fused, plain


@pytest.mark.parametrize("init", ["identity", "random"])
@pytest.mark.parametrize("name", ["swin", "swinv2", "twins", "edgevit"])
def test_inference_form_matches_training_form(name, init):
    family = FAMILIES[name]
    hat = open_gates(hatplug.convert(make_model(family, family.sizes[1]), init=init)).eval()
    fused, plain = _outputs(hat, torch.randn(2, 3, family.sizes[1], family.sizes[1]))
    torch.testing.assert_close(fused, plain, **TOL)


def test_without_the_private_flash_kernel(monkeypatch):
    """Builds without SDPA's CPU flash kernel (or other devices) mix two public SDPA calls instead."""
    family = FAMILIES["swin"]
    hat = open_gates(hatplug.convert(make_model(family, 40), init="identity")).eval()
    x = torch.randn(2, 3, 40, 40)
    fused, plain = _outputs(hat, x)
    monkeypatch.setattr(attention, "_FLASH_CPU", None)
    with torch.no_grad():
        fallback = hat(x)
    torch.testing.assert_close(fallback, plain, **TOL)
    torch.testing.assert_close(fallback, fused, **TOL)


def test_identity_init_is_the_original_in_the_inference_form():
    family = FAMILIES["swin"]
    original = make_model(family, 40)
    hat = hatplug.convert(original, init="identity").eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(hat(x), original(x), **TOL)
