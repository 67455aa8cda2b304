"""A step's token choice (``Sampler``): logits processors, then greedy / temperature, top-k, top-p
with a seed, or a beam-search step.

Rows sharing one SamplingParams are processed together (one indexed op per rule), so a step
over hundreds of sequences with the same options costs a handful of kernels, not one per row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import encdec_kernels
from encdec_cli.engine.beam import BeamLaunch, beam_finish, beam_launch, to_logprobs
from encdec_cli.engine.block_manager import BlockManager
from encdec_cli.engine.sequence import SamplingParams, Sequence, SequenceGroup, TimestampRules
from encdec_cli.engine.transfer import take_rows, to_device

NEG_INF = float("-inf")


def banned_ngram_tokens(tokens: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of ``tokens`` (transformers' no_repeat_ngram rule)."""
    if n <= 0 or len(tokens) + 1 < n:
        return []
    prefix = tuple(tokens[len(tokens) - n + 1 :])
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix]


class NgramIndex:
    """A sequence's n-grams: every (n-1)-token prefix -> the tokens that followed it, in order.

    Kept on the sequence (``Sequence.ngrams``) and extended as it grows; a beam fork copies its
    parent's (``Sequence.fork``): one dict copy instead of re-indexing every token."""

    __slots__ = ("n", "done", "following")

    def __init__(self, n: int):
        self.n = n
        self.done = 0  # n-gram start positions indexed so far
        self.following: dict[tuple[int, ...], tuple[int, ...]] = {}

    def copy(self) -> NgramIndex:
        c = NgramIndex(self.n)
        c.done, c.following = self.done, self.following.copy()  # values are tuples: never mutated
        return c


def banned_ngram_tokens_cached(seq: Sequence, n: int) -> list[int]:
    """``banned_ngram_tokens(seq.tokens, n)`` from the sequence's ``NgramIndex``, extended as it
    grows: O(new tokens) per step instead of a scan of the whole sequence. Any object with a
    ``tokens`` list works (the index is stored as its ``ngrams`` attribute)."""
    tokens = seq.tokens
    if n <= 0 or len(tokens) + 1 < n:
        return []
    end = len(tokens) - n + 1  # n-gram start positions [0, end) exist
    index = getattr(seq, "ngrams", None)
    if index is None or index.n != n or index.done > end:
        index = seq.ngrams = NgramIndex(n)
    following, m = index.following, n - 1
    for i in range(index.done, end):
        key = tuple(tokens[i : i + m])
        following[key] = following.get(key, ()) + (tokens[i + m],)
    index.done = end
    return list(following.get(tuple(tokens[end:]), ()))


def ngram_bans(seqs: list, n: int, out: list[int], counts: list[int]) -> None:
    """``banned_ngram_tokens_cached(s, n)`` for every sequence of ``seqs`` at once, appended to
    ``out`` (one flat list) with how many each sequence has to ``counts``. The same index updates,
    inlined: this runs for every row of every step. Each sequence needs ``tokens`` and ``ngrams``."""
    m = n - 1
    for s in seqs:
        tokens = s.tokens
        end = len(tokens) - m  # n-gram start positions [0, end) exist
        if n <= 0 or end < 0:
            counts.append(0)
            continue
        index = s.ngrams
        if index is None or index.n != n or index.done > end:
            index = s.ngrams = NgramIndex(n)
        following = index.following
        done = index.done
        if done == end - 1:  # the usual case: one token more than last time
            key = tuple(tokens[done:-1])  # the n-gram that ends with the last token
            following[key] = following.get(key, ()) + (tokens[-1],)
        else:
            for i in range(done, end):
                key = tuple(tokens[i : i + m])
                following[key] = following.get(key, ()) + (tokens[i + m],)
        index.done = end
        ban = following.get(tuple(tokens[end:]))
        if ban is None:
            counts.append(0)
        else:
            out += ban
            counts.append(len(ban))


