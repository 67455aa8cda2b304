"""--vad: Silero VAD (our batched PyTorch run of the silero-vad package's model) finds the speech;
chunked long-form decodes only it; times map back to the file.

The end-to-end test uses the real tiny.en weights on an espeak file whose sentences are separated
by 5-25 s of silence, noise and music-like tones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encdec_cli.tasks.vad import Chunk, VadOptions, VoiceActivity, pack
from encdec_models.silero_vad import VadState
from tests.support.transcribe_clips import (
    SENTENCES,
    TOLERANCE,
    build,
    build_with_gaps,
    gap_audio,
    have_espeak,
    sentences_in,
    transcribe,
    word_error_rate,
    words_outside,
    write,
)

needs_espeak = pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed")
SR = 16000


def test_chunk_times_map_back_to_the_file():
    chunk = Chunk(((16000, 48000), (160000, 176000)))  # 1-3 s and 10-11 s of the file, joined: 3 s
    assert chunk.samples == 48000 and chunk.start == 16000 and chunk.end == 176000
    assert chunk.to_file(0.0) == 1.0 and chunk.to_file(1.5) == 2.5
    assert chunk.to_file(2.0) == 10.0 and chunk.to_file(2.0, end=True) == 3.0  # the seam
    assert chunk.to_file(2.5) == 10.5 and chunk.to_file(9.0, end=True) == 11.0  # past the end: clamped
    audio = np.arange(200000, dtype=np.float32)
    joined = chunk.audio(audio)
    assert len(joined) == 48000 and joined[32000] == 160000 and joined[31999] == 47999


def test_regions_pack_into_chunks_of_30_s_of_speech():
    s = SR
    regions = [(0, 10 * s), (40 * s, 55 * s), (60 * s, 66 * s), (100 * s, 130 * s), (131 * s, 132 * s)]
    chunks = pack(regions)
    assert [c.pieces for c in chunks] == [
        ((0, 10 * s), (40 * s, 55 * s)),  # 25 s; the next 6 s would make 31 s
        ((60 * s, 66 * s),),
        ((100 * s, 130 * s),),  # exactly 30 s
        ((131 * s, 132 * s),),
    ]
    assert all(c.samples <= 30 * s for c in chunks)


@needs_espeak
def test_probabilities_match_the_silero_vad_package():
    """Our batched run gives the package's own model's probabilities (its TorchScript, frame by frame)."""
    audio, _ = build([0.3, SENTENCES[0], 0.4])
    audio = audio + gap_audio("noise", len(audio) / SR, seed=3) * 0.3
    ours = VoiceActivity(VadOptions()).probs(audio)
    threads = torch.get_num_threads()
    from silero_vad import load_silero_vad

    torch.set_num_threads(threads)
    with torch.inference_mode():
        theirs = load_silero_vad().audio_forward(torch.from_numpy(audio)[None], SR)[0].numpy()
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 1e-4
    assert ours.max() > 0.9 and ours.min() < 0.1  # speech and non-speech both in the clip


@pytest.fixture(scope="module")
def gaps_file(tmp_path_factory):
    if not have_espeak():
        pytest.skip("espeak-ng not installed")
    gaps = [("silence", 5), ("noise", 12), ("tones", 8), ("silence", 25), ("tones", 15), ("noise", 6)]
    audio, truth = build_with_gaps(SENTENCES[:6], gaps)
    return write(tmp_path_factory.mktemp("vad") / "gaps.wav", audio), truth


def test_regions_are_the_sentences(gaps_file):
    """Silence, noise and tones are no speech; every sentence is found, padded by at most 0.5 s."""
    path, truth = gaps_file
    import soundfile as sf

    audio, _ = sf.read(path, dtype="float32")
    regions = VoiceActivity(VadOptions()).regions(audio)
    assert len(regions) == len(truth), regions
    for (s, e), t in zip(regions, truth):
        assert abs(s / SR - t.start) <= TOLERANCE and abs(e / SR - t.end) <= TOLERANCE, (s / SR, e / SR, t)


def test_a_file_streamed_in_pieces_gives_the_same_speech(gaps_file):
    """Read piece by piece (bounded memory), the VAD's state carries over: the same probabilities as
    in one go, and the same speech (a region is cut where a piece ends, and joined again in a chunk)."""
    path, truth = gaps_file
    import soundfile as sf

    audio, _ = sf.read(path, dtype="float32")
    vad = VoiceActivity(VadOptions())
    state = VadState()
    cut = 512 * 1000  # 32 s, a whole number of frames
    pieces = np.concatenate([vad.probs(audio[:cut], state), vad.probs(audio[cut:], state)])
    assert np.abs(pieces - vad.probs(audio)).max() < 1e-5

    blocks = [(i, audio[i : i + 7 * SR]) for i in range(0, len(audio), 7 * SR)]  # 7 s blocks
    whole = vad.chunks(audio)
    for piece in (len(audio) + 1, 20 * SR):  # one piece; 20 s pieces (cutting sentences in two)
        streamed = list(vad.stream(blocks, piece_samples=piece))
        assert vad.samples_read == len(audio)
        speech = [(s / SR, e / SR) for chunk, _ in streamed for s, e in chunk.pieces]
        for t in truth:  # every sentence inside the speech decoded
            assert any(s - TOLERANCE <= t.start and t.end <= e + TOLERANCE for s, e in _merged(speech)), t
        for chunk, joined in streamed:
            assert len(joined) == chunk.samples <= 30 * SR
            assert np.array_equal(joined, chunk.audio(audio))
    assert [c.pieces for c, _ in vad.stream(blocks, piece_samples=len(audio) + 1)] == [
        c.pieces for c in whole
    ]


def _merged(spans):
    out = []
    for s, e in spans:
        if out and s <= out[-1][1] + 0.05:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def test_vad_transcript_has_no_words_in_the_gaps(gaps_file, tiny_engine):
    """Real tiny.en, word timestamps on: with --vad no word lies in a gap, every sentence's words start
    and end within 0.5 s of where it was placed, and the text is right."""
    path, truth = gaps_file
    t = transcribe(tiny_engine, [path], word_timestamps=True, vad=VadOptions())["gaps"]
    assert t.duration == pytest.approx(truth[-1].end + 6, abs=0.01)  # the file's length, not the speech's
    assert words_outside(t.segments, truth) == []
    timed = [w for s in t.segments for w in s.words]
    for sentence in truth:
        lo, hi = sentence.start - TOLERANCE, sentence.end + TOLERANCE
        inside = [w for w in timed if lo <= (w.start + w.end) / 2 <= hi]
        assert inside, sentence
        assert abs(inside[0].start - sentence.start) <= TOLERANCE, (inside[0], sentence)
        assert abs(inside[-1].end - sentence.end) <= TOLERANCE, (inside[-1], sentence)
    for s in t.segments:  # every segment holds speech, from its first word to its last
        assert sentences_in(s, truth) and s.words[0].start == s.start and s.words[-1].end == s.end, s
    assert all(a.end <= b.start for a, b in zip(timed, timed[1:]))
    assert word_error_rate(" ".join(x.text for x in truth), t.text) <= 0.1, t.text


def test_no_speech_at_all_is_an_empty_transcript(tmp_path, tiny_engine):
    path = write(tmp_path / "tones.wav", np.concatenate([gap_audio("tones", 20), gap_audio("noise", 15)]))
    t = transcribe(tiny_engine, [path], vad=VadOptions())["tones"]
    assert t.text == "" and t.segments == [] and t.duration == pytest.approx(35.0)


def test_vad_options_are_checked():
    from encdec_cli.tasks.whisper_rules import TranscribeOptions

    with pytest.raises(ValueError, match="--vad-threshold must be between 0 and 1"):
        VadOptions(threshold=1.5)
    with pytest.raises(ValueError, match="--min-silence must be >= 0"):
        VadOptions(min_silence=-1)
    with pytest.raises(ValueError, match="--vad builds the windows of --long-form chunked"):
        TranscribeOptions(long_form="sequential", vad=VadOptions())


@needs_espeak
def test_cli_vad_is_the_default_for_chunked_long_form(tmp_path, tiny_en_dir):
    """`encdec transcribe` runs the VAD unless told not to: the 12 s of chords before the sentence
    are skipped (its json segment starts at the sentence, on the file's timeline); --vad with
    sequential long-form is a usage error."""
    import json
    import os
    import subprocess
    import sys

    audio, truth = build_with_gaps([SENTENCES[2]], [("silence", 2)], lead=("tones", 12.0))
    path = write(tmp_path / "late.wav", audio)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "encdec_cli",
        "transcribe",
        str(path),
        "-o",
        str(tmp_path),
        "-f",
        "json",
        "-q",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "late.json").read_text())
    assert "report" in data["text"].lower() and data["segments"]
    assert abs(data["segments"][0]["start"] - truth[0].start) <= TOLERANCE, data["segments"]
    assert abs(data["segments"][-1]["end"] - truth[0].end) <= TOLERANCE, data["segments"]
    r = subprocess.run([*cmd, "--vad", "--long-form", "sequential"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "--vad builds the windows of --long-form chunked" in r.stderr, r.stderr
