"""Pipeline parallelism: the model's layers split into P stages, one process (and device) per stage.

The global layer list is the encoder's layers, then the decoder's; stage s holds a contiguous
range of it (``split_layers``), so a stage holds encoder layers, decoder layers or both. Stage 0
is the engine's own process: the scheduler, the block manager and the sampler run there unchanged,
with a ``PipelineRunner`` in place of the ``ModelRunner`` (the same interface). Stages 1..P-1 are
worker processes (``_stage_main``) that the runner spawns; they load the same model, drop the
layers of other stages and run what each step's message tells them.

Per engine call (block copies, an encoder run, a decoder step) stage 0 sends every worker one
control message (pickled, over gloo): the step's block copies, cache slots, block tables and
lengths, already decided. Block ids are the same on every stage (one pool size, the smallest any
stage can hold), so each stage keeps the K/V of its own decoder layers in its own pool under the
same tables. The work of a call is cut into micro-batches (up to P): stage s runs micro-batch m
while stage s+1 runs m-1, so all stages work at once. Activations (x and the pending pre-norm
residual) go point to point to the next stage: NCCL between GPUs, gloo on the CPU.

- Encoder: stage 0 embeds, every stage with encoder layers runs its range, the stage with the
  last encoder layer applies the final norm and sends the encoder output of each micro-batch once
  to every other stage with decoder layers; each writes the cross K/V (or, absorbed, the rows) of
  its own layers.
- Decoder: stage 0 embeds the tokens, the decoder stages run their layers in order, the last
  stage computes the logits and sends them back to stage 0, where sampling, beam search and stop
  checks run. Logits rather than tokens travel back so that the sampler, its logits rules and the
  beam bookkeeping stay one unchanged piece of code on the process that owns the scheduler (the
  price: [B, vocab] float32 per step instead of [B] token ids).
- Faults: out of memory in any stage does not break the protocol: that stage sends zeros flagged
  as failed, the flag travels down the pipeline to stage 0, which raises ``torch.OutOfMemoryError``
  (the engine's recovery then runs as in one process). A stage that dies (killed, crashed) closes
  its connections: stage 0 raises ``PipelineFailure`` naming it.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing
import os
import pickle
import time
import weakref
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing

from encdec_cli.engine.config import EngineConfig
from encdec_cli.engine.cuda_graphs import CudaGraphs
from encdec_cli.engine.runner import (
    KVPool,
    ModelRunner,
    absorb_by_default,
    cache_dtype,
    cross_layout,
    fit_blocks,
)
from encdec_cli.engine.sequence import Sequence, SequenceGroup
from encdec_cli.errors import PipelineFailure
from encdec_models.base import AttentionMetadata, EncoderBatch, PagedView

log = logging.getLogger("encdec")

# message tags (gloo matches a receive by source and tag, in order)
CONTROL, ACTIVATION, ENCODER_OUT, LOGITS, REPLY = 1, 2, 3, 4, 5
_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TIMEOUT = datetime.timedelta(minutes=30)  # a stage silent this long (alive) is a hang: fail


# ---- stage placement ---------------------------------------------------------------------------
def layer_costs(model) -> list[int]:
    """Estimated cost of every layer, encoder layers first: its parameter count (its weight bytes,
    which is also what a memory-bound decode step reads; a decoder layer's cross-attention makes it
    about 1.3x an encoder layer)."""
    return [
        sum(p.numel() for p in layer.parameters())
        for layer in (*model.encoder_layers(), *model.decoder_layers())
    ]


def split_layers(costs: list[int], stages: int) -> list[int]:
    """Layers per stage (contiguous, each at least 1) minimising the costliest stage."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"--pipeline-parallel {stages}: this model has {n} layers; use 1 to {n} stages")
    prefix = np.concatenate([[0], np.cumsum(costs)])
    # best[k][i]: the least max-stage cost of layers [0, i) in k stages; cut[k][i]: its last cut
    best = np.full((stages + 1, n + 1), np.inf)
    cut = np.zeros((stages + 1, n + 1), np.int64)
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                c = max(best[k - 1][j], prefix[i] - prefix[j])
                if c < best[k][i]:
                    best[k][i], cut[k][i] = c, j
    sizes, i = [], n
    for k in range(stages, 0, -1):
        j = int(cut[k][i])
        sizes.append(i - j)
        i = j
    return sizes[::-1]


def parse_pp_layers(text: str | None) -> tuple[int, ...] | None:
    """``--pp-layers 6,6,8`` -> (6, 6, 8); None or "" -> None (balanced placement)."""
    if text is None or not str(text).strip():
        return None
    try:
        return tuple(int(x) for x in str(text).split(","))
    except ValueError:
        raise ValueError(
            f"--pp-layers takes comma-separated layer counts, one per stage, e.g. 6,6; got {text!r}"
        ) from None


def stage_sizes(model, stages: int, pp_layers: tuple[int, ...] | None) -> list[int]:
    """Layers per stage: ``pp_layers`` once checked, else the balanced split."""
    n_enc, n_dec = len(model.encoder_layers()), len(model.decoder_layers())
    n = n_enc + n_dec
    if pp_layers is None:
        return split_layers(layer_costs(model), stages)
    sizes = list(pp_layers)
    if len(sizes) != stages or min(sizes) < 1 or sum(sizes) != n:
        raise ValueError(
            f"--pp-layers {','.join(map(str, sizes))}: give {stages} numbers (one per stage of "
            f"--pipeline-parallel {stages}), each at least 1, summing to this model's {n} layers "
            f"({n_enc} encoder then {n_dec} decoder layers), e.g. "
            + ",".join(map(str, split_layers(layer_costs(model), stages)))
        )
    return sizes