@dataclass
class History:
    """Every row's tokens on the device (a beam step launched ahead makes its children's from its
    parents', ``ModelRunner.decode_children``): ``tokens`` [B, T] (prompt and generated, -1 after
    the end), ``lengths`` [B] tokens per row. The n-gram rule then runs there
    (``ngram_bans_on_device``) instead of on the host's per-row indexes."""

    tokens: torch.Tensor
    lengths: torch.Tensor

    def rows(self, index: torch.Tensor) -> History:
        return History(self.tokens.index_select(0, index), self.lengths.index_select(0, index))


def ngram_bans_on_device(logits: torch.Tensor, hist: History, rows: list[int], n: int) -> None:
    """``banned_ngram_tokens`` for rows ``rows`` of ``logits`` from their device history, set to
    -inf in place (``encdec_kernels.ngram_bans``: one kernel on CUDA), no host sync."""
    whole = len(rows) == len(logits) and rows[0] == 0 and rows[-1] == len(logits) - 1
    index = None if whole else to_device(logits.device, rows)
    encdec_kernels.ngram_bans(logits, hist.tokens, hist.lengths, n, index)


def banned_bad_words(tokens: list[int], bad_words: tuple[tuple[int, ...], ...]) -> list[int]:
    out = []
    for w in bad_words:
        if len(w) == 1 or tuple(tokens[len(tokens) - len(w) + 1 :]) == tuple(w[:-1]):
            out.append(w[-1])
    return out


_CONSTANTS: dict[tuple[torch.device, float], torch.Tensor] = {}


def _set(x: torch.Tensor, index, value: float) -> None:
    """``x[index] = value`` with advanced indexing, without a host sync: a Python number would be
    copied to the device from pageable memory on every call, which waits for the GPU to finish
    the step (a device-side constant is reused instead)."""
    key = (x.device, value)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(value, dtype=torch.float32, device=x.device)
    x[index] = _CONSTANTS[key]


ParamRows = list[tuple[SamplingParams, list[int]]]  # rows of a step grouped by their SamplingParams


def rows_by_params(seqs: list[Sequence]) -> ParamRows:
    """The rows of ``seqs`` grouped by their SamplingParams object (first-seen order). A request's
    rows (its beams) are consecutive: the dict is looked up only when the params change."""
    out: dict[int, tuple[SamplingParams, list[int]]] = {}
    last, rows = None, []
    for i, s in enumerate(seqs):
        p = s.group.params
        if p is not last:
            last = p
            entry = out.get(id(p))
            if entry is None:
                entry = out[id(p)] = (p, [])
            rows = entry[1]
        rows.append(i)
    return list(out.values())


