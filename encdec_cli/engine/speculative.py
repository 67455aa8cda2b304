"""Speculative decoding inside continuous batching (``EngineConfig.speculative``, ``--speculative``).

Each step a drafter proposes up to K tokens for every running sequence, and one model run verifies
them all: a sequence's uncached token and its drafts are its queries (K + 1 in a decode step),
through the same multi-query paged attention as prompts, so the step reads each request's cross
cache once for up to K + 1 tokens. Sequences without a draft ride in the same run with their one
token. The logits of each sequence's last len(draft) + 1 inputs decide:

- greedy rows take the drafts up to the first that differs from the argmax, then the argmax there:
  exactly the tokens plain greedy decoding gives (every logits rule sees the draft prefix of its
  row, ``Extended``);
- sampled rows use speculative sampling (Leviathan et al. 2023; Chen et al. 2023): draft token d
  is accepted with probability min(1, p(d) / q(d)) (q: the draft's distribution; a point mass for
  drafts chosen outright), a rejected one is replaced by a sample of max(0, p - q) normalised, and
  when all are accepted one more token comes from p. The output distribution is p's.

Rejected drafts' cache slots are given back (``BlockManager.truncate``). Beam search is refused
(the engine turns such a request into an error Result; the CLI refuses the options together).

Drafters:
- ``NgramDrafter`` (prompt lookup): the continuation of the latest earlier occurrence of the
  sequence's last n tokens (n = 3, 2, 1) in the encoder input's token ids (where encoder and
  decoder share a vocabulary: BART, T5, Marian), the prompt and the tokens generated so far.
- ``ModelDrafter``: a smaller model with the same tokenizer, run K steps ahead in its own KV pool;
  where its encoder weights equal the target's (distil-whisper), it takes the target's encoder
  output instead of running its own encoder.
- ``OracleDrafter`` (measuring only): the target's own greedy continuation, recorded in an earlier
  run, each token replaced by a wrong one with probability 1 - alpha.
"""

from __future__ import annotations

import weakref
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from encdec_cli.engine.block_manager import BlockManager, OutOfBlocks
from encdec_cli.engine.config import DEFAULT_K, EngineConfig
from encdec_cli.engine.sampling import (
    FEW_ROWS,
    process_logits,
    rows_by_params,
    sampling_generator,
    sampling_probs,
)
from encdec_cli.engine.sequence import Sequence, SequenceGroup, packed_rows
from encdec_cli.engine.transfer import to_device


@dataclass
class Draft:
    """Draft tokens for one sequence. ``probs`` [len(tokens), V]: the distribution each token was
    sampled from (a draft model sampling); None: the tokens were chosen outright (q = 1 for them)."""

    tokens: list[int]
    probs: torch.Tensor | None = None


class Drafter:
    """Proposes draft tokens. ``propose`` gets the step's sequences and, per sequence, the most
    draft tokens it may take (``room``; 0: none); it returns a Draft or None per sequence."""

    k: int = DEFAULT_K
    name: str = "drafter"

    def propose(self, seqs: list[Sequence], room: list[int]) -> list[Draft | None]:
        raise NotImplementedError

    def on_encode(self, groups: list[SequenceGroup], hidden: torch.Tensor | None) -> None:
        """The target just ran its encoder for ``groups`` (packed output ``hidden``), or (``hidden``
        None) admitted them on a cached encoder run (prefix cache: no encoder output this step)."""

    def forget(self, group: SequenceGroup) -> None:
        """The group finished or was preempted: drop what is kept for it."""

    #: Whether ``propose_ahead`` works: the drafts depend only on how many tokens the sequence
    #: will have generated, not on which (the engine may then verify ahead, ``Engine._verify_ahead``).
    drafts_ahead = False

    def propose_ahead(self, seqs: list[Sequence], after: list[int], k: list[int]) -> np.ndarray | None:
        """Drafts for a step launched before the step in flight reaches the host, for every outcome
        of that step: row b's drafts, if the step in flight takes m of its ``after[b]`` drafts and
        one token of its own, are row b's values [m, m + k[b]); shape [len(seqs), max(after) +
        max(k)]. None: no drafts (only with ``drafts_ahead``)."""
        return None


# ---- prompt lookup -------------------------------------------------------------------------------


class _Lookup:
    """One request's n-gram indexes: n-gram -> where its continuation starts, for the encoder
    input's ids (first occurrence) and the decoder tokens (latest occurrence, extended as they grow)."""

    __slots__ = ("encoder", "decoder", "done")

    def __init__(self, encoder_ids: list[int] | None, sizes: range):
        self.encoder: dict[tuple[int, ...], int] = {}
        if encoder_ids:
            for c in range(len(encoder_ids) - 1, 0, -1):  # backwards: the first occurrence wins
                for n in sizes:
                    if c >= n:
                        self.encoder[tuple(encoder_ids[c - n : c])] = c
        self.decoder: dict[tuple[int, ...], int] = {}
        self.done = 0  # continuation starts indexed so far in the decoder tokens


class NgramDrafter(Drafter):
    """Prompt lookup: the continuation of the longest (n <= ``max_n``) latest earlier occurrence of
    the sequence's last n tokens, in the encoder input (``encoder_ids``: where it shares the decoder's
    vocabulary) and in the decoder's own tokens (prompt and generated)."""

    name = "ngram"

    def __init__(self, k: int = DEFAULT_K, encoder_ids: bool = True, max_n: int = 3, min_n: int = 1):
        self.k, self.encoder_ids = k, encoder_ids
        self.sizes = range(max_n, min_n - 1, -1)
        self._state: weakref.WeakKeyDictionary[SequenceGroup, _Lookup] = weakref.WeakKeyDictionary()

    def _lookup(self, group: SequenceGroup) -> _Lookup:
        state = self._state.get(group)
        if state is None:
            ids = group.request.encoder_input
            usable = self.encoder_ids and isinstance(ids, (list, tuple))
            usable = usable and all(isinstance(t, int) for t in ids)
            state = self._state[group] = _Lookup(list(ids) if usable else None, self.sizes)
        return state

    def propose(self, seqs: list[Sequence], room: list[int]) -> list[Draft | None]:
        out: list[Draft | None] = []
        for s, r in zip(seqs, room):
            k = min(self.k, r)
            out.append(self._draft(s, k) if k > 0 else None)
        return out

    def _draft(self, s: Sequence, k: int) -> Draft | None:
        st, tokens = self._lookup(s.group), s.tokens
        end = len(tokens)
        dec = st.decoder
        for c in range(max(st.done, 1), end):  # n-grams ending before c, continued by tokens[c]
            for n in self.sizes:
                if c >= n:
                    dec[tuple(tokens[c - n : c])] = c  # later occurrences overwrite: the latest wins
        st.done = end
        enc_ids = s.group.request.encoder_input
        for n in self.sizes:
            if end < n:
                continue
            key = tuple(tokens[end - n :])
            c = st.encoder.get(key)
            if c is not None:
                return Draft(list(enc_ids[c : c + k]))
            c = dec.get(key)
            if c is not None:
                return Draft(tokens[c : c + k])
        return None


