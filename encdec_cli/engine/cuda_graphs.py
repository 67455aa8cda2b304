"""CUDA graphs for pure decode steps (one new token per sequence).

One graph per padded batch size (1, 2, 4, 8, then multiples of 8 up to max_num_seqs), captured at
start-up into one shared memory pool and replayed with static input buffers. Padding rows write
nowhere (slot -1) and attend to one key; their logits are dropped. The cross-attention length is
data (a per-sequence length tensor), never a graph key. Every graph writes its output into one
buffer of the largest graph's shape (its first rows): the lm head's product writes the logits
there itself (``out``), other outputs (a pipeline stage's (x, residual)) are copied in as the
graph's last kernel. One output tensor per
batch size would hold sum(b) rows of logits (16,647 at max_num_seqs 512: 8.5 GB of NLLB's bf16
logits, which the KV pool's sizing did not leave). A step's output is read (its device work queued)
before the next replay, of any size, rewrites it.

Speculative verification steps (engine/speculative.py) have graphs of their own (``queries`` =
K + 1): every sequence has K + 1 query rows, its real inputs (its token and its drafts) last and
padding rows first. A padding row writes nowhere; it sits before the real ones, so the causal rule
(the i-th of q queries sees keys up to seq_len - q + i) gives it fewer keys than the real rows, never
a key past the sequence's end, and the real rows see exactly their own keys. Padding rows' outputs
(possibly NaN: they may see no key at all) stay in their own rows and are never read.

Each step's graph is captured as up to SEGMENTS graphs cut at decoder-layer boundaries and replayed
in order: launching a graph costs the host time per kernel before the GPU starts it, so with one
graph of a whole step the GPU idles for that long every step; with segments it runs the first
while the host launches the rest. The first segment is one layer and each next one about twice the
layers before it (cuts after layers 1, 3, 7, 15): the GPU waits for one layer's launch, not a
quarter of the step's (a step that cannot launch ahead, as a verification step, waited for it
every step: 0.14 ms between the inputs' copy and the graph's first kernel in the H100 profile of
W5's verification steps, benchmarks/results/h100-profile-W5-verify-2026-12-06-8c2e62e.json), and
each later segment's launch still ends before the GPU has run the layers before it.

A step launched ahead (its inputs on the device: ``run`` with ``next_tokens``, ``run_ahead``,
``run_children``) is launched while the step before it still runs on the GPU, so its launch is
hidden anyway, and there each cut only costs: a segment's first kernel cannot start early under
programmatic dependent launch, as a kernel inside a graph does. Batch sizes up to
``WHOLE_AHEAD`` (where a step is short and those cuts weigh) can therefore also get the step in
one graph, which steps launched ahead replay. Back to back (as steps launched ahead run), a W5
step's graph in one piece replayed 0.024-0.040 ms faster than in five segments on an H100
(benchmarks/README.md, seventeenth session); end to end on an H200, W5 ran 1.6% faster with it,
plain and speculative alike (twentieth session).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from encdec_cli.engine.runner import CROSS_ENTRY_ROWS
from encdec_cli.engine.transfer import to_device
from encdec_models.base import AttentionMetadata, PagedView
from encdec_models.layers import layer_boundary_hook

SEGMENTS = 5  # graphs per decode step at most (at most one per decoder layer)
# batch sizes up to this also get a one-piece graph for steps launched ahead (0: none; the A/B of
# gpu_session.sh whole)
WHOLE_AHEAD = max(0, int(os.environ.get("ENCDEC_GRAPH_WHOLE_AHEAD", "8")))


def segment_cuts(layers: int, segments: int = SEGMENTS) -> list[int]:
    """The decoder layers after which a step's graph is cut: after layers 1, 3, 7, 15, ... (each
    segment twice the layers before it), at most ``segments`` graphs, none of them empty."""
    cuts: list[int] = []
    cut = 1
    while cut < layers and len(cuts) < segments - 1:
        cuts.append(cut)
        cut = 2 * cut + 1
    return cuts


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def _tree(fn, out, *more):
    """``fn`` over a step's output: a tensor, or a tuple of tensors / None (a pipeline stage's
    (x, residual)), with the matching items of ``more``."""
    if isinstance(out, tuple):
        return tuple(None if t is None else fn(t, *(m[i] for m in more)) for i, t in enumerate(out))
    return fn(out, *more)


def _into(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` holding ``t``: t itself when written there, else a copy."""
    return rows if t.data_ptr() == rows.data_ptr() else rows.copy_(t)