def process_logits(
    logits: torch.Tensor,
    seqs: list[Sequence],
    by_params: ParamRows | None = None,
    drafted: np.ndarray | None = None,
    view: Callable[[int], Sequence] | None = None,
    generated: np.ndarray | None = None,
    history: History | None = None,
) -> torch.Tensor:
    """Apply every request's logits rules in place. logits: [B, V] float32, row i = seqs[i].

    Rules are gathered over all rows first and applied as a few batched index operations, so the
    cost does not grow with the number of distinct SamplingParams in the batch. Rows are visited
    per SamplingParams, so a row pays only for the rules its request has; the rules that depend
    only on the number of tokens generated (begin suppression, min length, forced tokens,
    suppress / allowed lists) are computed over all of a SamplingParams' rows at once (numpy), no
    Python per row.

    Speculative verification rows (engine/speculative.py): row i is ``seqs[i]`` seen with
    ``drafted[i]`` draft tokens after its own; ``view(i)`` gives that row's sequence with them
    (``Extended``), made only for the rules that read the tokens themselves (n-grams, bad words,
    repetition penalty, timestamps). ``by_params``: ``rows_by_params(seqs)`` when the caller has it
    (rows as lists or numpy arrays); ``generated``: each row's tokens generated, drafts seen
    included, when the caller has them. ``history``: every row's tokens on the device
    (a beam step launched ahead): the n-gram rule runs there.
    """
    dev = logits.device
    if by_params is None:
        by_params = rows_by_params(seqs)
    if len(seqs) <= FEW_ROWS and all(_counts_only(p) for p, _ in by_params):
        _count_rules_few(logits, seqs, by_params, drafted, generated)
        return logits
    if generated is not None:
        generated = np.asarray(generated, np.int64)
    if drafted is not None and view is not None:

        def seq_at(i: int) -> Sequence:
            return view(i) if drafted[i] else seqs[i]
    else:

        def seq_at(i: int) -> Sequence:
            return seqs[i]

    if any(p.record_first_step_probs for p, _ in by_params):
        record_first_step_probs(
            logits, seqs if drafted is None else [seq_at(i) for i in range(len(seqs))], by_params
        )
    ban_rows: list = []  # (row, token) pairs set to -inf: lists / numpy arrays, joined at the end
    ban_toks: list = []
    suppress: dict[int, tuple[tuple[int, ...], list]] = {}  # id(tokens) -> (tokens, row arrays)
    allowed: dict[int, tuple[tuple[int, ...], list]] = {}
    # rules that depend only on the number of new tokens, gathered over every SamplingParams and
    # applied as one numpy pass each: {tokens: (rows, each row's threshold)}
    at_begin: dict[tuple[int, ...], tuple[list, list]] = {}  # banned when generated == begin_index
    too_short: dict[tuple[int, ...], tuple[list, list]] = {}  # banned while generated < min_new
    forced_at: tuple[list, list, list] = ([], [], [])  # rows, position, token
    ngram_rows: dict[int, tuple[list, list]] = {}  # no_repeat_ngram: n -> (rows, their sequences)
    pen_rows: list[int] = []  # repetition penalty: (row, token seen) pairs and their penalties
    pen_toks: list[int] = []
    pen_vals: list[float] = []
    for p, rows in by_params:
        if p.repetition_penalty != 1.0:
            for i in rows:
                seen = set(seq_at(int(i)).tokens)
                pen_rows += [int(i)] * len(seen)
                pen_toks += seen
            pen_vals += [p.repetition_penalty] * (len(pen_toks) - len(pen_vals))
        if p.suppress_tokens:
            suppress.setdefault(id(p.suppress_tokens), (p.suppress_tokens, []))[1].append(rows)
        if p.allowed_tokens:
            allowed.setdefault(id(p.allowed_tokens), (p.allowed_tokens, []))[1].append(rows)
        ngram, bad_words = p.no_repeat_ngram_size, p.bad_words_ids
        if p.begin_suppress_tokens:
            entry = at_begin.setdefault(p.begin_suppress_tokens, ([], []))
            entry[0].extend(rows)
            entry[1].extend([p.begin_index] * len(rows))
        if p.min_new_tokens and p.stop_token_ids:
            entry = too_short.setdefault(p.stop_token_ids, ([], []))
            entry[0].extend(rows)
            entry[1].extend([p.min_new_tokens] * len(rows))
        for at, token in p.forced_tokens:
            forced_at[0].extend(rows)
            forced_at[1].extend([at] * len(rows))
            forced_at[2].extend([token] * len(rows))
        if ngram:
            entry = ngram_rows.setdefault(ngram, ([], []))
            entry[0].extend(rows)
            if history is None:  # (with the history on the device the rule reads no sequence)
                entry[1].extend([seqs[i] for i in rows] if drafted is None else map(seq_at, map(int, rows)))
        if bad_words:
            for i in rows:
                i = int(i)
                ban = banned_bad_words(seq_at(i).tokens, bad_words)
                if ban:
                    ban_rows.append([i] * len(ban))
                    ban_toks.append(ban)
    for n, (rows, picked) in ngram_rows.items() if history is None else ():
        toks: list[int] = []
        counts: list[int] = []
        ngram_bans(picked, n, toks, counts)
        if toks:
            ban_rows.append(np.repeat(np.asarray(rows, np.int64), counts))
            ban_toks.append(toks)
    forced_rows: list = []
    forced_toks: list = []
    if at_begin or too_short or forced_at[0]:
        if generated is None:
            generated = np.fromiter((len(s.tokens) - s.num_prompt for s in seqs), np.int64, len(seqs))
            if drafted is not None:
                generated += drafted
        for table, banned_if in ((at_begin, np.equal), (too_short, np.less)):
            for toks, (rows, limits) in table.items():
                r = np.asarray(rows, np.int64)
                sel = r[banned_if(generated[r], np.asarray(limits, np.int64))]
                if len(sel):
                    ban_rows.append(np.repeat(sel, len(toks)))
                    ban_toks.append(np.tile(np.asarray(toks, np.int64), len(sel)))
        if forced_at[0]:
            r, at, token = (np.asarray(x, np.int64) for x in forced_at)
            hit = generated[r] == at
            if hit.any():
                forced_rows.append(r[hit])
                forced_toks.append(token[hit])
    if pen_rows:  # one gather and one scatter for every penalised row (first, as before the bans)
        r, t = to_device(dev, [pen_rows, pen_toks])
        pen = to_device(dev, pen_vals, torch.float32)
        x = logits[r, t]
        logits[r, t] = torch.where(x < 0, x * pen, x / pen)
    for tokens, rows in suppress.values():
        _set(logits, (to_device(dev, _join(rows)).unsqueeze(1), to_device(dev, tokens)), NEG_INF)
    if ban_rows:
        ban = to_device(dev, np.stack([_join(ban_rows), _join(ban_toks)]))  # [2, M]: one copy
        _set(logits, (ban[0], ban[1]), NEG_INF)
    if history is not None:  # the n-gram bans, with the other bans (before allowed / forced tokens)
        for n, (rows, _) in ngram_rows.items():
            ngram_bans_on_device(logits, history, [int(i) for i in rows], n)
    for tokens, rows in allowed.values():
        r, t = to_device(dev, _join(rows)).unsqueeze(1), to_device(dev, tokens)
        keep = logits[r, t]
        _set(logits, r, NEG_INF)
        logits[r, t] = keep
    if forced_rows:
        rt = to_device(dev, np.stack([_join(forced_rows), _join(forced_toks)]))
        _set(logits, rt[0], NEG_INF)
        _set(logits, (rt[0], rt[1]), 0.0)
    if any(p.timestamp_rules for p, _ in by_params):
        apply_timestamp_rules(
            logits, seqs if drafted is None else [seq_at(i) for i in range(len(seqs))], by_params
        )
    return logits