# ---- oracle (measuring the engine) --------------------------------------------------------------


class OracleDrafter(Drafter):
    """For measuring the engine only (``encdec bench --speculative oracle``), synthetic: proposes the
    target's own greedy continuation of each request (``continuations``: request_id -> the token ids
    an earlier run generated), each draft token replaced by a wrong one with probability
    1 - ``alpha``, seeded per request (the same drafts whatever the batch). A sequence that left the
    recorded path (reduced-precision numerics in another batch composition) gets no draft."""

    name = "oracle"

    def __init__(self, continuations: dict, alpha: float, k: int, vocab_size: int, seed: int = 0):
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.continuations, self.alpha, self.k = continuations, alpha, k
        self.vocab_size, self.seed = vocab_size, seed
        self._drafts: dict = {}  # request_id -> the recorded tokens with the wrong ones in place
        self.off_track = 0  # proposals skipped: the sequence left the recorded continuation

    def _noisy(self, rid) -> list[int] | None:
        out = self._drafts.get(rid)
        if out is None:
            cont = self.continuations.get(rid)
            if cont is None:
                return None
            rng = np.random.default_rng([self.seed, zlib.crc32(repr(rid).encode())])
            wrong = rng.random(len(cont)) >= self.alpha
            shift = rng.integers(1, self.vocab_size, len(cont))  # never 0: a different token
            arr = np.asarray(cont, np.int64)
            out = self._drafts[rid] = np.where(wrong, (arr + shift) % self.vocab_size, arr).tolist()
        return out

    def propose(self, seqs: list[Sequence], room: list[int]) -> list[Draft | None]:
        out: list[Draft | None] = []
        for s, r in zip(seqs, room):
            rid = s.group.request.request_id
            noisy, cont = self._noisy(rid), self.continuations.get(rid)
            g = s.num_generated
            k = min(self.k, r, len(cont) - g) if cont is not None else 0
            if k < 1:
                out.append(None)
            elif g and s.tokens[-1] != cont[g - 1]:
                self.off_track += 1
                out.append(None)
            else:
                out.append(Draft(noisy[g : g + k]))
        return out

    drafts_ahead = True

    def propose_ahead(self, seqs: list[Sequence], after: list[int], k: list[int]) -> np.ndarray | None:
        # the step in flight takes m drafts and a token: the next drafts start at generated + m + 1.
        # Unlike propose, a sequence off the recorded path still gets them (all rejected, the same
        # output): which token the step in flight chose is not on the host yet
        width = max(after, default=0) + max(k, default=0)
        out = np.zeros((len(seqs), max(width, 1)), np.int64)
        for b, s in enumerate(seqs):
            noisy = self._noisy(s.group.request.request_id)
            if noisy is not None:
                g = s.num_generated + 1
                row = noisy[g : g + width]
                out[b, : len(row)] = row
        return out


# ---- a draft model -------------------------------------------------------------------------------


