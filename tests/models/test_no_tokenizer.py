"""A model folder without tokenizer files, for every family: the Python API loads it (no
tokenizer), runs it on token ids (ids in, ids out, ``Result.text`` None) and gives transformers'
greedy tokens on the same random weights; the CLI, which reads and writes text, refuses it with a
usage error."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, M2M100Config

from encdec_cli.engine import Engine, Request, SamplingParams
from encdec_models.loading import load_model
from encdec_models.registry import inspect_model
from tests.support.text_models import build_config, single_thread
from tests.support.whisper_models import EOT, SOT, discriminating_init_, random_whisper
from tests.tasks.test_cli_seq2seq import encdec

TEXT_FAMILIES = ["bart", "mbart", "marian", "pegasus", "t5", "t5_v1_1", "mt5", "m2m100"]
MAX_NEW = 10


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _text_config(name: str):
    if name == "m2m100":
        return M2M100Config(
            vocab_size=120, d_model=48, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=64,
            dropout=0.0, pad_token_id=1, eos_token_id=2, bos_token_id=0, decoder_start_token_id=2,
        )  # fmt: skip
    return build_config(name)


def _save_text_model(name: str, folder):
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(_text_config(name)).eval()
    fixed = {  # Marian / Pegasus: a fixed sinusoidal table, kept as it is
        f"{m}.{n}": p.detach().clone()
        for m, mod in model.named_modules()
        if "Sinusoidal" in type(mod).__name__
        for n, p in mod.named_parameters()
    }
    discriminating_init_(model)
    with torch.no_grad():
        if name != "marian":  # scaled embeddings comparable to the layers' outputs (tiny Marian
            for p in model.get_input_embeddings().parameters():  # repeats one token then)
                p.mul_(model.config.d_model**-0.5)
        for n, p in model.named_parameters():
            if n in fixed:
                p.copy_(fixed[n])
    model.save_pretrained(folder)
    return model


def _strip(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos)] if eos in row else row


@pytest.mark.parametrize("name", TEXT_FAMILIES)
def test_text_family_without_tokenizer(name, tmp_path):
    hf = _save_text_model(name, tmp_path)
    cfg = hf.config
    assert not inspect_model(tmp_path).has_tokenizer
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.tokenizer is None
    g = torch.Generator().manual_seed(1)
    low = 3  # above the special tokens
    inputs = [
        torch.randint(low, cfg.vocab_size, (n,), generator=g).tolist() + [cfg.eos_token_id]
        for n in (5, 9, 14, 3, 20)
    ]
    start = cfg.decoder_start_token_id
    expected = []
    with torch.no_grad():
        for ids in inputs:
            out = hf.generate(
                torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, num_beams=1,
                decoder_start_token_id=start, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                forced_bos_token_id=None, forced_eos_token_id=None,
            )[0, 1:].tolist()  # fmt: skip
            expected.append(_strip(out, cfg.eos_token_id))
    assert len({tuple(e) for e in expected}) >= 2  # the outputs depend on the input
    engine = Engine(loaded, num_blocks=64, block_size=4, max_num_seqs=4)
    params = SamplingParams(max_new_tokens=MAX_NEW, stop_token_ids=(cfg.eos_token_id,))
    results = {
        r.request_id: r
        for r in engine.generate(Request(ids, [start], params, i) for i, ids in enumerate(inputs))
    }
    assert [results[i].token_ids for i in range(len(inputs))] == expected
    assert all(r.text is None and r.error is None for r in results.values())


def test_whisper_without_tokenizer(tmp_path):
    hf = random_whisper(tmp_path)
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.tokenizer is None
    feats = torch.randn(80, 3000, generator=torch.Generator().manual_seed(4))
    ref = hf.generate(
        input_features=feats[None], decoder_input_ids=torch.tensor([[SOT]]), max_new_tokens=MAX_NEW
    )
    ref = ref[0].tolist()
    ref = _strip(ref[1:] if ref[0] == SOT else ref, EOT)  # transformers versions differ
    params = SamplingParams(max_new_tokens=MAX_NEW, stop_token_ids=(EOT,))
    (r,) = Engine(loaded, num_blocks=500, block_size=4).generate([Request(feats, [SOT], params, 0)])
    assert r.token_ids == ref and len(set(ref)) > 3 and r.text is None


def test_cli_refuses_a_folder_without_tokenizer(tmp_path):
    _save_text_model("bart", tmp_path / "m")
    random_whisper(tmp_path / "w")
    (tmp_path / "in.txt").write_text("w1 w2\n")
    r = encdec("summarize", tmp_path / "in.txt", "-m", tmp_path / "m", "-o", tmp_path / "o.jsonl")
    assert r.exit_code == 2 and "has no tokenizer files" in r.stderr
    r = encdec("transcribe", tmp_path / "in.txt", "-m", tmp_path / "w", "-o", tmp_path / "out")
    assert r.exit_code == 2 and "has no tokenizer files" in r.stderr