# Up to this many rows, a step whose rules all count tokens (``_counts_only``) takes them in Python
# (``_count_rules_few``): numpy's and torch's fixed cost per call outweighs a loop over a few rows
# (batch 1: a speculative verification step's K + 1 rows, a plain step's one row).
FEW_ROWS = 16


def _counts_only(p: SamplingParams) -> bool:
    """Every logits rule of ``p`` depends only on the number of tokens generated."""
    return (
        p.timestamp_rules is None
        and not p.no_repeat_ngram_size
        and not p.bad_words_ids
        and p.repetition_penalty == 1.0
        and not p.record_first_step_probs
    )


_INDEXES: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}


def _index(dev: torch.device, tokens: tuple[int, ...]) -> torch.Tensor:
    """A device tensor of ``tokens`` (a SamplingParams' tuple), uploaded once and reused."""
    key = (dev, tokens)
    t = _INDEXES.get(key)
    if t is None:
        if len(_INDEXES) >= 1024:  # many distinct option tuples: start again rather than grow
            _INDEXES.clear()
        t = _INDEXES[key] = to_device(dev, list(tokens))
    return t


def _row_runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct rows -> their runs of consecutive rows [lo, hi)."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def _count_rules_few(
    logits: torch.Tensor,
    seqs: list[Sequence],
    by_params: ParamRows,
    drafted,
    generated,
) -> None:
    """``process_logits`` for a few rows whose rules all count tokens (suppress / allowed lists,
    begin suppression, min length, forced tokens), in Python: each rule's rows in runs of
    consecutive rows, each run one in-place op on a row slice with the rule's tokens as a device
    tensor uploaded once (``_index``): no per-step host-to-device copy. Same result as the general
    path (every rule sets -inf; allowed keeps the values the bans left; forced tokens last)."""
    bans: dict[tuple[int, ...], set[int]] = {}  # banned tokens -> rows
    allowed: dict[tuple[int, ...], set[int]] = {}
    forced: list[tuple[int, int]] = []  # (row, token)
    for p, rows in by_params:
        begin, forced_at = p.begin_suppress_tokens, p.forced_tokens
        stops = p.stop_token_ids if p.min_new_tokens else ()
        if p.suppress_tokens:
            bans.setdefault(p.suppress_tokens, set()).update(int(i) for i in rows)
        if p.allowed_tokens:
            allowed.setdefault(p.allowed_tokens, set()).update(int(i) for i in rows)
        if not (begin or stops or forced_at):
            continue
        for i in rows:
            i = int(i)
            if generated is not None:
                n = int(generated[i])
            else:
                n = seqs[i].num_generated + (int(drafted[i]) if drafted is not None else 0)
            if begin and n == p.begin_index:
                bans.setdefault(begin, set()).add(i)
            if stops and n < p.min_new_tokens:
                bans.setdefault(stops, set()).add(i)
            for at, token in forced_at:
                if n == at:
                    forced.append((i, token))
    dev = logits.device
    for tokens, rows in bans.items():
        idx = _index(dev, tokens)
        for lo, hi in _row_runs(sorted(rows)):
            logits[lo:hi].index_fill_(1, idx, NEG_INF)
    for tokens, rows in allowed.items():
        idx = _index(dev, tokens)
        for lo, hi in _row_runs(sorted(rows)):
            x = logits[lo:hi]
            keep = x.index_select(1, idx)
            x.fill_(NEG_INF)
            x.index_copy_(1, idx, keep)
    if forced:
        rt = to_device(dev, [[r for r, _ in forced], [t for _, t in forced]])
        _set(logits, rt[0], NEG_INF)
        _set(logits, (rt[0], rt[1]), 0.0)


