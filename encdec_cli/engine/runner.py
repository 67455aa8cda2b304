"""Builds each step's tensors and runs the model: encoder runs, cross K/V writes, decoder steps.

Host overhead is kept out of the hot loop: block tables live in persistent numpy arrays (one row
per running sequence / request, updated only when a sequence gains a block), each step's inputs
go to the device in a few pinned copies, and pure decode steps (one new token per sequence) replay
CUDA graphs captured for padded batch sizes (see ``encdec_cli/engine/cuda_graphs.py``).
"""

from __future__ import annotations

import gc
import itertools
import os
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch

import encdec_kernels
from encdec_cli.engine.beam import Children
from encdec_cli.engine.config import EngineConfig
from encdec_cli.engine.sequence import Sequence, SequenceGroup, packed_rows
from encdec_cli.engine.transfer import to_device
from encdec_models.base import AttentionMetadata, PagedView

# absorbed cross-attention by default from this many sequences per step (where the Hopper kernel runs):
# it reads each sequence's encoder rows with one CTA per 64-row tile, so a step of a few sequences
# leaves most SMs idle (measured with benchmarks/sweep_shared_kv.py; numbers in benchmarks/README.md)
ABSORB_MIN_SEQS = 16


def absorb_by_default(config: EngineConfig, queries: int, hopper_cross) -> bool:
    """``EngineConfig.absorb_cross`` None: absorbed cross-attention for batched plain decoding on
    the Hopper kernel (``hopper_cross()``: it runs this model). Not with speculative decoding
    (``queries`` > 1): that kernel reads a sequence's encoder rows once per query token, so a
    verification step's K + 1 tokens read them K + 1 times, while per-layer K/V go through the paged
    kernel, which reads them once for all of them (W1 at alpha 0.7, K 4 on an H100: RTFx 2,737-2,793
    against 2,187 for plain absorbed decoding; benchmarks/README.md, eleventh session)."""
    if config.absorb_cross is not None:
        return config.absorb_cross
    return queries == 1 and config.max_num_seqs >= ABSORB_MIN_SEQS and hopper_cross()


# a cross-attention entry (``cross_entries``) takes at most this many query rows: one query tile of
# the paged kernel at one row a sequence, so a CUDA graph captured for one-row steps runs it too
CROSS_ENTRY_ROWS = 16


