"""How many row splits the Hopper absorbed cross-attention kernel takes
(``shared_kv_hopper.num_splits_for``): enough to fill an H100's 132 SMs, and never more than
``SPLIT_PARTIALS_MAX_BYTES`` of float32 partials. Absorbed rows are d_model wide, so at Whisper
large's verification steps (512 sequences x 5 query tokens) 6 splits took 1.4 GiB and ran the
engine out of memory in graph capture (W1, speculative, on an 80 GB H100)."""

from __future__ import annotations

from unittest import mock

import torch

from encdec_kernels import SPLIT_PARTIALS_MAX_BYTES, shared_kv_hopper

WHISPER_LARGE = 20 * (1280 + 1) * 4  # one token's partials a split: 20 heads of 1280 values and a sum


def _splits(tokens: int, split_bytes: int = 0) -> int:
    with mock.patch.object(shared_kv_hopper, "sm_count", return_value=132):
        return shared_kv_hopper.num_splits_for(tokens, 1500, torch.device("cuda"), split_bytes=split_bytes)


def test_small_batches_split_to_fill_the_sms():
    assert _splits(1, WHISPER_LARGE) == _splits(1) > 4  # batch 1: the rows spread over CTAs, uncapped
    assert _splits(132 * 4, WHISPER_LARGE) == 1  # whole waves: no split


def test_split_partials_stay_within_their_budget():
    # 945 tokens: 7.2 waves of CTAs, so 5 or 6 splits would save part of a wave...
    assert _splits(945) >= 5
    # ...but their partials would be 0.5 GB; the budget allows 2 splits
    capped = _splits(945, WHISPER_LARGE)
    assert capped == 2
    for tokens in (1, 5, 64, 200, 945, 2560):
        assert tokens * _splits(tokens, WHISPER_LARGE) * WHISPER_LARGE <= max(
            SPLIT_PARTIALS_MAX_BYTES, tokens * WHISPER_LARGE
        )