def _join(parts: list) -> np.ndarray:
    """Lists / numpy arrays of ints -> one int64 array."""
    if len(parts) == 1:
        return np.asarray(parts[0], np.int64)
    return np.concatenate([np.asarray(x, np.int64) for x in parts])


# ---- Whisper: first-step probabilities and timestamp rules -----------------------------------------


def record_first_step_probs(
    logits: torch.Tensor, seqs: list[Sequence], by_params: ParamRows | None = None
) -> None:
    """Store, for rows at their first step that ask for it, the softmax probability of the tokens in
    ``params.record_first_step_probs`` in ``group.first_step_probs``, returned in the request's
    Result (Whisper's no-speech probability: the <|nospeech|> probability right after
    <|startoftranscript|>).

    logits: [B, V] unprocessed (log-probabilities for beam rows: same softmax). ``by_params``:
    ``rows_by_params(seqs)`` when the caller has it (no row is visited when no request asks)."""
    if by_params is not None and not any(p.record_first_step_probs for p, _ in by_params):
        return
    rows = [i for i, s in enumerate(seqs) if s.num_generated == 0 and s.group.params.record_first_step_probs]
    if not rows:
        return
    probs = torch.softmax(logits[rows].float(), -1)  # [R, V]
    toks = [seqs[i].group.params.record_first_step_probs for i in rows]
    width = max(len(t) for t in toks)
    idx = to_device(logits.device, [list(t) + [t[-1]] * (width - len(t)) for t in toks])  # [R, width]
    values = probs.gather(1, idx).tolist()
    for i, t, v in zip(rows, toks, values):
        seqs[i].group.first_step_probs = dict(zip(t, v))