class StagePlan:
    """Which layers stage ``rank`` holds: encoder layers [e0, e1), decoder layers [d0, d1)."""

    def __init__(self, sizes: list[int], n_enc: int, rank: int):
        bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self.rank, self.num_stages, self.n_enc = rank, len(sizes), n_enc
        self.n_dec = bounds[-1] - n_enc
        lo, hi = bounds[rank], bounds[rank + 1]
        self.e0, self.e1 = min(lo, n_enc), min(hi, n_enc)
        self.d0, self.d1 = max(lo - n_enc, 0), max(hi - n_enc, 0)
        self.bounds = bounds
        # the stage holding the last encoder layer; the stages holding decoder layers, in order
        self.encoder_last = next(s for s in range(len(sizes)) if bounds[s + 1] >= n_enc)
        self.decoder_stages = [s for s in range(len(sizes)) if bounds[s + 1] > n_enc]
        # a model whose whole encoder is its embedding (no encoder layers to split: the image
        # encoders) runs it on stage 0
        self.has_encoder = self.e1 > self.e0 or (n_enc == 0 and rank == 0)
        self.has_decoder = self.d1 > self.d0

    def describe(self) -> str:
        parts = []
        if self.has_encoder:
            parts.append(f"encoder layers {self.e0}-{self.e1 - 1}" if self.e1 > self.e0 else "the encoder")
        if self.has_decoder:
            parts.append(f"decoder layers {self.d0}-{self.d1 - 1}")
        return ", ".join(parts)


def stage_pruner(config: EngineConfig, rank: int, sizes: list[int] | None = None):
    """``load_model``'s prune hook for stage ``rank``: the other stages' layers are never
    allocated. The split (``sizes``, else computed from the model) is kept as
    ``model.pipeline_sizes`` for the runner."""

    def prune(model) -> None:
        split = sizes or stage_sizes(model, config.pipeline_parallel, config.pp_layers)
        model.pipeline_sizes = list(split)
        drop_other_layers(model, StagePlan(split, len(model.encoder_layers()), rank))

    return prune


def drop_other_layers(model, plan: StagePlan) -> None:
    """Free the weights of the layers other stages hold (a placeholder module stays in their place)."""
    for layers, lo, hi in (
        (model.encoder_layers(), plan.e0, plan.e1),
        (model.decoder_layers(), plan.d0, plan.d1),
    ):
        for i in range(len(layers)):
            if not lo <= i < hi:
                layers[i] = torch.nn.Module()
    if next(model.parameters()).is_cuda:
        torch.cuda.empty_cache()
    model.pipeline_sizes = list(plan.bounds[i + 1] - plan.bounds[i] for i in range(plan.num_stages))


# ---- the wire ----------------------------------------------------------------------------------
def _one_gpu() -> bool:
    """Every stage on stage 0's GPU, activations over gloo through host memory (NCCL refuses two
    ranks on one device): for testing stages (their CUDA graphs) where one GPU is all there is.
    ``ENCDEC_TEST_STAGES_ON_ONE_GPU=1``, read by every stage (the workers inherit it)."""
    return os.environ.get("ENCDEC_TEST_STAGES_ON_ONE_GPU") == "1"


class _Wire:
    """Point-to-point messages between the stages of one pipeline: pickled objects and tensor
    headers over gloo; tensors over NCCL on CUDA, gloo on the CPU. Its own process groups on its
    own store, never the default group: a data-parallel rank can be a whole pipeline."""

    def __init__(self, store, rank: int, size: int, device: torch.device):
        self.rank, self.device = rank, device
        self.gloo = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, size, TIMEOUT)
        self.nccl = None
        if device.type == "cuda" and not _one_gpu():
            self.nccl = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, size)
        self.pending: list = []  # (work, tensor) of sends in flight (their buffers must live)

    def send_obj(self, obj, dst: int, tag: int = CONTROL) -> None:
        data = torch.frombuffer(
            bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8
        )
        n = torch.tensor([data.numel()], dtype=torch.int64)
        self.pending += [(self.gloo.send([n], dst, tag), n), (self.gloo.send([data], dst, tag), data)]

    def recv_obj(self, src: int, tag: int = CONTROL):
        n = torch.zeros(1, dtype=torch.int64)
        self.gloo.recv([n], src, tag).wait()
        data = torch.empty(int(n), dtype=torch.uint8)
        self.gloo.recv([data], src, tag).wait()
        return pickle.loads(data.numpy().tobytes())

    def send(self, t: torch.Tensor | None, dst: int, tag: int, failed: bool = False) -> None:
        """Send a tensor of up to 3 dims (None: an empty one) with a header: dtype, failed, shape."""
        if t is None:
            t = torch.zeros(0, device=self.device)
        t = t.contiguous()
        shape = list(t.shape) + [1] * (3 - t.dim())
        header = torch.tensor([_DTYPES.index(t.dtype), int(failed), t.dim(), *shape], dtype=torch.int64)
        self.pending.append((self.gloo.send([header], dst, tag), header))
        if t.numel():
            if t.is_cuda and self.nccl is None:  # stages sharing one GPU (tests): through host memory
                t = t.cpu()
            pg = self.nccl if t.is_cuda else self.gloo
            self.pending.append((pg.send([t], dst, tag), t))

    def post(self, src: int, tag: int, shape: tuple[int, ...], dtype: torch.dtype):
        """An NCCL receive of a tensor of known shape posted now, for ``recv(..., posted=)`` later:
        NCCL runs a pair's sends and receives in order on one stream, so a peer's send waiting for
        a receive this host has not posted yet would hold up everything behind it (the next
        micro-batch's activations). None on gloo (its sends do not wait for the receive)."""
        if self.nccl is None:
            return None
        t = torch.empty(shape, dtype=dtype, device=self.device)
        return t, self.nccl.recv([t], src, tag)

    def recv(self, src: int, tag: int, posted=None) -> tuple[torch.Tensor | None, bool]:
        """A tensor sent with ``send``; ``posted``: its receive, posted earlier with ``post``."""
        header = torch.zeros(6, dtype=torch.int64)
        self.gloo.recv([header], src, tag).wait()
        dtype, failed, ndim, *shape = header.tolist()
        shape = shape[:ndim]
        if posted is not None:
            t, work = posted
            if list(t.shape) != shape or t.dtype != _DTYPES[dtype]:
                raise RuntimeError(
                    f"pipeline: got a {shape} {_DTYPES[dtype]} tensor for a posted {list(t.shape)}"
                )
            work.wait()
            return t, bool(failed)
        if not int(np.prod(shape)):
            return None, bool(failed)
        if self.nccl is None:  # the CPU, or stages sharing one GPU (tests): gloo, host memory
            t = torch.empty(shape, dtype=_DTYPES[dtype])
            self.gloo.recv([t], src, tag).wait()
            return t.to(self.device), bool(failed)
        t = torch.empty(shape, dtype=_DTYPES[dtype], device=self.device)
        self.nccl.recv([t], src, tag).wait()
        return t, bool(failed)

    def flush(self) -> None:
        """Wait for the sends in flight (their buffers may then be freed)."""
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


