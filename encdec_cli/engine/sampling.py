"""Logits processors and token choice (greedy / temperature, top-k, top-p with a seed).

Rows sharing one SamplingParams are processed together (one indexed op per rule), so a step
over hundreds of sequences with the same options costs a handful of kernels, not one per row.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from encdec_cli.engine.sequence import SamplingParams, Sequence

NEG_INF = float("-inf")


def banned_ngram_tokens(tokens: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of ``tokens`` (transformers' no_repeat_ngram rule)."""
    if n <= 0 or len(tokens) + 1 < n:
        return []
    prefix = tuple(tokens[len(tokens) - n + 1 :])
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix]


def banned_bad_words(tokens: list[int], bad_words: tuple[tuple[int, ...], ...]) -> list[int]:
    out = []
    for w in bad_words:
        if len(w) == 1 or tuple(tokens[len(tokens) - len(w) + 1 :]) == tuple(w[:-1]):
            out.append(w[-1])
    return out


def process_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Apply every request's logits rules in place. logits: [B, V] float32, row i = seqs[i]."""
    groups: dict[SamplingParams, list[int]] = defaultdict(list)
    for i, s in enumerate(seqs):
        groups[s.group.params].append(i)
    dev = logits.device
    for p, rows in groups.items():
        idx = torch.tensor(rows, device=dev)
        if p.repetition_penalty != 1.0:
            for i in rows:
                prev = torch.tensor(sorted(set(seqs[i].tokens)), device=dev)
                x = logits[i, prev]
                logits[i, prev] = torch.where(x < 0, x * p.repetition_penalty, x / p.repetition_penalty)
        if p.no_repeat_ngram_size or p.bad_words_ids:
            for i in rows:
                ban = banned_ngram_tokens(seqs[i].tokens, p.no_repeat_ngram_size)
                ban += banned_bad_words(seqs[i].tokens, p.bad_words_ids)
                if ban:
                    logits[i, ban] = NEG_INF
        if p.allowed_tokens:
            keep = logits[idx.unsqueeze(1), torch.tensor(p.allowed_tokens, device=dev)]
            logits[idx] = NEG_INF
            logits[idx.unsqueeze(1), torch.tensor(p.allowed_tokens, device=dev)] = keep
        if p.suppress_tokens:
            logits[idx.unsqueeze(1), torch.tensor(p.suppress_tokens, device=dev)] = NEG_INF
        if p.begin_suppress_tokens:
            first = [i for i in rows if seqs[i].num_generated == 0]
            if first:
                logits[
                    torch.tensor(first, device=dev).unsqueeze(1),
                    torch.tensor(p.begin_suppress_tokens, device=dev),
                ] = NEG_INF
        if p.min_new_tokens and p.stop_token_ids:
            early = [i for i in rows if seqs[i].num_generated < p.min_new_tokens]
            if early:
                logits[
                    torch.tensor(early, device=dev).unsqueeze(1), torch.tensor(p.stop_token_ids, device=dev)
                ] = NEG_INF
        for at, token in p.forced_tokens:
            forced = [i for i in rows if seqs[i].num_generated == at]
            if forced:
                f = torch.tensor(forced, device=dev)
                logits[f] = NEG_INF
                logits[f, token] = 0.0
    return logits


def choose_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float] | None]:
    """Pick one token per row of processed logits [B, V] (greedy or seeded sampling).

    Returns the token ids and, when any row asks for them, their log-probabilities.
    """
    greedy = all(s.group.params.temperature == 0 for s in seqs)
    if greedy:
        tokens = logits.argmax(-1)
    else:
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        for i, s in enumerate(seqs):
            p = s.group.params
            if p.temperature == 0:
                tokens[i] = logits[i].argmax()
                continue
            x = logits[i] / p.temperature
            if p.top_k:
                kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
                x = x.masked_fill(x < kth, NEG_INF)
            if p.top_p < 1.0:
                sorted_x, order = torch.sort(x, descending=True)
                cum = torch.softmax(sorted_x, -1).cumsum(-1)
                drop = cum - torch.softmax(sorted_x, -1) > p.top_p  # keep the smallest set with mass >= top_p
                x[order[drop]] = NEG_INF
            if s.group.generator is None:
                s.group.generator = torch.Generator(device=logits.device)
                if p.seed is not None:
                    s.group.generator.manual_seed(p.seed)
                else:
                    s.group.generator.seed()
            tokens[i] = torch.multinomial(torch.softmax(x, -1), 1, generator=s.group.generator)[0]
    logprobs = None
    if any(s.group.params.logprobs for s in seqs):
        logprobs = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0].tolist()
    return tokens.tolist(), logprobs