def same_encoder(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models' encoders have equal weights (then one encoder output serves both)."""

    def enc(m):
        return {n: p for n, p in m.named_parameters() if n.startswith("encoder.") or n == "shared.weight"}

    ea, eb = enc(a), enc(b)
    if not ea or ea.keys() != eb.keys():
        return False
    return all(ea[n].shape == eb[n].shape and torch.equal(ea[n], eb[n].to(ea[n].device)) for n in ea)


def check_same_tokenizer(target, draft) -> None:
    """ValueError unless the draft's tokenizer (or, without one, its vocabulary size) is the target's."""
    ta, tb = target.tokenizer, draft.tokenizer
    if ta is not None and tb is not None:
        if ta.get_vocab() != tb.get_vocab():
            raise ValueError(
                f"the draft model {draft.path} has another tokenizer than the target; speculative "
                "decoding needs a draft with the same tokenizer"
            )
    elif draft.model.vocab_size != target.model.vocab_size:
        raise ValueError(
            f"the draft model {draft.path} has a vocabulary of {draft.model.vocab_size} tokens, the "
            f"target {target.model.vocab_size}; speculative decoding needs the same tokenizer"
        )


class _Shadow:
    """The draft model's copy of one request: a SequenceGroup of its own (cross blocks in the draft's
    pool) whose one sequence follows the target's tokens, plus how many of them were synced."""

    __slots__ = ("group", "seq", "synced")

    def __init__(self, group: SequenceGroup):
        self.group = group
        self.seq = group.seqs[0]
        self.seq.tokens = []
        self.synced = 0  # leading tokens known equal to the target's


class ModelDrafter(Drafter):
    """A smaller model with the target's tokenizer, in its own runner and KV pool (as many blocks as
    the target's, or what fits). Each step it catches up with the target's tokens (keeping the cache
    of the drafts that were accepted) and runs up to K single-token steps. When its pool or its
    length limits cannot hold a request, that request simply gets no drafts."""

    name = "model"

    def __init__(self, draft, target, k: int, config: EngineConfig, num_blocks: int):
        from encdec_cli.engine.runner import ModelRunner, cache_dtype

        check_same_tokenizer(target, draft)
        self.k, self.draft = k, draft
        self.model = draft.model
        self.shares_encoder = same_encoder(target.model, draft.model)
        self.target_vocab = target.model.vocab_size
        dev = next(self.model.parameters()).device
        if dev.type == "cuda":  # the target's pool took its share: what is left, at most as many blocks
            dtype = cache_dtype(config.kv_dtype, next(self.model.parameters()).dtype)
            per_block = ModelRunner.bytes_per_block(self.model, config.block_size, dtype)
            num_blocks = max(16, min(num_blocks, int(torch.cuda.mem_get_info(dev)[0] * 0.5 // per_block)))
        cfg = EngineConfig(
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_source_len=config.max_source_len,
            max_target_len=config.max_target_len,
            num_blocks=num_blocks,
            absorb_cross=False,
            enforce_eager=config.enforce_eager,
            kv_dtype=config.kv_dtype,
        )
        self.runner = ModelRunner(self.model, cfg)
        self.blocks = BlockManager(num_blocks, config.block_size, self.runner.cross_block_rows)
        if dev.type == "cuda" and not config.enforce_eager:
            from encdec_cli.engine.cuda_graphs import CudaGraphs

            graphs = CudaGraphs(self.runner, config.max_num_seqs, ahead=False)  # (never launched ahead)
            graphs.capture(self.model)
            self.runner.graphs = graphs
        self._state: dict[SequenceGroup, _Shadow] = {}

    def forget(self, group: SequenceGroup) -> None:
        sh = self._state.pop(group, None)
        if sh is not None:
            self.blocks.free(sh.seq.block_table)
            self.blocks.free(sh.group.cross_blocks)
            sh.seq.block_table, sh.group.cross_blocks = [], []

    def on_encode(self, groups: list[SequenceGroup], hidden: torch.Tensor | None) -> None:
        if hidden is None and self.shares_encoder:  # nothing to write the draft's cross cache from:
            for g in groups:  # no drafts for these requests (their own encoder would be the target's)
                self.forget(g)
            return
        taken: list[_Shadow | None] = []
        for g in groups:
            self.forget(g)  # re-admitted after a preemption: start again
            need = self.blocks.cross_blocks_for(g.encoder_len)
            if g.encoder_len > self.runner.max_source_len or need > self.blocks.num_free:
                taken.append(None)
                continue
            shadow = SequenceGroup(g.request, g.encoder_len, g.max_new_tokens, g.order)
            shadow.cross_blocks = self.blocks.allocate(need)
            if g.params.temperature > 0:  # its own random stream, independent of the target's
                gen = shadow.generator = torch.Generator(device=self.runner.device)
                seed = g.params.seed
                if seed is None:
                    gen.seed()
                else:
                    gen.manual_seed((seed * 1_000_003 + 12_345) % 2**63)
            sh = self._state[g] = _Shadow(shadow)
            taken.append(sh)
        mine = [sh.group for sh in taken if sh is not None]
        if not mine:
            return
        if not self.shares_encoder:
            self.runner.encode(mine)
            return
        slots = np.concatenate(
            [
                self.runner._cross_positions(sh.group, 0, g.encoder_len)
                if sh is not None
                else np.full(g.encoder_len, -1, np.int64)
                for g, sh in zip(groups, taken)
            ]
        )
        self.model.write_cross_kv(hidden, to_device(hidden.device, slots))
        for g in mine:
            g.encoded = True

    def _sync(self, s: Sequence, sh: _Shadow, k: int) -> int:
        """Bring the draft sequence to the target's tokens; room for ``k`` drafts -> drafts it may
        make (0 when its pool or length limit says no)."""
        ds, tokens = sh.seq, s.tokens
        same = sh.synced  # the draft's tokens agree with the target's up to the last sync ...
        n = min(len(ds.tokens), len(tokens))
        while same < n and ds.tokens[same] == tokens[same]:  # ... and then up to the first rejection
            same += 1
        ds.num_cached = min(ds.num_cached, same, len(tokens) - 1)  # the last token is always an input
        del ds.tokens[same:]
        ds.tokens += tokens[same:]
        sh.synced = len(tokens)
        self.blocks.truncate(ds.block_table, len(ds.tokens))  # the rejected drafts' slots
        k = min(k, self.runner.max_target_len - len(tokens) + 1)
        if k < 1:
            return 0
        try:
            copies = self.blocks.prepare_write(ds.block_table, ds.num_cached, len(tokens) + k - 1)
        except OutOfBlocks:
            return 0
        self.runner.copy_blocks(copies)
        return k

    def propose(self, seqs: list[Sequence], room: list[int]) -> list[Draft | None]:
        out: list[Draft | None] = [None] * len(seqs)
        todo: list[tuple[int, _Shadow, int]] = []  # (row, shadow, drafts wanted)
        for i, (s, r) in enumerate(zip(seqs, room)):
            sh = self._state.get(s.group)
            if sh is not None and r > 0:
                k = self._sync(s, sh, min(self.k, r))
                if k:
                    todo.append((i, sh, k))
        drafts = {i: Draft([], None) for i, _, _ in todo}
        probs: dict[int, list[torch.Tensor]] = {i: [] for i, _, _ in todo}
        for step in range(max((k for _, _, k in todo), default=0)):
            live = [(i, sh) for i, sh, k in todo if step < k]
            dseqs = [sh.seq for _, sh in live]
            logits = self.runner.decode(dseqs)
            if logits.shape[1] > self.target_vocab:  # never propose what the target cannot say
                logits[:, self.target_vocab :] = float("-inf")
            process_logits(logits, dseqs)
            greedy = logits.argmax(-1).tolist()
            for j, (i, sh) in enumerate(live):
                p = sh.group.params
                t = greedy[j]
                if p.temperature > 0:
                    q = sampling_probs(logits[j : j + 1], p)[0]
                    t = int(torch.multinomial(q, 1, generator=sampling_generator(sh.group, q.device)))
                    probs[i].append(q)
                sh.seq.tokens.append(t)
                drafts[i].tokens.append(t)
        for i, _, _ in todo:
            if probs[i]:
                drafts[i].probs = torch.stack(probs[i])
            out[i] = drafts[i]
        return out


# ---- verification ----------------------------------------------------------------------------------


class Extended:
    """A sequence seen with some draft tokens after its own: what the logits rules of the
    verification row after those drafts read (token counts, n-grams, timestamps). Plain
    attributes: the rules read them for every row of every step."""

    __slots__ = ("seq", "extra", "group", "num_prompt", "num_generated", "_tokens", "ngrams", "stop_logprob")

    def __init__(self, seq: Sequence, extra: list[int]):
        self.seq, self.extra, self.group, self.num_prompt = seq, extra, seq.group, seq.num_prompt
        self.num_generated = len(seq.tokens) + len(extra) - seq.num_prompt
        self._tokens: list[int] | None = None
        self.ngrams = None
        self.stop_logprob = None

    @property
    def tokens(self) -> list[int]:
        if self._tokens is None:
            self._tokens = self.seq.tokens + self.extra
        return self._tokens


@dataclass
class Verified:
    """One sequence's outcome of a verification step."""

    tokens: list[int]  # accepted drafts, then one token of the target's own
    logprobs: list[float] | None
    accepted: int  # draft tokens accepted


@dataclass
class PendingVerify:
    """A verification step's acceptance launched on the device (``Speculator.verify_launch``), not
    yet on the host: ``Speculator.verify_finish`` waits for its copy (its event only) and
    completes it."""

    seqs: list[Sequence]
    drafts: list[Draft | None]
    clock: int  # the speculator's clock at the step (adaptive K's back-off counts from it)
    host: torch.Tensor  # what the host reads, on its way (CPU tensor; pinned on CUDA)
    done: object  # a CUDA event after the copy, or None (on the CPU: nothing to wait for)
    layout: tuple | None  # verify_finish's row bookkeeping; None: the few-row path
    # the argmax of every row on the device (greedy rows), and the drafts there when they were made
    # there ([B, kmax], -1 past each row's: a step launched ahead): what the next step launched
    # ahead is built from (``Engine._verify_ahead``)
    best: torch.Tensor | None = None
    device_drafts: torch.Tensor | None = None


@dataclass
class AheadVerify:
    """A verification step launched before the previous step's outcome reached the host
    (``Engine._verify_ahead``): its sequences, the logits of all their inputs (packed: each
    sequence's chosen token and its ``ks[b]`` drafts), the drafts themselves on the device
    ([B, max(ks)], -1 past each row's), and per sequence the cache positions [0, reserve) whose
    blocks must stay until this step is taken (it may write up to there)."""

    seqs: list[Sequence]
    logits: torch.Tensor
    ks: np.ndarray
    drafts: torch.Tensor
    reserve: dict[Sequence, int]


def _toward_host(x: torch.Tensor) -> tuple[torch.Tensor, object]:
    """x on the host: on CUDA a non-blocking copy into fresh pinned memory and an event behind it
    (read the copy once the event completes); on the CPU x itself."""
    if x.device.type != "cuda":
        return x, None
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _fit_vocab(q: torch.Tensor, vocab: int) -> torch.Tensor:
    if q.shape[1] == vocab:
        return q
    if q.shape[1] > vocab:
        return q[:, :vocab]
    return torch.nn.functional.pad(q, (0, vocab - q.shape[1]))


def speculative_accept(
    probs: torch.Tensor,
    starts: torch.Tensor,
    lens: torch.Tensor,
    drafts: torch.Tensor,
    draft_probs: torch.Tensor | None,
    u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling for many sequences at once, on the device (no host sync).

    ``probs`` [T, V]: the target's distributions, packed: sequence b's after each of its draft
    prefixes at rows starts[b] .. starts[b] + lens[b]; ``drafts`` [B, kmax] long (-1 past lens[b]);
    ``draft_probs`` [B, kmax, V]: the distribution each draft token was sampled from (None: every
    draft was chosen outright, q a point mass); ``u`` [B, kmax + 1] uniforms in [0, 1).
    Returns (accepted drafts [B], the token after them [B]): draft d_j is accepted while
    u_j * q(d_j) < p(d_j); at the first rejection m the token is a sample of max(0, p_m - q_m)
    (normalised; p_m where that is zero), after all drafts a sample of p; sampled by inverting the
    cumulative distribution at u[:, kmax]."""
    n, kmax = drafts.shape
    vocab, dev = probs.shape[1], probs.device
    j = torch.arange(kmax, device=dev)
    in_draft = j[None, :] < lens[:, None]  # [B, kmax]
    valid = in_draft & (drafts >= 0) & (drafts < vocab)  # a token the target cannot say: rejected
    tok = drafts.clamp(0, vocab - 1)
    pos = (starts[:, None] + j).clamp_(max=probs.shape[0] - 1)
    p_d = probs[pos, tok] * valid
    q_d = draft_probs.gather(2, tok[..., None])[..., 0] if draft_probs is not None else 1.0
    accept = (u[:, :kmax] * q_d < p_d) & in_draft
    m = accept.long().cumprod(1).sum(1) if kmax else torch.zeros(n, dtype=torch.long, device=dev)
    rows = torch.arange(n, device=dev)
    p_m = probs[starts + m]  # [B, V]
    if kmax:
        rejected = m < lens
        mc = m.clamp(max=kmax - 1)
        if draft_probs is not None:
            q_m = draft_probs[rows, mc]
        else:
            q_m = torch.zeros_like(p_m)
            q_m[rows, tok[rows, mc]] = valid[rows, mc].to(p_m.dtype)
        resid = (p_m - q_m * rejected[:, None]).clamp_min_(0)
        last = torch.where(resid.sum(1, keepdim=True) > 0, resid, p_m)
    else:
        last = p_m
    cdf = last.cumsum(1)
    x = u[:, kmax : kmax + 1] * cdf[:, -1:]
    token = torch.searchsorted(cdf, x, right=True)[:, 0].clamp_(max=vocab - 1)
    return m, token


def speculative_sample(
    probs: torch.Tensor, draft: Draft | None, generator: torch.Generator
) -> tuple[list[int], int]:
    """Speculative sampling for one sequence (``speculative_accept`` of one row). ``probs``
    [k + 1, V]: the target's distribution after each draft prefix; returns (tokens, drafts
    accepted): the accepted drafts, then a sample of the residual max(0, p - q) at the first
    rejection or of p after the last draft."""
    k = len(draft.tokens) if draft is not None else 0
    dev, vocab = probs.device, probs.shape[1]
    dp = None
    if k and draft.probs is not None:
        dp = _fit_vocab(draft.probs.to(dev, torch.float32), vocab)[None]
    table = to_device(dev, [draft.tokens if k else []]).reshape(1, k)
    u = torch.rand(1, k + 1, generator=generator, device=dev)
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    m, token = speculative_accept(probs, zero, zero + k, table, dp, u)
    m = int(m[0])
    return (draft.tokens[:m] if k else []) + [int(token[0])], m


class _Adapt:
    """One sequence's drafting state (adaptive K): the drafts it may take now, and, while that is 0,
    the step on which it tries one draft again and how long it waited last."""

    __slots__ = ("k", "next_try", "backoff", "misses", "steps", "hits")

    def __init__(self, k: int):
        self.k, self.next_try, self.backoff, self.misses = k, 0, 0, 0
        self.steps = self.hits = 0  # its verified steps with drafts; those whose first draft was accepted

    @property
    def misses_to_halve(self) -> int:
        """Steps in a row with every draft rejected that halve K. Every draft rejected means the
        first one was, which good drafts also do now and then: at a draft acceptance of 0.7, on 30%
        of steps, so two such steps in a row (9% of steps) halved K on drafts worth their cost.
        Where the sequence's steps before this run of misses had their first draft accepted at least
        GOOD of the time it takes MISSES_GOOD (2.7% by chance at 0.7): oracle drafts at alpha 0.7,
        K 4 then give 2.69 tokens a step against 2.64, at 0.5 1.83 against 1.80 (Whisper, 128
        tokens, 16 seeds: benchmarks/README.md, twenty-fourth session). Drafts never yet right
        halve K after MISSES, as before (alpha 0: the same steps). The record is the sequence's
        own, not the engine's: its drafts are the same however the engine's steps group sequences."""
        before = self.steps - self.misses
        return MISSES_GOOD if before and self.hits >= GOOD * before else MISSES


# steps a sequence whose drafts keep failing waits before trying one draft again: doubling from the
# first to the last (a rejected retry waits longer; an accepted draft ends the back-off)
BACKOFF_FIRST, BACKOFF_MOST = 4, 32
# steps in a row with every draft rejected that halve K (one rejected retry ends a try): MISSES, or
# MISSES_GOOD where the sequence's first drafts were accepted at least GOOD of the time before
# (``_Adapt.misses_to_halve``)
MISSES, MISSES_GOOD, GOOD = 2, 3, 0.5
# a new sequence starts backed off (BACKOFF_MOST) while the engine's recent drafts were almost all
# rejected: the share accepted, averaged over the last ~RECENT verified sequence-steps with drafts,
# below COLD, after at least RECENT of them
RECENT, COLD = 64, 0.05


class Speculator:
    """The engine's side of speculation: asks the drafter, makes room for the drafts in the target's
    pool, verifies, and gives rejected drafts' slots back.

    Adaptive drafting (``adaptive``): each sequence starts at K drafts a step; ``MISSES`` steps
    in a row whose drafts were all rejected (``MISSES_GOOD`` where the sequence's first drafts
    were mostly accepted before: ``_Adapt.misses_to_halve``) halve its K (down to none: it then
    decodes as in a plain step, and after about ``BACKOFF_FIRST`` steps tries one draft, waiting twice as long
    after each failed try, at most ``BACKOFF_MOST``); a step with an accepted draft doubles it
    again (at most K). Tries fall on the steps that are multiples of the wait (``clock``: the
    engine's steps), so sequences backing off alike try on the same steps and the steps between
    have no drafts at all: plain steps, which the engine may run ahead (``drafts_next_step``).
    Where drafts are rarely right, a step costs about what a plain one does; the output is the
    same either way (verification decides every token).

    A new sequence starts at K, unless the engine's recent drafts were almost all rejected
    (``cold``): then it starts backed off at the longest wait, trying on the steps the others try
    on. Otherwise, with requests admitted a few at a time (W1: 512 windows, their encoder runs
    spread over dozens of steps), each newcomer's first K-draft steps made nearly every step a
    verification step: 115 of W1's 252 at alpha 0 on an H100 (0.69x)."""

    def __init__(self, drafter: Drafter, blocks: BlockManager, adaptive: bool = True):
        self.blocks, self.adaptive = blocks, adaptive
        self.clock = 0  # the engine's steps so far (``tick``)
        self._cohort_clock = [0, 0]  # the clock at each micro-batch cohort's last step
        self.set_drafter(drafter)

    def set_drafter(self, drafter: Drafter) -> None:
        """Draft with ``drafter`` from now on (the engine idle), forgetting what adaptive drafting
        learnt of the last one's drafts (a new drafter starts as the first did: not ``cold``)."""
        self.drafter = drafter
        self._adapt: weakref.WeakKeyDictionary[Sequence, _Adapt] = weakref.WeakKeyDictionary()
        self.recent, self._verified = 1.0, 0  # share of drafts accepted lately; sequence-steps counted

    @property
    def k(self) -> int:
        return self.drafter.k

    def tick(self, cohort: int | None = None) -> None:
        """The engine starts a step: a whole step, or (``cohort``) a step of one of two micro-batch
        cohorts. The clock counts each sequence's own steps: a cohort's step advances it only when
        that cohort already stepped at the current clock, so both cohorts' steps of one round share
        a clock value, as the sequences' one whole step would."""
        if cohort is None:
            self.clock += 1
            self._cohort_clock = [self.clock, self.clock]
            return
        if self._cohort_clock[cohort] == self.clock:
            self.clock += 1
        self._cohort_clock[cohort] = self.clock

    def _want(self, s: Sequence, clock: int | None = None) -> int:
        """Drafts the sequence may take this step (adaptive K; without it, K); ``clock``: at
        another step's clock (a step launched ahead: the next one's)."""
        k = self.drafter.k
        if not self.adaptive:
            return k
        clock = self.clock if clock is None else clock
        a = self._adapt.get(s)
        if a is None:
            a = self._adapt[s] = _Adapt(k)
            if self.cold:
                a.k = 0
                self._back_off(a, BACKOFF_MOST, clock)
        if a.k == 0:  # backing off: one draft on its try step (adapt sets k and the next try)
            return 1 if clock >= a.next_try else 0
        return min(a.k, k)

    def drafts_next_step(self, seqs: list[Sequence]) -> bool:
        """Whether any of ``seqs`` may take drafts in the engine's next step (False: that step is a
        plain one, and the engine may launch it before this step's tokens reach the host)."""
        if not self.adaptive:
            return True
        nxt, adapt = self.clock + 1, self._adapt
        for s in seqs:
            a = adapt.get(s)
            if a is None or a.k or a.next_try <= nxt:
                return True
        return False

    @property
    def cold(self) -> bool:
        """Whether the engine's recent drafts were almost all rejected (new sequences start backed off)."""
        return self._verified >= RECENT and self.recent < COLD

    def _back_off(self, a: _Adapt, wait: int, clock: int) -> None:
        """Try again on a multiple of ``wait``, between half a wait and one and a half after
        ``clock``."""
        a.backoff = wait
        a.next_try = ((clock + wait // 2) // wait + 1) * wait

    def adapt(self, s: Sequence, proposed: int, accepted: int, clock: int | None = None) -> None:
        """After verification: the sequence's K for the next steps (see the class docstring).
        ``clock``: the verified step's (``PendingVerify.clock``; default: now)."""
        if not self.adaptive or proposed == 0:
            return
        self._verified += 1
        self.recent += (accepted / proposed - self.recent) / min(self._verified, RECENT)
        a = self._adapt.get(s)
        if a is None:
            return
        a.steps += 1
        a.hits += accepted > 0
        clock = self.clock if clock is None else clock
        if accepted == 0:
            if a.k == 0:  # a failed try: wait twice as long
                self._back_off(a, min(BACKOFF_MOST, a.backoff * 2), clock)
                return
            a.misses += 1
            if a.misses < a.misses_to_halve:
                return
            a.misses, a.k = 0, a.k // 2
            if a.k == 0:
                self._back_off(a, BACKOFF_FIRST, clock)
        else:
            a.k, a.backoff, a.misses = min(self.drafter.k, max(1, a.k) * 2), 0, 0

    def propose(self, seqs: list[Sequence]) -> tuple[list[Draft | None], list[tuple[int, int]]]:
        """Drafts for the step's sequences with cache slots for them -> (drafts, block copies to
        run first). A sequence gets at most as many drafts as it may still generate tokens, less one
        (the target adds one of its own), its adaptive K allows, and none when the pool has no room
        for them. The drafter sees only the sequences that may take drafts."""
        drafts: list[Draft | None] = [None] * len(seqs)
        ask, room = [], []
        for i, s in enumerate(seqs):
            r = min(s.group.max_new_tokens - s.num_generated - 1, self._want(s))
            if r > 0:
                ask.append(i)
                room.append(r)
        if not ask:
            return drafts, []
        proposed = self.drafter.propose([seqs[i] for i in ask], room)
        copies: list[tuple[int, int]] = []
        bs = self.blocks.block_size
        for i, d in zip(ask, proposed):
            if d is None or not d.tokens:
                continue
            s = seqs[i]
            n = len(s.tokens)
            try:
                copies += self.blocks.prepare_write(s.block_table, n, n + len(d.tokens))
            except OutOfBlocks:  # only what the last block still holds (no preemption for drafts)
                fit = len(s.block_table) * bs - n
                if fit <= 0 or self.blocks.refs[s.block_table[-1]] > 1:
                    continue
                d.tokens = d.tokens[:fit]
                d.probs = d.probs[:fit] if d.probs is not None else None
            drafts[i] = d
        return drafts, copies

    def propose_ahead(
        self, seqs: list[Sequence], after: list[int], limit: int
    ) -> tuple[tuple | None, list[tuple[int, int]]]:
        """Drafts for a step launched before the step in flight (``after[b]``: its drafts for
        sequence b) reaches the host (``Engine._verify_ahead``), and cache room for that step:
        each sequence takes at most what its adaptive K allows at the next step's clock and what
        its length allows after the most the step in flight can give it (``limit``: the
        positions a sequence may have). Returns ((drafts a sequence [B], the drafter's candidates
        (``Drafter.propose_ahead``), per sequence the end of the positions the step may write),
        block copies to run first); the first is None when no sequence would take a draft, the
        drafter has none, or the pool lacks room (the engine then finishes the step
        in flight first; the copies still run). The drafter must draft ahead
        (``Drafter.drafts_ahead``: ``Engine._can_verify_ahead`` checks it)."""
        clock = self.clock + 1
        ks, ends = [], []
        for s, a in zip(seqs, after):
            n = len(s.tokens)
            room = min(s.group.max_new_tokens - s.num_generated - a - 2, limit - n - a - 1)
            ks.append(max(0, min(room, self._want(s, clock))))
            ends.append(min(n + a + ks[-1] + 1, limit))
        bs = self.blocks.block_size
        need = sum(max(0, -(-e // bs) - len(s.block_table)) for s, e in zip(seqs, ends))
        if not any(ks) or need > self.blocks.num_free:
            return None, []
        candidates = self.drafter.propose_ahead(seqs, after, ks)
        if candidates is None:
            return None, []
        copies: list[tuple[int, int]] = []
        for s, e in zip(seqs, ends):
            try:
                copies += self.blocks.prepare_write(s.block_table, len(s.tokens), e)
            except OutOfBlocks:  # copy-on-write took the last blocks
                return None, copies
        return (np.asarray(ks, np.int64), candidates, np.asarray(ends, np.int64)), copies

    def verify(
        self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[Draft | None]
    ) -> list[Verified]:
        """logits [sum(len(draft) + 1), V] float32 (``ModelRunner.decode(drafts=...)``) -> each
        sequence's tokens (see the module docstring): ``verify_launch`` and ``verify_finish`` back
        to back (a whole step; the engine's micro-batches run the other cohort's host part between
        them)."""
        return self.verify_finish(self.verify_launch(logits, seqs, drafts))

    def verify_launch(
        self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[Draft | None]
    ) -> PendingVerify:
        """The device half of verification, nothing read back: the logits rules over every row
        (``process_logits`` with each row's drafts seen; count-based rules vectorised; their host
        part reads only these sequences' tokens), the argmax of every row (greedy sequences) and
        speculative sampling (sampled sequences: ``speculative_accept``) on the device, and one
        non-blocking copy of those (and of log-probabilities when asked for) toward the host, an
        event behind it. Every read of ``logits`` is queued here (a CUDA graph's output buffer may
        be overwritten by a later replay). Changes no sequence.

        A few greedy sequences without log-probabilities (batch 1) take ``_verify_few``'s path:
        the same in Python lists."""
        n = len(seqs)
        if n * (self.drafter.k + 1) <= FEW_ROWS and not any(
            s.group.params.temperature > 0 or s.group.params.logprobs for s in seqs
        ):
            return self._launch_few(logits, seqs, drafts, self.clock)
        return self._launch_many(logits, seqs, drafts, self.clock)

    def verify_launch_ahead(self, ahead: AheadVerify) -> PendingVerify:
        """``verify_launch`` of a step launched ahead (``AheadVerify``: every sequence greedy
        with count-based rules, its drafts on the device): the rules over every row (each row's
        token count is known on the host now), the argmax, and one copy toward the host of the
        drafts and every row's argmax (acceptance: ``verify_finish``)."""
        seqs, ks, logits = ahead.seqs, ahead.ks, ahead.logits
        n = len(seqs)
        starts, owner, drafted = packed_rows(ks + 1)
        generated = np.fromiter((s.num_generated for s in seqs), np.int64, n)[owner] + drafted
        flat = [seqs[b] for b in owner.tolist()]
        process_logits(logits, flat, None, drafted, None, generated)
        best = logits.argmax(-1)
        host, done = _toward_host(torch.cat([ahead.drafts.flatten(), best]))
        layout = ("ahead", ks, starts, ahead.drafts.shape[1])
        return PendingVerify(seqs, [], self.clock, host, done, layout, best, ahead.drafts)

    def _launch_many(
        self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[Draft | None], clock: int
    ) -> PendingVerify:
        n = len(seqs)
        dev = logits.device
        lens = np.fromiter((len(d.tokens) if d is not None else 0 for d in drafts), np.int64, n)
        counts = lens + 1
        total = int(counts.sum())
        # each sequence's first verification row, each row's sequence, the drafts each row sees
        starts, owner, drafted = packed_rows(counts)
        flat = [seqs[b] for b in owner.tolist()]
        base = rows_by_params(seqs)
        if len(base) == 1:
            by_params = [(base[0][0], np.arange(total))]
        else:
            gid = np.empty(n, np.int64)
            for g, (_, rows) in enumerate(base):
                gid[rows] = g
            fg = gid[owner]
            by_params = [(p, np.flatnonzero(fg == g)) for g, (p, _) in enumerate(base)]

        def view(i: int) -> Extended:
            b = owner[i]
            return Extended(seqs[b], drafts[b].tokens[: drafted[i]])

        generated = np.repeat(
            np.fromiter((s.num_generated for s in seqs), np.int64, n), counts
        ) + drafted  # fmt: skip
        process_logits(logits, flat, by_params, drafted, view, generated)
        kmax = int(lens.max()) if n else 0
        table = np.full((n, kmax), -1, np.int64)  # drafts, -1 past each row's end
        for b, d in enumerate(drafts):
            if d is not None:
                table[b, : len(d.tokens)] = d.tokens
        want_lp = any(s.group.params.logprobs for s in seqs)
        sampled = [b for b, s in enumerate(seqs) if s.group.params.temperature > 0]
        parts: list[torch.Tensor] = []  # what the host needs, copied to it at once
        if len(sampled) < n:  # greedy rows: the argmax of every row (acceptance: verify_finish)
            g = logits.argmax(-1)
            parts.append(g)
            if want_lp:
                parts.append(torch.log_softmax(logits, -1).gather(1, g[:, None])[:, 0])
        if sampled:  # speculative sampling on the device
            st = to_device(dev, table[sampled])
            m, token = self._sample(logits, seqs, drafts, sampled, lens, starts, kmax, st)
            parts += [m, token]
            if want_lp:  # the log-probability of each token a sequence takes
                tok = torch.cat([st, st[:, :1]], 1).scatter_(1, m[:, None], token[:, None])
                at = to_device(dev, starts[sampled])[:, None] + torch.arange(kmax + 1, device=dev)
                lp = torch.log_softmax(logits, -1)
                parts.append(lp[at.clamp_(max=total - 1), tok.clamp(0, lp.shape[1] - 1)].flatten())
        if want_lp:
            parts = [x.double() for x in parts]
        host, done = _toward_host(torch.cat(parts))  # the step's one device-to-host copy
        return PendingVerify(
            seqs,
            drafts,
            clock,
            host,
            done,
            (lens, starts, total, kmax, table, sampled, want_lp),
            best=g if len(sampled) < n else None,
        )

    def verify_finish(self, pending: PendingVerify) -> list[Verified]:
        """The host half: waits for this step's copy only (its event), then greedy acceptance (the
        drafts up to the first that is not the argmax) in numpy over all rows, the sampled rows'
        outcome as read back, and a stop token's log-probability kept on its sequence."""
        if pending.layout is None:
            return self._finish_few(pending)
        if pending.done is not None:
            pending.done.synchronize()  # this step's copy only; later work keeps running
        if isinstance(pending.layout[0], str):  # ("ahead", ...)
            return self._finish_ahead(pending)
        seqs, drafts = pending.seqs, pending.drafts
        lens, starts, total, kmax, table, sampled, want_lp = pending.layout
        n = len(seqs)
        res = pending.host.numpy()
        accepted = np.zeros(n, np.int64)
        last = np.zeros(n, np.int64)
        lp_rows = None  # [n, kmax + 1] log-probabilities of the tokens each sequence takes
        at = 0
        if len(sampled) < n:
            g = res[:total].astype(np.int64)
            at = total
            if kmax:
                cols = np.minimum(starts[:, None] + np.arange(kmax), total - 1)
                agree = g[cols] == table  # -1 never equals a token
                m = np.where(agree.all(1), kmax, agree.argmin(1))  # drafts before the first miss
                accepted = np.minimum(m, lens)
            last = g[starts + accepted]
            if want_lp:
                glp = res[at : at + total]
                at += total
                lp_rows = glp[np.minimum(starts[:, None] + np.arange(kmax + 1), total - 1)]
        if sampled:
            r = len(sampled)
            accepted[sampled] = res[at : at + r].astype(np.int64)
            last[sampled] = res[at + r : at + 2 * r].astype(np.int64)
            if want_lp:
                if lp_rows is None:
                    lp_rows = np.zeros((n, kmax + 1))
                lp_rows[sampled] = res[at + 2 * r :].reshape(r, kmax + 1)
        accepted, last = accepted.tolist(), last.tolist()
        result = []
        for b, (s, d) in enumerate(zip(seqs, drafts)):
            m = accepted[b]
            tokens = (d.tokens[:m] if m else []) + [last[b]]
            lps = None
            p = s.group.params
            if p.logprobs:
                lps = lp_rows[b, : m + 1].tolist()
                for t, lp in zip(tokens, lps):
                    if t in p.stop_token_ids:
                        s.stop_logprob = lp
                        break
            result.append(Verified(tokens, lps, m))
        return result

    def _finish_ahead(self, pending: PendingVerify) -> list[Verified]:
        """``verify_finish`` of a step launched ahead: its drafts (made on the device) and every
        row's argmax as copied back, greedy acceptance as ``_finish_few``'s; ``pending.drafts``
        gets the drafts."""
        _, ks, starts, kmax = pending.layout
        n = len(pending.seqs)
        res = pending.host.numpy()
        table = res[: n * kmax].reshape(n, kmax).tolist()
        best = res[n * kmax :].tolist()
        result = []
        for b, (k, at) in enumerate(zip(ks.tolist(), starts.tolist())):
            tokens = table[b][:k]
            pending.drafts.append(Draft(tokens) if k else None)
            m = 0
            while m < k and best[at + m] == tokens[m]:
                m += 1
            result.append(Verified(tokens[:m] + [best[at + m]], None, m))
        return result

    def _verify_few(
        self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[Draft | None]
    ) -> list[Verified]:
        """``verify`` of a few greedy sequences without log-probabilities, in Python lists: the
        rules over every row (``process_logits``' few-row path where the rules count tokens),
        every row's argmax in one device-to-host copy, then each sequence takes its drafts up to
        the first that is not the argmax, and the argmax there."""
        return self._finish_few(self._launch_few(logits, seqs, drafts, self.clock))

    def _launch_few(
        self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[Draft | None], clock: int
    ) -> PendingVerify:
        toks = [d.tokens if d is not None else [] for d in drafts]
        flat: list[Sequence] = []  # each row's sequence, the drafts it sees, its tokens generated
        seen: list[list[int]] = []
        drafted: list[int] = []
        generated: list[int] = []
        for s, t in zip(seqs, toks):
            g, k = s.num_generated, len(t) + 1
            flat += [s] * k
            seen += [t] * k
            drafted += range(k)
            generated += range(g, g + k)

        def view(i: int) -> Extended:
            return Extended(flat[i], seen[i][: drafted[i]])

        process_logits(logits, flat, rows_by_params(flat), drafted, view, generated)
        best = logits.argmax(-1)
        host, done = _toward_host(best)  # the step's one device-to-host copy
        return PendingVerify(seqs, drafts, clock, host, done, None, best=best)

    def _finish_few(self, pending: PendingVerify) -> list[Verified]:
        if pending.done is not None:
            pending.done.synchronize()
        best = pending.host.tolist()
        result = []
        at = 0
        for d in pending.drafts:
            t = d.tokens if d is not None else []
            m, k = 0, len(t)
            while m < k and best[at + m] == t[m]:
                m += 1
            result.append(Verified(t[:m] + [best[at + m]], None, m))
            at += k + 1
        return result

    def _sample(self, logits, seqs, drafts, rows, lens, starts, kmax, table):
        """Speculative sampling of the sampled sequences ``rows`` (indexes into seqs): their
        distributions (per SamplingParams), the draft's, and their uniforms from each request's
        own generator -> (accepted [R], token [R]) on the device."""
        dev, vocab = logits.device, logits.shape[1]
        ln = lens[rows]
        counts = ln + 1
        local = np.zeros(len(rows), np.int64)
        np.cumsum(counts[:-1], out=local[1:])
        src = np.concatenate([np.arange(starts[b], starts[b] + c) for b, c in zip(rows, counts)])
        probs = torch.empty(int(counts.sum()), vocab, device=dev)
        groups: dict[int, tuple] = {}
        for r, b in enumerate(rows):
            p = seqs[b].group.params
            groups.setdefault(id(p), (p, []))[1].append(r)
        for p, rs in groups.values():
            sel = np.concatenate([np.arange(local[r], local[r] + counts[r]) for r in rs])
            dst = to_device(dev, sel)
            probs[dst] = sampling_probs(logits.index_select(0, to_device(dev, src[sel])), p)
        # each row's random draws do not depend on the step's other rows (so seeded sampling gives
        # the same tokens in any batch, whole steps or micro-batches): a row with drafts draws
        # len + 1 uniforms (u[:, :len] and u[:, kmax]); one without draws its token as a plain
        # step does (choose_tokens_on_device: multinomial)
        u = torch.zeros(len(rows), kmax + 1, device=dev)
        plain: list[tuple[int, torch.Tensor]] = []  # (row, its token) of rows without drafts
        draws, dest = [], []
        for r, b in enumerate(rows):
            gen = sampling_generator(seqs[b].group, dev)
            n = int(ln[r])
            if n == 0:
                plain.append((r, torch.multinomial(probs[int(local[r])], 1, generator=gen)))
                continue
            draws.append(torch.rand(n + 1, generator=gen, device=dev))
            dest.append(r * (kmax + 1) + np.append(np.arange(n), kmax))
        if draws:
            u.view(-1)[to_device(dev, np.concatenate(dest))] = torch.cat(draws)
        dprobs = None
        if any(drafts[b] is not None and drafts[b].probs is not None for b in rows):
            dprobs = torch.zeros(len(rows), kmax, vocab, device=dev)
            for r, b in enumerate(rows):
                d = drafts[b]
                if d is None or not d.tokens:
                    continue
                if d.probs is not None:
                    dprobs[r, : len(d.tokens)] = _fit_vocab(d.probs.to(dev, torch.float32), vocab)
                else:  # chosen outright: a point mass
                    t = to_device(dev, d.tokens).clamp_(max=vocab - 1)
                    dprobs[r, torch.arange(len(d.tokens), device=dev), t] = 1.0
        meta = to_device(dev, np.stack([local, ln]))
        m, token = speculative_accept(probs, meta[0], meta[1], table, dprobs, u)
        if plain:  # their m is 0 already
            token[to_device(dev, [r for r, _ in plain])] = torch.cat([t for _, t in plain])
        return m, token

    def settle(self, seq: Sequence, num_tokens_before: int, accepted: int, reserve: int = 0) -> None:
        """After a running sequence took its verified tokens: the cache holds its tokens up to the
        accepted drafts; the slots past its tokens go back to the pool, except those a step
        launched ahead may write (positions below ``reserve``)."""
        seq.num_cached = num_tokens_before + accepted
        self.blocks.truncate(seq.block_table, max(len(seq.tokens), reserve))