def _timestamp_row_bounds(s: Sequence, rules: TimestampRules, vocab: int) -> tuple[int, int, int]:
    """For one row: (text_hi, ts_lo, ts_hi): ids < text_hi are banned, and of the timestamps only
    ts_lo <= id <= ts_hi stay allowed (ts_lo > ts_hi bans them all)."""
    tb, tokens = rules.timestamp_begin, s.tokens
    begin = s.num_prompt + s.group.params.begin_index
    n = len(tokens) - begin  # free tokens so far
    if n == 0:  # the first free token is a timestamp, at most max_initial_timestamp_index
        mx = rules.max_initial_timestamp_index
        return tb, tb, vocab - 1 if mx is None else tb + mx
    last_ts = tokens[-1] >= tb
    penultimate_ts = n < 2 or tokens[-2] >= tb
    if last_ts and penultimate_ts:  # a pair just closed (or the opening one): text must follow
        return 0, vocab, vocab - 1
    text_hi = rules.eot if last_ts else 0  # an open timestamp is closed (or ends the text): no text
    last = next((tokens[j] for j in range(len(tokens) - 1, begin - 1, -1) if tokens[j] >= tb), None)
    if last is None:
        return text_hi, tb, vocab - 1
    # timestamps never decrease; a segment closing its own pair may repeat the opening time,
    # otherwise each segment has a nonzero length
    return text_hi, last if last_ts and not penultimate_ts else last + 1, vocab - 1


def apply_timestamp_rules(
    logits: torch.Tensor, seqs: list[Sequence], by_params: ParamRows | None = None
) -> None:
    """Whisper's timestamp rules (``TimestampRules``) on every row that has them, in place.

    Rows sharing one ``TimestampRules`` (all of them, usually) go together: per-row bounds from a
    short scan of each row's tokens; the timestamp columns are masked as one [R, n_timestamps]
    block, the text columns only on the rows that ban text; then "when the timestamps together
    are likelier than the likeliest text token, take a timestamp" from one logsumexp over the
    rows (log-probabilities differ from the logits by a per-row constant, so the comparison needs
    no full log-softmax). logits: [B, V] float32. ``by_params``: as in ``record_first_step_probs``."""
    if by_params is not None and not any(p.timestamp_rules for p, _ in by_params):
        return
    groups: dict[int, tuple[TimestampRules, list[int], list[tuple[int, int, int]]]] = {}
    vocab = logits.shape[1]
    for i, s in enumerate(seqs):
        p = s.group.params
        r = p.timestamp_rules
        if r is None or s.num_generated < p.begin_index:
            continue
        g = groups.setdefault(id(r), (r, [], []))
        g[1].append(i)
        g[2].append(_timestamp_row_bounds(s, r, vocab))
    dev = logits.device
    for r, rows, bounds in groups.values():
        tb = r.timestamp_begin
        whole = len(rows) == len(seqs)
        idx = None if whole else to_device(dev, rows)
        x = logits if whole else logits[idx]  # [R, V]
        x[:, r.no_timestamps] = NEG_INF
        for hi in (r.eot, tb):  # rows banning the text tokens below ``hi``
            ban = [j for j, b in enumerate(bounds) if b[0] == hi]
            if ban:
                _set(x, (to_device(dev, ban), slice(None, hi)), NEG_INF)
        lo_hi = to_device(dev, [(b[1], b[2]) for b in bounds]) - tb  # [R, 2] allowed timestamp range
        col = torch.arange(vocab - tb, device=dev)[None, :]  # [1, n_timestamps]
        ts = x[:, tb:]  # [R, n_timestamps] view
        ts.masked_fill_((col < lo_hi[:, :1]) | (col > lo_hi[:, 1:]), NEG_INF)
        lse = torch.logsumexp(x, -1, keepdim=True)  # [R, 1]
        ts_logprob = torch.logsumexp(ts - lse, -1)  # [R]
        max_text = x[:, :tb].amax(-1) - lse[:, 0]  # [R]
        x[:, :tb].masked_fill_((ts_logprob > max_text)[:, None], NEG_INF)
        if not whole:
            logits[idx] = x


