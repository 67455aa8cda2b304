"""Whole models on the Triton kernels, on the CPU: ``encdec_kernels.use_triton`` is made to serve
CPU tensors, so every kernel call that a CUDA run makes (norms with and without the fused residual
add, the one-row gemv / norm_gemv, the paged attention with its causal window and log-sum-exp,
store_kv, ...) runs the Triton kernel in the interpreter, while attention with what the kernels do
not implement (soft-capping, the encoder's sliding window) still goes to the reference, as on a
GPU. The CPU parity tests run the references everywhere, so they cannot see a model handing a
Triton kernel something its reference takes and it refuses (T5Gemma 2's SigLIP tower gave the
fused add-norm a strided residual: an error on CUDA only), or a kernel that disagrees with its
reference for a model's arguments. Outputs: transformers' greedy tokens (fp32) and encoder outputs;
for beam steps launched ahead, the host's beam steps.

Slow in the interpreter (every kernel launch is Python), so the models are the tiny ones of the
parity tests with few inputs."""

from __future__ import annotations

import pytest
import torch

import encdec_kernels
from encdec_cli.engine import Engine, Request, SamplingParams
from encdec_models.loading import load_model
from tests.kernels.conftest import INTERPRETED, NOT_INTERPRETED_REASON, _interpreted_module
from tests.support.text_models import single_thread

