"""The fused one-row layer helpers compute what the unfused layers do (CPU: the references)."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from encdec_models.layers import Linear, Norm, Rotary, layer_boundary_hook, run_layers


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["moonshine-base", "rotate-half", "rotate-half-partial"])
def test_rotary_turns_q_and_k_bit_for_bit_as_transformers(layout, dtype):
    """Rotary.split (q and k together, x * cos + x[partner] * signed sin, the pass-through features
    at cos 1, sin 0) gives transformers' rotary bit for bit: Moonshine's interleaved partial rotary
    (head dim 52, 32 turned), and rotate-half (full, as T5Gemma's, and partial); a table's rows equal
    the rotary computed at those positions."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as rotate_half_rope
    from transformers.models.moonshine.modeling_moonshine import apply_rotary_pos_emb as interleaved_rope

    h, d = 8, 52
    r = {"moonshine-base": 32, "rotate-half": d, "rotate-half-partial": 20}[layout]
    interleaved = layout == "moonshine-base"
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r))
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 2, 7, 193, 40, 3])
    qkv = torch.randn(len(positions), 3 * h * d, generator=g).to(dtype)
    table = Rotary.table(inv_freq, 194, dtype, interleaved, head_dim=d)
    rotary = Rotary.at(inv_freq, positions, dtype, interleaved, head_dim=d)
    assert torch.equal(table.rows(positions).cos, rotary.cos) and torch.equal(
        table.rows(positions).sin, rotary.sin
    )
    q, k, v = table.rows(positions).split(qkv, h, d)

    freqs = positions.float()[:, None] * inv_freq  # transformers' rotary embedding module
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype)[None], emb.sin().to(dtype)[None]  # [1, T, R]
    q0, k0, v0 = qkv.view(1, -1, 3, h, d).unbind(2)  # [1, T, H, D]
    if interleaved:
        want_q, want_k = interleaved_rope(q0, k0, cos, sin, unsqueeze_dim=2)
    else:
        (q_rot, q_pass), (k_rot, k_pass) = q0.split([r, d - r], -1), k0.split([r, d - r], -1)
        want_q, want_k = rotate_half_rope(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
        want_q, want_k = torch.cat((want_q, q_pass), -1), torch.cat((want_k, k_pass), -1)
    assert torch.equal(q, want_q[0]) and torch.equal(k, want_k[0]) and torch.equal(v, v0[0])
    assert not torch.equal(q, q0[0])


def test_exact_fp32_convolutions_turns_tf32_off_for_float32_cuda_models_only(monkeypatch):
    """The flag cuDNN reads is off inside the context for a float32 model on CUDA, restored after
    (also after an error); other dtypes and CPU models leave it alone."""
    from types import SimpleNamespace

    from encdec_models.base import exact_fp32_convolutions

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)

    def model(dtype, cuda):
        return SimpleNamespace(parameters=lambda: iter([SimpleNamespace(dtype=dtype, is_cuda=cuda)]))

    with exact_fp32_convolutions(model(torch.float32, True)):
        assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is True
    with pytest.raises(RuntimeError), exact_fp32_convolutions(model(torch.float32, True)):
        raise RuntimeError("inside")
    assert torch.backends.cudnn.allow_tf32 is True
    for dtype, cuda in ((torch.bfloat16, True), (torch.float32, False)):
        with exact_fp32_convolutions(model(dtype, cuda)):
            assert torch.backends.cudnn.allow_tf32 is True


def test_exact_fp32_convolutions_stays_off_until_the_last_thread_leaves(monkeypatch):
    """Two threads inside at once (two engines' encoders): the first one leaving does not turn
    TF32 back on under the second; the last one leaving restores the flag it found."""
    import threading
    from types import SimpleNamespace

    from encdec_models.base import exact_fp32_convolutions

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    model = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(dtype=torch.float32, is_cuda=True)]))
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with exact_fp32_convolutions(model):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        with exact_fp32_convolutions(model):
            b_in.set()
            a_out.wait(5)
            seen["b after a left"] = torch.backends.cudnn.allow_tf32
        seen["after both"] = torch.backends.cudnn.allow_tf32

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"b after a left": False, "after both": True}
