"""The fused one-row layer helpers compute what the unfused layers do (CPU: the references)."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from encdec_models.layers import Linear, Norm, layer_boundary_hook, run_layers


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("activation", [None, "gelu", "relu", "gelu_new"])
def test_norm_linear_matches_norm_then_linear(kind, with_residual, activation):
    g = torch.Generator().manual_seed(0)
    norm, linear = Norm(48, kind, 1e-5), Linear(48, 40)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=g))
        if norm.bias is not None:
            norm.bias.copy_(torch.randn(48, generator=g))
    x = torch.randn(1, 48, generator=g)
    residual = torch.randn(1, 48, generator=g) if with_residual else None
    with torch.no_grad():
        got, got_sum = norm.linear(x, residual, linear, activation)
        h, want_sum = (norm(x), x) if residual is None else norm.add(x, residual)
        want = linear(h)
        if activation is not None:
            want = ACT2FN[activation](want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_sum, want_sum, rtol=0, atol=0)


def test_layer_boundary_hook_is_called_inside_its_block_only():
    """CUDA-graph capture's cut points: fn(i) before every layer i > 0 of a stack, within the block."""

    def layer(x, residual=None):
        calls.append("layer")
        return x, residual

    calls = []
    with layer_boundary_hook(calls.append):
        run_layers([layer] * 3, torch.zeros(1))
    run_layers([layer] * 3, torch.zeros(1))
    assert calls == ["layer", 1, "layer", 2, "layer"] + ["layer"] * 3
