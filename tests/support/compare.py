"""Comparing transcripts from two runs: the words and timings are exact, the per-segment statistics
(log-probability, no-speech probability) equal to float32 rounding, which depends on what else was
in the batch when the window was decoded."""

from __future__ import annotations

import pytest

STATISTICS = ("avg_logprob", "no_speech_prob", "compression_ratio")


def same_segments(got: list[dict] | None, want: list[dict] | None) -> None:
    """Assert two runs' segment lists (JSON dicts; keys with null values count as absent) agree."""
    if got is None or want is None:
        assert got == want
        return
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want, strict=True):
        g = {k: v for k, v in g.items() if v is not None}
        w = {k: v for k, v in w.items() if v is not None}
        assert g.keys() == w.keys()
        for key in g:
            if key in STATISTICS:
                assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), key
            else:
                assert g[key] == w[key], key
