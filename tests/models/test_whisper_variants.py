"""Whisper variants people run, each on a random-weight model of its exact shape (layer counts,
vocabulary, mel bins as in the checkpoint's config.json; widths shrunk): distil-whisper (2 decoder
layers), large-v3-turbo (4 decoder layers, 128 mels), and fine-tunes with a changed vocabulary or
without timestamp tokens. Our engine's tokens equal transformers' (fp32, CPU), with each layout's
own decoder prompt; the transcribe path reads timestamps' presence from the model (none: segments
are timed by their windows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers import PreTrainedTokenizerFast, WhisperFeatureExtractor

from encdec_cli.engine import Engine, Request, SamplingParams
from encdec_models.loading import load_model, whisper_generation_config
from tests.support import transcribe_clips
from tests.support.text_models import single_thread
from tests.support.whisper_models import load_ours, random_whisper

transformers.logging.set_verbosity_error()

NARROW = dict(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
              decoder_ffn_dim=128)  # fmt: skip
# token layouts: (vocab_size, <|endoftext|>, <|startoftranscript|>, prompt after it)
EN = (51864, 50256, 50257, [50362])  # English-only: <|notimestamps|>
V2 = (51865, 50257, 50258, [50259, 50359, 50363])  # multilingual: <|en|> <|transcribe|> <|notimestamps|>
V3 = (51866, 50257, 50258, [50259, 50360, 50364])  # large-v3 (+ <|yue|>): ids after the languages move up
VARIANTS = {
    # distil-whisper/distil-large-v3: 32 encoder layers, 2 decoder layers, 128 mels
    "distil-large-v3": (dict(encoder_layers=32, decoder_layers=2, num_mel_bins=128), V3),
    # distil-whisper/distil-small.en: 12 + 2 layers, 80 mels, English-only
    "distil-small.en": (dict(encoder_layers=12, decoder_layers=2, num_mel_bins=80), EN),
    # openai/whisper-large-v3-turbo: 32 encoder layers, 4 decoder layers, 128 mels
    "large-v3-turbo": (dict(encoder_layers=32, decoder_layers=4, num_mel_bins=128), V3),
    # a fine-tune of whisper-small with 120 added tokens (a new language's tokens) at the end
    "changed-vocabulary": (dict(encoder_layers=12, decoder_layers=12), (51865 + 120, *V2[1:])),
    # a fine-tune of an English model trimmed after <|notimestamps|>: no timestamp tokens
    "no-timestamps": (dict(encoder_layers=4, decoder_layers=4), (50363, *EN[1:])),
}


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _hf_greedy(model, feats, prompt, max_new, eot):
    out = model.generate(
        input_features=feats[None], decoder_input_ids=torch.tensor([prompt]), max_new_tokens=max_new,
        do_sample=False, num_beams=1,
    )[0].tolist()  # fmt: skip
    out = out[len(prompt) :] if out[: len(prompt)] == prompt else out
    return out[: out.index(eot)] if eot in out else out


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if "v3" in n else n for n in VARIANTS],  # 32 encoder layers
)
def test_variant_parity(name, tmp_path):
    shape, (vocab, eot, sot, after) = VARIANTS[name]
    hf = random_whisper(
        tmp_path, seed=len(name), vocab_size=vocab, decoder_start_token_id=sot, eos_token_id=eot,
        pad_token_id=eot, bos_token_id=eot, max_target_positions=448, **NARROW, **shape,
    )  # fmt: skip
    assert hf.config.vocab_size == vocab and hf.config.decoder_layers == shape["decoder_layers"]
    ours = load_ours(tmp_path)
    assert ours.model.cache_spec.num_layers == shape["decoder_layers"] and ours.model.vocab_size == vocab
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(hf.config.num_mel_bins, 3000, generator=g) for _ in range(3)]
    prompt = [sot, *after]
    ref = [_hf_greedy(hf, f, prompt, 12, eot) for f in feats]
    assert len({tuple(r) for r in ref}) == len(ref) and all(len(set(r)) > 3 for r in ref)
    engine = Engine(ours, num_blocks=3 * 375 + 60, block_size=4, max_num_seqs=3)
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(eot,))
    out = {
        r.request_id: r.token_ids
        for r in engine.generate(Request(f, prompt, params, i) for i, f in enumerate(feats))
    }
    assert [out[i] for i in range(len(feats))] == ref


def test_fine_tune_without_timestamp_tokens_transcribes(tiny_en_dir, tmp_path):
    """A model whose vocabulary ends at <|notimestamps|>: `transcribe` decodes without timestamp
    tokens (asking for them is not an error), its tokens equal transformers' greedy after
    <|startoftranscript|><|notimestamps|>, and each window is one segment timed by the window."""
    if not transcribe_clips.have_espeak():
        pytest.skip("espeak-ng not installed")
    from encdec_cli.tasks.whisper_rules import WhisperVocab

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny_en_dir / "tokenizer.json"))
    vocab, eot, sot, (no_ts,) = VARIANTS["no-timestamps"][1]
    assert len(tok) == vocab and tok.convert_tokens_to_ids("<|notimestamps|>") == no_ts
    hf = random_whisper(
        tmp_path, vocab_size=vocab, decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot,
        bos_token_id=eot, max_target_positions=448, **NARROW, **VARIANTS["no-timestamps"][0],
    )  # fmt: skip
    tok.save_pretrained(tmp_path)
    whisper_generation_config(hf.config, tok, {}).save_pretrained(tmp_path)
    engine = Engine(load_model(tmp_path, device="cpu"), num_blocks=1200, block_size=16)
    assert not WhisperVocab.from_engine(engine).timestamps

    audio, _ = transcribe_clips.build([0.5, "the quick brown fox jumps over the lazy dog", 0.5])
    path = transcribe_clips.write(tmp_path / "fox.wav", audio)
    opts = dict(temperatures=(0.0,), compression_ratio_threshold=None, logprob_threshold=None,
                no_speech_threshold=None, max_new_tokens=40)  # fmt: skip
    (transcript,) = transcribe_clips.transcribe(engine, [path], **opts).values()
    feats = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000, return_tensors="pt")
    ref = _hf_greedy(hf, feats.input_features[0], [sot, no_ts], 40, eot)
    assert len(set(ref)) > 3
    assert transcript.text.strip() == tok.decode(ref, skip_special_tokens=True).strip()
    (segment,) = transcript.segments
    assert segment.start == 0.0 and segment.end == pytest.approx(len(audio) / 16000, abs=0.02)
    assert np.isfinite(segment.end)