KERNEL_MODULES = ("common", "varlen", "paged", "shared_kv", "norm", "linear", "blocks", "beams")
# tokens compared (the start of transformers' 16): past the models' 4-token sliding windows, and
# each interpreted decode step costs seconds
NEW = 10


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Route CPU tensors to the (interpreted) Triton kernels; yields the set of kernel modules
    that served a call, to show the run really went through them."""
    if not INTERPRETED:
        pytest.skip(NOT_INTERPRETED_REASON)
    for name in KERNEL_MODULES:
        _interpreted_module(name)
    used: set[str] = set()
    impl = encdec_kernels._impl

    def recording_impl(t, triton_module):
        module = impl(t, triton_module)
        if module is not encdec_kernels.reference:
            used.add(triton_module)
        return module

    monkeypatch.setattr(encdec_kernels, "use_triton", lambda t: True)
    monkeypatch.setattr(encdec_kernels, "_impl", recording_impl)
    return used


def test_t5gemma_on_triton_kernels_matches_transformers(tmp_path, triton_on_cpu):
    """T5Gemma ("sliding": sliding windows, soft-capped scores, Gemma's (1 + w) RMSNorms, GELU-tanh,
    scaled embeddings): attention on the reference, the rest on the Triton kernels, as on CUDA
    (tests/gpu/test_new_models_gpu.py); two sequences at a time, so a batch of one decodes too (the
    one-row kernels)."""
    from tests.models.test_parity_t5gemma import BOS, EOS, _build, _hf, _inputs

    hf = _build(tmp_path, "sliding")
    inputs = _inputs(6, 1)[:3]
    expected = [_hf(hf, ids)[:NEW] for ids in inputs]
    engine = Engine(load_model(tmp_path, device="cpu"), num_blocks=60, block_size=4, max_num_seqs=2)
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=(EOS,))
    got = {
        r.request_id: r.token_ids
        for r in engine.generate(Request(ids, [BOS], params, i) for i, ids in enumerate(inputs))
    }
    assert [got[i] for i in range(len(inputs))] == expected
    assert {"norm", "linear", "paged"} <= triton_on_cpu  # norms, one-row linears, store_kv


def test_t5gemma2_on_triton_kernels_matches_transformers(tmp_path, triton_on_cpu):
    """T5Gemma 2: the decoder's merged self + cross attention on the Triton paged kernel (causal
    window, log-sum-exp), images through SigLIP on the Triton norms: one image alone in its encoder
    batch (the batch whose patch rows were a strided view), then text and images together."""
    from tests.models.test_parity_t5gemma2 import EOS, _build, _hf, _hf_image, _image_inputs, _inputs, _run

    hf = _build(tmp_path)
    images, texts = _image_inputs(2, 11), _inputs(2, 1)
    expected_image = _hf_image(hf, images[0])[:NEW]
    mixed = [texts[1], images[1]]  # texts[1] holds the end-of-image token
    expected = [(_hf_image(hf, x) if isinstance(x, dict) else _hf(hf, x))[:NEW] for x in mixed]
    engine = Engine(load_model(tmp_path, device="cpu"), num_blocks=60, block_size=4, max_num_seqs=4)
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=(EOS,))
    assert _run(engine, [images[0]], params) == [expected_image]
    assert _run(engine, mixed, params) == expected
    assert {"norm", "linear", "paged"} <= triton_on_cpu


def _spy_kv_store(monkeypatch) -> list[bool]:
    """Record, per pre-norm decoder layer call, whether the qkv projection wrote the K/V rows."""
    from encdec_models.layers import Attention

    fused: list[bool] = []
    real = Attention.kv_store

    def spy(self, x, meta, pos):
        out = real(self, x, meta, pos)
        fused.append(out is not None)
        return out

    monkeypatch.setattr(Attention, "kv_store", spy)
    return fused


def test_t5_decoder_writes_its_kv_in_the_qkv_kernel(monkeypatch, triton_on_cpu, tiny_text_model):
    """T5 (pre-norm, relative position bias) on the Triton kernels, two sequences at a time: the
    decode steps of one and two rows take the one-row kernels, whose qkv projection also writes the
    step's K/V rows into the cache (no store_kv kernel for them); transformers' greedy tokens."""
    from tests.models.test_parity_bart_t5 import reference_outputs, run_engine

    tiny = tiny_text_model("t5")
    loaded = load_model(tiny.path, device="cpu", dtype="float32")
    texts = ["w3 w17 w5", "w40 w2 w9 w11 w1", "w8"]
    fused = _spy_kv_store(monkeypatch)
    _, results = run_engine(loaded, tiny, [loaded.tokenizer(t).input_ids for t in texts], max_num_seqs=2)
    expected = reference_outputs(tiny, loaded.tokenizer, texts)
    assert [r.token_ids for r in results] == [tokens for tokens, _ in expected]
    assert any(fused) and "linear" in triton_on_cpu
    fused.clear()  # ENCDEC_GEMV_KV_STORE=0: store_kv writes them, the same tokens
    monkeypatch.setattr(encdec_kernels, "GEMV_KV_STORE", False)
    _, results = run_engine(loaded, tiny, [loaded.tokenizer(t).input_ids for t in texts], max_num_seqs=2)
    assert [r.token_ids for r in results] == [tokens for tokens, _ in expected]
    assert fused and not any(fused)


def test_beam_steps_ahead_on_triton_kernels_match_host_steps(triton_on_cpu):
    """Beam search (3 beams, no_repeat_ngram_size 3) on a random BART whose steps choose their beams
    on the device and launch the next step ahead, on the Triton kernels as a CUDA run takes them
    (``beams.py``: the choice around its topk, the children's tables, the n-gram bans from the
    device history; ``blocks.py``: the forks' block copies): every hypothesis as the host's beam
    steps make it (``lookahead=False``). (The trained tiny models barely read their own tokens:
    a child fed a wrong token still gave transformers' hypotheses there.)"""
    from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

    from encdec_models.loading import LoadedModel, build_model
    from tests.support.whisper_models import discriminating_init_

    arch = "BartForConditionalGeneration"
    cfg = BartConfig(
        vocab_size=300, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        architectures=[arch],
    )  # fmt: skip
    torch.manual_seed(0)
    hf = BartForConditionalGeneration(cfg).eval()
    discriminating_init_(hf)
    model = build_model(arch, cfg, hf.state_dict().items(), torch.device("cpu"), torch.float32)
    loaded = LoadedModel(model, None, cfg, GenerationConfig(), arch, None)
    params = SamplingParams(
        num_beams=3, num_return_sequences=2, max_new_tokens=10, stop_token_ids=(2,), length_penalty=1.5,
        no_repeat_ngram_size=3,
    )  # fmt: skip
    g = torch.Generator().manual_seed(2)
    reqs = [
        Request(torch.randint(4, 299, (n,), generator=g).tolist(), [2], params, i)
        for i, n in enumerate((9, 21))
    ]

    def run(**cfg):
        engine = Engine(loaded, block_size=4, max_num_seqs=6, **cfg)
        out = {
            r.request_id: [(c.token_ids, c.finish_reason) for c in r.completions]
            for r in engine.generate(reqs)
        }
        assert len(out) == len(reqs) and engine.blocks.num_free == engine.blocks.num_blocks
        return out, engine

    host, _ = run(num_blocks=200, lookahead=False)
    ahead, engine = run(num_blocks=200)
    assert engine.stats.ahead_steps > engine.stats.steps // 2 and {"beams", "blocks"} <= triton_on_cpu
    assert ahead == host
    assert any(len({tuple(t) for t, _ in hyps}) == 2 for hyps in host.values())  # the beams differ


def test_whisper_decoder_writes_its_kv_in_the_qkv_kernel(tmp_path, monkeypatch, triton_on_cpu):
    """Whisper (pre-norm, no position bias) likewise, on a 4-layer decoder: transformers' greedy
    tokens, with the K/V rows written by the qkv projection."""
    from tests.models.test_parity_whisper import SHAPES, _hf_greedy
    from tests.support.whisper_models import EOT, SOT, load_ours, random_whisper

    hf = random_whisper(tmp_path, seed=2, **SHAPES["deeper-decoder"])
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(hf.config.num_mel_bins, 3000, generator=g) for _ in range(2)]
    prompts = [[SOT, 7], [SOT, 9, 4]]  # the interpreter's encoder takes ~1 min a request
    ref = [_hf_greedy(hf, f, p, NEW) for f, p in zip(feats, prompts)]
    fused = _spy_kv_store(monkeypatch)
    engine = Engine(load_ours(tmp_path), num_blocks=2 * 375 + 40, block_size=4, max_num_seqs=2)
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=(EOT,))
    reqs = [Request(f, p, params, i) for i, (f, p) in enumerate(zip(feats, prompts))]
    out = {r.request_id: r for r in engine.generate(reqs)}
    assert [out[i].token_ids for i in range(2)] == ref
    assert any(fused) and "linear" in triton_on_cpu


