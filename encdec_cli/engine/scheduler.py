"""Offline, throughput-first scheduling: which requests run the encoder, which decode, this step.

Pure Python over SequenceGroups and the BlockManager: no tensors, unit-testable.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from encdec_cli.engine.block_manager import BlockManager, OutOfBlocks
from encdec_cli.engine.config import EngineConfig
from encdec_cli.engine.sequence import Sequence, SequenceGroup

# While requests run, admit new ones once this share of the sequence slots and of the KV pool is
# free (see Scheduler._admission_paused).
ADMIT_MIN_FREE_FRACTION = 1 / 8


def _waiting_key(group: SequenceGroup) -> tuple[bool, int]:
    return (not group.preempted, group.encoder_len)  # preempted first, then shortest input


@dataclass
class StepPlan:
    encode: list[SequenceGroup] = field(default_factory=list)  # run the encoder, write cross K/V
    reused: list[SequenceGroup] = field(default_factory=list)  # admitted on a cached encoder run
    decode: list[Sequence] = field(default_factory=list)  # one decoder step each
    copies: list[tuple[int, int]] = field(default_factory=list)  # block copies (src, dst) first
    preempted: list[SequenceGroup] = field(default_factory=list)
    failed: list[tuple[SequenceGroup, str]] = field(default_factory=list)  # can never fit


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager):
        # the step limits: from the engine's config, lowered by the engine after running out of memory
        self.max_num_seqs = config.max_num_seqs  # decoder sequences (beams count singly) in one step
        self.max_encoder_tokens = config.max_encoder_tokens  # encoder tokens per step (>= 1 request)
        self.window = config.window  # look-ahead: waiting requests sorted by encoder length
        self.blocks = blocks
        self.waiting: list[SequenceGroup] = []  # kept sorted by _waiting_key
        self.running: list[SequenceGroup] = []
        self.num_preemptions = 0
        # micro-batches (Engine._step): admitted requests join the cohort with fewer sequences
        # (1: everything in cohort 0)
        self.cohorts = 1

    def add(self, group: SequenceGroup) -> None:
        bisect.insort(self.waiting, group, key=_waiting_key)

    @property
    def has_room(self) -> bool:
        return len(self.waiting) < self.window

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def max_blocks(self, group: SequenceGroup) -> int:
        """Blocks a group needs at its largest: cross + every beam at full length."""
        full = len(group.request.prompt_ids) + group.max_new_tokens
        return self.blocks.cross_blocks_for(
            group.encoder_len
        ) + group.params.num_beams * self.blocks.blocks_for(full)

    def _admit_blocks(self, group: SequenceGroup) -> int:
        """Blocks a waiting group takes when admitted: its cross blocks and prompt blocks."""
        own = sum(self.blocks.blocks_for(len(s.tokens)) for s in group.seqs)
        return self.blocks.cross_blocks_for(group.encoder_len) + own

    def _headroom(self) -> int:
        """Blocks kept free for the running sequences: one each, so admitted work can progress."""
        return sum(len(g.seqs) for g in self.running)

    def _admission_paused(self, num_seqs: int, headroom: int) -> bool:
        """Batched admission: while requests run, wait until a slice (ADMIT_MIN_FREE_FRACTION) of
        the sequence slots and of the KV pool (beyond the running sequences' headroom) is free, or
        everything waiting fits, so encoder runs stay large instead of one request per finishing
        sequence, and the steps in between run ahead (Engine._can_run_ahead). A preempted request
        is admitted as soon as it fits."""
        if not self.running or not self.waiting or self.waiting[0].preempted:  # sorted: preempted first
            return False
        if self.max_num_seqs - num_seqs < max(1, int(self.max_num_seqs * ADMIT_MIN_FREE_FRACTION)):
            return True
        want = min(
            int(self.blocks.num_blocks * ADMIT_MIN_FREE_FRACTION),
            self._admit_blocks(self.waiting[0]) * len(self.waiting),
        )
        return self.blocks.num_free - headroom < want

    def admits_next_step(self) -> bool:
        """Whether the next ``schedule`` would admit (or reject) a waiting request, as things stand
        now: admission not paused, and the first waiting request fits the sequence slots and the
        free blocks (or can never fit, and gets its error)."""
        if not self.waiting:
            return False
        num_seqs, headroom = sum(g.num_seqs_reserved for g in self.running), self._headroom()
        if self._admission_paused(num_seqs, headroom):
            return False
        first = self.waiting[0]
        if not self.running or self.max_blocks(first) > self.blocks.num_blocks:
            return True
        if num_seqs + first.num_seqs_reserved > self.max_num_seqs:
            return False
        return self._admit_blocks(first) + headroom <= self.blocks.num_free

    def cohort_seqs(self) -> list[int]:
        """Sequences (reserved: a beam search counts its beams) running in each cohort."""
        load = [0] * self.cohorts
        for g in self.running:
            load[g.cohort] += g.num_seqs_reserved
        return load

    def schedule(self, cohort: int | None = None) -> StepPlan:
        """The next step: room for the running sequences' next tokens, admissions, what decodes.

        ``cohort``: a micro-batch step (Engine._step): only that cohort's requests get room and
        decode, and only they can be preempted (the other cohort's step is in flight); admitted
        requests still join the lighter cohort (encoded now, decoded in their cohort's step)."""
        plan = StepPlan()
        # 1. Room for every running sequence's next token(s); out of blocks: preempt the newest.
        bs = self.blocks.block_size
        refs = self.blocks.refs
        for group in sorted(self.running, key=lambda g: g.order):
            if group.preempted_now or (cohort is not None and group.cohort != cohort):
                continue  # preempted below
            for seq in group.seqs:
                table = seq.block_table
                # fast path: the new tokens fit the last block, which is this sequence's own
                if len(seq.tokens) <= len(table) * bs and refs[table[(seq.num_cached) // bs]] == 1:
                    continue
                while True:
                    try:
                        plan.copies += self.blocks.prepare_write(
                            seq.block_table, seq.num_cached, len(seq.tokens)
                        )
                        break
                    except OutOfBlocks:
                        victim = max(
                            (g for g in self.running if cohort is None or g.cohort == cohort),
                            key=lambda g: g.order,
                        )
                        self._preempt(victim)
                        plan.preempted.append(victim)
                        if victim is group:
                            break
                if group.preempted_now:
                    break
        for g in plan.preempted:
            g.preempted_now = False
        # 2. Admit waiting requests (preempted first, then shortest encoder input first).
        self.waiting.sort(key=_waiting_key)  # sorted already unless a preemption just happened
        num_seqs = sum(g.num_seqs_reserved for g in self.running)
        enc_tokens = 0
        still_waiting = []
        if self._admission_paused(num_seqs, self._headroom()):
            plan.decode = self._decode(cohort)
            return plan
        load = self.cohort_seqs()
        for i, group in enumerate(self.waiting):
            if self.max_blocks(group) > self.blocks.num_blocks:
                plan.failed.append(
                    (
                        group,
                        f"request needs {self.max_blocks(group)} KV blocks at its longest; "
                        f"the pool has {self.blocks.num_blocks} (raise the memory budget)",
                    )
                )
                continue
            fits = (
                # at least one request even beyond the limit (e.g. more beams than max_num_seqs
                # after an out-of-memory shrink): a request that can never be admitted would hang
                (num_seqs == 0 or num_seqs + group.num_seqs_reserved <= self.max_num_seqs)
                and (enc_tokens == 0 or enc_tokens + self._encoder_tokens(group) <= self.max_encoder_tokens)
                and self._try_admit(group)
            )
            if not fits:
                still_waiting.extend(self.waiting[i:])
                break
            num_seqs += group.num_seqs_reserved
            # the lighter cohort (ties: the one stepping now, so that it decodes at once)
            first = cohort if cohort is not None else 0
            group.cohort = min(range(self.cohorts), key=lambda c: (load[c], c != first))
            load[group.cohort] += group.num_seqs_reserved
            self.running.append(group)
            if not group.encoded:  # a prefix cache hit shares another request's encoder run
                enc_tokens += group.encoder_len
                plan.encode.append(group)
            else:
                plan.reused.append(group)
        self.waiting = still_waiting
        plan.decode = self._decode(cohort)
        return plan

    def _decode(self, cohort: int | None) -> list[Sequence]:
        if cohort is None:
            return [s for g in self.running for s in g.seqs]
        return [s for g in self.running if g.cohort == cohort for s in g.seqs]

    def _encoder_tokens(self, group: SequenceGroup) -> int:
        """Encoder tokens a waiting group would add to this step's encoder run: none when its
        encoder output is in the prefix cache."""
        cache = self.blocks.cache
        if cache is not None and group.encoder_key is not None and cache.lookup(group.encoder_key):
            return 0
        return group.encoder_len

    def _try_admit(self, group: SequenceGroup) -> bool:
        """Allocate cross blocks and each sequence's prompt blocks, keeping one block of headroom
        per running sequence so admitted work can make progress. With prefix caching, a request
        whose encoder input is cached (or encoded by a request admitted before it in this step)
        shares its cross blocks and skips the encoder (``group.encoded``), and cached full blocks
        of its decoder prompt are shared (``BlockManager.acquire_prompt``)."""
        if self._admit_blocks(group) + self._headroom() > self.blocks.num_free:
            return False
        blocks, key = self.blocks, group.encoder_key
        group.cross_blocks, group.encoded = blocks.acquire_cross(
            key, blocks.cross_blocks_for(group.encoder_len)
        )
        if group.encoded:
            blocks.cache.counters.encoder_tokens_saved += group.encoder_len
        group.encoder_cached = group.encoded
        for s in group.seqs:  # prefix caching: full blocks of the same encoder input and prompt
            s.block_table, s.num_cached = blocks.acquire_prompt(key, s.tokens, s.num_prompt)
            s.num_reused = s.num_cached
        group.cached_prompt_tokens = group.seqs[0].num_reused if group.seqs else 0
        return True

    def preempt_all(self) -> list[SequenceGroup]:
        """Send every running request back to waiting, to re-encode and recompute later (after a
        step failed, e.g. out of device memory); returns them."""
        self.blocks.drop_pending()  # what this step registered in the prefix cache is not written
        groups = sorted(self.running, key=lambda g: g.order)
        for g in groups:
            self._preempt(g)
            g.preempted_now = False
        return groups

    def _preempt(self, group: SequenceGroup) -> None:
        """Free everything the group holds; it re-encodes and recomputes its tokens later."""
        self.running.remove(group)
        self._free(group)
        group.encoded = False
        group.preempted = True  # goes first when re-admitted
        group.preempted_now = True
        self.waiting.insert(0, group)
        self.num_preemptions += 1

    def _free(self, group: SequenceGroup) -> None:
        for s in group.seqs:
            self.blocks.free(s.block_table)
            s.block_table = []
            s.num_cached = 0
        self.blocks.free(group.cross_blocks)
        group.cross_blocks = []

    def free_seq(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []

    def finish(self, group: SequenceGroup) -> None:
        """The group is done: release its remaining blocks."""
        if group in self.running:
            self.running.remove(group)
        self._free(group)
