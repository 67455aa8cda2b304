"""Pieces shared by the text families (BART family, T5 family): token-id encoder inputs packed
without padding, and a shared token embedding with an lm_head that may be tied to it.

Encoder inputs are lists of token ids (already truncated by the task layer). A batch packs them
into one [T] tensor with ``cu_seqlens`` offsets; positions restart at 0 in every sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from encdec_models.base import EncDecModel, EncoderBatch, host_to_device
from encdec_models.layers import logits_into


def as_token_ids(item: Any) -> np.ndarray:
    """A 1-D int64 array of token ids from a list/tuple/array/1-D tensor; ValueError otherwise.

    Runs for every request, twice (admission checks, then the encoder batch): one vectorised
    conversion, no Python loop over the tokens."""
    if torch.is_tensor(item):
        item = item.detach().cpu().numpy()
    if isinstance(item, (str, bytes)) or not isinstance(item, (Sequence, np.ndarray)):
        raise ValueError(
            f"encoder input must be a list of token ids (tokenize text first), got {type(item).__name__}"
        )
    if isinstance(item, (list, tuple)) and bool in set(map(type, item)):
        raise ValueError("encoder input must hold integer token ids only (found a bool)")
    try:
        ids = np.asarray(item)
    except (TypeError, ValueError) as e:  # ragged nesting
        raise ValueError(f"encoder input must be a 1-D sequence of token ids ({e})") from None
    if ids.ndim != 1:
        raise ValueError(f"encoder input must be a 1-D sequence of token ids, got shape {ids.shape}")
    if ids.size and ids.dtype.kind not in "iu":
        raise ValueError("encoder input must hold integer token ids only")
    return ids.astype(np.int64, copy=False)


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T] int64 index of every packed token inside its own sequence (0, 1, .., 0, 1, ..)."""
    cu = cu_seqlens.long()
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=total)
    return torch.arange(total, device=cu.device) - starts


class TextEncDecModel(EncDecModel):
    """Base of the text families. Subclasses set ``max_source_positions`` and
    ``source_vocab_size`` (encoder token ids must be below it), create ``shared`` (token
    embedding) and ``lm_head`` modules, and fill ``tied_weights`` ({lm_head param: embedding
    param}) when the lm_head may be tied to an embedding."""

    max_source_positions: int
    source_vocab_size: int
    # parameter -> parameter it aliases when the checkpoint lacks it (transformers ties it then)
    tied_weights: dict[str, str]

    # ---- encoder inputs -----------------------------------------------------------------------
    def encoder_length(self, item) -> int:
        ids = as_token_ids(item)
        if not len(ids):
            raise ValueError("empty encoder input: it needs at least one token")
        if len(ids) > self.max_source_positions:
            raise ValueError(
                f"encoder input has {len(ids)} tokens; this model takes at most "
                f"{self.max_source_positions} (truncate the input)"
            )
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.source_vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"encoder input holds token id {bad}, outside the model's vocabulary "
                f"[0, {self.source_vocab_size})"
            )
        return len(ids)

    def prepare_encoder_batch(self, items, device) -> EncoderBatch:
        """items: lists of token ids -> inputs [T] int64 packed, cu_seqlens [B+1] int32."""
        seqs = [as_token_ids(x) for x in items]
        lens = [len(s) for s in seqs]
        host = [
            torch.from_numpy(np.concatenate(seqs)),
            torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32),
        ]
        inputs, cu_seqlens = (host_to_device(t, device) for t in host)
        return EncoderBatch(inputs=inputs, cu_seqlens=cu_seqlens, max_seqlen=max(lens))

    # ---- tied weights -------------------------------------------------------------------------
    def fill_missing(self, name: str) -> bool:
        """Loader hook: a tied weight absent from the checkpoint aliases its source."""
        if name in self.tied_weights:
            self._tie(name, self.tied_weights[name])
            return True
        return False

    def tie_equal_weights(self) -> None:
        """Alias tied weights that the checkpoint stored twice with equal values (older
        checkpoints store lm_head.weight beside the embedding): one copy in memory, not two."""
        for target, source in self.tied_weights.items():
            t, s = self.get_parameter(target), self.get_parameter(source)
            if t is not s and t.shape == s.shape and torch.equal(t, s):
                self._tie(target, source)

    def _tie(self, target: str, source: str) -> None:
        parent, attr = target.rsplit(".", 1)
        setattr(self.get_submodule(parent), attr, self.get_parameter(source))

    def lm_logits(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, d] final decoder states -> [N, vocab] logits (into ``out`` when given)."""
        return logits_into(x, self.lm_head.weight, out)
