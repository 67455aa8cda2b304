"""The model protocol the engine speaks, and the metadata passed to attention.

A model family implements ``prepare_encoder_batch``, ``encode``, ``write_cross_kv`` and
``decode``; the engine knows nothing else about it (see docs/design.md, "The model protocol").
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import encdec_kernels


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` without waiting for the GPU: on CUDA through pinned memory with a
    non-blocking copy (a copy from pageable memory first waits for every queued GPU step; the
    caching host allocator reuses the pinned buffers). Tensors already on a device stay as they are."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def stack_to_device(items: list[torch.Tensor], device: torch.device, dtype: torch.dtype | None = None):
    """``torch.stack(items)`` (cast to ``dtype``, default the first item's) on ``device``. Host items
    bound for CUDA are stacked straight into pinned memory (one host copy, not a stack and then a
    pinned copy) and moved without waiting for the GPU; items already on the device stack there."""
    device = torch.device(device)
    dtype = items[0].dtype if dtype is None else dtype
    if device.type != "cuda" or any(t.device.type != "cpu" for t in items):
        return torch.stack([t.to(device, dtype) for t in items])
    out = torch.empty((len(items), *items[0].shape), dtype=dtype, pin_memory=True)
    if all(t.dtype == dtype for t in items):
        torch.stack(items, out=out)
    else:
        for i, t in enumerate(items):
            out[i].copy_(t)
    return out.to(device, non_blocking=True)


@dataclass
class EncoderBatch:
    """Packed encoder inputs for one encoder run.

    inputs: model-specific tensor (Whisper: waveforms [B, N_SAMPLES]; text models: token ids [T];
    Moonshine: groups of waveforms, each zero-padded to its longest, flattened one after another).
    cu_seqlens: [B+1] int32 offsets of each sequence in the packed encoder output.
    max_seqlen: longest encoder sequence of the batch.
    """

    inputs: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    # raw-waveform models (Moonshine, see its prepare_encoder_batch): the front end's groups of padded
    # rows (rows, width in samples, valid frames), each row's valid samples, the (row, frame) of every
    # valid frame, and where the items' order differs from the groups', the packing's rows in it
    front_end_groups: list[tuple[int, int, int]] | None = None
    input_lengths: torch.Tensor | None = None
    pack_index: torch.Tensor | None = None
    pack_order: torch.Tensor | None = None


@dataclass
class PagedView:
    """Where one attention kind finds its keys: block tables + lengths per entry.

    block_tables: [E, max_blocks] int32; seq_lens: [E] int32 (number of valid keys).
    cu_seqlens_q, max_seqlen_q: the query rows of each entry ([E + 1] int32 offsets into the step's
    packed rows) and the most rows an entry has; None: an entry per sequence, with the step's own
    (``AttentionMetadata``). Cross-attention of beams: a request's beams are consecutive rows that
    read the same encoder keys, so one entry takes them all (its keys read once for all of them).
    """

    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    max_seqlen_q: int | None = None


@dataclass
class AttentionMetadata:
    """Everything a decoder step's attention layers need (typed, no globals).

    cu_seqlens_q: [B+1] int32 offsets of each sequence's new tokens in the packed step.
    max_seqlen_q: most new tokens of any sequence this step (1 for pure decode steps).
    slot_mapping: [Tq] int64 self-cache slot of every new token (-1 = padding, skipped).
    self_attn / cross_attn: paged views of the decoder self cache and the cross cache.
    logits_indices: [N] int64 rows of the step's hidden states to project to logits.
    """

    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    slot_mapping: torch.Tensor
    self_attn: PagedView
    cross_attn: PagedView
    logits_indices: torch.Tensor

    def queries(self, view: PagedView) -> tuple[torch.Tensor, int]:
        """(cu_seqlens_q, max_seqlen_q) of the query rows that attend through ``view``."""
        if view.cu_seqlens_q is None:
            return self.cu_seqlens_q, self.max_seqlen_q
        return view.cu_seqlens_q, view.max_seqlen_q


@dataclass(frozen=True)
class CacheSpec:
    """Shape of one token's K (or V) in every decoder layer: [num_layers, num_heads, head_dim].

    Self and cross attention have the same per-token shape in every supported family, so one
    block pool serves both (a block holds either self or cross K/V of its owner).
    """

    num_layers: int
    num_heads: int
    head_dim: int
    # width of the encoder output, what cross-attention reads (T5: not num_heads * head_dim)
    d_model: int
    decoder_width: int | None = None  # the decoder's hidden width where it differs from d_model

    @property
    def hidden(self) -> int:
        """Width of the decoder's hidden states."""
        return self.decoder_width or self.d_model


_boundary_hook: ContextVar[Callable[[int], None] | None] = ContextVar("layer_boundary_hook", default=None)


@contextlib.contextmanager
def layer_boundary_hook(fn: Callable[[int], None]):
    """Within this block (and this thread), every ``run_layers`` stack calls fn(i) before its
    layer i > 0: CUDA-graph capture cuts a decode step into several graphs at layer boundaries
    (encdec_cli/engine/cuda_graphs.py)."""
    token = _boundary_hook.set(fn)
    try:
        yield
    finally:
        _boundary_hook.reset(token)


_exact_lock = threading.Lock()
_exact_users = 0  # threads inside exact_fp32_convolutions
_exact_saved = True  # the flag as the first of them found it


@contextlib.contextmanager
def exact_fp32_convolutions(model: nn.Module):
    """cuDNN's convolutions in full float32 while a float32 ``model`` embeds its encoder input (the
    front ends: Whisper's and Moonshine's convolutions, the vision towers' patch and depthwise
    ones). torch lets cuDNN round float32 convolutions to TF32 by default (~1e-3 relative), and the
    algorithm it picks follows the batch size: an item's encoder output, and with it a sampled
    token, would depend on its batch neighbours (float32 on a GPU is for exact results).

    The flag is process-wide: it is turned off when the first thread enters and restored when the
    last one leaves (a count under a lock), so one engine's encoder ending never turns TF32 back on
    under another's. Other code's float32 convolutions in that window run in full float32 too."""
    global _exact_users, _exact_saved
    param = next(model.parameters(), None)
    if param is None or param.dtype != torch.float32 or not param.is_cuda:
        yield
        return
    with _exact_lock:
        if _exact_users == 0:
            _exact_saved = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False
        _exact_users += 1
    try:
        yield
    finally:
        with _exact_lock:
            _exact_users -= 1
            if _exact_users == 0:
                torch.backends.cudnn.allow_tf32 = _exact_saved


def run_layers(
    layers, x, *args, residual=None, start: int = 0, end: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run layers [start, end) of a stack of encoder or decoder layers (all by default); ``args``
    follow x in their forward; ``residual``: what the layer before ``start`` left pending.

    Returns (x, residual): the hidden state is x + residual. Pre-norm layers leave their last
    residual sum to the next norm (its fused add), one elementwise kernel less per layer; the
    stack's final norm takes it through ``final_norm``. Post-norm layers return residual None."""
    hook = _boundary_hook.get()
    part = layers if start == 0 and end is None else itertools.islice(layers, start, end)
    for i, layer in enumerate(part, start):
        if i and hook is not None:
            hook(i)
        x, residual = layer(x, *args, residual=residual)
    return x, residual


class EncDecModel(nn.Module):
    """Base class of the model families. Subclasses set ``config`` fields and implement:

    - ``encoder_length(item) -> int``: encoder tokens an input will take (Whisper: 1500).
    - ``prepare_encoder_batch(items, device) -> EncoderBatch``.
    - the pieces around the two layer stacks: ``encoder_layers`` / ``decoder_layers``,
      ``embed_encoder``, ``encoder_layer_args``, ``finish_encoder``, ``embed_decoder``,
      ``decoder_layer_args``, ``decoder_head``.

    From these the base composes the protocol the engine speaks:
    - ``encode(batch) -> hidden [total_encoder_tokens, d_model]``.
    - ``write_cross_kv(hidden, slot_mapping)``: project each decoder layer's cross K/V once.
    - ``decode(tokens [Tq], positions [Tq], meta) -> logits [N, vocab]``.
    and its layer-range form for pipeline stages (``encoder_part``, ``decoder_part``; a stage binds
    the cache of its own decoder layers with ``bind_cache(..., first=)``).
    """

    cache_spec: CacheSpec
    cross_rows: torch.Tensor | None = None  # set by bind_cache
    cross_row_scales: torch.Tensor | None = None  # fp8 pools: the rows' float32 scales (bind_cache)
    # whether the engine takes absorbed cross-attention by default (where the Hopper kernel runs it):
    # it pays where every request's encoder output is long (Whisper: 1500 rows); on BART's shorter
    # inputs the two extra matmuls per layer cost more than the reads they save (benchmarks/README.md)
    absorb_cross_by_default: bool = False
    # False: decode steps cannot be captured in CUDA graphs (T5Gemma's sliding windows and soft-capping
    # run on the reference attention, which reads sequence lengths on the host)
    cuda_graphs: bool = True
    max_target_positions: int  # decoder positions the model supports (prompt + output)
    max_source_positions: int  # encoder tokens the model supports
    vocab_size: int

    def encoder_activation_bytes(self, tokens: int) -> int:
        """Peak bytes of the activations of an encoder step of ``tokens`` encoder tokens (the
        engine sizes its KV pool around them): about 24 live bf16 tensors of [tokens, d_model]."""
        return tokens * self.cache_spec.num_heads * self.cache_spec.head_dim * 2 * 24

    def bind_cache(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cross_rows: torch.Tensor | None = None,
        scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
        first: int = 0,
    ) -> None:
        """Give each decoder layer its slice of the pool: caches are [L, NB, BS, H, D] for decoder
        layers [first, first + L) (a pipeline stage holds the cache of its own layers only).

        cross_rows: the same pool seen as encoder-output rows [C, NB, RC, d_model] (absorbed
        cross-attention, see ``layers.Attention.cross``); None: cross K/V per layer.
        scales: an fp8 pool's float32 scales (k [L, NB, BS, H], v [L, NB, BS, H], rows [C, NB, RC]
        or None), one per cached row (``encdec_kernels.reference.quantize_rows``)."""
        self.cross_rows = cross_rows
        k_sc, v_sc, row_sc = scales if scales is not None else (None, None, None)
        self.cross_row_scales = row_sc
        self._cache_layers = range(first, first + k_cache.shape[0])
        layers = self.decoder_layers()
        for i in self._cache_layers:
            layer, j = layers[i], i - first
            for attn in (layer.self_attn, layer.encoder_attn):
                attn.k_cache, attn.v_cache = k_cache[j], v_cache[j]
                attn.k_scales = None if k_sc is None else k_sc[j]
                attn.v_scales = None if v_sc is None else v_sc[j]
            layer.encoder_attn.cross_rows = cross_rows
            layer.encoder_attn.row_scales = row_sc

    def unbind_cache(self) -> None:
        """Drop the pool views ``bind_cache`` gave the layers: the model no longer keeps an engine's
        KV pool alive (an engine's pool goes with it; a new engine sizes its pool from free memory)."""
        self.cross_rows = self.cross_row_scales = None
        for layer in self.decoder_layers():
            for attn in (layer.self_attn, layer.encoder_attn):
                attn.k_cache = attn.v_cache = attn.k_scales = attn.v_scales = None
            layer.encoder_attn.cross_rows = layer.encoder_attn.row_scales = None

    @property
    def d_model(self) -> int:
        return self.cache_spec.d_model

    def encoder_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def decoder_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def encoder_length(self, item: Any) -> int:
        raise NotImplementedError

    def prepare_encoder_batch(self, items: list[Any], device: torch.device) -> EncoderBatch:
        raise NotImplementedError

    # ---- the pieces around the layer stacks (each family) ---------------------------------------
    def embed_encoder(self, batch: EncoderBatch) -> torch.Tensor:
        """[T, d] input of encoder layer 0."""
        raise NotImplementedError

    def encoder_layer_args(self, batch: EncoderBatch, x: torch.Tensor) -> tuple:
        """What follows x (the [T, d] input of the layers; a stage past the first gets a batch
        without ``inputs``) in an encoder layer's forward."""
        return (batch.cu_seqlens, batch.max_seqlen)

    def finish_encoder(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The encoder output from the last layer's (x, residual)."""
        raise NotImplementedError

    def embed_decoder(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[Tq, d] input of decoder layer 0."""
        raise NotImplementedError

    def decoder_layer_args(self, meta: AttentionMetadata, positions: torch.Tensor, x: torch.Tensor) -> tuple:
        """What follows x in a decoder layer's forward (``positions``: [Tq] each input's index in
        its decoder sequence, for rotary families)."""
        return (meta,)

    def decoder_head(self, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata, out=None):
        """Logits [N, vocab] of the rows ``meta.logits_indices`` from the last layer's (x, residual),
        written into ``out`` when given (``layers.logits_into``)."""
        raise NotImplementedError

    # ---- the protocol, whole or a range of layers (pipeline stages) ---------------------------
    def _embedded(self, batch: EncoderBatch) -> torch.Tensor:
        """``embed_encoder`` under ``exact_fp32_convolutions``."""
        with exact_fp32_convolutions(self):
            return self.embed_encoder(batch)

    def encode(self, batch: EncoderBatch) -> torch.Tensor:
        x = self._embedded(batch)
        x, residual = run_layers(self.encoder_layers(), x, *self.encoder_layer_args(batch, x))
        return self.finish_encoder(x, residual)

    def encoder_part(self, batch: EncoderBatch, start: int, end: int, x=None, residual=None):
        """Encoder layers [start, end): from the embedding when ``start`` is 0, else from the
        (x, residual) of the part before. Returns the encoder output when ``end`` is the last
        layer, else (x, residual) for the next part."""
        layers = self.encoder_layers()
        if start == 0:
            x = self._embedded(batch)
        x, residual = run_layers(
            layers, x, *self.encoder_layer_args(batch, x), residual=residual, start=start, end=end
        )
        return self.finish_encoder(x, residual) if end == len(layers) else (x, residual)

    def decoder_part(
        self, meta: AttentionMetadata, positions, start: int, end: int, x, residual=None, out=None
    ):
        """Decoder layers [start, end) from (x, residual) (``embed_decoder``'s output for layer 0):
        the logits when ``end`` is the last layer (into ``out`` when given), else (x, residual)
        for the next part."""
        layers = self.decoder_layers()
        x, residual = run_layers(
            layers, x, *self.decoder_layer_args(meta, positions, x), residual=residual, start=start, end=end
        )
        return self.decoder_head(x, residual, meta, out) if end == len(layers) else (x, residual)

    def graph_encoder_batch(self, device: torch.device) -> EncoderBatch | None:
        """A one-item encoder batch of the fixed input shape every item of this model takes, to
        capture a CUDA graph of the encoder run (``ModelRunner.capture_encoder_graph``); None
        when inputs vary in shape (text)."""
        return None

    def write_cross_kv(self, hidden: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Write the encoder output's cross-attention cache: each layer's K/V at ``slot_mapping``,
        or (absorbed) the rows themselves at rows of ``cross_rows`` flattened to [N, d_model]."""
        if self.cross_rows is not None:  # slot = (chunk * NB + block) * RC + row; -1 = skip
            encdec_kernels.store_rows(hidden, self.cross_rows, slot_mapping, self.cross_row_scales)
            return
        layers = self.decoder_layers()
        for i in getattr(self, "_cache_layers", range(len(layers))):  # the layers bind_cache bound
            layers[i].encoder_attn.write_cross(hidden, slot_mapping)

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, out=None
    ) -> torch.Tensor:
        """The logits of a decode step; ``out``: an [N, vocab] tensor to write them into."""
        x = self.embed_decoder(tokens, positions)
        x, residual = run_layers(self.decoder_layers(), x, *self.decoder_layer_args(meta, positions, x))
        return self.decoder_head(x, residual, meta, out)
