"""Builds each step's tensors and runs the model: encoder runs, cross K/V writes, decoder steps."""

from __future__ import annotations

import torch

from encdec_cli.engine.sequence import Sequence, SequenceGroup
from models.base import AttentionMetadata, PagedView


class ModelRunner:
    """Owns the KV pool tensors ([L, NB, BS, H, D] for K and V) and the model's device."""

    def __init__(self, model, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.block_size = model, device, block_size
        spec = model.cache_spec
        shape = (spec.num_layers, num_blocks, block_size, spec.num_heads, spec.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        model.bind_cache(self.k_cache, self.v_cache)

    @staticmethod
    def bytes_per_block(model, block_size: int, dtype: torch.dtype) -> int:
        s = model.cache_spec
        return (
            2
            * s.num_layers
            * block_size
            * s.num_heads
            * s.head_dim
            * torch.empty((), dtype=dtype).element_size()
        )

    def _tensor(self, data, dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype, pin_memory=self.device.type == "cuda")
        return t.to(self.device, non_blocking=True)

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            src = self._tensor([c[0] for c in copies], torch.long)
            dst = self._tensor([c[1] for c in copies], torch.long)
            self.k_cache[:, dst] = self.k_cache[:, src]
            self.v_cache[:, dst] = self.v_cache[:, src]

    @torch.inference_mode()
    def encode(self, groups: list[SequenceGroup]) -> None:
        """Run the encoder over the groups' inputs (packed) and write their cross K/V."""
        batch = self.model.prepare_encoder_batch([g.request.encoder_input for g in groups], self.device)
        hidden = self.model.encode(batch)
        slots = []
        for g in groups:
            slots += self._slots(g.cross_blocks, 0, g.encoder_len)
        self.model.write_cross_kv(hidden, self._tensor(slots, torch.long))
        for g in groups:
            g.encoded = True

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One decoder step over every sequence's uncached tokens -> float32 logits [B, vocab] of
        each sequence's last token."""
        tokens, positions, slots, cu, last = [], [], [], [0], []
        for s in seqs:
            start, end = s.num_cached, len(s.tokens)
            tokens += s.tokens[start:end]
            positions += range(start, end)
            slots += self._slots(s.block_table, start, end)
            cu.append(cu[-1] + end - start)
            last.append(cu[-1] - 1)
        width = max(len(s.block_table) for s in seqs)
        cross_width = max(len(s.group.cross_blocks) for s in seqs)
        meta = AttentionMetadata(
            cu_seqlens_q=self._tensor(cu, torch.int32),
            max_seqlen_q=max(cu[i + 1] - cu[i] for i in range(len(seqs))),
            slot_mapping=self._tensor(slots, torch.long),
            self_attn=PagedView(
                self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32),
                self._tensor([len(s.tokens) for s in seqs], torch.int32),
            ),
            cross_attn=PagedView(
                self._tensor(
                    [s.group.cross_blocks + [0] * (cross_width - len(s.group.cross_blocks)) for s in seqs],
                    torch.int32,
                ),
                self._tensor([s.group.encoder_len for s in seqs], torch.int32),
            ),
            logits_indices=self._tensor(last, torch.long),
        )
        logits = self.model.decode(
            self._tensor(tokens, torch.long), self._tensor(positions, torch.long), meta
        )
        for s in seqs:
            s.num_cached = len(s.tokens)
        return logits.float()