def decode_inputs(seqs, ahead: bool, block_size: int, tok, pos, slot, lens, clens) -> None:
    """A one-token decode step's inputs for ``seqs`` written into the first len(seqs) values of the
    int64 arrays ``tok`` (each sequence's last token), ``pos`` (its position: len(tokens) - 1, or
    len(tokens) when the step runs ahead of the last token), ``slot`` (that position's cache
    slot), ``lens`` (keys to attend to) and ``clens`` (encoder length). A few list comprehensions
    and whole-array numpy operations: no per-row numpy item writes."""
    n, bs = len(seqs), block_size
    p = pos[:n]
    p[:] = [len(s.tokens) for s in seqs]
    if not ahead:
        p -= 1
    tok[:n] = [s.tokens[-1] for s in seqs]
    slot[:n] = [s.block_table[x // bs] for s, x in zip(seqs, p.tolist())]
    slot[:n] *= bs
    slot[:n] += p % bs
    np.add(p, 1, out=lens[:n])
    clens[:n] = [s.group.encoder_len for s in seqs]


class CudaGraphs:
    def __init__(self, runner, max_num_seqs: int, queries: int = 1, ahead: bool = True):
        """``ahead``: whether steps on these graphs can be launched ahead (look-ahead on; for
        verification graphs, a drafter that drafts ahead): only then are one-piece graphs captured
        (``WHOLE_AHEAD``), since only steps launched ahead replay them."""
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.ahead = ahead
        self.max_batch = self.sizes[-1]
        self.queries = q = queries  # query rows per sequence (K + 1 for verification steps)
        # one-row steps group a request's rows into one cross-attention entry (runner.cross_entries)
        self.grouped = self.cross_entries and q == 1 and runner.encoder_rows is None
        dev, n = runner.device, self.max_batch
        self.tokens = torch.zeros(n * q, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n * q, dtype=torch.long, device=dev)
        self.slots = torch.full((n * q,), -1, dtype=torch.long, device=dev)
        self.self_tables = torch.zeros(n, runner.self_width, dtype=torch.int32, device=dev)
        self.self_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.cross_tables = torch.zeros(n, runner.cross_width, dtype=torch.int32, device=dev)
        self.cross_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=dev) * q
        self.cross_cu = torch.arange(n + 1, dtype=torch.int32, device=dev)  # the entries' rows (grouped)
        # how many of cross_cu's first values are known to be an entry a row (its identity): a step
        # without entries (greedy, sampling: a row a request) within them skips its copy
        self.cross_cu_identity = n + 1
        self.idx = torch.arange(n * q, dtype=torch.long, device=dev)
        # Pinned host buffers, two sets used in turn (a step may be prepared while the previous
        # step's copies are still queued; an event says when a set is free again): tokens,
        # positions, slots (q values a sequence), self lens, cross lens, grouped: the cross entries'
        # row offsets (a step of padded batch b uses the first (3q + 2) * b values, + b + 1), then
        # the block tables.
        self.host_sets = [
            (
                torch.zeros((3 * q + 2) * n + (n + 1) * self.grouped, dtype=torch.long, pin_memory=True),
                torch.zeros(n, runner.self_width, dtype=torch.int32, pin_memory=True),
                torch.zeros(n, runner.cross_width, dtype=torch.int32, pin_memory=True),
                torch.cuda.Event(),
            )
            for _ in range(2 if dev.type == "cuda" else 0)  # (a pipeline stage's stand-in on the CPU)
        ]
        self.turn = 0
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}  # batch -> its segments, in order
        self.whole: dict[int, list[torch.cuda.CUDAGraph]] = {}  # batch -> one graph, for steps ahead
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.pool_bytes = 0
        self.replays = 0  # steps run on these graphs
        self.whole_replays = 0  # of those, steps launched ahead on a one-piece graph

    def _meta(self, b: int) -> AttentionMetadata:
        q = self.queries
        return AttentionMetadata(
            cu_seqlens_q=self.cu[: b + 1],
            max_seqlen_q=q,
            slot_mapping=self.slots[: b * q],
            self_attn=PagedView(self.self_tables[:b], self.self_lens[:b]),
            cross_attn=self._cross_view(b),
            logits_indices=self.idx[: b * q],
        )

    def _cross_view(self, e: int) -> PagedView:
        """The cross-attention view of the buffers' first ``e`` entries (grouped: up to
        ``CROSS_ENTRY_ROWS`` rows each, the captured kernel's one query tile)."""
        if not self.grouped:
            return PagedView(self.cross_tables[:e], self.cross_lens[:e])
        return PagedView(self.cross_tables[:e], self.cross_lens[:e], self.cross_cu[: e + 1], CROSS_ENTRY_ROWS)

    segments = SEGMENTS
    cross_entries = True  # whether one-row steps may group a request's rows (per-layer K/V)

    def _call(self, model, b: int, meta: AttentionMetadata, out=None):
        """What a graph of padded batch ``b`` runs, on the static buffers: the model's decode step,
        its logits written into ``out`` (the shared output's rows) when given."""
        q = self.queries
        return model.decode(self.tokens[: b * q], self.positions[: b * q], meta, out)

    @torch.inference_mode()
    def capture(self, model) -> None:
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()  # one pool: every segment of every batch size
        layers = len(model.decoder_layers())
        cuts = set(segment_cuts(layers, self.segments))
        stream = torch.cuda.Stream()
        shared = None  # the largest graph's output shapes: every graph writes its rows there
        for b in reversed(self.sizes):  # largest first: later graphs reuse its pool memory
            meta = self._meta(b)
            for _ in range(2):  # warm-up: compile / autotune outside the capture
                out = self._call(model, b, meta)
            if shared is None:
                shared = _tree(lambda t: torch.empty_like(t), out)
            rows = _tree(lambda t, s: s[: len(t)], out, shared)  # this graph's part of the output
            del out
            torch.cuda.synchronize()
            self.graphs[b] = self._capture_step(model, b, meta, rows, cuts, pool, stream)
            if cuts and self.ahead and b <= WHOLE_AHEAD:
                self.whole[b] = self._capture_step(model, b, meta, rows, set(), pool, stream)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        self.pool_bytes = max(0, free_before - torch.cuda.mem_get_info()[0])

    def _capture_step(self, model, b: int, meta, rows, cuts: set, pool, stream) -> list:
        """One step of padded batch ``b`` captured as graphs cut after the decoder layers ``cuts``;
        its output written into ``rows`` (``self.outputs[b]``)."""
        segments = [torch.cuda.CUDAGraph()]

        def cut(i):
            if i in cuts:
                segments[-1].capture_end()
                segments.append(torch.cuda.CUDAGraph())
                segments[-1].capture_begin(pool=pool)

        with torch.cuda.stream(stream), layer_boundary_hook(cut):
            segments[0].capture_begin(pool=pool)
            # the logits go straight into their rows (the lm-head product's output); what a step
            # returns otherwise (a pipeline stage's (x, residual)) is copied there
            out = self._call(model, b, meta, None if isinstance(rows, tuple) else rows)
            self.outputs[b] = _tree(_into, out, rows)
            del out  # its pool memory is the next (smaller) graph's to reuse
            segments[-1].capture_end()
        return segments

    def _replay(self, b: int, ahead: bool) -> None:
        """Replay the step of padded batch ``b``: in one graph when launched ahead and captured
        so, else in its segments."""
        whole = self.whole.get(b) if ahead else None
        for g in whole or self.graphs[b]:
            g.replay()
        self.replays += 1
        self.whole_replays += whole is not None

    def run_children(
        self, tokens, positions, slots, self_tables, self_lens, cross: PagedView
    ) -> torch.Tensor:
        """Replay the graph for a beam step launched ahead (``ModelRunner.decode_children``): its
        inputs are device tensors already, copied into the static buffers device to device (the
        cross-attention rows are the last step's, often these buffers themselves)."""
        n = len(tokens)
        b = next(s for s in self.sizes if s >= n)
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        self.self_tables[:n].copy_(self_tables)
        self.self_lens[:n].copy_(self_lens)
        e = len(cross.block_tables)  # cross-attention entries (n, or fewer when grouped)
        if cross.block_tables.data_ptr() != self.cross_tables.data_ptr():
            self.cross_tables[:e].copy_(cross.block_tables)
            self.cross_lens[:e].copy_(cross.seq_lens)
            if self.grouped:  # (a view without entries has one a row: the identity)
                cu = cross.cu_seqlens_q
                self.cross_cu[: e + 1].copy_(self.cu[: e + 1] if cu is None else cu)
                if cu is not None:
                    self.cross_cu_identity = 0
        if n < b:  # padding rows (see run)
            pads = ((self.tokens, 0), (self.positions, 0), (self.slots, -1), (self.self_lens, 1))
            pads += ((self.self_tables, 0),)
            for buf, value in pads:
                buf[n:b].fill_(value)
            self.cross_lens[e:b].fill_(1)
            self.cross_tables[e:b].fill_(0)
            if self.grouped:  # an entry a padding row, then none
                self.cross_cu[e + 1 : e + 1 + b - n].copy_(self.cu[n + 1 : b + 1])
                self.cross_cu[e + 1 + b - n : b + 1].fill_(b)
                if e != n:
                    self.cross_cu_identity = 0
        self._replay(b, True)
        return self.outputs[b][:n]

    def _upload_tables(self, runner, srows, crows, b: int, host_self, host_cross) -> None:
        """The step's block-table rows (self: a sequence's; cross: an entry's; padding rows'
        zero) into the graphs' table buffers, through this turn's pinned host set."""
        hs, hc = host_self.numpy(), host_cross.numpy()
        hs[: len(srows)] = runner.self_tables[srows]
        hc[: len(crows)] = runner.cross_tables[crows]
        hs[len(srows) : b] = 0
        hc[len(crows) : b] = 0
        self.self_tables[:b].copy_(host_self[:b], non_blocking=True)
        self.cross_tables[:b].copy_(host_cross[:b], non_blocking=True)

    def run_ahead(
        self, runner, seqs, srows, crows, inputs, real: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the verification graph for a step launched ahead (``ModelRunner.decode_ahead``):
        the block tables are uploaded here, then ``inputs(tables, tokens, positions, slots)``
        writes the sequences' rows of the token / position / slot buffers on the device (q rows a
        sequence, padding rows first) and returns (.., .., the drafts, the key counts). Returns
        (the logits of the rows ``real``, in order; the drafts)."""
        n, q = len(seqs), self.queries
        b = next(s for s in self.sizes if s >= n)
        flat, host_self, host_cross, free = self.host_sets[self.turn]
        self.turn ^= 1
        free.synchronize()  # this set's copies of two steps ago are done
        clens = flat[:b]
        h = clens.numpy()
        h[:n] = [s.group.encoder_len for s in seqs]
        h[n:] = 1
        dev = clens.to(runner.device, non_blocking=True)
        self._upload_tables(runner, srows, crows, b, host_self, host_cross)
        free.record()
        self.cross_lens[:b].copy_(dev)
        _, _, drafts, kv_lens = inputs(self.self_tables, self.tokens, self.positions, self.slots)
        self.self_lens[:n].copy_(kv_lens)
        if n < b:  # padding sequences (see run)
            for buf, value in ((self.tokens, 0), (self.positions, 0), (self.slots, -1)):
                buf[n * q : b * q].fill_(value)
            self.self_lens[n:b].fill_(1)
        self._replay(b, True)
        lo, hi = int(real[0]), int(real[-1]) + 1
        if hi - lo == len(real):  # consecutive (one sequence): a view, no index upload
            return self.outputs[b][lo:hi].float(), drafts
        return self.outputs[b].index_select(0, to_device(runner.device, real)).float(), drafts

    def run(
        self, runner, seqs, srows: np.ndarray, crows: np.ndarray, next_tokens=None, drafts=None
    ) -> torch.Tensor:
        """Replay the graph of the step's padded batch size; ``next_tokens`` and ``drafts``: see
        runner.decode (``drafts`` only with ``queries`` > 1)."""
        n, q = len(seqs), self.queries
        b = next(s for s in self.sizes if s >= n)
        flat, host_self, host_cross, free = self.host_sets[self.turn]
        self.turn ^= 1
        free.synchronize()  # this set's copies of two steps ago are done
        # the step's first (3q + 2) * b values, contiguous: a strided pinned slice would be staged
        # through pageable memory by .to(), a copy that blocks the host until the GPU is idle
        top = (3 * q + 2) * b
        host = flat[: top + (b + 1) * self.grouped]
        h = host.numpy()
        tok, pos, slot = h[: b * q], h[b * q : 2 * b * q], h[2 * b * q : 3 * b * q]
        lens, clens = h[3 * b * q : 3 * b * q + b], h[3 * b * q + b : top]
        bs = runner.block_size
        ahead = next_tokens is not None
        e, entries = n, None  # cross-attention entries: a sequence's, or (grouped) a request's rows
        if q == 1:
            decode_inputs(seqs, ahead, bs, tok, pos, slot, lens, clens)
            if self.grouped:
                entries = runner.cross_entries(crows)
                cu = h[top:]
                if entries is None:
                    cu[: n + 1] = np.arange(n + 1)
                else:
                    first, cu_rows = entries
                    e, crows = len(first), crows[first]
                    clens[:e] = clens[first]
                    cu[: e + 1] = cu_rows
                cu[e + 1 : e + 1 + b - n] = np.arange(n + 1, b + 1)  # an entry a padding row, then none
                cu[e + 1 + b - n :] = b
        else:  # real inputs last in each sequence's q rows, padding rows (slot -1) first
            lay = runner.verify_layout(seqs, srows, drafts, q)
            tok[: n * q], slot[: n * q] = 0, -1
            pos[: n * q] = np.repeat(lay.start, q)  # padding rows: the first input's position
            tok[lay.dest], pos[lay.dest], slot[lay.dest] = lay.tokens, lay.positions, lay.slots
            lens[:n] = lay.kv_lens
            clens[:n] = np.fromiter((s.group.encoder_len for s in seqs), np.int64, n)
            rows = lay.logits_rows  # each sequence's last len(draft) + 1
        # padding sequences: token 0 at position 0, write nowhere, read one key (every value of the
        # step's part of the buffer is set: its layout changes with b, stale values would index out
        # of range)
        tok[n * q :], pos[n * q :], slot[n * q :], lens[n:], clens[e:] = 0, 0, -1, 1, 1
        dev = host.to(runner.device, non_blocking=True)
        self._upload_tables(runner, srows, crows, b, host_self, host_cross)
        free.record()
        self.tokens[: b * q].copy_(dev[: b * q])
        if ahead:
            self.tokens[:n].copy_(next_tokens)
        self.positions[: b * q].copy_(dev[b * q : 2 * b * q])
        self.slots[: b * q].copy_(dev[2 * b * q : 3 * b * q])
        self.self_lens[:b].copy_(dev[3 * b * q : 3 * b * q + b])
        self.cross_lens[:b].copy_(dev[3 * b * q + b : top])
        if self.grouped and (entries is not None or self.cross_cu_identity < b + 1):
            self.cross_cu[: b + 1].copy_(dev[top:])
            self.cross_cu_identity = 0 if entries is not None else b + 1
        self._replay(b, ahead)
        if q == 1:
            runner.set_last_tables(self.self_tables[:n], self._cross_view(e), entries)
            return self.outputs[b][:n]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo == len(rows):  # consecutive (one sequence: batch 1): a view, no index upload
            return self.outputs[b][lo:hi]
        return self.outputs[b].index_select(0, to_device(runner.device, rows))
