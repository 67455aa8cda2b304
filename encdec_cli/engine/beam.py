"""Beam search inside the continuous-batching engine, step for step as transformers' ``_beam_search``.

A request with ``num_beams`` N starts as one sequence (its prompt). Each step, for one request:

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

The score arithmetic runs on the same float32 tensors in the same order as transformers, so
ties and near-ties break the same way. Scores live in small [N] / [K] tensors on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from encdec_cli.engine.block_manager import BlockManager
from encdec_cli.engine.sequence import Completion, Sequence, SequenceGroup

NEG_LARGE = -1.0e9  # transformers' "impossible" score: initial copies, hits, empty slots


@dataclass
class BeamState:
    """One request's beam search: N finished-hypothesis slots (best first) and the running scores."""

    num_beams: int
    beams_to_keep: int  # K candidates per step: enough that N of them are not stop tokens
    running_scores: torch.Tensor  # [len(group.seqs)] float32, sum of processed log-probs per beam
    slot_scores: torch.Tensor  # [N] float32, length-penalised; NEG_LARGE while empty
    slot_finished: torch.Tensor  # [N] bool
    slots: list[Completion | None] = field(default_factory=list)  # the hypothesis in each slot
    improvable: bool = True  # transformers' early-stop heuristic has not fired yet

    @classmethod
    def start(cls, num_beams: int, num_stop_tokens: int) -> BeamState:
        running = torch.full((num_beams,), NEG_LARGE)
        running[0] = 0.0
        return cls(
            num_beams,
            max(2, 1 + num_stop_tokens) * num_beams,
            running,
            torch.full((num_beams,), NEG_LARGE),
            torch.zeros(num_beams, dtype=torch.bool),
            [None] * num_beams,
        )


def beam_step(group: SequenceGroup, logprobs: torch.Tensor, blocks: BlockManager) -> None:
    """Advance one request's beams by one token.

    logprobs: [len(group.seqs), V] log_softmax of the logits, then the logits processors (the
    order transformers uses in beam search). Updates ``group.seqs`` (the running beams, best
    first) and, when the search ends, empties it and fills ``group.finished`` (best first).
    """
    p = group.params
    n = p.num_beams
    stop = set(p.stop_token_ids)
    if group.beam is None:
        group.beam = BeamState.start(n, len(p.stop_token_ids))
    st: BeamState = group.beam
    seqs = group.seqs
    if len(seqs) == 1 < n:  # first step: the prompt stands for N identical copies
        parents = seqs * n
        logprobs = logprobs.expand(n, -1)
    else:
        parents = seqs
    vocab = logprobs.shape[1]
    prompt_len = seqs[0].num_prompt
    cur_len = len(seqs[0].tokens)  # every running beam has the same length
    max_len = prompt_len + group.max_new_tokens

    # 1. top K candidates over (beam x vocab)
    acc = logprobs + st.running_scores.to(logprobs.device)[:, None]  # [N, V]
    top_scores, top_idx = torch.topk(acc.reshape(1, -1), st.beams_to_keep)
    top_scores, top_idx = top_scores[0].cpu(), top_idx[0].cpu()  # [K]
    cand_beam = (top_idx // vocab).tolist()
    cand_tok = (top_idx % vocab).tolist()
    at_limit = cur_len + 1 >= max_len
    hits = torch.tensor([at_limit or t in stop for t in cand_tok])  # [K] bool
    tok_logprob = None
    if p.logprobs:
        tok_logprob = logprobs.reshape(-1)[top_idx.to(logprobs.device)].tolist()

    # 2. running beams for the next step: the N best candidates that did not hit
    masked = top_scores + hits.to(torch.float32) * NEG_LARGE
    next_idx = torch.topk(masked, k=n)[1]
    next_scores = masked[next_idx]

    # 3. finished hypotheses: hits among the top N, merged with the slots, N best kept
    top_n = torch.arange(st.beams_to_keep) < n
    did_finish = hits & top_n
    cand = top_scores / ((cur_len + 1 - prompt_len) ** p.length_penalty)
    full = bool(st.slot_finished.all()) and p.early_stopping is True
    cand += float(full) * NEG_LARGE
    cand += float(not st.improvable) * NEG_LARGE
    cand += (~did_finish) * NEG_LARGE
    merged = torch.cat((st.slot_scores, cand))
    keep = torch.topk(merged, k=n)[1].tolist()
    merged_finished = torch.cat((st.slot_finished, did_finish))
    slots = []
    for j in keep:
        if j < n:
            slots.append(st.slots[j])
        elif did_finish[j - n]:
            c = j - n
            slots.append(
                _hypothesis(
                    parents[cand_beam[c]],
                    cand_tok[c],
                    stop,
                    float(merged[j]),
                    tok_logprob[c] if tok_logprob else None,
                    p.logprobs,
                )
            )
        else:
            slots.append(None)
    st.slots = slots
    st.slot_scores = merged[keep]
    st.slot_finished = merged_finished[keep]

    # 4. stop rule (transformers' _check_early_stop_heuristic / _beam_search_has_unfinished_sequences)
    if p.early_stopping == "never" and p.length_penalty > 0.0:
        best_len = max_len - prompt_len
    else:
        best_len = cur_len + 1 - prompt_len
    best_possible = next_scores[:1] / (best_len**p.length_penalty)
    worst_finished = torch.where(st.slot_finished, torch.min(st.slot_scores), NEG_LARGE)
    st.improvable = st.improvable and bool(torch.any(best_possible > worst_finished))
    open_slot = not (bool(st.slot_finished.all()) and p.early_stopping is True)
    if not (st.improvable and open_slot and not bool(hits.all())):
        for s in seqs:
            blocks.free(s.block_table)
            s.block_table = []
        group.seqs = []
        group.finished = [
            h for h, done in zip(st.slots, st.slot_finished.tolist(), strict=True) if done and h is not None
        ]
        return

    # 5. the new running beams: reuse each parent once, fork it (sharing blocks) for more children
    chosen = next_idx.tolist()
    new_seqs: list[Sequence] = []
    reused: set[int] = set()
    for c in chosen:
        parent = parents[cand_beam[c]]
        if id(parent) in reused:
            child = parent.fork()
            child.block_table = blocks.share(parent.block_table)
        else:
            reused.add(id(parent))
            child = parent
        new_seqs.append(child)
    for s in seqs:
        if id(s) not in reused:
            blocks.free(s.block_table)
            s.block_table = []
    for child, c in zip(new_seqs, chosen, strict=True):  # after every fork copied its parent's tokens
        child.tokens.append(cand_tok[c])
        if tok_logprob is not None:
            child.logprobs.append(tok_logprob[c])
    st.running_scores = next_scores
    for s, score in zip(new_seqs, next_scores.tolist(), strict=True):
        s.cum_logprob = score
    group.seqs = new_seqs


def _hypothesis(
    parent: Sequence, token: int, stop: set[int], score: float, logprob: float | None, want_logprobs: bool
) -> Completion:
    """A finished beam: its generated tokens (the stop token excluded) and length-penalised score."""
    if token in stop:
        return Completion(parent.generated, list(parent.logprobs) if want_logprobs else None, score, "stop")
    lps = parent.logprobs + [logprob] if want_logprobs else None
    return Completion(parent.generated + [token], lps, score, "length")