def cross_entries(crows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """A one-row-a-sequence step's cross-attention entries (``PagedView``'s): each run of
    consecutive rows of one request (``crows``, each row's cross-table row: beams, or a request's
    sampled sequences) is one entry of up to ``CROSS_ENTRY_ROWS`` rows, which the paged kernel
    serves with one read of the request's keys. Returns (each entry's first row, [E + 1] row
    offsets), or None where no entry would take two rows (an entry per row, the step's own)."""
    n = len(crows)
    new = np.ones(n, bool)
    np.not_equal(crows[1:], crows[:-1], out=new[1:])
    if new.all():
        return None
    rows = np.arange(n)
    run_start = np.maximum.accumulate(np.where(new, rows, 0))
    new |= (rows - run_start) % CROSS_ENTRY_ROWS == 0
    first = np.flatnonzero(new)
    return first, np.append(first, n).astype(np.int32)


# up to this many sequences a verification step's inputs are laid out in Python lists
# (``ModelRunner._verify_layout_few``), beyond it in numpy over all rows at once
FEW_SEQS = 8


def cache_dtype(kv_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV pool's value dtype for ``EngineConfig.kv_dtype``: "auto" keeps the model's dtype,
    "fp8" stores e4m3 values with float32 scales per row (decoder self-attention and
    cross-attention alike: one pool serves both kinds of block)."""
    return encdec_kernels.FP8_DTYPE if kv_dtype == "fp8" else model_dtype


def cross_layout(block_size: int, num_blocks: int, rc: int | None = None, chunks: int = 0):
    """(cross_block_rows, (step, offsets)): encoder positions a cross block holds and where: the
    position r of block b is cache slot b * step + offsets[r] (``ModelRunner._cross_positions``).
    Per-layer K/V (``rc`` None): ``block_size`` positions, slot b * BS + r. Absorbed: ``chunks``
    chunks of ``rc`` rows a block, row r in chunk r // rc of ``KVPool.encoder_rows``."""
    if rc is None:
        return block_size, (block_size, np.arange(block_size))
    r = np.arange(chunks * rc)
    return chunks * rc, (rc, (r // rc) * num_blocks * rc + r % rc)


class KVPool:
    """The KV pool of decoder layers [first, first + L) in one process (a ``ModelRunner``'s whole
    decoder, a pipeline ``Stage``'s own layers), bound into those layers by ``build``.

    ``values`` [2, L, NB, BS, H, D]: K and V of each layer for block NB's BS tokens. Absorbed
    cross-attention: ``encoder_rows`` [C = 2 * L, NB, RC, d_model] is the same memory seen as
    encoder-output rows, RC = BS * H * D // d_model a [BS, H, D] chunk (``Attention.cross``).

    fp8 (``cache_dtype`` e4m3): ``scales`` [2, L, NB, BS, H] float32 holds one scale per (token,
    head) row of K/V, each block's head-major in memory (``scale_blocks`` [2, L, NB, H, BS]: the
    paged kernel reads one head's scales of a block's keys as 64 contiguous bytes, not one 32-byte
    sector a key); the rows of chunk c in block b take theirs from the first RC entries of chunk c,
    block b (``row_scales`` [C, NB, RC]; RC <= BS * H since d_model >= D). Otherwise all None."""

    def __init__(self, values, scale_blocks, encoder_rows, row_scales):
        self.values, self.scale_blocks = values, scale_blocks
        self.scales = None if scale_blocks is None else scale_blocks.transpose(-1, -2)
        self.encoder_rows, self.row_scales = encoder_rows, row_scales

    @staticmethod
    def bytes_per_block(spec, layers: int, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block of ``layers`` decoder layers' pool with values of ``dtype`` (the cache
        dtype): fp8 takes one byte a value plus a float32 scale per (token, head) row, so about
        twice the blocks fit in the same memory as bf16."""
        elem = torch.empty((), dtype=dtype).element_size()
        rows = 2 * layers * block_size * spec.num_heads
        scale_bytes = 4 if dtype == encdec_kernels.FP8_DTYPE else 0
        return rows * (spec.head_dim * elem + scale_bytes)

    @staticmethod
    def rows_per_chunk(spec, block_size: int) -> int:
        """RC: encoder rows of one [BS, H, D] chunk in the absorbed layout."""
        rc = block_size * spec.num_heads * spec.head_dim // spec.d_model
        if rc < 1:
            d = spec.d_model
            raise ValueError(f"block_size {block_size} is too small to hold a {d}-wide encoder row")
        return rc

    @classmethod
    def build(cls, model, layers: int, num_blocks: int, block_size: int, dtype: torch.dtype,
              device: torch.device, absorb: bool, first: int = 0) -> KVPool:  # fmt: skip
        """A zeroed pool of decoder layers [first, first + layers), bound into them
        (``model.bind_cache``); ``absorb``: with the encoder-rows view."""
        spec = model.cache_spec
        shape = (2, layers, num_blocks, block_size, spec.num_heads, spec.head_dim)
        values = torch.zeros(shape, dtype=dtype, device=device)
        blocks = rows = row_scales = None
        if dtype == encdec_kernels.FP8_DTYPE:  # head-major in each block, seen as [.., BS, H]
            blocks = torch.ones((2, layers, num_blocks, spec.num_heads, block_size), device=device)
        if absorb:
            chunk = block_size * spec.num_heads * spec.head_dim  # elements of one [BS, H, D] chunk
            d, rc = spec.d_model, cls.rows_per_chunk(spec, block_size)
            rows = values.as_strided((2 * layers, num_blocks, rc, d), (num_blocks * chunk, chunk, d, 1))
            if blocks is not None:
                per = block_size * spec.num_heads  # scales of one chunk
                row_scales = blocks.view(2 * layers, num_blocks, per)[:, :, :rc]
        pool = cls(values, blocks, rows, row_scales)
        scales = None if blocks is None else (pool.scales[0], pool.scales[1], row_scales)
        model.bind_cache(values[0], values[1], rows, scales, first)
        return pool

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Blocks src -> dst (device long tensors): values and, fp8, their scales."""
        raw = self.values.view(torch.uint8) if self.scales is not None else self.values  # fp8: as bytes
        raw[:, :, dst] = raw[:, :, src]
        if self.scale_blocks is not None:
            self.scale_blocks[:, :, dst] = self.scale_blocks[:, :, src]

    def store_rows(self, x: torch.Tensor, slots: torch.Tensor) -> None:
        """Absorbed layout: rows x [N, d] to encoder-row slots (``encdec_kernels.store_rows``; fp8:
        quantized, one scale a row)."""
        encdec_kernels.store_rows(x, self.encoder_rows, slots, self.row_scales)

    def read_rows(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Absorbed layout: the encoder rows at ``slots`` [n, d] in ``dtype`` (a copy; fp8:
        dequantized)."""
        nb, rc = self.encoder_rows.shape[1], self.encoder_rows.shape[2]
        index = (slots // (nb * rc), slots // rc % nb, slots % rc)
        if self.row_scales is None:
            return self.encoder_rows[index]
        vals = self.encoder_rows.view(torch.uint8)[index].view(self.encoder_rows.dtype)
        return (vals.float() * self.row_scales[index][:, None]).to(dtype)


def fit_blocks(model, config: EngineConfig, per_block: int, device: torch.device, logit_rows: int,
               who: str = "", hint: str = "") -> int:  # fmt: skip
    """Blocks of ``per_block`` bytes a pool takes: ``config.cpu_kv_cache_bytes`` on the CPU; on a
    GPU what ``gpu_memory_utilization`` leaves after the memory in use and room for activations:
    the largest encoder batch's (the model's ``encoder_activation_bytes``) and a decode step's of
    ``logit_rows`` rows (logits at 16 bytes a value: the graphs' bf16 output, float32 copies, log
    probabilities; attention split partials and layer temporaries at 128 bytes a d_model value,
    and ``encdec_kernels.SPLIT_PARTIALS_MAX_BYTES`` for absorbed cross-attention's split partials).
    ``who`` / ``hint``: the error's prefix and extra advice."""
    if device.type != "cuda":
        return max(16, config.cpu_kv_cache_bytes // per_block)
    gc.collect()  # an Engine dropped before this one (reference cycles) gives its pool back first
    free, total = torch.cuda.mem_get_info(device)
    mine = torch.cuda.memory_allocated(device)
    # memory torch's caching allocator holds but no tensor uses (a freed pool) is free for this one
    used = total - free - max(0, torch.cuda.memory_reserved(device) - mine)
    spec = model.cache_spec
    d_model = spec.num_heads * spec.head_dim
    act = model.encoder_activation_bytes(config.max_encoder_tokens)
    act += logit_rows * (model.vocab_size * 16 + d_model * 128) + encdec_kernels.SPLIT_PARTIALS_MAX_BYTES
    budget = total * config.gpu_memory_utilization - used - act
    if budget < per_block * 64:
        raise RuntimeError(
            f"{who}not enough GPU memory left for the KV cache ({used / 2**30:.1f} of "
            f"{total / 2**30:.1f} GiB in use, {mine / 2**30:.1f} GiB by this process: another Engine "
            f"still alive? Engine.close() gives its pool back); lower --max-num-seqs"
            f"{',' if hint else ' or'} raise --gpu-memory-utilization{hint}"
        )
    return int(budget // per_block)


class _Rows:
    """Row ids of a persistent table for live objects; rows of objects gone are reused.

    Keys must stay unique while they hold a row: sequence ids, or the request (group) objects
    themselves (never ``id(obj)``: a finished group's id is reused by a new group, which would then
    inherit its stale row)."""

    def __init__(self, n: int):
        self.free = list(range(n - 1, -1, -1))
        self.of: dict[Hashable, int] = {}

    def get(self, key: Hashable) -> tuple[int, bool]:
        row = self.of.get(key)
        if row is not None:
            return row, False
        if not self.free:
            raise RuntimeError("runner row table full (more live sequences than max_num_seqs)")
        row = self.of[key] = self.free.pop()
        return row, True

    def keep_only(self, keys: set) -> None:
        for k in [k for k in self.of if k not in keys]:
            self.free.append(self.of.pop(k))


@dataclass
class VerifyLayout:
    """A verification step's inputs (``ModelRunner.verify_layout``), numpy int64."""

    tokens: np.ndarray  # [T] every sequence's inputs, in order
    positions: np.ndarray  # [T]
    slots: np.ndarray  # [T] their self-attention cache slots
    dest: np.ndarray  # [T] each input's row in the step (packed, or q rows a sequence)
    logits_rows: np.ndarray  # [sum(len(d) + 1)] the rows whose logits verification reads
    start: np.ndarray  # [B] each sequence's first input position (its cached tokens)
    kv_lens: np.ndarray  # [B] keys each sequence attends to
    inputs: np.ndarray  # [B] inputs a sequence


class ModelRunner:
    """Owns the KV pool and the model's device.

    The pool (``KVPool``: ``pool`` = its values, ``scales``, ``encoder_rows``, ``row_scales``) is
    one tensor [2, L, NB, BS, H, D]: K and V of every decoder layer for block NB's BS tokens. With
    absorbed cross-attention a request's cross blocks hold its encoder output instead (read by
    every layer, see ``Attention.cross``): each of the 2 * L chunks [BS, H, D] of a block holds
    RC = BS * H * D // d_model rows, so a block holds 2 * L * RC (1024 for Whisper large: 1500
    positions in 2 blocks instead of 94).

    ``EngineConfig.kv_dtype`` "fp8": the pool holds e4m3 values (``cache_dtype``) with a float32
    scale per cached row (``KVPool``).

    From the ``EngineConfig`` it resolves what the model and the device decide: the length limits
    (``max_source_len``, ``max_target_len``), the pool size (``num_blocks``) and the
    cross-attention layout (``encoder_rows`` is None unless absorbed).
    """

    def __init__(self, model, config: EngineConfig, queries: int = 1):
        """``queries``: the most inputs per sequence of a decode step (speculative verification:
        K + 1): the step's logits take that much more room."""
        p = next(model.parameters())
        # an earlier engine's pool, bound into this model's layers, must not count as used memory
        # (nor outlive that engine) when this one sizes its own
        model.unbind_cache()
        self.queries = queries
        self.model, self.device, self.dtype, self.block_size = model, p.device, p.dtype, config.block_size
        self.max_source_len = min(config.max_source_len or 4096, model.max_source_positions)
        self.max_target_len = min(config.max_target_len or 1024, model.max_target_positions)
        self.cache_dtype = cache_dtype(config.kv_dtype, self.dtype)
        self.num_blocks = num_blocks = config.num_blocks or self._pool_blocks(config)
        absorb = absorb_by_default(config, queries, self._hopper_cross)
        block_size, spec = config.block_size, model.cache_spec
        self.kv = KVPool.build(
            model, spec.num_layers, num_blocks, block_size, self.cache_dtype, self.device, bool(absorb)
        )
        self.pool, self.scales = self.kv.values, self.kv.scales
        self.encoder_rows, self.row_scales = self.kv.encoder_rows, self.kv.row_scales
        self.k_cache, self.v_cache = self.pool[0], self.pool[1]
        rc = KVPool.rows_per_chunk(spec, block_size) if absorb else None
        chunks = 2 * spec.num_layers
        self.cross_block_rows, self._cross_layout = cross_layout(block_size, num_blocks, rc, chunks)
        self._init_tables(config.max_num_seqs, block_size)
        self.graphs = None  # CudaGraphs, set up by the engine
        # the last decode step's (self-attention tables [B, W], cross-attention PagedView) on the
        # device, row i = its i-th sequence (decode_children reads its parents' rows there)
        self.last_tables: tuple[torch.Tensor, PagedView] | None = None
        # with cross-attention entries (``cross_entries``), their [E + 1] row offsets (host copy)
        self.last_entries: np.ndarray | None = None
        self.verify_graphs = None  # [CudaGraphs] of speculative verification steps, by queries a sequence
        self.encoder_graph = None  # (graph, static EncoderBatch, static slots): capture_encoder_graph()
        self.encoder_graph_replays = 0
        # Fault injection for tests: encode/decode calls (counted from 1 in `calls`) that raise
        # torch.OutOfMemoryError instead of running, as a CUDA OOM would; also read from the
        # environment, e.g. ENCDEC_INJECT_OOM_AT=3,7 (for CLI tests in a subprocess).
        self.calls = 0
        self.fail_at_calls: set[int] = {
            int(x) for x in os.environ.get("ENCDEC_INJECT_OOM_AT", "").split(",") if x.strip()
        }

    def _init_tables(self, max_num_seqs: int, block_size: int) -> None:
        """The persistent block tables: self-attention per sequence, cross-attention per request
        (rows handed out by ``_Rows``; ``synced``: seq_id -> the block table written into its row)."""
        self.max_num_seqs = max_num_seqs
        self.self_width = -(-self.max_target_len // block_size)
        self.cross_width = -(-self.max_source_len // self.cross_block_rows)
        self.self_tables = np.zeros((max_num_seqs, self.self_width), np.int32)
        self.cross_tables = np.zeros((max_num_seqs, self.cross_width), np.int32)
        self.self_rows, self.cross_rows = _Rows(max_num_seqs), _Rows(max_num_seqs)
        self.synced: dict[int, list[int]] = {}

    def _hopper_cross(self) -> bool:
        """Whether this model takes absorbed cross-attention by default here: encdec_kernels prefers
        it where its Hopper kernel runs this model's shape and dtype, with a cache of that dtype."""
        m = self.model
        return m.absorb_cross_by_default and encdec_kernels.prefers_absorbed_cross(
            self.device, self.dtype, m.cache_spec.num_heads, m.d_model, self.cache_dtype
        )

    def release(self) -> None:
        """Drop the KV pool and the CUDA graphs (``Engine.close``); the model's layers let go of the
        pool too unless another runner bound its own since."""
        if self.pool is not None:
            k = self.model.decoder_layers()[0].self_attn.k_cache
            if k is not None and k.untyped_storage().data_ptr() == self.pool.untyped_storage().data_ptr():
                self.model.unbind_cache()
        self.graphs = self.verify_graphs = self.encoder_graph = None
        self.pool = self.k_cache = self.v_cache = self.encoder_rows = self.kv = None
        self.scales = self.row_scales = None

    def _pool_blocks(self, config: EngineConfig) -> int:
        """Blocks of the KV pool (``fit_blocks``; the step's logits: ``queries`` rows a sequence)."""
        per_block = self.bytes_per_block(self.model, config.block_size, self.cache_dtype)
        return fit_blocks(self.model, config, per_block, self.device, config.max_num_seqs * self.queries)

    @staticmethod
    def bytes_per_block(model, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block of the whole decoder's pool with values of ``dtype`` (the cache dtype;
        ``KVPool.bytes_per_block``)."""
        return KVPool.bytes_per_block(model.cache_spec, model.cache_spec.num_layers, block_size, dtype)

    def _tensor(self, data, dtype) -> torch.Tensor:
        return to_device(self.device, data, dtype)

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def verify_layout(
        self, seqs: list[Sequence], srows: np.ndarray, drafts: list[list[int]], q: int | None = None
    ) -> VerifyLayout:
        """The inputs of a verification step (each sequence's uncached tokens, then its drafts) as
        numpy arrays over all sequences at once: packed (``q`` None) or in ``q`` rows a sequence,
        real inputs last (the verification CUDA graphs). ``srows``: the sequences' rows of
        ``self_tables`` (``_rows``, written for this step). A few sequences take ``_verify_layout_few``
        (the same in Python lists)."""
        n, bs = len(seqs), self.block_size
        if n <= FEW_SEQS:
            return self._verify_layout_few(seqs, drafts, q)
        start = np.fromiter((s.num_cached for s in seqs), np.int64, n)
        dl = np.fromiter((len(d) for d in drafts), np.int64, n)
        r = np.fromiter((len(s.tokens) for s in seqs), np.int64, n) - start + dl  # inputs a sequence
        total = int(r.sum())
        tokens = np.fromiter(
            itertools.chain.from_iterable(
                itertools.chain(s.tokens[c:], d) for s, c, d in zip(seqs, start.tolist(), drafts)
            ),
            np.int64,
            total,
        )
        first, owner, j = packed_rows(r)
        positions = start[owner] + j
        slots = self.self_tables[srows[owner], positions // bs].astype(np.int64) * bs + positions % bs
        end = first + r if q is None else np.arange(1, n + 1) * q  # past each sequence's inputs
        dest = (end - r)[owner] + j  # where each input goes
        _, lo, li = packed_rows(dl + 1)
        logits_rows = (end - dl - 1)[lo] + li  # the last len(d) + 1
        return VerifyLayout(tokens, positions, slots, dest, logits_rows, start, start + r, r)

    def _verify_layout_few(
        self, seqs: list[Sequence], drafts: list[list[int]], q: int | None
    ) -> VerifyLayout:
        """``verify_layout`` of a few sequences: Python lists (numpy's fixed cost per op outweighs
        a loop over a few rows), slots from the sequences' block tables (``_rows`` wrote the same
        into ``self_tables``)."""
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        dest: list[int] = []
        logits_rows: list[int] = []
        start: list[int] = []
        kv_lens: list[int] = []
        inputs: list[int] = []
        end = 0  # past the previous sequence's rows
        for i, (s, d) in enumerate(zip(seqs, drafts)):
            c = s.num_cached
            mine = s.tokens[c:] + d
            r = len(mine)
            end = end + r if q is None else (i + 1) * q
            tokens += mine
            positions += range(c, c + r)
            slots += self._slots(s.block_table, c, c + r)
            dest += range(end - r, end)
            logits_rows += range(end - len(d) - 1, end)
            start.append(c)
            kv_lens.append(c + r)
            inputs.append(r)
        a = np.array
        return VerifyLayout(
            a(tokens, np.int64), a(positions, np.int64), a(slots, np.int64), a(dest, np.int64),
            a(logits_rows, np.int64), a(start, np.int64), a(kv_lens, np.int64), a(inputs, np.int64),
        )  # fmt: skip

    def _cross_positions(self, g: SequenceGroup, start: int, end: int) -> np.ndarray:
        """Cache slots of a request's encoder positions [start, end). Position p is row r = p % rows
        of block b = table[p // rows] (rows = ``cross_block_rows``), at slot b * step + offset[r]:
        b * BS + r for per-layer K/V; for encoder rows, row r % RC of chunk r // RC of the block
        (``encoder_rows`` [C, NB, RC, d]). Numpy: a Python loop over a Whisper request's 1500
        positions kept the GPU waiting for milliseconds per encoder batch."""
        step, offsets = self._cross_layout
        p = np.arange(start, end)
        rows = self.cross_block_rows
        return np.asarray(g.cross_blocks, np.int64)[p // rows] * step + offsets[p % rows]

    def read_encoder_rows(self, blocks: list[int], n: int) -> torch.Tensor:
        """Absorbed layout: the first ``n`` encoder rows held in cross blocks ``blocks`` [n, d]
        (a copy: the blocks may be reused afterwards)."""
        step, offsets = self._cross_layout
        p = np.arange(n)
        slots = self._tensor(np.asarray(blocks, np.int64)[p // self.cross_block_rows] * step
                             + offsets[p % self.cross_block_rows], torch.long)  # fmt: skip
        return self.kv.read_rows(slots, self.dtype)

    def _cross_slots(self, groups: list[SequenceGroup]) -> np.ndarray:
        """Cache slot of every encoder position of the groups, packed."""
        return np.concatenate([self._cross_positions(g, 0, g.encoder_len) for g in groups])

    def _tile_end_slots(self, groups: list[SequenceGroup]) -> np.ndarray:
        """The cross-cache slots after each request's encoder rows up to the end of their last
        ``encdec_kernels.SHARED_KV_TILE_ROWS``-row tile (see ``_zero_tile_ends``)."""
        tile = encdec_kernels.SHARED_KV_TILE_ROWS
        ends = [min(-(-g.encoder_len // tile) * tile, len(g.cross_blocks) * self.cross_block_rows)
                for g in groups]  # fmt: skip
        return np.concatenate([self._cross_positions(g, g.encoder_len, e) for g, e in zip(groups, ends)])

    def _zero_tile_ends(self, groups: list[SequenceGroup]) -> None:
        """Absorbed layout: write zeros after each request's encoder rows up to the end of their last
        ``encdec_kernels.SHARED_KV_TILE_ROWS``-row tile. The Hopper kernel loads whole tiles and
        masks the scores only, so a stale inf or NaN left there by an earlier request would reach
        the output through 0 * inf."""
        slots = self._tile_end_slots(groups)
        if len(slots):
            zeros = torch.zeros(
                (len(slots), self.encoder_rows.shape[3]), dtype=self.dtype, device=self.device
            )
            self.kv.store_rows(zeros, self._tensor(slots, torch.long))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:  # sources and destinations in one host-to-device copy
            src, dst = self._tensor([[c[0] for c in copies], [c[1] for c in copies]], torch.long)
            self.kv.copy_blocks(src, dst)

    def _count_call(self, what: str) -> None:
        self.calls += 1
        if self.calls in self.fail_at_calls:
            raise torch.OutOfMemoryError(f"injected out-of-memory error at {what} (call {self.calls})")

    def capture_encoder_graph(self) -> int:
        """Capture one CUDA graph of a one-item encoder run and its cross K/V writes, for models
        whose encoder input has a fixed shape (Whisper's 30 s windows). A single request's
        encoder run launches ~15 kernels per layer, each a few microseconds of GPU work on one
        item, so eager it waits on the host (~10% of a batch-1 Whisper request's time); the
        graph replays them without. Returns the bytes the graph took (0 if none)."""
        example = self.model.graph_encoder_batch(self.device)
        if example is None:
            return 0
        free_before = torch.cuda.mem_get_info(self.device)[0]
        slots = torch.full(
            (example.max_seqlen,), -1, dtype=torch.long, device=self.device
        )  # -1: write nowhere
        for _ in range(2):  # warm-up: compiles, autotunes, FFT plans outside the capture
            self.model.write_cross_kv(self.model.encode(example), slots)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            hidden = self.model.encode(example)
            self.model.write_cross_kv(hidden, slots)
        self.encoder_graph = (graph, example, slots, hidden)
        return max(0, free_before - torch.cuda.mem_get_info(self.device)[0])

    def encode(self, groups: list[SequenceGroup]) -> torch.Tensor:
        """Run the encoder over the groups' inputs (packed) and write their cross K/V; returns the
        encoder output [total encoder tokens, d_model] (valid until the next encoder run)."""
        self._count_call("encode")
        batch = self.model.prepare_encoder_batch([g.request.encoder_input for g in groups], self.device)
        slots = self._cross_slots(groups)
        graphed = self.encoder_graph
        if (
            graphed is not None
            and graphed[1].inputs.shape == batch.inputs.shape
            and len(slots) == len(graphed[2])
        ):
            graph, example, static_slots, hidden = graphed
            example.inputs.copy_(batch.inputs)
            static_slots.copy_(self._tensor(slots, torch.long))
            graph.replay()
            self.encoder_graph_replays += 1
        else:
            hidden = self.model.encode(batch)
            self.model.write_cross_kv(hidden, self._tensor(slots, torch.long))
        if self.encoder_rows is not None:
            self._zero_tile_ends(groups)
        for g in groups:
            g.encoded = True
        return hidden

    def _rows(self, seqs: list[Sequence], keep: list[Sequence] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Row of every sequence in the self and cross tables, writing rows that changed; rows of
        other sequences are handed back, except those of ``keep`` (the other micro-batch's).

        A self-table row is rewritten only when its sequence's block table differs from the one
        last written there (``synced`` keeps a copy): a block appended, a shared block replaced by
        its copy (copy-on-write: beams), or new blocks after a preemption. Beams forked this step
        have new sequence ids, so new rows."""
        self.self_rows.keep_only({s.seq_id for s in itertools.chain(seqs, keep)})
        self.cross_rows.keep_only({s.group for s in itertools.chain(seqs, keep)})
        synced = self.synced
        for k in [k for k in synced if k not in self.self_rows.of]:
            del synced[k]
        self_of, cross_of = self.self_rows.of, self.cross_rows.of
        srows, crows = [], []
        for s in seqs:
            r = self_of.get(s.seq_id)
            if r is None:
                r, _ = self.self_rows.get(s.seq_id)
            table = s.block_table
            # first decode since (re)admission: its blocks are new (prefix cache hits included)
            fresh = s.num_cached == s.num_reused
            if fresh or synced.get(s.seq_id) != table:
                self.self_tables[r, : len(table)] = table
                synced[s.seq_id] = table.copy()
            srows.append(r)
            c = cross_of.get(s.group)
            if c is None or fresh:
                c, _ = self.cross_rows.get(s.group)
                self.cross_tables[c, : len(s.group.cross_blocks)] = s.group.cross_blocks
            crows.append(c)
        return np.array(srows, np.int64), np.array(crows, np.int64)

    def decode(
        self,
        seqs: list[Sequence],
        next_tokens: torch.Tensor | None = None,
        drafts: list[list[int]] | None = None,
        keep: list[Sequence] = (),
    ) -> torch.Tensor:
        """One decoder step over every sequence's uncached tokens -> float32 logits [B, vocab] of
        each sequence's last token.

        ``next_tokens`` ([B] int64 on the device): run the step after the current one, before its
        tokens are on the host: sequence b's input is next_tokens[b] at position len(tokens) (its
        cache slot must exist). The caller appends the tokens to the sequences afterwards.

        ``drafts`` (speculative verification): sequence b's input continues with drafts[b] after
        its uncached tokens (their cache slots must exist), and the logits are those of its last
        len(drafts[b]) + 1 inputs, packed: [sum(len(d) + 1), vocab]. ``num_cached`` then counts
        the tokens only; the caller adds the drafts it accepts.

        ``keep``: sequences not in this step whose table rows stay (the other micro-batch's)."""
        self._count_call("decode")
        srows, crows = self._rows(seqs, keep)
        ahead = next_tokens is not None
        q_lens = [1] * len(seqs) if ahead else [len(s.tokens) - s.num_cached for s in seqs]
        if drafts is not None:
            q_lens = [q + len(d) for q, d in zip(q_lens, drafts)]
            most = max(q_lens)  # the graphs with the fewest queries a sequence that hold the step's
            graphs = next((g for g in self.verify_graphs or () if g.queries >= most), None)
            if graphs is not None and len(seqs) <= graphs.max_batch:
                logits = graphs.run(self, seqs, srows, crows, drafts=drafts)
            else:
                logits = self._eager(seqs, srows, crows, q_lens, drafts=drafts)
        elif self.graphs is not None and max(q_lens) == 1 and len(seqs) <= self.graphs.max_batch:
            logits = self.graphs.run(self, seqs, srows, crows, next_tokens)
        else:
            logits = self._eager(seqs, srows, crows, q_lens, next_tokens)
        for s in seqs:
            s.num_cached = len(s.tokens) + ahead
        return logits.float()

    def decode_ahead(
        self,
        seqs: list[Sequence],
        best: torch.Tensor,
        starts: np.ndarray,
        last: np.ndarray | torch.Tensor,
        ks: np.ndarray,
        candidates: np.ndarray,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A verification step launched before the previous one's outcome reaches the host
        (``Engine._verify_ahead``). That step verified every sequence of ``seqs``, greedy: ``best``
        is the argmax of its rows on the device (sequence b's from starts[b]) and ``last`` its
        drafts ([B, KL], -1 past each row's; on the host, or on the device when it was itself
        launched ahead). Sequence b took m drafts (those before the first that is not the argmax)
        and the argmax t after them, whose cache that step wrote; its inputs now: t at position
        len(tokens) + m, then ks[b] drafts candidates[b, m + i] (``Drafter.propose_ahead``). One
        kernel makes m, t and these inputs on the device (``encdec_kernels.accept_and_next``).
        Cache slots must exist for every position the step may write: up to len(tokens) + KL + ks[b].
        Returns (float32 logits of every input, packed: [sum(ks + 1), vocab]; the drafts [B,
        max(ks)] on the device, -1 past each row's). ``num_cached`` is left to the caller
        (``Speculator.settle``)."""
        self._count_call("decode")
        srows, crows = self._rows(seqs)
        n, dev = len(seqs), self.device
        counts = ks + 1
        total, most = int(counts.sum()), int(counts.max())
        graphs = next((g for g in self.verify_graphs or () if g.queries >= most), None)
        if graphs is not None and n > graphs.max_batch:
            graphs = None
        if graphs is not None:  # q rows a sequence, real inputs last (as CudaGraphs.run lays them out)
            q = rows = graphs.queries
            row_first = np.arange(n, dtype=np.int64) * q
            row_end = row_first + q
        else:  # packed
            rows = most
            row_end = np.cumsum(counts)
            row_first = row_end - counts
        base = np.fromiter((len(s.tokens) for s in seqs), np.int64, n)
        parts = [base, ks, starts, row_first, row_end, candidates.ravel()]
        on_host = isinstance(last, np.ndarray)
        up = to_device(dev, np.concatenate(parts + [last.ravel()] if on_host else parts))  # one upload
        base_d, ks_d, starts_d, first_d, end_d = up[: 5 * n].view(5, n)
        cand = up[5 * n : 5 * n + candidates.size].view(candidates.shape)
        last_d = up[5 * n + candidates.size :].view(last.shape) if on_host else last

        def inputs(tables, tokens, positions, slots):
            return encdec_kernels.accept_and_next(
                best, starts_d, last_d, base_d, ks_d, cand, tables, self.block_size, first_d, end_d,
                tokens, positions, slots, most - 1, rows, self.queries,
            )  # fmt: skip

        if graphs is not None:
            # the real rows: the last ks[b] + 1 of each sequence's (consecutive at batch 1)
            _, owner, j = packed_rows(counts)
            real = (row_end - counts)[owner] + j
            return graphs.run_ahead(self, seqs, srows, crows, inputs, real)
        tables = self._tensor(self.self_tables[srows], torch.int32)
        tokens, positions, slots = torch.empty((3, total), dtype=torch.long, device=dev)
        _, _, drafts, kv_lens = inputs(tables, tokens, positions, slots)
        cu = np.zeros(n + 1, np.int32)
        np.cumsum(counts, out=cu[1:])
        meta = AttentionMetadata(
            cu_seqlens_q=self._tensor(cu, torch.int32),
            max_seqlen_q=most,
            slot_mapping=slots,
            self_attn=PagedView(tables, kv_lens),
            cross_attn=PagedView(
                self._tensor(self.cross_tables[crows], torch.int32),
                self._tensor([s.group.encoder_len for s in seqs], torch.int32),
            ),
            logits_indices=torch.arange(total, device=dev),
        )
        self.set_last_tables(meta.self_attn.block_tables, meta.cross_attn)
        return self.model.decode(tokens, positions, meta).float(), drafts

    def _eager(self, seqs, srows, crows, q_lens, next_tokens=None, drafts=None) -> torch.Tensor:
        ahead = next_tokens is not None
        cu = np.zeros(len(seqs) + 1, np.int32)
        np.cumsum(q_lens, out=cu[1:])
        if drafts is not None:  # verification: each sequence's last len(draft) + 1 inputs' logits
            lay = self.verify_layout(seqs, srows, drafts)
            tokens, positions, slots = lay.tokens, lay.positions, lay.slots
            logits_rows, kv_lens = lay.logits_rows, lay.kv_lens
        else:
            tokens, positions, slots = [], [], []
            for s in seqs:
                start, end = (len(s.tokens), len(s.tokens) + 1) if ahead else (s.num_cached, len(s.tokens))
                tokens += s.tokens[start:end]
                positions += range(start, end)
                slots += self._slots(s.block_table, start, end)
            logits_rows = cu[1:] - 1
            kv_lens = [len(s.tokens) + ahead for s in seqs]
        entries = self.cross_entries(crows) if drafts is None and max(q_lens) == 1 else None
        if entries is None:
            cross = PagedView(
                self._tensor(self.cross_tables[crows], torch.int32),
                self._tensor([s.group.encoder_len for s in seqs], torch.int32),
            )
        else:
            first, cross_cu = entries
            cross = PagedView(
                self._tensor(self.cross_tables[crows[first]], torch.int32),
                self._tensor([seqs[i].group.encoder_len for i in first.tolist()], torch.int32),
                self._tensor(cross_cu, torch.int32),
                CROSS_ENTRY_ROWS,
            )
        meta = AttentionMetadata(
            cu_seqlens_q=self._tensor(cu, torch.int32),
            max_seqlen_q=max(q_lens),
            slot_mapping=self._tensor(slots, torch.long),
            self_attn=PagedView(
                self._tensor(self.self_tables[srows], torch.int32),
                self._tensor(kv_lens, torch.int32),
            ),
            cross_attn=cross,
            logits_indices=self._tensor(logits_rows, torch.long),
        )
        token_ids = next_tokens if ahead else self._tensor(tokens, torch.long)
        self.set_last_tables(meta.self_attn.block_tables, cross, entries)
        return self.model.decode(token_ids, self._tensor(positions, torch.long), meta)

    def cross_entries(self, crows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``cross_entries`` of a one-row step where cross-attention reads per-layer K/V through
        the paged kernel; None with absorbed rows (their kernel reads a sequence's rows once per
        query row either way)."""
        return cross_entries(crows) if self.encoder_rows is None else None

    def set_last_tables(self, tables: torch.Tensor, cross: PagedView, entries=None) -> None:
        """The step just launched: its self tables and cross view (``last_tables``), and with
        ``entries`` (``cross_entries``) their row offsets."""
        self.last_tables = (tables, cross)
        self.last_entries = None if entries is None else entries[1]

    def keep_rows(self, rows: list[int]) -> None:
        """The last decode step's rows that go on, in order (the rest finished): ``last_tables``
        keeps theirs only, so that row i there is the next step's i-th sequence again."""
        if self.last_tables is not None and rows:
            tables, cross = self.last_tables
            if self.last_entries is None:
                index = to_device(self.device, rows)
                kept = PagedView(*(t.index_select(0, index) for t in (cross.block_tables, cross.seq_lens)))
                self.last_tables = (tables.index_select(0, index), kept)
                return
            # cross-attention entries: those with a row left, over their rows left
            of_row = np.repeat(np.arange(len(self.last_entries) - 1), np.diff(self.last_entries))
            entries, counts = np.unique(of_row[rows], return_counts=True)
            cu = np.zeros(len(entries) + 1, np.int64)
            np.cumsum(counts, out=cu[1:])
            up = to_device(self.device, np.concatenate([rows, entries, cu]))  # one upload
            index, which = up[: len(rows)], up[len(rows) : len(rows) + len(entries)]
            kept = PagedView(
                cross.block_tables.index_select(0, which),
                cross.seq_lens.index_select(0, which),
                up[len(rows) + len(entries) :].to(torch.int32),
                cross.max_seqlen_q,
            )
            self.last_tables = (tables.index_select(0, index), kept)
            self.last_entries = cu

    def decode_children(self, children: Children, positions: np.ndarray, new_block: np.ndarray,
                        reserved: list[int]) -> torch.Tensor:  # fmt: skip
        """A beam-search step launched ahead (``Engine._run_beams_ahead``): its rows are the
        children the device chose from the last decode step's rows (``beam.Children``), not yet
        known on the host. Row i's input is ``children.tokens[i]`` at ``positions[i]`` (its
        parent's length); its self-attention table is its parent row's (``last_tables``) with one
        change: a row whose token starts a new block (``new_block[i]``) or that forks its parent
        (it shares the parent's last, partly written block) takes the next of ``reserved`` there
        (the pool's first free blocks, in row order: ``encdec_kernels.beam_children``), a fork's
        being a copy of the parent's block (``encdec_kernels.copy_blocks_where``: only those
        blocks' bytes move). Its cross-attention row is its parent's (request g's N rows stay rows
        g * N ...). ``beam._grants`` gives the host's children the same blocks. Returns the logits
        [B, vocab] float32, as ``decode``."""
        self._count_call("decode")
        n, bs, dev = len(positions), self.block_size, self.device
        if self.last_tables is None or len(self.last_tables[0]) != n:
            rows = None if self.last_tables is None else len(self.last_tables[0])
            raise RuntimeError(f"decode_children: {n} children, but the last decode step had {rows} rows")
        up = to_device(dev, np.concatenate([positions, new_block, reserved]))  # one upload
        pos = up[:n]
        self_tables, cross = self.last_tables
        tables, here, block, copy, slots, lens = encdec_kernels.beam_children(
            self_tables, children.parents, children.fork, up, n, bs
        )
        for part in (self.kv.values, self.kv.scale_blocks):
            if part is not None:  # [2, L, NB, ...] as [2 * L, NB, ...]
                encdec_kernels.copy_blocks_where(part.flatten(0, 1), here, block, copy)
        if self.graphs is not None and n <= self.graphs.max_batch:
            logits = self.graphs.run_children(children.tokens, pos, slots, tables, lens, cross)
        else:
            meta = AttentionMetadata(
                cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32, device=dev),
                max_seqlen_q=1,
                slot_mapping=slots,
                self_attn=PagedView(tables, lens),
                cross_attn=cross,
                logits_indices=torch.arange(n, device=dev),
            )
            logits = self.model.decode(children.tokens, pos, meta)
        self.last_tables = (tables, cross)  # the same rows a request as its parents: the same entries
        return logits.float()