# ---- one stage's model part and cache ---------------------------------------------------------
class Stage:
    """A stage's layers and the KV pool of its decoder layers (``KVPool``, as one process holds it:
    with ``kv_dtype`` "fp8", e4m3 values and their scales); runs its part of each call."""

    def __init__(self, model, config: EngineConfig, plan: StagePlan, wire: _Wire):
        p = next(model.parameters())
        self.model, self.plan, self.wire = model, plan, wire
        self.device, self.dtype, self.config = p.device, p.dtype, config
        self.cache_dtype = cache_dtype(config.kv_dtype, self.dtype)
        self.kv: KVPool | None = None  # make_pool
        self.busy = 0.0  # seconds of this stage's own compute (see busy_seconds)
        self._events: list = []  # CUDA: (start, end) events of parts not yet added to busy
        # out of memory in this stage since its last decoder step: every activation it sends says
        # so until then, and the last stage's logits carry it to stage 0
        self.failed = False
        # fault injection for tests: ENCDEC_INJECT_STAGE_OOM=S:N makes stage S's N-th part (counted
        # from 1) raise torch.OutOfMemoryError instead of running, as a CUDA OOM would
        stage, _, part = os.environ.get("ENCDEC_INJECT_STAGE_OOM", "").partition(":")
        self.parts, self.fail_at_part = 0, int(part) if stage.strip() == str(plan.rank) else 0
        # CUDA graphs of this stage's part of a pure decode micro-batch (StageGraphs), as one process
        # has them; on the CPU only as the tests' stand-in (ENCDEC_TEST_STAGE_GRAPHS=1: replays
        # re-run the captured call on the same static buffers)
        on = not config.enforce_eager and getattr(model, "cuda_graphs", True)
        self.use_graphs = on and (
            self.device.type == "cuda" or os.environ.get("ENCDEC_TEST_STAGE_GRAPHS") == "1"
        )
        self.graphs: StageGraphs | None = None  # captured at the first pure decode micro-batch

    def own_blocks(self) -> int:
        """Blocks this stage's memory holds (a stage without decoder layers: no limit)."""
        if not self.plan.has_decoder:
            return 1 << 62
        if self.config.num_blocks:
            return self.config.num_blocks
        c = self.config
        return fit_blocks(self.model, c, self.bytes_per_block(), self.device, c.max_num_seqs,
                          f"pipeline stage {self.plan.rank}: ", " or use more stages")  # fmt: skip

    def bytes_per_block(self) -> int:
        """Bytes of one block of this stage's pool (its decoder layers; fp8: with the scales)."""
        layers = self.plan.d1 - self.plan.d0
        return KVPool.bytes_per_block(self.model.cache_spec, layers, self.config.block_size, self.cache_dtype)

    def make_pool(self, num_blocks: int, cross_block_rows: int | None) -> None:
        """The pool of this stage's decoder layers; ``cross_block_rows``: absorbed layout (the rows
        of a cross block, the same on every stage), None: per-layer K/V."""
        self.kv = None
        if not self.plan.has_decoder:
            return
        p = self.plan
        self.kv = KVPool.build(self.model, p.d1 - p.d0, num_blocks, self.config.block_size, self.cache_dtype,
                               self.device, cross_block_rows is not None, first=p.d0)  # fmt: skip

    def _tensor(self, data, dtype) -> torch.Tensor:
        from encdec_cli.engine.transfer import to_device

        return to_device(self.device, data, dtype)

    def _timed(self, fn, fallback):
        """fn() timed as busy; out of memory: (fallback(), True) so that the pipeline goes on (what
        it sends then is flagged as failed). On CUDA the part's GPU time is taken from events (no
        sync: the host goes on launching)."""
        cuda = self.device.type == "cuda"
        if cuda:
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
        else:
            start = time.perf_counter()
        self.parts += 1
        try:
            if self.parts == self.fail_at_part:
                raise torch.OutOfMemoryError(f"injected out-of-memory error in part {self.parts}")
            out, failed = fn(), False
        except torch.OutOfMemoryError:
            out, failed = fallback(), True
        if cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((begin, end))
            if len(self._events) > 1024:
                self._add_events(wait=False)
        else:
            self.busy += time.perf_counter() - start
        self.failed |= failed
        return out, failed

    def _add_events(self, wait: bool) -> None:
        keep = []
        for begin, end in self._events:
            if wait:
                end.synchronize()
            if end.query():
                self.busy += begin.elapsed_time(end) / 1000
            else:
                keep.append((begin, end))
        self._events = keep

    def busy_seconds(self) -> float:
        """Seconds this stage computed since it started."""
        self._add_events(wait=True)
        return self.busy

    def stats(self) -> dict:
        """Seconds computed and graph replays (micro-batches run on CUDA graphs) since it started."""
        return {"busy": self.busy_seconds(), "replays": self.graphs.replays if self.graphs is not None else 0}

    # -- the three calls -------------------------------------------------------------------------
    def copy_blocks(self, copies) -> None:
        if self.kv is not None and copies:
            self.kv.copy_blocks(self._tensor([c[0] for c in copies], torch.long),
                                self._tensor([c[1] for c in copies], torch.long))  # fmt: skip

    def encode(self, micro: list[dict], batches: list[EncoderBatch] | None = None) -> None:
        """This stage's part of an encoder run in micro-batches (``batches``: stage 0's prepared
        inputs)."""
        plan, wire, model = self.plan, self.wire, self.model
        d = model.cache_spec.d_model
        for m, mb in enumerate(micro):
            total = int(mb["cu"][-1])
            hidden = None
            if plan.has_encoder:
                if plan.rank == 0:
                    batch, x, res = batches[m], None, None
                else:
                    batch = EncoderBatch(None, self._tensor(mb["cu"], torch.int32), mb["max"])
                    xr, failed = wire.recv(plan.rank - 1, ACTIVATION)
                    self.failed |= failed
                    x, res = xr[0], (xr[1] if xr.shape[0] == 2 else None)
                zeros = partial(self._zeros, total, d, pair=plan.e1 < plan.n_enc)
                out, _ = self._timed(partial(model.encoder_part, batch, plan.e0, plan.e1, x, res), zeros)
                if plan.e1 == plan.n_enc:
                    hidden = out
                    for s in plan.decoder_stages:
                        if s != plan.rank:
                            wire.send(hidden, s, ENCODER_OUT, self.failed)
                else:
                    wire.send(_stack(*out), plan.rank + 1, ACTIVATION, self.failed)
            if plan.has_decoder:
                if hidden is None:
                    hidden, failed = wire.recv(plan.encoder_last, ENCODER_OUT)
                    self.failed |= failed
                self._timed(partial(self._write_cross, hidden, mb), lambda: None)

    def _write_cross(self, hidden, mb) -> None:
        self.model.write_cross_kv(hidden, self._tensor(mb["slots"], torch.long))
        if mb.get("zero") is not None and len(mb["zero"]):
            zeros = torch.zeros((len(mb["zero"]), self.kv.encoder_rows.shape[3]), dtype=self.dtype,
                                device=self.device)  # fmt: skip
            self.kv.store_rows(zeros, self._tensor(mb["zero"], torch.long))

    def _meta(self, mb) -> AttentionMetadata:
        t = self._tensor
        return AttentionMetadata(
            cu_seqlens_q=t(mb["cu"], torch.int32),
            max_seqlen_q=mb["max_q"],
            slot_mapping=t(mb["slots"], torch.long),
            self_attn=PagedView(t(mb["self_tables"], torch.int32), t(mb["self_lens"], torch.int32)),
            cross_attn=PagedView(t(mb["cross_tables"], torch.int32), t(mb["cross_lens"], torch.int32)),
            logits_indices=t(mb["logits"], torch.long),
        )

    def decode(self, micro: list[dict], tokens: list[torch.Tensor] | None = None) -> None:
        """This stage's part of a decoder step in micro-batches (``tokens``: stage 0's input tokens
        of each, on the device). The last stage sends each micro-batch's logits to stage 0."""
        plan, wire, model = self.plan, self.wire, self.model
        d, vocab = model.cache_spec.hidden, model.vocab_size
        stages = plan.decoder_stages
        for m, mb in enumerate(micro):
            tq, n = int(mb["cu"][-1]), len(mb["logits"])
            tok, x, res = None, None, None
            if plan.rank == 0:
                tok = tokens[m]
            elif plan.has_decoder:
                src = stages[stages.index(plan.rank) - 1] if stages.index(plan.rank) else 0
                xr, failed = wire.recv(src, ACTIVATION)
                self.failed |= failed
                x, res = xr[0], (xr[1] if xr.shape[0] == 2 else None)
            else:
                continue  # an encoder-only stage has no part in decoding
            last = plan.rank == plan.num_stages - 1
            if plan.has_decoder:
                zeros = (
                    partial(self._zeros, n, vocab, torch.float32)
                    if last
                    else partial(self._zeros, tq, d, pair=True)
                )
                graphs = self._graphs_for(mb, res is not None)
                if graphs is not None:
                    part = partial(graphs.run_micro, mb, tok, x, res)
                else:
                    positions = self._tensor(mb["positions"], torch.long)
                    part = partial(self._decoder_part, self._meta(mb), positions, tok, x, res)
                out, _ = self._timed(part, zeros)
            else:  # stage 0 without decoder layers: its embedding goes on
                positions = self._tensor(mb["positions"], torch.long)
                x, _ = self._timed(partial(model.embed_decoder, tok, positions), partial(self._zeros, tq, d))
                out = (x, None)
            if last:
                wire.send(out.float(), 0, LOGITS, self.failed)
            else:
                nxt = stages[stages.index(plan.rank) + 1] if plan.rank in stages else stages[0]
                wire.send(_stack(*out), nxt, ACTIVATION, self.failed)
        self.failed = False

    def _decoder_part(self, meta, positions, tokens, x, residual, out=None):
        """This stage's decoder layers (stage 0: on its embedded ``tokens``); see ``decoder_part``."""
        if tokens is not None:
            x = self.model.embed_decoder(tokens, positions)
        return self.model.decoder_part(meta, positions, self.plan.d0, self.plan.d1, x, residual, out)

    def _graphs_for(self, mb: dict, pair: bool) -> StageGraphs | None:
        """The stage's graphs when this micro-batch can replay one (one query a sequence, a
        padded size captured), captured now if not yet: the first such micro-batch says whether
        a residual travels with x. None: the eager path."""
        if not self.use_graphs or mb["max_q"] != 1:
            return None
        if self.graphs is None:
            rows = -(-self.config.max_num_seqs // self.plan.num_stages)  # the largest micro-batch
            widths = mb["self_tables"].shape[1], mb["cross_tables"].shape[1]
            try:
                graphs = StageGraphs(self, rows, *widths, pair)
                graphs.capture(self.model)
            except torch.OutOfMemoryError:  # no room for the graphs: this stage runs eagerly
                log.warning(
                    "pipeline stage %d: no memory to capture CUDA graphs; it runs eagerly", self.plan.rank
                )
                self.use_graphs = False
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                return None
            self.graphs = graphs
            log.info("pipeline stage %d: captured %d CUDA graphs (rows 1..%d) in %.1f s", self.plan.rank,
                     len(self.graphs.sizes), self.graphs.max_batch, self.graphs.capture_seconds)  # fmt: skip
        g = self.graphs
        if len(mb["logits"]) > g.max_batch or pair != (g.res is not None):
            return None
        return g

    def _zeros(self, rows: int, d: int, dtype=None, pair: bool = False):
        """What a part that ran out of memory sends on: zeros (with residual None as a pair)."""
        z = torch.zeros((rows, d), dtype=dtype or self.dtype, device=self.device)
        return (z, None) if pair else z


class StageGraphs(CudaGraphs):
    """CUDA graphs of one stage's part of a pure decode micro-batch (one token a sequence), one
    per padded row count (``graph_batch_sizes``), one segment each: stage 0's embedding and its
    decoder layers, or the previous stage's (x, residual) copied into static buffers and this
    stage's layers; the last stage's graphs end with the logits. Padding rows write nowhere and
    read one key, as in one process (``CudaGraphs``). Outputs are cloned before they are sent: the
    next replay rewrites the graphs' output memory while a send may still read it.

    On the CPU (the tests' stand-in, ``Stage.use_graphs``) a "graph" is ``_EagerReplay``: replaying
    re-runs the captured call on the same static buffers and writes into the same output."""

    segments = 1  # a stage's part is short, its launch one call
    cross_entries = False  # a micro-batch's cross view has an entry a row (``run_micro``)

    def __init__(self, stage: Stage, rows: int, self_width: int, cross_width: int, pair: bool):
        self.stage = stage
        self.self_width, self.cross_width = self_width, cross_width
        super().__init__(self, rows)  # (reads device, self_width, cross_width)
        d = stage.model.cache_spec.hidden
        self.embeds = stage.plan.rank == 0
        self.x = torch.zeros(self.max_batch, d, dtype=stage.dtype, device=stage.device)
        self.res = torch.zeros_like(self.x) if pair else None

    @property
    def device(self) -> torch.device:
        return self.stage.device

    def _call(self, model, b: int, meta: AttentionMetadata, out=None):
        tokens = self.tokens[:b] if self.embeds else None
        res = self.res[:b] if self.res is not None else None
        return self.stage._decoder_part(meta, self.positions[:b], tokens, self.x[:b], res, out)

    @torch.inference_mode()
    def capture(self, model) -> None:
        if self.device.type == "cuda":
            super().capture(model)
            return
        start = time.perf_counter()
        for b in reversed(self.sizes):
            meta = self._meta(b)
            self.outputs[b] = self._call(model, b, meta)
            self.graphs[b] = [_EagerReplay(partial(self._call, model, b, meta), self.outputs[b])]
        self.capture_seconds = time.perf_counter() - start

    def run_micro(self, mb: dict, tokens: torch.Tensor | None, x: torch.Tensor | None,
                  res: torch.Tensor | None):  # fmt: skip
        """Replay the graph of the micro-batch's padded size on its inputs (stage 0: ``tokens``;
        the others: ``x`` and ``res``) -> the logits [n, vocab] (last stage) or (x, residual)."""
        n = len(mb["logits"])
        b = next(s for s in self.sizes if s >= n)
        ints = np.zeros(4 * b, np.int64)  # positions, slots, self lens, cross lens; padding rows:
        ints[b : 2 * b] = -1  # position 0, write nowhere (slot -1), read one key
        ints[2 * b :] = 1
        ints[:n], ints[b : b + n] = mb["positions"], mb["slots"]
        ints[2 * b : 2 * b + n], ints[3 * b : 3 * b + n] = mb["self_lens"], mb["cross_lens"]
        tables = np.zeros((2, b, max(self.self_width, self.cross_width)), np.int32)
        tables[0, :n, : self.self_width] = mb["self_tables"]
        tables[1, :n, : self.cross_width] = mb["cross_tables"]
        dev = self.stage._tensor(ints, torch.long)
        tab = self.stage._tensor(tables, torch.int32)
        self.positions[:b].copy_(dev[:b])
        self.slots[:b].copy_(dev[b : 2 * b])
        self.self_lens[:b].copy_(dev[2 * b : 3 * b])
        self.cross_lens[:b].copy_(dev[3 * b :])
        self.self_tables[:b].copy_(tab[0, :, : self.self_width])
        self.cross_tables[:b].copy_(tab[1, :, : self.cross_width])
        if self.embeds:
            self.tokens[:n].copy_(tokens)
            self.tokens[n:b].zero_()
        else:
            self.x[:n].copy_(x)
            if self.res is not None:
                self.res[:n].copy_(res)
        for g in self.graphs[b]:
            g.replay()
        self.replays += 1
        out = self.outputs[b]
        if isinstance(out, tuple):
            return tuple(t[:n].clone() if t is not None else None for t in out)
        return out[:n].clone()


class _EagerReplay:
    """A CUDA graph's stand-in on the CPU (tests): ``replay`` re-runs ``call`` and writes its
    output into ``out`` (a tensor or a tuple of tensors / None), where the graph's output is."""

    def __init__(self, call, out):
        self.call, self.out = call, out

    def replay(self) -> None:
        new = self.call()
        for o, t in zip(self.out, new, strict=True) if isinstance(new, tuple) else ((self.out, new),):
            if o is not None:
                o.copy_(t)


def _stack(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """(x, residual) as one [1 or 2, T, d] tensor to send."""
    return x.unsqueeze(0) if residual is None else torch.stack((x, residual))


def _micro(n: int, parts: int) -> list[range]:
    """n rows in up to ``parts`` contiguous, nearly equal micro-batches."""
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


# ---- the worker processes ----------------------------------------------------------------------
def _stage_main(rank: int, size: int, port: int, source, device: str, dtype: str, config, sizes) -> None:
    """A worker stage: connect, load the model (its own layers), agree on the pool, then serve.
    ``source``: the model folder, or the model itself (shared memory) when it has none."""
    import signal

    from encdec_models.loading import load_model

    # Ctrl-C and SIGTERM are stage 0's to handle (the job stops in order, then closes the stages)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if torch.device(device).type == "cpu":  # the stages share the CPU's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=TIMEOUT)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    wire = _Wire(store, rank, size, dev)
    try:
        if isinstance(source, str):
            model = load_model(source, device, dtype, prune=stage_pruner(config, rank, sizes)).model
        else:
            model = source
        plan = StagePlan(sizes, len(model.encoder_layers()), rank)
        drop_other_layers(model, plan)
        model.to(dev)
        stage = Stage(model, config, plan, wire)
        wire.send_obj({"blocks": stage.own_blocks()}, 0, REPLY)
    except Exception as e:  # loading failed: tell stage 0, which raises it
        wire.send_obj({"error": f"{type(e).__name__}: {e}"}, 0, REPLY)
        wire.flush()
        return
    wire.flush()
    try:
        layout = wire.recv_obj(0)
        stage.make_pool(layout["num_blocks"], layout["cross_block_rows"])
        _serve(stage, wire)
    except RuntimeError as e:  # stage 0 (or another stage) is gone: nothing is left to serve
        log.debug("pipeline stage %d stops: %s", rank, e)


def _serve(stage: Stage, wire: _Wire) -> None:
    """A worker stage's loop: one control message from stage 0 at a time."""
    with torch.inference_mode():
        while True:
            msg = wire.recv_obj(0)
            op = msg["op"]
            if op == "copy":
                stage.copy_blocks(msg["copies"])
            elif op == "encode":
                stage.encode(msg["micro"])
            elif op == "decode":
                stage.decode(msg["micro"])
            elif op == "stats":
                wire.send_obj(stage.stats(), 0, REPLY)
            elif op == "close":
                wire.flush()
                return
            wire.flush()


def _shutdown(procs, wire) -> None:
    """Tell the workers to stop and wait for them (briefly), then end any that remain."""
    for s, p in enumerate(procs, start=1):
        if p.is_alive():
            try:
                wire.send_obj({"op": "close"}, s)
            except Exception:  # noqa: BLE001 (a dead peer: nothing to tell)
                pass
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)


# ---- stage 0: the runner the engine uses -----------------------------------------------------
class InFlightLogits:
    """The logits of a decoder step launched ahead (``PipelineRunner.decode`` with next tokens),
    still in the stages: ``wait()`` receives them. Until then stage 0's host goes on (the engine's
    bookkeeping of the step before) while the stages compute."""

    def __init__(self, runner: PipelineRunner, posted: list):
        self.runner, self.posted = runner, posted  # each micro-batch's receive (Wire.post) or None

    def wait(self) -> torch.Tensor:
        runner = self.runner
        if runner._in_flight is not self:
            raise RuntimeError("these logits were dropped: another pipeline call came first")
        runner._in_flight = None
        return runner._receive(self.posted)


class PipelineRunner:
    """The engine's runner for P > 1 stages: ``ModelRunner``'s interface (the engine cannot tell),
    stage 0's part of every call, the other stages through their control messages."""

    # what it shares with ModelRunner: the row tables and the cache-slot arithmetic
    _rows = ModelRunner._rows
    _slots = ModelRunner._slots
    _cross_positions = ModelRunner._cross_positions
    _cross_slots = ModelRunner._cross_slots
    _tensor = ModelRunner._tensor
    _init_tables = ModelRunner._init_tables
    _hopper_cross = ModelRunner._hopper_cross
    _tile_end_slots = ModelRunner._tile_end_slots

    def __init__(self, loaded, config: EngineConfig, queries: int = 1):
        model, stages = loaded.model, config.pipeline_parallel
        self.model, self.config = model, config
        self.queries = queries  # the most inputs per sequence of a step (speculative verification)
        p = next(model.parameters())
        self.device, self.dtype, self.block_size = p.device, p.dtype, config.block_size
        self.cache_dtype = cache_dtype(config.kv_dtype, self.dtype)  # every stage's pool (Stage)
        self.max_source_len = min(config.max_source_len or 4096, model.max_source_positions)
        self.max_target_len = min(config.max_target_len or 1024, model.max_target_positions)
        # the split chosen when the model was loaded for stage 0 (see stage_pruner), else now
        self.sizes = getattr(model, "pipeline_sizes", None) or stage_sizes(model, stages, config.pp_layers)
        n_enc = len(model.encoder_layers())
        self.plans = [StagePlan(self.sizes, n_enc, s) for s in range(stages)]
        plan = self.plans[0]
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        devices = [
            torch.device("cuda", self.device.index + s)
            if self.device.type == "cuda" and not _one_gpu()
            else self.device
            for s in range(stages)
        ]
        if self.device.type == "cuda" and devices[-1].index >= torch.cuda.device_count():
            raise ValueError(
                f"--pipeline-parallel {stages} on {self.device} needs GPUs {self.device.index}.."
                f"{devices[-1].index}; this machine has {torch.cuda.device_count()}"
            )
        self.stage_devices = devices
        dtype_name = str(self.dtype).removeprefix("torch.")
        store = dist.TCPStore("127.0.0.1", 0, stages, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
        ctx = torch.multiprocessing.get_context("spawn")  # its tensors pickle through shared memory
        # the workers load the model from its folder; a model built in memory (random weights for
        # encdec bench) goes to them itself
        path = Path(loaded.path)
        source = str(path) if (path / "config.json").is_file() or (path / "model.bin").is_file() else model
        self.procs = [
            ctx.Process(
                target=_stage_main,
                args=(s, stages, store.port, source, str(devices[s]), dtype_name, config, self.sizes),
                daemon=True,
                name=f"encdec-stage-{s}",
            )
            for s in range(1, stages)
        ]
        # a data-parallel rank may itself be a daemonic process, which multiprocessing refuses
        # children; the stages need no such guard (a stage whose stage 0 dies sees its
        # connections close and exits), so the flag is lifted while they start
        me = multiprocessing.current_process()
        daemonic = me.daemon
        me._config["daemon"] = False
        try:
            for proc in self.procs:
                proc.start()
        finally:
            me._config["daemon"] = daemonic
        self.wire = wire = _Wire(store, 0, stages, self.device)
        self._store = store
        self._closer = weakref.finalize(self, _shutdown, self.procs, wire)
        self.stage = Stage(model, config, plan, wire)
        blocks = []
        for s in range(1, stages):
            reply = self._recv_obj(s, REPLY)
            if "error" in reply:
                self.close()
                raise RuntimeError(f"pipeline stage {s} could not start: {reply['error']}")
            blocks.append(reply["blocks"])
        # only now: a model sent to the stages in memory (CUDA IPC) must live until they hold it
        drop_other_layers(model, plan)
        # one pool size for all: the fewest blocks any stage holds
        self.num_blocks = num_blocks = int(min([self.stage.own_blocks(), *blocks]))
        absorb = absorb_by_default(config, self.queries, self._hopper_cross)  # as ModelRunner decides
        spec, bs = model.cache_spec, config.block_size
        self.encoder_rows = None
        # absorbed: the rows of a cross block are what the stage with the fewest decoder layers holds
        rc = KVPool.rows_per_chunk(spec, bs) if absorb else None
        fewest = min(p.d1 - p.d0 for p in self.plans if p.has_decoder)
        self.cross_block_rows, self._cross_layout = cross_layout(bs, num_blocks, rc, 2 * fewest)
        layout = {"num_blocks": num_blocks, "cross_block_rows": self.cross_block_rows if absorb else None}
        for s in range(1, stages):
            wire.send_obj(layout, s)
        self._flush()
        self.stage.make_pool(num_blocks, layout["cross_block_rows"])
        self.kv = self.stage.kv  # stage 0's own pool (None: it holds no decoder layer)
        if absorb:  # not None: the engine reads it as "absorbed" (stage 0 may hold no decoder layer)
            self.encoder_rows = self.kv.encoder_rows if plan.has_decoder else torch.empty(0)
        self._init_tables(config.max_num_seqs, bs)  # as ModelRunner keeps them (rows travel with each step)
        # the one-process graphs are not used: each stage captures its own (Stage.use_graphs)
        self.graphs = self.verify_graphs = self.encoder_graph = None
        self.stage_graphs = self.stage.use_graphs
        self.encoder_graph_replays = 0
        self.calls = 0
        self.fail_at_calls: set[int] = {
            int(x) for x in os.environ.get("ENCDEC_INJECT_OOM_AT", "").split(",") if x.strip()
        }
        # fault injection for tests: stage 1 is killed (SIGKILL) at this call (CLI tests in a subprocess)
        self.kill_at_call = int(os.environ.get("ENCDEC_TEST_KILL_STAGE_AT_CALL", "0"))
        log.info(
            "pipeline of %d stages: %s",
            stages,
            "; ".join(f"stage {p.rank} on {devices[p.rank]}: {p.describe()}" for p in self.plans),
        )

    # -- faults ----------------------------------------------------------------------------------
    def _dead(self, error: Exception) -> PipelineFailure:
        """The failure to raise when talking to a stage failed: it died (or hung up)."""
        for _ in range(20):  # its exit may lag its closed connections a little
            gone = [(s, p) for s, p in enumerate(self.procs, start=1) if not p.is_alive()]
            if gone:
                break
            time.sleep(0.05)
        who = ", ".join(f"stage {s} (exit code {p.exitcode})" for s, p in gone) or "a stage"
        self._in_flight = None  # nothing more is received from the stages
        self.close()
        self.broken = PipelineFailure(f"pipeline {who} stopped ({str(error).splitlines()[0][:200]})")
        return self.broken

    @contextlib.contextmanager
    def _exchange(self):
        """A message exchange with the stages. A stage gone: ``PipelineFailure``. Anything else that
        cuts it short (Ctrl-C) leaves the stages mid-call, out of step with stage 0: they are
        ended, and the pipeline takes no more calls."""
        if self.broken is not None:
            raise self.broken
        try:
            yield
        except PipelineFailure:
            raise
        except RuntimeError as e:
            raise self._dead(e) from None
        except BaseException:
            if self.broken is None:
                self.broken = PipelineFailure("a pipeline step was interrupted; its stages were stopped")
                for p in self.procs:
                    if p.is_alive():
                        p.kill()
                self.close()
            raise

    def _recv_obj(self, src: int, tag: int):
        with self._exchange():
            return self.wire.recv_obj(src, tag)

    def _flush(self) -> None:
        with self._exchange():
            self.wire.flush()

    def _broadcast(self, msg: dict) -> None:
        with self._exchange():
            for s in range(1, len(self.plans)):
                self.wire.send_obj(msg, s)

    broken: PipelineFailure | None = None

    def read_encoder_rows(self, blocks: list[int], n: int) -> torch.Tensor | None:
        """Absorbed layout: a cached request's encoder rows from stage 0's pool (``ModelRunner``'s);
        None when stage 0 holds no decoder layer (no rows here: the caller runs the encoder)."""
        if not self.plans[0].has_decoder:
            return None
        return ModelRunner.read_encoder_rows(self, blocks, n)

    def release(self) -> None:
        """``Engine.close``: the stages stop, and with them their pools."""
        self.close()

    def close(self) -> None:
        """Stop the worker stages (also when the runner is collected or the process exits)."""
        if self.broken is None:
            try:  # the last stage finishes sending a step launched ahead before it is told to stop
                self._drain()
            except PipelineFailure:
                pass
        if self.broken is None:
            self.broken = PipelineFailure("the pipeline's stages were stopped")
        self._closer()

    def _count_call(self, what: str) -> None:
        self.calls += 1
        if self.calls == self.kill_at_call:
            import signal

            os.kill(self.procs[0].pid, signal.SIGKILL)
            self.procs[0].join()
        if self.calls in self.fail_at_calls:
            raise torch.OutOfMemoryError(f"injected out-of-memory error at {what} (call {self.calls})")

    # -- statistics ------------------------------------------------------------------------------
    def stage_stats(self) -> list[dict]:
        """Each stage's ``Stage.stats`` since it started, stage 0 first ([] once stopped)."""
        if self.broken is not None:
            return []
        self._drain()
        with self._exchange():
            self._broadcast({"op": "stats"})
            return [self.stage.stats()] + [self.wire.recv_obj(s, REPLY) for s in range(1, len(self.plans))]

    def stage_busy(self) -> list[float]:
        """Seconds each stage spent computing (not waiting) since it started, stage 0 first (the
        engine reports differences)."""
        return [s["busy"] for s in self.stage_stats()]

    # -- the engine's calls ----------------------------------------------------------------------
    def capture_encoder_graph(self) -> int:
        return 0

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            self._drain()
            with self._exchange():
                self._broadcast({"op": "copy", "copies": list(copies)})
                self.stage.copy_blocks(copies)

    def encode(self, groups: list[SequenceGroup]) -> None:
        self._count_call("encode")
        self._drain()
        micro, batches = [], []
        for rows in _micro(len(groups), len(self.plans)):
            part = [groups[i] for i in rows]
            lens = [g.encoder_len for g in part]
            mb = {"cu": np.concatenate([[0], np.cumsum(lens)]).astype(np.int32), "max": max(lens)}
            mb["slots"] = self._cross_slots(part)
            mb["zero"] = self._tile_end_slots(part) if self.encoder_rows is not None else None
            micro.append(mb)
            if self.plans[0].has_encoder:
                batches.append(
                    self.model.prepare_encoder_batch([g.request.encoder_input for g in part], self.device)
                )
        with self._exchange():
            self._broadcast({"op": "encode", "micro": micro})
            self.stage.encode(micro, batches)
        for g in groups:
            g.encoded = True

    def decode(
        self,
        seqs: list[Sequence],
        next_tokens: torch.Tensor | None = None,
        drafts: list[list[int]] | None = None,
    ) -> torch.Tensor:
        """One decoder step through every stage, in micro-batches -> float32 logits [B, vocab]; with
        ``drafts`` a verification step: the logits of each sequence's last len(drafts[b]) + 1
        inputs, packed (see ``ModelRunner.decode``)."""
        self._count_call("decode")
        srows, crows = self._rows(seqs)
        ahead = next_tokens is not None
        micro, embed = [], []
        for rows in _micro(len(seqs), len(self.plans)):
            part = [seqs[i] for i in rows]
            tokens, positions, slots, q_lens, logits_rows, kv_lens = [], [], [], [], [], []
            for i, s in zip(rows, part):
                start, end = (len(s.tokens), len(s.tokens) + 1) if ahead else (s.num_cached, len(s.tokens))
                tokens += s.tokens[start:end]
                extra = len(drafts[i]) if drafts is not None else 0
                if extra:
                    tokens += drafts[i]
                    end += extra
                positions += range(start, end)
                slots += self._slots(s.block_table, start, end)
                q_lens.append(end - start)
                last = sum(q_lens)
                logits_rows += range(last - extra - 1, last)
                kv_lens.append(len(s.tokens) + ahead + extra)
            cu = np.zeros(len(part) + 1, np.int32)
            np.cumsum(q_lens, out=cu[1:])
            micro.append({
                "cu": cu,
                "max_q": max(q_lens),
                "slots": np.asarray(slots, np.int64),
                "positions": np.asarray(positions, np.int64),
                "self_tables": self.self_tables[srows[rows.start:rows.stop]],
                "self_lens": np.array(kv_lens, np.int32),
                "cross_tables": self.cross_tables[crows[rows.start:rows.stop]],
                "cross_lens": np.array([s.group.encoder_len for s in part], np.int32),
                "logits": np.asarray(logits_rows, np.int64),
            })  # fmt: skip
            embed.append(
                next_tokens[rows.start : rows.stop] if ahead else self.stage._tensor(tokens, torch.long)
            )
        self._drain()
        last, vocab = len(self.plans) - 1, self.model.vocab_size
        with self._exchange():
            self._broadcast({"op": "decode", "micro": micro})
            self.stage.decode(micro, embed)
            posted = [self.wire.post(last, LOGITS, (len(mb["logits"]), vocab), torch.float32) for mb in micro]
        for s in seqs:
            s.num_cached = len(s.tokens) + ahead
        if ahead:  # the engine's host work for this step's tokens runs while the stages compute
            self._in_flight = InFlightLogits(self, posted)
            return self._in_flight
        return self._receive(posted)

    def _receive(self, posted: list) -> torch.Tensor:
        """The logits of a decoder step's micro-batches from the last stage (``posted``: each one's
        receive posted at the launch, or None)."""
        with self._exchange():
            failed = False  # out of memory in any stage (since its last step): in the logits' headers
            logits = []
            for p in posted:
                out, f = self.wire.recv(len(self.plans) - 1, LOGITS, p)
                logits.append(out)
                failed |= f
            self.wire.flush()
        if failed:
            raise torch.OutOfMemoryError("out of device memory in a pipeline stage")
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    _in_flight: InFlightLogits | None = None

    def _drain(self) -> None:
        """Receive (and drop) the logits of a step launched ahead that the engine let go (its rows
        all finished, or the job ended), before any other exchange: the last stage's messages
        are matched in order, so they would otherwise be taken for the next step's."""
        pending, self._in_flight = self._in_flight, None
        if pending is not None:
            try:
                self._receive(pending.posted)
            except torch.OutOfMemoryError:  # that step's failure: nothing of it is used
                pass
