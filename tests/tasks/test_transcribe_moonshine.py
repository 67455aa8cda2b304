"""``encdec transcribe`` with a Moonshine folder (random weights, a word-level tokenizer): the
command picks the raw-waveform front end and chunk-timed decoding from the folder; a 40 s file is
cut at quiet points exactly like the chunked Whisper mode, each chunk's tokens equal transformers'
greedy tokens on that chunk, and the segments are timed by the chunk boundaries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from encdec_cli.io.inputs import AudioItem, read_windows
from encdec_cli.tasks.transcribe_chunks import max_new_tokens
from tests.models.test_parity_moonshine import EOT, SOT, _build
from tests.support import transcribe_clips
from tests.tasks.test_cli_transcribe import encdec

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore",
    "peter piper picked a peck of pickled peppers",
    "how much wood would a woodchuck chuck",
]


@pytest.fixture(scope="module")
def moonshine(tmp_path_factory):
    if not transcribe_clips.have_espeak():
        pytest.skip("espeak-ng not installed")
    path = tmp_path_factory.mktemp("moonshine")
    hf = _build(path, tied=False)
    vocab = {"<unk>": 0, "<s>": SOT, "</s>": EOT, **{f"t{i}": i for i in range(3, hf.config.vocab_size)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)
    return path, hf


def _hf_tokens(hf, audio: np.ndarray) -> list[int]:
    n = max_new_tokens(len(audio), 1, hf.config.max_position_embeddings)
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(audio)[None], max_new_tokens=n, do_sample=False)[0].tolist()
    out = out[1:] if out[0] == SOT else out
    return out[: out.index(EOT)] if EOT in out else out


def test_moonshine_transcribe_is_chunk_timed_and_matches_transformers(moonshine, tmp_path):
    path, hf = moonshine
    parts = [0.5]
    for i in range(9):  # ~40 s: two or more chunks, cut in the pauses
        parts += [SENTENCES[i % len(SENTENCES)], 1.0 + 0.3 * (i % 3)]
    long_audio, _ = transcribe_clips.build(parts)
    short_audio, _ = transcribe_clips.build([0.3, SENTENCES[0], 0.3])
    files = {
        "long": transcribe_clips.write(tmp_path / "long.wav", long_audio),
        "short": transcribe_clips.write(tmp_path / "short.wav", short_audio),
    }
    out = tmp_path / "out"
    r = encdec("transcribe", files["long"], files["short"], "-m", path, "-o", out, "-f", "json", "-q")
    assert r.returncode == 0, r.stderr
    for name, wav in files.items():
        got = json.loads((out / f"{name}.json").read_text())
        chunks = list(read_windows(AudioItem(str(wav), name, str(wav))))
        assert len(chunks) >= (2 if name == "long" else 1)
        segments = got["segments"]
        assert len(segments) == len(chunks)
        for seg, (start, audio) in zip(segments, chunks):
            assert seg["tokens"] == _hf_tokens(hf, audio)
            assert seg["start"] == pytest.approx(start / 16000, abs=1e-3)
            assert seg["end"] == pytest.approx((start + len(audio)) / 16000, abs=1e-3)
        assert segments[-1]["end"] == pytest.approx(
            len(long_audio if name == "long" else short_audio) / 16000, abs=0.01
        )
    # Whisper-only options are usage errors
    r = encdec("transcribe", files["short"], "-m", path, "-o", out, "--language", "de", "-q")
    assert r.returncode == 2 and "English only" in r.stderr