def sampling_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a sampled row draws from: processed logits [R, V] (float32) over the
    temperature, limited to the top-k tokens and to the smallest set with mass >= top_p -> [R, V]
    probabilities (speculative verification compares these with the draft's)."""
    x = logits / p.temperature
    if p.top_k:
        kth = torch.topk(x, min(p.top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, NEG_INF)
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True, dim=-1)
        sorted_p = torch.softmax(sorted_x, -1)
        drop = sorted_p.cumsum(-1) - sorted_p > p.top_p  # keep the smallest set with mass >= top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), NEG_INF)
    return torch.softmax(x, -1)


def sampling_generator(group: SequenceGroup, device: torch.device) -> torch.Generator:
    """The request's random generator (made on first use: seeded by ``params.seed``, else at random)."""
    if group.generator is None:
        group.generator = torch.Generator(device=device)
        if group.params.seed is not None:
            group.generator.manual_seed(group.params.seed)
        else:
            group.generator.seed()
    return group.generator


def choose_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float] | None]:
    """Pick one token per row of processed logits [B, V] (greedy or seeded sampling).

    Returns the token ids and, when any row asks for them, their log-probabilities.
    """
    tokens, logprobs = choose_tokens_on_device(logits, seqs)
    return chosen_to_host(seqs, tokens.tolist(), logprobs.tolist() if logprobs is not None else None)


