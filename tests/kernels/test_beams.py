"""A beam step launched ahead on the device: ``beam_children`` (the children's tables and slots) and
``ngram_bans`` (the no-repeat-n-gram rule from the token history), the Triton kernels in the
interpreter against the references and plain loops."""

from __future__ import annotations

import pytest
import torch

from encdec_kernels import reference


def _children_case(n, width, block_size, gen):
    """Parents' tables, children (parents, forks), positions, new-block flags and reserved blocks."""
    rows = max(1, n // 2 + 1)
    self_tables = torch.randint(0, 500, (rows, width), generator=gen, dtype=torch.int32)
    parents = torch.randint(0, rows, (n,), generator=gen)
    fork = torch.rand(n, generator=gen) < 0.4
    positions = torch.randint(0, width * block_size, (n,), generator=gen)
    new_block = (torch.rand(n, generator=gen) < 0.3).long()
    needs = int((fork | (new_block > 0)).sum())
    reserved = 1000 + torch.randperm(needs + 3, generator=gen)[: needs + 2]
    return self_tables, parents, fork, torch.cat([positions, new_block, reserved]), reserved


def _children_loop(self_tables, parents, fork, up, n, block_size):
    """Row by row, as the rule reads."""
    pos, fresh, spare = up[:n].tolist(), (up[n : 2 * n] > 0).tolist(), up[2 * n :].tolist()
    tables, here, block, copy, slots, lens, taken = [], [], [], [], [], [], 0
    for i in range(n):
        row = self_tables[parents[i]].tolist()
        col, off = divmod(pos[i], block_size)
        here.append(row[col])
        if fresh[i] or bool(fork[i]):
            row[col] = spare[taken]
            taken += 1
        block.append(row[col])
        copy.append(bool(fork[i]) and not fresh[i])
        slots.append(row[col] * block_size + off)
        lens.append(pos[i] + 1)
        tables.append(row)
    return tables, here, block, copy, slots, lens


@pytest.mark.parametrize("n, width, block_size", [(1, 3, 16), (7, 5, 4), (64, 9, 16), (130, 70, 8)])
def test_beam_children_matches_the_rule(beams, n, width, block_size):
    gen = torch.Generator().manual_seed(n)
    self_tables, parents, fork, up, _ = _children_case(n, width, block_size, gen)
    want = _children_loop(self_tables, parents, fork, up, n, block_size)
    for impl in (beams, reference):
        got = impl.beam_children(self_tables, parents, fork, up, n, block_size)
        tables, here, block, copy, slots, lens = got
        assert tables.dtype == torch.int32 and lens.dtype == torch.int32 and copy.dtype == torch.bool
        assert here.dtype == block.dtype == slots.dtype == torch.long
        assert [t.tolist() for t in got] == list(want), impl.__name__


def _ngram_loop(logits, tokens, lengths, n, rows):
    """transformers' rule, row by row: every earlier n-gram whose first n - 1 tokens are the row's
    last n - 1 bans its last token."""
    out = logits.clone()
    for r in rows:
        toks = tokens[r, : int(lengths[r])].tolist()
        for i in range(len(toks) - n + 1):
            if toks[i : i + n - 1] == toks[len(toks) - n + 1 :]:
                out[r, toks[i + n - 1]] = float("-inf")
    return out


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("subset", [False, True], ids=["all-rows", "some-rows"])
def test_ngram_bans_matches_the_rule(beams, n, subset):
    gen = torch.Generator().manual_seed(n)
    b, width, vocab = 9, 40, 3  # a small vocabulary: many repeats, the same token banned twice
    tokens = torch.randint(0, vocab, (b, width), generator=gen)
    lengths = torch.tensor([0, 1, n - 1, n, n + 1, 12, 25, 39, 40])
    tokens[torch.arange(width) >= lengths[:, None]] = -1  # -1 after each row's end
    logits = torch.randn(b, vocab, generator=gen)
    rows = [1, 4, 6, 8] if subset else list(range(b))
    want = _ngram_loop(logits, tokens, lengths, n, rows)
    assert torch.isinf(want).sum() >= 2  # the case bans something
    index = torch.tensor(rows) if subset else None
    for impl in (beams, reference):
        got = logits.clone()
        impl.ngram_bans(got, tokens, lengths.to(torch.int32), n, index)
        assert torch.equal(got, want), impl.__name__


def _candidates_case(num, n, k, vocab, dtype, gen):
    """[P, G, K] candidates as ``beam._candidates`` packs them: scores sorted down, flat indices
    beam * vocab + token (some tokens stop tokens), and each request's info row."""
    scores = torch.randn(num, k, generator=gen).sort(1, descending=True).values
    beams = torch.randint(0, n, (num, k), generator=gen)
    tokens = torch.randint(0, 6, (num, k), generator=gen)  # few tokens: stop tokens among them
    packed = torch.stack([scores.to(dtype), (beams * vocab + tokens).to(dtype)])
    stops = torch.tensor([[2, -1], [2, 5], [3, -1]])[torch.arange(num) % 3]
    at_limit = (torch.arange(num) % 4 == 3).long()[:, None]
    return packed, torch.cat([at_limit, stops], 1), beams, tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num, n", [(1, 2), (9, 4), (33, 3)])
def test_beam_mask_hits_and_chosen_match_the_rule(beams, dtype, num, n):
    gen = torch.Generator().manual_seed(num * n)
    k, vocab = 2 * n + 1, 50264
    packed, info, cand_beam, cand_tok = _candidates_case(num, n, k, vocab, dtype, gen)
    want_masked = packed[0].float().clone()
    for g in range(num):
        for c in range(k):
            if info[g, 0] or int(cand_tok[g, c]) in info[g, 1:].tolist():
                want_masked[g, c] += -1.0e9
    chosen = torch.topk(want_masked, n).indices
    parent = cand_beam.gather(1, chosen)
    fork = [[parent[g, j] in parent[g, :j].tolist() for j in range(n)] for g in range(num)]
    for impl in (beams, reference):
        masked = impl.beam_mask_hits(packed, info, vocab)
        assert masked.dtype == torch.float32 and torch.equal(masked, want_masked), impl.__name__
        out, rows, tokens, forks = impl.beam_chosen(packed, chosen, vocab)
        assert out.dtype == dtype and torch.equal(out, chosen.to(dtype))
        assert torch.equal(rows, (parent + n * torch.arange(num)[:, None]).reshape(-1))
        assert torch.equal(tokens, cand_tok.gather(1, chosen).reshape(-1))
        assert forks.tolist() == [f for row in fork for f in row], impl.__name__
    assert any(f for row in fork for f in row) and (want_masked < -1e8).any()