def _encoder_output(model, pixels: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(model.prepare_encoder_batch(pixels, torch.device("cpu")))


@pytest.mark.parametrize("family", ["trocr-vit", "donut-swin"])
def test_vision_encoders_on_triton_kernels_match_transformers(tmp_path, family, triton_on_cpu):
    """The ViT and Swin image encoders on the Triton norms, one image and two: transformers' encoder
    output."""
    from tests.models.test_parity_vision import _pixels
    from tests.support.vision_models import draw_images, load_ours, random_donut, random_trocr

    hf = (random_trocr if family == "trocr-vit" else random_donut)(tmp_path)
    ours = load_ours(tmp_path).model
    pixels = _pixels(tmp_path, draw_images(2))
    for batch in (pixels[:1], pixels):
        with torch.no_grad():
            ref = hf.encoder(pixel_values=torch.stack(batch)).last_hidden_state
        got = _encoder_output(ours, batch)
        torch.testing.assert_close(got, ref.reshape(-1, ref.shape[-1]), rtol=1e-4, atol=1e-4)
    assert "norm" in triton_on_cpu


def test_florence2_tower_on_triton_kernels_matches_transformers(tmp_path, triton_on_cpu):
    """Florence-2's DaViT tower and projector (norms fused with the convolutions' residuals, on
    permuted token rows) on the Triton norms, one image and two: transformers' image features."""
    from tests.support.vision_models import load_ours, random_florence2

    hf = random_florence2(tmp_path, seed=3)
    ours = load_ours(tmp_path).model
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for batch in (pixels[:1], pixels):
        with torch.no_grad():
            ref = hf.model.get_image_features(batch)
            ref = getattr(ref, "pooler_output", ref)
            got = ours.image_features(batch)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert "norm" in triton_on_cpu


def test_siglip_tower_on_triton_kernels_matches_transformers(tmp_path, triton_on_cpu):
    """T5Gemma 2's SigLIP tower and projector on the Triton norms, one image and two (one image: its
    patch rows were a transposed view, which the fused add-norm refused): transformers' image
    features."""
    from tests.models.test_parity_t5gemma2 import _build

    hf = _build(tmp_path)
    ours = load_model(tmp_path, device="cpu").model
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    for batch in (pixels[:1], pixels):
        with torch.no_grad():
            ref = hf.model.encoder.get_image_features(batch)
            ref = getattr(ref, "pooler_output", ref)
            got = ours.projector(ours.vision_tower(batch))
        torch.testing.assert_close(got, ref.reshape(got.shape), rtol=1e-5, atol=1e-5)
    assert "norm" in triton_on_cpu