def choose_tokens_on_device(
    logits: torch.Tensor, seqs: list[Sequence]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``choose_tokens``' device half: the tokens [B] (int64) and, when a row asks for them, their
    log-probabilities [B] (float32), on the logits' device, nothing read back."""
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
            probs = sampling_probs(logits[i : i + 1], p)[0]
            generator = sampling_generator(s.group, logits.device)
            tokens[i] = torch.multinomial(probs, 1, generator=generator)[0]
    logprobs = None
    if any(s.group.params.logprobs for s in seqs):
        logprobs = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    return tokens, logprobs


def chosen_to_host(
    seqs: list[Sequence], tokens: list[int], logprobs: list[float] | None
) -> tuple[list[int], list[float] | None]:
    """``choose_tokens``' host half, once the tokens are read back: a stop token's log-probability
    is kept on its sequence (the Completion's logprobs end before the stop token)."""
    if logprobs is not None:
        for s, t, lp in zip(seqs, tokens, logprobs):
            if t in s.group.params.stop_token_ids:
                s.stop_logprob = lp
    return tokens, logprobs


@dataclass
class Sampled:
    """What a step chose: the greedy / sampled rows' tokens (the engine appends them) and the
    beam-search requests, each advanced by one token already (``beam_step_batch``)."""

    seqs: list[Sequence]  # the greedy / sampled rows, in step order
    tokens: list[int]
    logprobs: list[float] | None  # when a row asks for them
    beam_groups: list[SequenceGroup]


@dataclass
class PendingSample:
    """A step's token choice launched on the device (``Sampler.launch``), not yet on the host:
    ``Sampler.finish`` waits for its copies (its event only) and completes it."""

    chosen: list[Sequence]  # the greedy / sampled rows, in step order
    tokens: torch.Tensor | None  # their tokens on the way to the host (CPU tensor; pinned on CUDA)
    logprobs: torch.Tensor | None  # and their log-probabilities, when a row asks for them
    beams: BeamLaunch | None  # the beam-search requests' candidates (beam_launch)
    done: object  # a CUDA event after the copies, or None (on the CPU: nothing to wait for)


class Sampler:
    """Chooses a step's tokens from the model's logits [B, V] (row i = ``seqs[i]``): splits the rows
    into greedy / sampled ones and beam-search requests, takes log-probabilities for beam rows,
    applies every request's logits rules, then picks.

    When all rows take one path (the usual case) no [B, V] gather or scatter runs; the beam-search
    requests of a step advance together (one device-to-host copy per step). ``launch`` and
    ``finish`` are the two halves of a call: the device work and copies toward the host, then
    the host's part once they land (the engine's micro-batches run other work in between)."""

    def __init__(self, device: torch.device, max_rows: int):
        # look-ahead tokens reach the host through pinned memory (see _argmax_ahead)
        self._host_tokens = torch.empty(max_rows, dtype=torch.long, pin_memory=device.type == "cuda")

    def __call__(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        blocks: BlockManager,
        launch_ahead: Callable[[torch.Tensor], object] | None = None,
        history: History | None = None,
    ) -> Sampled:
        """``launch_ahead``: only when every row is greedy with count-based rules (the engine's
        look-ahead, ``EngineConfig.lookahead``); called with the step's tokens on the device. Or
        when every row is a beam search that can run ahead (``beam_launch``'s ``ahead``): called
        with the children chosen on the device. ``history``: the rows' tokens on the device (a beam
        step launched ahead made them)."""
        if launch_ahead is None or seqs[0].group.params.num_beams > 1:
            return self.finish(self.launch(logits, seqs, launch_ahead, history), blocks)
        process_logits(logits, seqs)  # every row greedy (Engine._can_run_ahead): no beams
        return Sampled(seqs, self._argmax_ahead(logits, launch_ahead), None, [])

    def launch(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        beams_ahead: Callable | None = None,
        history: History | None = None,
    ) -> PendingSample:
        """The device half of a step's choice: log-probabilities for beam rows, the logits rules
        (their host part reads these rows' tokens), the greedy / sampled tokens and the beam
        candidates (``beam_launch``; ``beams_ahead``: its ``ahead``), and non-blocking copies of
        them to the host. Changes no sequence. ``history``: the rows' tokens on the device
        (``process_logits``)."""
        single: list[int] = []  # rows of greedy / sampled sequences
        beams: dict[SequenceGroup, list[int]] = {}  # beam-search request -> its rows
        for i, s in enumerate(seqs):
            if s.group.params.num_beams > 1:
                group_rows = beams.get(s.group)
                if group_rows is None:
                    beams[s.group] = [i]
                else:
                    group_rows.append(i)
            else:
                single.append(i)
        whole = len(single) == len(seqs)
        if beams:
            logits = to_logprobs(logits, [i for rows in beams.values() for i in rows] if single else None)
        process_logits(logits, seqs, history=history)
        chosen = seqs if whole else [seqs[i] for i in single]
        tokens = logprobs = None
        if single:
            tokens, logprobs = choose_tokens_on_device(logits if whole else take_rows(logits, single), chosen)
        launched = beam_launch(list(beams), logits, list(beams.values()), beams_ahead) if beams else None
        done = None
        if logits.device.type == "cuda" and tokens is not None:
            tokens = _to_pinned(tokens)
            logprobs = _to_pinned(logprobs) if logprobs is not None else None
            done = torch.cuda.Event()
            done.record()
        return PendingSample(chosen, tokens, logprobs, launched, done)

    def finish(self, pending: PendingSample, blocks: BlockManager) -> Sampled:
        """The host half: the chosen tokens read back, the beam-search requests advanced one token
        (``beam_finish``: slots, forks, blocks)."""
        tokens, logprobs = [], None
        if pending.tokens is not None:
            if pending.done is not None:
                pending.done.synchronize()  # this step's copies only; later work keeps running
            lps = pending.logprobs.tolist() if pending.logprobs is not None else None
            tokens, logprobs = chosen_to_host(pending.chosen, pending.tokens.tolist(), lps)
        beams = pending.beams
        if beams is not None:
            beam_finish(beams, blocks)
        return Sampled(pending.chosen, tokens, logprobs, beams.groups if beams is not None else [])

    def _argmax_ahead(self, logits: torch.Tensor, launch: Callable[[torch.Tensor], object]) -> list[int]:
        """Greedy tokens of this step; on the way, ``launch`` starts the next step's model run with
        them as its input (device to device) before the host waits for them, so the GPU computes
        the next step while the host does this step's bookkeeping."""
        tokens = logits.argmax(-1)
        if logits.device.type != "cuda":
            launch(tokens)
            return tokens.tolist()
        host = self._host_tokens[: len(tokens)]
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        launch(tokens)
        done.synchronize()  # this step's tokens only; the next step keeps running
        return host.tolist()


def _to_pinned(x: torch.Tensor) -> torch.Tensor:
    """A non-blocking copy of a device tensor into fresh pinned host memory (read it only after an
    event recorded behind the copy has completed)."""
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    return host
