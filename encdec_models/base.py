"""The model protocol the engine speaks, and the metadata passed to attention.

A model family implements ``prepare_encoder_batch``, ``encode``, ``write_cross_kv`` and
``decode``; the engine knows nothing else about it (see docs/design.md, "The model protocol").
"""

from __future__ import annotations

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
    """Where one attention kind finds its keys: block tables + lengths per sequence.

    block_tables: [B, max_blocks] int32; seq_lens: [B] int32 (number of valid keys).
    """

    block_tables: torch.Tensor
    seq_lens: torch.Tensor


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


@dataclass(frozen=True)
class CacheSpec:
    """Shape of one token's K (or V) in every decoder layer: [num_layers, num_heads, head_dim].

    Self and cross attention have the same per-token shape in every supported family, so one
    block pool serves both (a block holds either self or cross K/V of its owner).
    """

    num_layers: int
    num_heads: int
    head_dim: int


class EncDecModel(nn.Module):
    """Base class of the model families. Subclasses set ``config`` fields and implement:

    - ``encoder_length(item) -> int``: encoder tokens an input will take (Whisper: 1500).
    - ``prepare_encoder_batch(items, device) -> EncoderBatch``.
    - ``encode(batch) -> hidden [total_encoder_tokens, d_model]``.
    - ``write_cross_kv(hidden, slot_mapping)``: project each decoder layer's cross K/V once.
    - ``decode(tokens [Tq], positions [Tq], meta) -> logits [N, vocab]``.
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

    def bind_cache(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cross_rows: torch.Tensor | None = None,
        scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
    ) -> None:
        """Give each decoder layer its slice of the pool: caches are [L, NB, BS, H, D].

        cross_rows: the same pool seen as encoder-output rows [C, NB, RC, d_model] (absorbed
        cross-attention, see ``layers.Attention.cross``); None: cross K/V per layer.
        scales: an fp8 pool's float32 scales (k [L, NB, BS, H], v [L, NB, BS, H], rows [C, NB, RC]
        or None), one per cached row (``encdec_kernels.reference.quantize_rows``)."""
        self.cross_rows = cross_rows
        k_sc, v_sc, row_sc = scales if scales is not None else (None, None, None)
        self.cross_row_scales = row_sc
        for i, layer in enumerate(self.decoder_layers()):
            for attn in (layer.self_attn, layer.encoder_attn):
                attn.k_cache, attn.v_cache = k_cache[i], v_cache[i]
                attn.k_scales = None if k_sc is None else k_sc[i]
                attn.v_scales = None if v_sc is None else v_sc[i]
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
        return self.decoder_layers()[0].encoder_attn.kv_proj.in_features

    def decoder_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def encoder_length(self, item: Any) -> int:
        raise NotImplementedError

    def prepare_encoder_batch(self, items: list[Any], device: torch.device) -> EncoderBatch:
        raise NotImplementedError

    def encode(self, batch: EncoderBatch) -> torch.Tensor:
        raise NotImplementedError

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
        for layer in self.decoder_layers():
            layer.encoder_attn.write_cross(hidden, slot_mapping)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError
