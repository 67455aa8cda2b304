"""Beam search inside the continuous-batching engine (see issue: BART/T5 families)."""

from __future__ import annotations

import torch

from encdec_cli.engine.block_manager import BlockManager
from encdec_cli.engine.sequence import SequenceGroup


def beam_step(group: SequenceGroup, logits: torch.Tensor, blocks: BlockManager) -> None:
    """Advance one request's beams by one token. logits: [len(group.seqs), V] processed logits."""
    raise NotImplementedError("beam search is not implemented yet")
