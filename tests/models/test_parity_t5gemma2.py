"""T5Gemma 2 on the shared layers: token-for-token parity with transformers'
T5Gemma2ForConditionalGeneration on random weights (fp32, CPU).

The tiny model has everything the real ones have on the text path: grouped-query attention, Gemma's
(1 + w) RMSNorms before and after every sub-layer and on each head's query and key, rotary with a
local and a global base, sliding-window layers (window 4, shorter than inputs and outputs, so the
window decides what a layer sees; the encoder's even window is one longer ahead than behind), logit
soft-capping, the end-of-image token's own embedding (in inputs and outputs), the decoder's merged
self + cross attention, and images through the SigLIP tower and projector. Greedy (untied, and
tied: loaded from the encoder's embedding), 4-beam, with the prefix cache reusing encoder runs and
decoder prompt blocks, with prompt-lookup speculative decoding, with images (Python API and
`encdec image-to-text` with Gemma 3's processor), and `encdec generate`: the same tokens every time.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "T5Gemma2ForConditionalGeneration"):
    pytest.skip("the installed transformers has no T5Gemma 2 (the reference)", allow_module_level=True)
from transformers import T5Gemma2Config, T5Gemma2ForConditionalGeneration  # noqa: E402

from encdec_cli.engine import Engine, Request, SamplingParams  # noqa: E402
from encdec_models import loading  # noqa: E402
from encdec_models.loading import load_model  # noqa: E402
from tests.support.text_models import single_thread  # noqa: E402
from tests.tasks.test_cli_seq2seq import encdec, read_output  # noqa: E402

VOCAB, PAD, EOS, BOS = 120, 0, 1, 2
BOI, EOI, IMAGE = 100, 101, 102  # image tokens (a text-only input may still hold the end-of-image one)
MAX_NEW = 16
WINDOW = 4


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _side(kinds: list[str]) -> dict:
    return dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=len(kinds),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=WINDOW, layer_types=kinds, final_logit_softcapping=3.0, rms_norm_eps=1e-6,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, max_position_embeddings=256,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0}},
    )  # fmt: skip


ENCODER_KINDS = ["sliding_attention", "full_attention", "sliding_attention"]
DECODER_KINDS = ["sliding_attention", "sliding_attention", "full_attention"]


def _config(tied: bool, encoder_kinds=ENCODER_KINDS, decoder_kinds=DECODER_KINDS) -> T5Gemma2Config:
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=7)  # fmt: skip
    encoder = dict(text_config=_side(encoder_kinds), vision_config=vision, mm_tokens_per_image=4,
                   boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE)  # fmt: skip
    return T5Gemma2Config(encoder=encoder, decoder=_side(decoder_kinds), tie_word_embeddings=tied,
                          image_token_index=IMAGE)  # fmt: skip


def _build(folder, tied: bool = False, **kinds) -> T5Gemma2ForConditionalGeneration:
    torch.manual_seed(0)
    model = T5Gemma2ForConditionalGeneration(_config(tied, **kinds)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma norms scale by (1 + w): w around 0
                p.copy_(torch.randn(p.shape) * 0.3)
            elif "eoi_embedding" in name:  # zero at init: make the end-of-image token's own embedding matter
                p.copy_(torch.randn(p.shape))
            elif "embed_tokens" in name:  # unit variance after the sqrt(hidden) scale
                p.copy_(torch.randn(p.shape) * p.shape[-1] ** -0.5)
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape) * p.shape[-1] ** -0.5)
    model.save_pretrained(folder)
    return model


def _inputs(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = [3, 12, 7, 20, 9, 15][:n]
    rows = [torch.randint(3, BOI, (k,), generator=g).tolist() + [EOS] for k in lens]
    rows[1][4] = EOI  # the end-of-image token takes its own embedding
    return rows


def _hf(model, ids, prompt=(BOS,), **gen) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), decoder_input_ids=torch.tensor([list(prompt)]), max_new_tokens=MAX_NEW,
            do_sample=False, eos_token_id=EOS, pad_token_id=PAD, **gen,
        )[0, len(prompt):].tolist()  # fmt: skip
    return out[: out.index(EOS)] if EOS in out else out


def _run(engine, inputs, params, prompts=None) -> list[list[int]]:
    prompts = prompts or [[BOS]] * len(inputs)
    got = {
        r.request_id: r
        for r in engine.generate(
            Request(ids, list(p), params, i) for i, (ids, p) in enumerate(zip(inputs, prompts))
        )
    }
    assert all(got[i].error is None for i in got)
    return [got[i].token_ids for i in range(len(inputs))]


GREEDY = SamplingParams(max_new_tokens=MAX_NEW, stop_token_ids=(EOS,))


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_parity(tied, tmp_path):
    hf = _build(tmp_path, tied)
    inputs = _inputs(6, 1)
    expected = [_hf(hf, ids) for ids in inputs]
    if not tied:  # the outputs depend on the input (a random tied lm_head tends to repeat one token)
        assert len({tuple(e) for e in expected}) == len(expected)
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.architecture == "T5Gemma2ForConditionalGeneration" and loaded.tokenizer is None
    engine = Engine(loaded, num_blocks=60, block_size=4, max_num_seqs=4, prefix_cache=False)
    assert _run(engine, inputs, GREEDY) == expected
    assert engine.blocks.num_free == engine.blocks.num_blocks
    model = loaded.model
    if tied:  # one tensor, as in transformers
        assert model.lm_head.weight is model.encoder.embed_tokens.weight
        assert model.decoder.embed_tokens.weight is model.encoder.embed_tokens.weight


def test_sliding_windows_and_end_of_image_embedding_matter(tmp_path):
    """The same weights without the encoder's, or the decoder's, sliding windows, or with another
    end-of-image embedding, give other tokens: each is really applied (and matched above)."""
    hf = _build(tmp_path / "m")
    inputs = _inputs(6, 1)
    expected = [_hf(hf, ids) for ids in inputs]
    for kinds in (dict(encoder_kinds=["full_attention"] * 3), dict(decoder_kinds=["full_attention"] * 3)):
        other = T5Gemma2ForConditionalGeneration(_config(False, **kinds)).eval()
        other.load_state_dict(hf.state_dict())
        assert [_hf(other, ids) for ids in inputs] != expected, kinds
    with torch.no_grad():
        hf.model.encoder.text_model.embed_tokens.eoi_embedding.zero_()
    assert _hf(hf, inputs[1]) != expected[1]


def test_beam_parity(tmp_path):
    hf = _build(tmp_path)
    inputs = _inputs(4, 3)
    gen = dict(num_beams=4, length_penalty=1.2, early_stopping=True)
    expected = [_hf(hf, ids, **gen) for ids in inputs]
    engine = Engine(load_model(tmp_path, device="cpu"), num_blocks=300, block_size=4, max_num_seqs=16)
    params = SamplingParams(max_new_tokens=MAX_NEW, stop_token_ids=(EOS,), **gen)
    assert _run(engine, inputs, params) == expected


def test_prefix_cache_gives_the_same_tokens(tmp_path):
    """Repeated inputs reuse the encoder run (cross blocks) and the decoder prompt's full blocks; a
    longer decoder prompt (3 blocks of 4) is continued as transformers continues it."""
    hf = _build(tmp_path)
    base = _inputs(4, 5)
    prompt = [BOS, 7, 9, 11, 13, 15, 17, 19, 21, 23]
    inputs = base + base + base
    prompts = [[BOS]] * 4 + [prompt] * 8
    expected = [_hf(hf, ids, p) for ids, p in zip(inputs, prompts)]
    loaded = load_model(tmp_path, device="cpu")
    cached = Engine(loaded, num_blocks=200, block_size=4, max_num_seqs=2, prefix_cache=True)
    assert _run(cached, inputs, GREEDY, prompts) == expected
    stats = cached.stats
    # every repeat found its encoder run; prompts found written blocks where their twin had finished
    assert stats.prefix_cache_hits == 8 and stats.prefix_cache_prompt_tokens >= 8


def test_speculative_ngram_gives_the_same_tokens(tmp_path):
    hf = _build(tmp_path)
    inputs = _inputs(6, 1) + _inputs(6, 7)
    expected = [_hf(hf, ids) for ids in inputs]
    engine = Engine(load_model(tmp_path, device="cpu"), num_blocks=200, block_size=4, max_num_seqs=4,
                    speculative="ngram:3", speculative_adaptive=False)  # fmt: skip
    assert _run(engine, inputs, GREEDY) == expected
    stats = engine.stats
    assert stats.verify_steps > 0 and stats.accepted_tokens > 0  # drafts were verified, and some taken


def test_fp8_cache_keeps_the_greedy_tokens(tmp_path):
    """The merged attention reads fp8 self and cross caches (per-row scales) like the other layers.
    Quantization noise may flip a near-tie on these random weights (the sequence then diverges),
    not more: every sequence starts with transformers' tokens, and most are identical throughout."""
    hf = _build(tmp_path)
    inputs = _inputs(6, 1)
    expected = [_hf(hf, ids) for ids in inputs]
    engine = Engine(load_model(tmp_path, device="cpu"), num_blocks=60, block_size=4, max_num_seqs=4,
                    kv_dtype="fp8")  # fmt: skip
    assert engine.kv_dtype_name == "fp8_e4m3"
    got = _run(engine, inputs, GREEDY)
    assert all(g[:3] == e[:3] for g, e in zip(got, expected)), (got, expected)
    assert sum(g == e for g, e in zip(got, expected)) >= 4, (got, expected)


