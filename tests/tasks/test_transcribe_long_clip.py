"""A 3.6-minute clip through real tiny.en, chunked and sequential, with word timestamps: 56 espeak-ng
sentences in four voices and speeds, pauses of 0.5 to 3 s and one of 8 s, eight 30 s windows. The
text, every sentence found at its place, segment and word times absolute and in order across the
windows, nothing placed in the long silence."""

import pytest

from encdec_cli.io.inputs import AudioItem
from encdec_cli.tasks.transcribe import Transcriber
from encdec_cli.tasks.whisper_rules import TranscribeOptions
from encdec_models.audio import N_SAMPLES, SAMPLE_RATE
from tests.support import transcribe_clips as tc

VOICES = [("en-us", 150), ("en-gb", 170), ("en-us+f3", 135), ("en-gb-scotland", 160)]  # voice, words/min
PAUSES = [0.6, 1.5, 0.9, 2.5, 1.2, 3.0, 0.8, 2.0, 0.5, 1.8]  # seconds after each sentence, in turn
N_SENTENCES = 56
LONG_PAUSE_AFTER, LONG_PAUSE = 29, 8.0  # the 30th sentence is followed by 8 s of silence
WINDOW = N_SAMPLES / SAMPLE_RATE  # 30 s
TOLERANCE = tc.TOLERANCE


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """(path, seconds, true sentences) of the 218.6 s clip."""
    if not tc.have_espeak():
        pytest.skip("espeak-ng not installed")
    texts = tc.SENTENCES + tc.MORE_SENTENCES  # 28: every text once (11 is coprime to 28), then again
    parts: list = [1.0]
    for i in range(N_SENTENCES):
        voice, wpm = VOICES[i % len(VOICES)]
        parts.append(tc.Say(texts[i * 11 % len(texts)], voice, wpm))
        parts.append(LONG_PAUSE if i == LONG_PAUSE_AFTER else PAUSES[i % len(PAUSES)])
    audio, truth = tc.build(parts)
    path = tc.write(tmp_path_factory.mktemp("long-clip") / "long.wav", audio)
    return path, len(audio) / SAMPLE_RATE, truth


def test_word_error_rate():
    assert tc.word_error_rate("The cat sat on the mat.", "the cat sat on a mat") == pytest.approx(1 / 6)
    assert tc.word_error_rate("a b c d", "a c d e f") == pytest.approx(3 / 4)


@pytest.mark.parametrize("long_form", ["chunked", "sequential"])
def test_three_and_a_half_minutes(tiny_engine, long_clip, long_form):
    path, seconds, truth = long_clip
    assert seconds >= 175
    out = {}
    opts = TranscribeOptions(long_form=long_form, word_timestamps=True)
    Transcriber(tiny_engine, opts).run(
        [AudioItem("k", "long", str(path))], lambda i, t, e: out.setdefault("r", (t, e))
    )
    t, err = out["r"]
    assert err is None and t.duration == pytest.approx(seconds, abs=0.01)
    # the words: tiny.en mishears some of espeak-ng's voices (observed 14% chunked, 13% sequential)
    assert tc.word_error_rate(" ".join(x.text for x in truth), t.text) <= 0.2
    # absolute times over all the windows: each segment inside its window, windows in order
    seeks = [s.seek for s in t.segments]
    assert seeks == sorted(seeks) and len(set(seeks)) >= seconds // WINDOW
    for s in t.segments:
        assert s.seek / 100 - 0.01 <= s.start < s.end <= s.seek / 100 + WINDOW, (s.seek, s.start, s.end)
    # every sentence found at its place
    for x in truth:
        assert any(s.start - TOLERANCE <= x.start and x.end <= s.end + TOLERANCE for s in t.segments), x
    tc.check_word_segment_times(t.segments, truth)
    # nothing in the long silence: no segment starts in it, none spans it
    quiet_from, quiet_to = truth[LONG_PAUSE_AFTER].end, truth[LONG_PAUSE_AFTER + 1].start
    assert quiet_to - quiet_from == pytest.approx(LONG_PAUSE)
    for s in t.segments:
        assert not quiet_from + TOLERANCE < s.start < quiet_to - TOLERANCE, (s.start, s.text)
        assert not s.start < (quiet_from + quiet_to) / 2 < s.end, (s.start, s.end, s.text)
