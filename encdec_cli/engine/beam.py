"""Beam search inside the continuous-batching engine, step for step as transformers' ``_beam_search``.

A request with ``num_beams`` N starts as one sequence (its prompt). Each step, for every
beam-search request at once (``beam_step_batch``):

1. candidates: running beam scores + the processed log-probabilities of each beam's next token,
   the top K = max(2, 1 + #EOS) * N over (beam x vocab). On the first step the one prompt stands
   for N copies scored [0, -1e9, ...] (what transformers starts from).
2. a candidate "hits" when it ends in a stop token or reaches the length limit. A hit among the top
   N becomes a finished hypothesis scored ``sum_logprobs / new_tokens ** length_penalty``
   (new_tokens counts the stop token, not the decoder prompt) when it ranks among the N best.
3. the N best non-hit candidates are the next running beams. A parent's first child reuses its
   sequence; further children fork it and share its self-attention blocks (copy-on-write in
   ``BlockManager.prepare_write``); parents without children free their blocks.
4. the search ends when no candidate can continue, when every hypothesis slot is finished and
   ``early_stopping`` is True, or when the best running beam can no longer beat the worst finished
   hypothesis (transformers' heuristic; ``early_stopping`` "never" assumes the longest length).

Batching: the requests of a step that share N and K (the usual case: all of them) go through
steps 1-4 together. Step 1 takes their rows as [G, N, V] on the device (a view when the rows are
consecutive, the usual case; a gather otherwise) and one ``topk``; one copy brings every batch's
candidates to the CPU. Steps 2-4 are float32 numpy ops over [G, K] and [G, N + K] (a small numpy op
costs a fraction of a small torch op; elementwise IEEE arithmetic gives torch's values) and two
``torch.topk`` rankings on the same memory; Python per request only does the sequence
bookkeeping (step 5: slots, forks, blocks).

A step that launches the next one ahead (``Engine._beams_ahead_plan``) also ranks step 3's
running beams on the device (``_choose``), so the next step starts before the host has them
(``ModelRunner.decode_children``); the host then takes the device's ranking and blocks
(``_select``'s ``chosen`` and ``ahead``, ``_grants``).

The score arithmetic runs on the same float32 values in the same order as transformers (each
request's row of every batched op computes exactly what transformers' batch-of-one ops compute),
so ties and near-ties break the same way. Scores between steps live as Python floats (exact
float32 values) in each request's ``BeamState``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

import encdec_kernels
from encdec_cli.engine.block_manager import BlockManager
from encdec_cli.engine.sequence import Completion, Sequence, SequenceGroup
from encdec_cli.engine.transfer import to_device
from encdec_kernels.reference import BEAM_NEG_LARGE

NEG_LARGE = BEAM_NEG_LARGE  # transformers' "impossible" score (-1e9): initial copies, hits, empty slots
NEG_LARGE_F32 = np.float32(NEG_LARGE)  # exact: 1e9 = 2**9 * 1953125
F32 = torch.float32


@dataclass
class BeamState:
    """One request's beam search: N finished-hypothesis slots (best first) and the running scores.

    Scores are float32 values kept as Python floats (exact both ways)."""

    num_beams: int
    beams_to_keep: int  # K candidates per step: enough that N of them are not stop tokens
    running_scores: list[float]  # [N] sum of processed log-probs per running beam
    # [N] each (lists, or one shared tuple of empty slots while none is finished: never mutated)
    slot_scores: list[float] | tuple[float, ...]  # length-penalised; NEG_LARGE while empty
    slot_finished: list[bool] | tuple[bool, ...]
    slots: list[Completion | None] | tuple[None, ...] = field(default_factory=list)  # the hypotheses
    improvable: bool = True  # transformers' early-stop heuristic has not fired yet

    @classmethod
    def start(cls, num_beams: int, num_stop_tokens: int) -> BeamState:
        return cls(
            num_beams,
            max(2, 1 + num_stop_tokens) * num_beams,
            [0.0] + [NEG_LARGE] * (num_beams - 1),
            [NEG_LARGE] * num_beams,
            [False] * num_beams,
            [None] * num_beams,
        )


def to_logprobs(logits: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
    """Beam search applies the logits processors to log-probabilities (as transformers): the
    log_softmax of ``logits`` [B, V], of every row (``rows`` None: the usual case, no gather and
    scatter of [B, V]) or, in place, of ``rows`` only (greedy or sampled rows share the step)."""
    if rows is None:
        return torch.log_softmax(logits, -1)
    idx = to_device(logits.device, rows)
    return logits.index_copy_(0, idx, torch.log_softmax(logits.index_select(0, idx), -1))


def beam_step_batch(
    groups: list[SequenceGroup], logprobs: torch.Tensor, rows: list[list[int]], blocks: BlockManager
) -> None:
    """Advance every beam-search request of an engine step by one token.

    logprobs: [B, V] float32 on the model's device, log_softmax of the logits then the logits
    processors (the order transformers uses in beam search); ``rows[g]`` are the rows of
    ``groups[g].seqs`` in it (one row on a request's first step, N after). Updates each
    ``group.seqs`` (the running beams, best first) and, when its search ends, empties it and
    fills ``group.finished`` (best first).

    Requests are batched by their (N, K): one ``topk`` over [G_b, N * V] per such batch, the very
    shapes transformers uses, so even exactly tied candidates rank as in transformers (a topk over
    padded rows, or with a larger k, may order ties differently). All batches' candidates come to
    the CPU in one copy, the step's only device sync.

    The same as ``beam_finish(beam_launch(groups, logprobs, rows), blocks)``: the engine's micro-
    batches (``Engine._step``) run the two halves apart, another step's GPU work in between.
    """
    beam_finish(beam_launch(groups, logprobs, rows), blocks)


@dataclass
class BeamLaunch:
    """A beam step's device half (``beam_launch``): its candidates on their way to the host."""

    groups: list[SequenceGroup]
    batches: list[list[int]]  # indices into groups: the requests of each (N, K)
    shapes: list[torch.Size]  # each batch's [P, G, K]
    host: torch.Tensor  # every batch's candidates, flat (float64; on CUDA pinned, filled by a copy)
    done: object  # a CUDA event recorded after the copy, or None (the copy is done)
    vocab: int
    # a step launched ahead (``Children``): the running beams the device chose, then the
    # blocks it gave them (``AheadBlocks``); None otherwise
    chosen: bool = False
    ahead: AheadBlocks | None = None


@dataclass
class Children:
    """The next step's rows of a beam step launched ahead, chosen on the device (``beam_launch``
    with ``ahead``): request g's N running beams are rows [g * N, (g + 1) * N), best first."""

    parents: torch.Tensor  # [B] long: each child's parent row in this step
    tokens: torch.Tensor  # [B] long: its new token (its input in the next step)
    fork: torch.Tensor  # [B] bool: not its parent's first child (it shares the parent's blocks)


@dataclass
class AheadBlocks:
    """Blocks the device gave a beam step launched ahead: the host's mirror (``_select``) hands
    the same ones to the same children. ``reserved``: the pool's first free blocks when it was
    launched, taken in order; ``new_block[g]``: request g's next token starts a new block (every
    child takes one), else only forked children take one (a copy of the parent's last block)."""

    reserved: list[int]
    new_block: list[bool]


def beam_launch(
    groups: list[SequenceGroup],
    logprobs: torch.Tensor,
    rows: list[list[int]],
    ahead: Callable[[Children], AheadBlocks] | None = None,
) -> BeamLaunch:
    """The device half of ``beam_step_batch``: per (N, K) batch one ``topk`` of the candidates,
    then one copy of them all toward the host; on CUDA a non-blocking copy into pinned memory with
    an event, so nothing waits here and the GPU may go on with other work. Touches no sequence.

    ``ahead`` (one (N, K) batch, every request at N running beams in consecutive rows, none asking
    for log-probs: ``Engine._beams_ahead_plan``): the next running beams are chosen on the device too
    (steps 2 and 3: the hits and the N best candidates that did not hit), copied back with the
    candidates, and ``ahead`` launches the next step's model run on them (``Children``) before
    the host waits for anything; ``beam_finish`` then makes the host's beams the device's."""
    for g in groups:
        if g.beam is None:
            g.beam = BeamState.start(g.params.num_beams, len(g.params.stop_token_ids))
    batches: dict[tuple[int, int], list[int]] = {}
    for i, g in enumerate(groups):
        batches.setdefault((g.beam.num_beams, g.beam.beams_to_keep), []).append(i)
    on_device = [
        _candidates([groups[i] for i in idx], logprobs, [rows[i] for i in idx]) for idx in batches.values()
    ]
    chosen = None
    if ahead is not None:
        chosen, children = _choose(groups, on_device[0], logprobs.shape[1])
        on_device.append(chosen)
    flat = torch.cat([t.reshape(-1) for t in on_device])
    done = None
    if flat.device.type == "cuda":
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    else:
        host = flat.cpu()
    shapes = [t.shape for t in on_device]
    launch = BeamLaunch(
        groups, list(batches.values()), shapes, host, done, logprobs.shape[1], chosen is not None
    )
    if ahead is not None:
        launch.ahead = ahead(children)
    return launch


def _choose(groups: list[SequenceGroup], packed: torch.Tensor, vocab: int) -> tuple[torch.Tensor, Children]:
    """Steps 2 and 3's choice on the device for G requests of one (N, K) batch (``_select`` makes it
    on the host otherwise): the hits, the N best candidates that did not hit (the same float32
    arithmetic) and the children they make, in two kernels around one ``torch.topk``. Returns (the
    chosen candidates [G, N] as ``packed``'s dtype, for the host; the children)."""
    n = groups[0].beam.num_beams
    # per request: at the length limit, then the stop tokens (-1: none); one array from tuples
    stops = [g.params.stop_token_ids for g in groups]
    width = max(1, *map(len, stops))
    at_limit = [len(g.seqs[0].tokens) + 1 - g.seqs[0].num_prompt >= g.max_new_tokens for g in groups]
    info = np.array([(a, *s, *(-1,) * (width - len(s))) for a, s in zip(at_limit, stops)], np.int64)
    masked = encdec_kernels.beam_mask_hits(packed, to_device(packed.device, info), vocab)  # _select's
    chosen = torch.topk(masked, n).indices  # [G, N]: the ranking transformers makes (its ties too)
    chosen, rows, tokens, fork = encdec_kernels.beam_chosen(packed, chosen, vocab)
    return chosen, Children(rows, tokens, fork)


def beam_finish(launch: BeamLaunch, blocks: BlockManager) -> None:
    """The host half of ``beam_step_batch``: wait for this launch's candidates only (its event),
    then steps 2-5 per (N, K) batch: new slots, running beams, forks and freed blocks."""
    if launch.done is not None:
        launch.done.synchronize()
    host = launch.host.split([s.numel() for s in launch.shapes])
    groups = launch.groups
    if launch.chosen:  # one batch (beam_launch's ahead)
        chosen = host[1].view(launch.shapes[1]).numpy().astype(np.int64)
        _select(groups, host[0].view(launch.shapes[0]), launch.vocab, blocks, chosen, launch.ahead)
        return
    for idx, packed, shape in zip(launch.batches, host, launch.shapes, strict=True):
        _select([groups[i] for i in idx], packed.view(shape), launch.vocab, blocks)


def _candidates(groups: list[SequenceGroup], logprobs: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
    """Top K candidates of G requests sharing (N, K), on the device, without a sync.

    logprobs: [B, V]. Returns [P, G, K], float32 when N * V <= 2**24 (float32 holds those flat
    indices exactly; topk writes its scores straight into it: one cast kernel for the indices),
    else float64, so one copy moves all: P = 2 (scores, flat index beam * V + token into [N, V]),
    or 3 with the candidates' own log-probs when a request asks for them.
    """
    n = groups[0].beam.num_beams
    k = groups[0].beam.beams_to_keep
    dev = logprobs.device
    num, vocab = len(groups), logprobs.shape[1]
    running = to_device(dev, [g.beam.running_scores for g in groups], F32)  # [G, N]
    flat = [i for r in rows for i in r]
    want = any(g.params.logprobs for g in groups)
    if n * vocab <= 1 << 24:  # the usual case: scores, indices (and log-probs) in one float32 tensor
        out = torch.empty((2 + want, num, k), dtype=F32, device=dev)
        top_scores, top_idx = out[0], torch.empty((num, k), dtype=torch.long, device=dev)
    else:
        out, top_scores, top_idx = None, None, None
    if len(flat) == num * n and flat == list(range(flat[0], flat[0] + len(flat))):
        # the usual case: every request has its N beams, in consecutive rows: a view, no gather
        own = logprobs[flat[0] : flat[0] + len(flat)].view(num, n * vocab)  # [G, N * V]
        acc = own.view(num, n, vocab) + running[:, :, None]
        top_scores, top_idx = _topk(acc.view(num, -1), k, top_scores, top_idx)  # [G, K]
        parts = [top_scores, top_idx]
        if want:
            parts.append(own.gather(1, top_idx))
    else:  # a gather: a first step, or rows of requests of another (N, K) in between
        # first step: the prompt's one row stands for N copies (running scores [0, -1e9, ...])
        beam_rows = [r * n if len(r) == 1 < n else r for r in rows]  # [G][N] rows of logprobs
        row_idx = to_device(dev, beam_rows)
        acc = logprobs[row_idx]  # [G, N, V]
        acc += running[:, :, None]
        top_scores, top_idx = _topk(acc.view(num, -1), k, top_scores, top_idx)  # [G, K]
        parts = [top_scores, top_idx]
        if want:
            parts.append(logprobs[row_idx.gather(1, top_idx // vocab), top_idx % vocab])
    if out is None:
        return torch.stack([t.double() for t in parts])
    out[1].copy_(top_idx)
    if want:
        out[2].copy_(parts[2])
    return out


def _topk(x: torch.Tensor, k: int, values: torch.Tensor | None, indices: torch.Tensor | None):
    """``torch.topk(x, k)`` along the last dim, into ``values`` and ``indices`` when given."""
    if values is None:
        return torch.topk(x, k)
    return torch.topk(x, k, out=(values, indices))


def _select(
    groups: list[SequenceGroup],
    packed: torch.Tensor,
    vocab: int,
    blocks: BlockManager,
    chosen: np.ndarray | None = None,
    ahead: AheadBlocks | None = None,
) -> None:
    """Steps 2-5 for G requests sharing (N, K), from their candidates ``packed`` [P, G, K] (CPU).

    The score arithmetic is float32 numpy (elementwise IEEE operations: the same values as torch's
    in the same order, at a fraction of a small torch op's cost); the two rankings stay
    ``torch.topk`` (on the same arrays, no copy) so ties break as in transformers.

    ``chosen`` [G, N]: the running beams the device chose (a step launched ahead, ``_choose``),
    taken instead of ranking them here; ``ahead``: the blocks that step gave the children, which
    the host's children take too (``_grants``)."""
    states: list[BeamState] = [g.beam for g in groups]
    n, k = states[0].num_beams, states[0].beams_to_keep
    host = packed.numpy()
    top_scores, top_idx = host[0].astype(np.float32), host[1].astype(np.int64)  # [G, K]
    # per request (every running beam of a request has the same length)
    new_len, best_len, lps, stop_lists = [], [], [], []  # new_len counts the new token
    at_limit, early_true, not_improvable, slot_scores, slot_finished = [], [], [], [], []
    for g, st in zip(groups, states, strict=True):
        p, seq = g.params, g.seqs[0]
        t, lp = len(seq.tokens) + 1 - seq.num_prompt, p.length_penalty
        new_len.append(t)
        lps.append(lp)
        # the early-stop heuristic's length: "never" assumes the longest one (for lp > 0)
        best_len.append(g.max_new_tokens if p.early_stopping == "never" and lp > 0.0 else t)
        stop_lists.append(p.stop_token_ids)
        at_limit.append(t >= g.max_new_tokens)
        early_true.append(p.early_stopping is True)
        not_improvable.append(not st.improvable)
        slot_scores.append(st.slot_scores)
        slot_finished.append(st.slot_finished)
    at_limit = np.array(at_limit)[:, None]  # [G, 1]
    early_true = np.array(early_true)[:, None]  # [G, 1]

    # 2. hits, and the running beams for the next step: the N best candidates that did not hit
    cand_beam, cand_tok = top_idx // vocab, top_idx % vocab
    width = max(1, max(map(len, stop_lists)))
    stops = np.array([(*s, *(-1,) * (width - len(s))) for s in stop_lists], np.int64)  # [G, S], -1: none
    if width == 1:  # one stop token per request (the usual case)
        hits = at_limit | (cand_tok == stops)  # [G, K]
    else:
        hits = at_limit | (cand_tok[:, :, None] == stops[:, None, :]).any(-1)
    masked = top_scores + hits.astype(np.float32) * NEG_LARGE_F32
    rows = np.arange(len(groups))[:, None]
    if chosen is None:
        next_scores, next_idx = (t.numpy() for t in torch.topk(torch.from_numpy(masked), n))  # [G, N]
    else:  # the device's ranking (its ties broke the device's way): the next step runs on it
        next_idx = chosen
        next_scores = masked[rows, next_idx]

    # 3. finished hypotheses: hits among the top N, merged with the slots, N best kept
    did_finish = hits & (np.arange(k) < n)
    slot_scores = np.array(slot_scores, np.float32)  # [G, N]
    slot_finished = np.array(slot_finished, bool)
    pen = np.array([t**lp for t, lp in zip(new_len, lps, strict=True)], np.float32)[:, None]
    cand = top_scores / pen
    cand += (slot_finished.all(1, keepdims=True) & early_true).astype(np.float32) * NEG_LARGE_F32
    cand += np.array(not_improvable, np.float32)[:, None] * NEG_LARGE_F32
    cand += (~did_finish).astype(np.float32) * NEG_LARGE_F32
    merged = np.concatenate((slot_scores, cand), 1)  # [G, N + K]: the slots, then the candidates
    slot_scores, keep = (t.numpy() for t in torch.topk(torch.from_numpy(merged), n))  # [G, N]
    slot_finished = np.concatenate((slot_finished, did_finish), 1)[rows, keep]

    # 4. stop rule (transformers' _check_early_stop_heuristic / _beam_search_has_unfinished_sequences)
    best_pen = np.array([t**lp for t, lp in zip(best_len, lps, strict=True)], np.float32)[:, None]
    best_possible = next_scores[:, :1] / best_pen
    worst_finished = np.where(slot_finished, slot_scores.min(1, keepdims=True), NEG_LARGE_F32)  # [G, N]
    improvable = ~np.array(not_improvable) & (best_possible > worst_finished).any(1)
    full = slot_finished.all(1) & early_true[:, 0]
    go_on = (improvable & ~full & ~hits.all(1)).tolist()

    # 5. per request: the new slots, then the new running beams or the end of the search
    tok_logprobs = host[2].astype(np.float32) if len(host) > 2 else None
    next_beam = cand_beam[rows, next_idx]  # [G, N]
    grants = _grants(next_beam, ahead, blocks) if ahead is not None else None
    next_beam, next_tok = next_beam.tolist(), cand_tok[rows, next_idx].tolist()
    next_logprobs = tok_logprobs[rows, next_idx].tolist() if tok_logprobs is not None else None
    # only requests with a finished hypothesis have slots to build (slots are None exactly while
    # unfinished); the others share one row of empty slots (never mutated: each step makes new ones)
    any_finished = slot_finished.any(1)
    fin = np.flatnonzero(any_finished).tolist()
    fin_keep = dict(zip(fin, keep[fin].tolist()))
    fin_scores, fin_done = slot_scores[fin].tolist(), slot_finished[fin].tolist()
    empty_slots, empty_scores, empty_done = (None,) * n, (NEG_LARGE,) * n, (False,) * n
    improvable, next_scores = improvable.tolist(), next_scores.tolist()
    j_fin = 0
    for i, (g, st) in enumerate(zip(groups, states, strict=True)):
        want = g.params.logprobs
        kept = fin_keep.get(i)
        if kept is None:
            st.slots, st.slot_scores, st.slot_finished = empty_slots, empty_scores, empty_done
        else:
            scores, done = fin_scores[j_fin], fin_done[j_fin]
            j_fin += 1
            parents = g.seqs * n if len(g.seqs) == 1 < n else g.seqs
            slots = []
            for j in kept:
                c = j - n
                if c < 0:
                    slots.append(st.slots[j])
                elif did_finish[i, c]:
                    lp = float(tok_logprobs[i, c]) if want else None
                    token = int(cand_tok[i, c])
                    parent = parents[cand_beam[i, c]]
                    slots.append(
                        _hypothesis(parent, token, g.params.stop_token_ids, scores[len(slots)], lp, want)
                    )
                else:
                    slots.append(None)
            st.slots, st.slot_scores, st.slot_finished = slots, scores, done
        st.improvable = improvable[i]
        if go_on[i]:
            st.running_scores = next_scores[i]
            grant = (grants[i], ahead.new_block[i]) if grants is not None else None
            _advance(
                g,
                next_beam[i],
                next_tok[i],
                next_logprobs[i] if want else None,
                st.running_scores,
                blocks,
                grant,
            )
        else:
            if grants is not None:  # the children the step launched ahead computed for nothing
                blocks.free([b for b in grants[i] if b is not None])
            for s in g.seqs:
                blocks.free(s.block_table)
                s.block_table = []
            g.seqs = []
            g.finished = [
                h for h, done in zip(st.slots, st.slot_finished, strict=True) if done and h is not None
            ]


_EARLIER: dict[int, np.ndarray] = {}  # N -> [N, N] bool, [i, j]: j < i


def forks(parent: np.ndarray) -> np.ndarray:
    """[G, N] bool for each request's children ``parent`` [G, N] (their parent beams): the child
    forks, i.e. an earlier child has its parent (the first child takes the parent's own blocks).
    The host's side (``_grants``) of the rule the device applies in ``encdec_kernels.beam_chosen``."""
    n = parent.shape[1]
    earlier = _EARLIER.get(n)
    if earlier is None:
        earlier = _EARLIER[n] = np.tri(n, n, -1, bool)
    return ((parent[:, :, None] == parent[:, None, :]) & earlier).any(-1)


def _grants(parents: np.ndarray, ahead: AheadBlocks, blocks: BlockManager) -> list[list[int | None]]:
    """The reserved blocks a step launched ahead gave the children of ``parents`` [G, N] (each
    child's parent beam), per request and child (None: none): the rule of ``ModelRunner.
    decode_children``, in row order. Takes them from the pool (they are its first free blocks:
    nothing was allocated since they were reserved)."""
    needs = forks(parents) | np.array(ahead.new_block, bool)[:, None]
    taken = blocks.allocate(int(needs.sum()))
    if taken != ahead.reserved[: len(taken)]:
        raise RuntimeError("the blocks reserved for a beam step launched ahead were taken meanwhile")
    it = iter(taken)
    return [[next(it) if x else None for x in row] for row in needs.tolist()]


def _advance(
    group: SequenceGroup,
    beams: list[int],
    tokens: list[int],
    logprobs: list[float] | None,
    scores: list[float],
    blocks: BlockManager,
    grant: tuple[list[int | None], bool] | None = None,
) -> None:
    """The new running beams: child i = running beam ``beams[i]`` + tokens[i] (on a request's first
    step its one sequence stands for every beam). Each parent's first child reuses its sequence,
    further children fork it and share its blocks; childless parents free theirs.

    ``grant`` (a step launched ahead has already computed the children: their new tokens' K/V are
    written): (each child's block or None, whether the new token started a block). A child's
    block is appended to its table when it started one, else it replaces the shared block where
    the new token goes (the copy the device made): a forked child does not share that block at
    all when it is its parent's last (the usual case)."""
    old = group.seqs
    if len(old) == 1:
        beams = [0] * len(beams)
    granted, new_block = grant if grant is not None else (None, True)
    bs = blocks.block_size
    taken = [False] * len(old)
    children: list[Sequence] = []
    for b in beams:
        parent = old[b]
        if taken[b]:
            child = parent.fork(ngrams=grant is None)  # ahead: the next step's n-grams are the device's
            table = parent.block_table
            if not new_block and len(parent.tokens) // bs == len(table) - 1:
                table = table[:-1]  # the new token's block is the child's own copy (granted below)
            child.block_table = blocks.share(table)
        else:
            taken[b] = True
            child = parent
        children.append(child)
    if not all(taken):
        for s, t in zip(old, taken):
            if not t:
                blocks.free(s.block_table)
                s.block_table = []
    for i, child in enumerate(children):  # after every fork copied its parent's tokens
        child.tokens.append(tokens[i])
        if logprobs is not None:
            child.logprobs.append(logprobs[i])
        child.cum_logprob = scores[i]
    if granted is not None:
        for child, b in zip(children, granted, strict=True):
            if b is not None:
                col = (len(child.tokens) - 1) // bs
                if col == len(child.block_table):  # a new block, or a fork's copy of the last one
                    child.block_table.append(b)
                else:  # copy-on-write, done on the device
                    blocks.free([child.block_table[col]])
                    child.block_table[col] = b
            child.num_cached = len(child.tokens)
    group.seqs = children


def _hypothesis(
    parent: Sequence,
    token: int,
    stop: tuple[int, ...],
    score: float,
    logprob: float | None,
    want_logprobs: bool,
) -> Completion:
    """A finished beam: its generated tokens (the stop token excluded) and length-penalised score."""
    if token in stop:
        return Completion(parent.generated, list(parent.logprobs) if want_logprobs else None, score, "stop")
    lps = parent.logprobs + [logprob] if want_logprobs else None
    return Completion(parent.generated + [token], lps, score, "length")