def test_absorbed_cross_attention_is_refused(tmp_path):
    _build(tmp_path)
    with pytest.raises(ValueError, match="absorbed"):
        Engine(load_model(tmp_path, device="cpu"), num_blocks=60, block_size=4, absorb_cross=True)


def test_loads_where_transformers_lacks_t5gemma2(tmp_path, monkeypatch):
    """An older transformers (the GPU machine's) cannot read the config: config.json is read directly,
    with transformers' defaults for what it leaves out, and the tokens stay the same."""
    hf = _build(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for side in (raw["decoder"], raw["encoder"]["text_config"]):  # defaults: rms_norm_eps, activation
        side.pop("rms_norm_eps"), side.pop("hidden_activation")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "generation_config.json").unlink()
    inputs = _inputs(4, 1)
    expected = [_hf(hf, ids) for ids in inputs]

    def unknown(*args, **kwargs):
        raise ValueError("The checkpoint you are trying to load has model type `t5gemma2` ... not recognize")

    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", unknown)
    loaded = load_model(tmp_path, device="cpu")
    assert not isinstance(loaded.config, T5Gemma2Config)
    assert loaded.generation_config.bos_token_id == BOS and loaded.generation_config.eos_token_id == EOS
    engine = Engine(loaded, num_blocks=60, block_size=4, max_num_seqs=4)
    assert _run(engine, inputs, GREEDY) == expected


def _tokenizer_and_processor(folder):
    """A word-level tokenizer with Gemma 3's image tokens (<pad> 0, </s> 1, <bos> 2, words w0.. from 3)
    and Gemma 3's processor (4 image tokens, 28 x 28 pixels) saved into the model folder."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import Gemma3Processor, PreTrainedTokenizerFast

    images = {"<start_of_image>": BOI, "<end_of_image>": EOI, "<image_soft_token>": IMAGE}
    vocab = {"<pad>": PAD, "</s>": EOS, "<bos>": BOS, **{f"w{i}": 3 + i for i in range(BOI - 3)}, **images}
    vocab["<unk>"] = IMAGE + 1
    word_level = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_level.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", EOS)]
    )
    word_level.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=word_level, bos_token="<bos>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )  # fmt: skip
    # the Pillow backend (no torchvision here); older transformers call it Gemma3ImageProcessor
    pil = getattr(transformers, "Gemma3ImageProcessorPil", None) or transformers.Gemma3ImageProcessor
    processor = Gemma3Processor(
        image_processor=pil(size={"height": 28, "width": 28}), tokenizer=tok, image_seq_length=4
    )
    processor.save_pretrained(folder)
    return tok, processor


def test_cli_generate(tmp_path):
    """`encdec generate` on a T5Gemma 2 folder with a tokenizer gives transformers' text."""
    hf = _build(tmp_path / "m")
    tok, _ = _tokenizer_and_processor(tmp_path / "m")
    texts = ["w1 w5 w9 w2", "w40 w41 w3 w7 w8 w9 w60 w61 w62", "w13"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    r = encdec("generate", tmp_path / "in.txt", "-m", tmp_path / "m", "-o", tmp_path / "o.jsonl", "-q",
               "--max-new-tokens", MAX_NEW, "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    expected = [tok.decode(_hf(hf, tok(t)["input_ids"]), skip_special_tokens=True).strip() for t in texts]
    assert [row["generated"] for row in read_output(tmp_path / "o.jsonl")] == expected


def test_cli_image_to_text(tmp_path):
    """`encdec image-to-text` on a T5Gemma 2 folder: its processor's pixels and token layout (the
    image where <start_of_image> stands, --prompt after it), transformers' text per image."""
    from PIL import Image

    hf = _build(tmp_path / "m")
    tok, processor = _tokenizer_and_processor(tmp_path / "m")
    (tmp_path / "img").mkdir()
    g = torch.Generator().manual_seed(5)
    images = {}
    for i, size in enumerate([(40, 30), (28, 28), (64, 20)]):
        pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        images[f"im{i}"] = Image.fromarray(pixels)
        images[f"im{i}"].save(tmp_path / "img" / f"im{i}.png")
    prompt = "w3 w4 w5"
    r = encdec("image-to-text", tmp_path / "img", "-m", tmp_path / "m", "-o", tmp_path / "out", "-q",
               "--prompt", prompt, "--max-new-tokens", MAX_NEW, "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    got, expected = {}, {}
    for name, image in images.items():
        inputs = processor(text="<start_of_image>" + prompt, images=image, return_tensors="pt")
        item = {"pixel_values": inputs["pixel_values"][0], "input_ids": inputs["input_ids"][0].tolist()}
        expected[name] = tok.decode(_hf_image(hf, item), skip_special_tokens=True).strip()
        got[name] = (tmp_path / "out" / f"{name}.txt").read_text().strip()
    assert got == expected and len(set(expected.values())) > 1
    r = encdec("image-to-text", tmp_path / "img", "-m", tmp_path / "m", "-o", tmp_path / "o2", "--task", "x")
    assert r.exit_code == 2 and "takes no --task" in r.stderr


def _image_inputs(n: int, seed: int) -> list[dict]:
    """Encoder inputs with an image: pixels [3, 28, 28] and ids with the image's 4 tokens between
    the begin- and end-of-image tokens (the processor's layout), text around them."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        text = torch.randint(3, BOI, (3 + 2 * i,), generator=g).tolist()
        ids = text[:2] + [BOI] + [IMAGE] * 4 + [EOI] + text[2:] + [EOS]
        rows.append({"pixel_values": torch.randn(3, 28, 28, generator=g), "input_ids": ids})
    return rows


def _hf_image(model, item, **gen) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([item["input_ids"]]), pixel_values=item["pixel_values"][None],
            decoder_input_ids=torch.tensor([[BOS]]), max_new_tokens=MAX_NEW, do_sample=False,
            eos_token_id=EOS, pad_token_id=PAD, **gen,
        )[0, 1:].tolist()  # fmt: skip
    return out[: out.index(EOS)] if EOS in out else out


def test_image_inputs_parity(tmp_path):
    """Images through the SigLIP tower and the projector into the encoder's image tokens, batched
    with text-only inputs: transformers' tokens, greedy and 4-beam; the image decides the output."""
    hf = _build(tmp_path)
    images = _image_inputs(4, 11)
    mixed = [images[0], *_inputs(2, 1), *images[1:]]
    expected = [_hf_image(hf, x) if isinstance(x, dict) else _hf(hf, x) for x in mixed]
    other = dict(images[0], pixel_values=torch.randn(3, 28, 28, generator=torch.Generator().manual_seed(99)))
    assert _hf_image(hf, other) != expected[0]
    engine = Engine(load_model(tmp_path, device="cpu"), num_blocks=200, block_size=4, max_num_seqs=4)
    assert _run(engine, mixed, GREEDY) == expected
    gen = dict(num_beams=4, length_penalty=1.2, early_stopping=True)
    beams = [_hf_image(hf, x, **gen) for x in images[:2]]
    assert (
        _run(engine, images[:2], SamplingParams(max_new_tokens=MAX_NEW, stop_token_ids=(EOS,), **gen))
        == beams
    )


def test_bad_image_inputs_are_item_errors(tmp_path):
    _build(tmp_path)
    engine = Engine(load_model(tmp_path, device="cpu"), num_blocks=60, block_size=4, max_num_seqs=4)
    good = _image_inputs(1, 3)[0]
    bad = [
        dict(good, input_ids=good["input_ids"][:3] + good["input_ids"][4:]),  # 3 image tokens, not 4
        dict(good, pixel_values=torch.randn(3, 14, 14)),  # not the processor's size
        {"input_ids": good["input_ids"]},  # no pixels
        good["input_ids"],  # image tokens without an image
    ]
    results = {
        r.request_id: r
        for r in engine.generate(Request(x, [BOS], GREEDY, i) for i, x in enumerate([*bad, good]))
    }
    assert all(results[i].error for i in range(len(bad))), [results[i].error for i in range(len(bad))]
    assert results[len(bad)].error is None and results[len(bad)].token_ids
