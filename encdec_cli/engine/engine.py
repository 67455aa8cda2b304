"""The engine: requests in (any iterable, streamed), results out as they finish."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import logging
import time
import weakref
from collections.abc import Iterable, Iterator

import numpy as np
import torch

import encdec_kernels
from encdec_cli.engine.beam import AheadBlocks, Children
from encdec_cli.engine.block_manager import BlockManager
from encdec_cli.engine.config import EngineConfig, EngineStats, parse_speculative
from encdec_cli.engine.prefix_cache import PrefixCache, PrefixCacheCounters, encoder_key
from encdec_cli.engine.runner import ModelRunner
from encdec_cli.engine.sampling import History, PendingSample, Sampled, Sampler
from encdec_cli.engine.scheduler import Scheduler, StepPlan
from encdec_cli.engine.sequence import Completion, Request, Result, Sequence, SequenceGroup, packed_rows
from encdec_cli.engine.speculative import (
    AheadVerify,
    Draft,
    Drafter,
    ModelDrafter,
    NgramDrafter,
    PendingVerify,
    Speculator,
)
from encdec_cli.engine.transfer import take_rows, to_device
from encdec_cli.errors import PipelineFailure
from encdec_models.loading import LoadedModel, load_model

log = logging.getLogger("encdec")

_frozen = 0  # generate() calls running (nested or interleaved) that hold the garbage collector frozen


@contextlib.contextmanager
def gc_frozen() -> Iterator[None]:
    """Move every object that exists now out of the garbage collector's view while generating
    (``gc.freeze``; undone when the last running ``generate`` ends). A full collection scans every
    tracked object: with torch, transformers and a model loaded that is hundreds of thousands,
    ~0.2 s on a busy CPU, and the beams' sequences created every step trigger one every few
    hundred steps (W3: ~1.4 ms a step on average). Frozen, it scans only what the run created."""
    global _frozen
    if _frozen == 0:
        gc.freeze()
    _frozen += 1
    try:
        yield
    finally:
        _frozen -= 1
        if _frozen == 0:
            gc.unfreeze()


class Engine:
    """Continuous-batching encoder/decoder generation.

    ``model``: a name or path (see ``encdec_models.loading.load_model``) or a ``LoadedModel``.
    ``device``: "auto", "cpu", "cuda", "cuda:N"; ``dtype``: "auto", "float32", "bfloat16", "float16".
    ``drafter``: a speculative-decoding drafter of the caller's (e.g. ``OracleDrafter`` for measuring),
    instead of ``speculative``. Further keyword arguments are ``EngineConfig`` fields.
    """

    def __init__(
        self,
        model: str | LoadedModel = "tiny.en",
        device: str = "auto",
        dtype: str = "auto",
        drafter: Drafter | None = None,
        **config,
    ):
        self.config = EngineConfig(**config)
        prune = None
        if self.config.pipeline_parallel > 1:  # stage 0 allocates only its own layers' weights
            from encdec_cli.engine.pipeline import stage_pruner

            prune = stage_pruner(self.config, 0)
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, device, dtype, prune)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        spec = parse_speculative(self.config.speculative)
        if spec is not None and drafter is not None:
            raise ValueError("give either EngineConfig.speculative or a drafter, not both")
        draft_model = None
        if spec is not None and spec.kind == "model":  # before the KV pool is sized: its weights count
            p = next(self.model.parameters())
            draft_model = load_model(spec.path, str(p.device), p.dtype)
        k = spec.k if spec is not None else drafter.k if drafter is not None else 0
        if self.config.pipeline_parallel > 1:  # stage 0 of a pipeline: see engine/pipeline.py
            from encdec_cli.engine.pipeline import PipelineRunner

            self.runner = PipelineRunner(self.loaded, self.config, queries=k + 1)
        else:
            self.runner = ModelRunner(self.model, self.config, queries=k + 1)
        self.device, self.dtype = self.runner.device, self.runner.dtype
        self.max_source_len, self.max_target_len = self.runner.max_source_len, self.runner.max_target_len
        num_blocks = self.runner.num_blocks
        cache = PrefixCache() if self.config.prefix_cache else None
        self.blocks = BlockManager(num_blocks, self.config.block_size, self.runner.cross_block_rows, cache)
        # what besides the input decides the cached encoder output (one engine has one of each)
        self._key_salt = repr(
            (self.loaded.architecture, str(self.loaded.path), str(self.dtype), self.runner.cross_block_rows,
             self.runner.encoder_rows is not None, str(self.runner.cache_dtype))
        ).encode()  # fmt: skip
        self._encoder_clock = _EncoderClock(self.device) if cache is not None else None
        # a model whose attention must run on the (host-synchronising) reference runs eagerly;
        # pipeline stages capture graphs of their own parts (pipeline.StageGraphs)
        graphs_ok = getattr(self.model, "cuda_graphs", True) and self.config.pipeline_parallel == 1
        if self.device.type == "cuda" and not self.config.enforce_eager and graphs_ok:
            from encdec_cli.engine.cuda_graphs import CudaGraphs

            graphs = CudaGraphs(self.runner, self.config.max_num_seqs, ahead=self.config.lookahead)
            graphs.capture(self.model)
            self.runner.graphs = graphs
            log.info(
                "captured %d CUDA graphs (batch 1..%d) in %.1f s, %.0f MiB",
                len(graphs.sizes),
                graphs.max_batch,
                graphs.capture_seconds,
                graphs.pool_bytes / 2**20,
            )
            start = time.perf_counter()
            encoder_bytes = self.runner.capture_encoder_graph()
            if self.runner.encoder_graph is not None:
                log.info(
                    "captured the one-item encoder run in %.1f s, %.0f MiB",
                    time.perf_counter() - start,
                    encoder_bytes / 2**20,
                )
        log.info(
            "KV pool: %d blocks of %d tokens (%.0f MiB) on %s, %s; cross-attention %s",
            num_blocks,
            self.config.block_size,
            num_blocks
            * ModelRunner.bytes_per_block(self.model, self.config.block_size, self.runner.cache_dtype)
            / 2**20,
            self.device,
            self.kv_dtype_name,
            f"absorbed ({self.runner.cross_block_rows} encoder rows a block)"
            if self.absorbs_cross
            else "K/V per layer",
        )
        self.scheduler = Scheduler(self.config, self.blocks)
        if spec is not None:
            if spec.kind == "ngram":  # encoder ids count where the decoder shares their vocabulary
                drafter = NgramDrafter(spec.k, encoder_ids=getattr(self.model, "shared_vocab", True))
            else:
                drafter = ModelDrafter(draft_model, self.loaded, spec.k, self.config, num_blocks)
                if self.config.pipeline_parallel > 1:  # stage 0 holds no whole encoder output to share
                    drafter.shares_encoder = False
        self.speculator = (
            Speculator(drafter, self.blocks, self.config.speculative_adaptive)
            if drafter is not None
            else None
        )
        # the runners whose pools this engine holds (its own, a draft model's): released by close()
        # or, when the engine is collected unclosed, by this finalizer (this process's pools: the
        # model's layers hold views of a pool and would keep it as long as the model lives)
        self._runners = [self.runner, *_runner_of(drafter)]
        self._finalizer = weakref.finalize(self, _release_pools, self._runners)
        self._finalizer.atexit = False  # at exit the process's memory goes anyway
        if self.speculator is not None and self.runner.graphs is not None:
            from encdec_cli.engine.cuda_graphs import CudaGraphs

            # K + 1 queries a sequence, and K / 2 + 1, K / 4 + 1, ..., 2 (the Ks adaptive drafting
            # goes through; 2: its tries): a step runs the graphs of the fewest queries that hold
            # its longest row, so where every row drafts at most k tokens it computes k + 1 rows a
            # sequence, not K + 1
            self.runner.verify_graphs = []
            ahead = self._may_verify_ahead()  # one-piece graphs only if steps can launch ahead
            for q in verify_queries(k):
                verify = CudaGraphs(self.runner, self.config.max_num_seqs, queries=q, ahead=ahead)
                verify.capture(self.model)
                self.runner.verify_graphs.append(verify)
                log.info(
                    "captured %d CUDA graphs of verification steps (%d queries a sequence) in %.1f s, "
                    "%.0f MiB",
                    len(verify.sizes),
                    q,
                    verify.capture_seconds,
                    verify.pool_bytes / 2**20,
                )
        self._order = 0
        self.sampler = Sampler(self.device, self.config.max_num_seqs)
        # (rows, logits) of a step launched ahead by the previous one (see _run_ahead), or a
        # verification step launched ahead (see _verify_ahead)
        self._ahead: tuple[list[Sequence], torch.Tensor] | AheadVerify | None = None
        # the taken step's rows' tokens on the device, when a beam step launched ahead made them
        # (its n-gram rule runs there; see _run_beams_ahead)
        self._history: History | None = None
        # micro-batches (see _micro_step): two cohorts, or 1 (off)
        self.micro_batches = self.config.micro_batches
        self.scheduler.cohorts = self.micro_batches
        self._turn = 0  # the cohort of the next micro-batch step when none is pending
        # (cohort, its launched token choice or acceptance): a micro-batch step whose host part is
        # still to run
        self._pending: tuple[int, PendingSample | PendingVerify] | None = None
        # encoder tokens of the encoder run in progress (0: none): an out-of-memory error raised
        # there shrinks the encoder's batches only (_recover_from_oom)
        self._encoding = 0
        self._profile = self.config.profile
        self.reset_stats()

    # ---- what callers may read ------------------------------------------------------------------
    @property
    def stats(self) -> EngineStats:
        """Counters since the engine was made or since ``reset_stats`` (a snapshot)."""
        cache = self.blocks.cache
        counters = cache.counters if cache is not None else PrefixCacheCounters()
        return dataclasses.replace(
            self._stats,
            preemptions=self.scheduler.num_preemptions - self._preemptions_before,
            phase_seconds=dict(self._stats.phase_seconds),
            stage_busy_seconds=self._stage_busy(),
            prefix_cache_hits=counters.hits,
            prefix_cache_misses=counters.misses,
            prefix_cache_evictions=counters.evictions,
            prefix_cache_prompt_tokens=counters.prompt_tokens_saved,
            encoder_seconds_saved=(
                counters.encoder_tokens_saved * self._encoder_clock.seconds_per_token() if cache else 0.0
            ),
        )

    def _stage_busy(self) -> list[float]:
        if not hasattr(self.runner, "stage_busy"):
            return []
        return [b - b0 for b, b0 in zip(self.runner.stage_busy(), self._busy_before)]

    def reset_stats(self, profile: bool | None = None) -> None:
        """Start the counters again; ``profile`` turns the per-phase timing (GPU synced) on or off."""
        if profile is not None:
            self._profile = profile
        self._stats = EngineStats()
        self._preemptions_before = self.scheduler.num_preemptions
        self._busy_before = self.runner.stage_busy() if hasattr(self.runner, "stage_busy") else []
        if self.blocks.cache is not None:
            self.blocks.cache.counters = PrefixCacheCounters()
        self._last_tick = time.perf_counter()

    @property
    def idle(self) -> bool:
        """No request waiting or running."""
        return self.scheduler.idle

    @property
    def max_num_seqs(self) -> int:
        """Sequences one step may decode now: ``config.max_num_seqs`` until an out-of-memory
        recovery lowers it."""
        return self.scheduler.max_num_seqs

    @property
    def num_blocks(self) -> int:
        """Blocks in the KV pool (self-attention and cross-attention together)."""
        return self.blocks.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    @property
    def uses_cuda_graphs(self) -> bool:
        """Whether decode steps run on CUDA graphs: one process's, or each pipeline stage's own."""
        return self.runner.graphs is not None or getattr(self.runner, "stage_graphs", False)

    @property
    def prefix_caching(self) -> bool:
        """Automatic prefix caching is on (``EngineConfig.prefix_cache``)."""
        return self.blocks.cache is not None

    def reset_prefix_cache(self) -> int:
        """Forget the prefix cache's entries that no running request holds (a benchmark's warm-up
        inputs, for instance), so that later requests run their encoder again; returns how many
        were dropped. Outputs never depend on it."""
        return self.blocks.drop_cached()

    @property
    def kv_dtype_name(self) -> str:
        """The KV pool's value dtype, for summaries: "bfloat16", "float32", ... or "fp8_e4m3"
        (``EngineConfig.kv_dtype``: fp8 values with a float32 scale per row)."""
        dt = self.runner.cache_dtype
        return "fp8_e4m3" if dt == encdec_kernels.FP8_DTYPE else str(dt).removeprefix("torch.")

    @property
    def absorbs_cross(self) -> bool:
        """Cross-attention reads the encoder output itself (absorbed) rather than per-layer K/V."""
        return self.runner.encoder_rows is not None

    def cached_encoder_output(self, encoder_input) -> torch.Tensor | None:
        """The encoder output [encoder length, d_model] of an input whose encoder run is still in the
        prefix cache, read back from the cross cache (a copy), or None: not cached, evicted, or the
        cross cache holds per-layer K/V rather than the encoder output (only the absorbed layout
        keeps it). Lets a later pass over the same input (Whisper's word alignment) skip the
        encoder; the values are the ones the decoder attended to."""
        cache = self.blocks.cache
        if cache is None or self.runner.encoder_rows is None:
            return None
        key = encoder_key(encoder_input, self._key_salt)
        blocks = None if key is None else cache.lookup(key, ready_only=True)
        if blocks is None:
            return None
        with torch.inference_mode():
            return self.runner.read_encoder_rows(blocks, self.model.encoder_length(encoder_input))

    def close(self) -> None:
        """Give the KV pool and the CUDA graphs back (also those of a draft model): another engine on
        the same model may then size its pool from the free memory (after ``gc.collect()`` and
        ``torch.cuda.empty_cache()``). The engine cannot run afterwards; closing twice is harmless. An
        engine collected unclosed releases its pools then (this process's: ``_release_pools``)."""
        self._finalizer.detach()
        for r in self._runners:
            r.release()
        self._ahead = self._history = None
        self._pending = None

    def set_drafter(self, drafter: Drafter) -> None:
        """Replace the speculative drafter between jobs (the engine idle), e.g. an ``OracleDrafter``
        of another alpha; the engine must decode speculatively already, with K at least the new one's
        (its verification steps and graphs are sized for it). Adaptive drafting starts afresh: what
        it learnt of the old drafter's drafts (``Speculator.cold``) says nothing of the new one's."""
        if self.speculator is None or drafter.k > self.runner.queries - 1:
            raise ValueError(
                f"set_drafter needs an engine made with a drafter (or speculative) of K >= {drafter.k}"
            )
        if not self.idle:
            raise ValueError("set_drafter needs an idle engine")
        for r in self._runners[1:]:
            if r not in _runner_of(drafter):
                r.release()
        self._runners[1:] = _runner_of(drafter)
        self.speculator.set_drafter(drafter)

    # ---- public API -------------------------------------------------------------------------
    def generate(self, requests: Iterable[Request | None]) -> Iterator[Result]:
        """Yield one Result per request, in completion order (match them by ``request_id``).

        ``requests`` is consumed lazily, only while the engine has room. A streaming source may
        yield ``None`` for "nothing ready yet": the engine then runs a step (or, when idle, asks
        again), so a source can wait briefly for audio decoding or for earlier results.

        While it runs, the objects that existed before it are out of the garbage collector's view
        (``gc_frozen``).
        """
        with gc_frozen():
            yield from self._generate(iter(requests))

    def _generate(self, it: Iterator[Request | None]) -> Iterator[Result]:
        exhausted = False
        while True:
            while not exhausted and self.scheduler.has_room:
                try:
                    req = next(it)
                except StopIteration:
                    exhausted = True
                    break
                if req is None:  # a streaming source has nothing ready yet: run a step first
                    break
                group = self._admit(req)
                if isinstance(group, Result):
                    yield group
                else:
                    self.scheduler.add(group)
            if self.scheduler.idle:
                # rows that all finished (stop tokens) while it was launched
                self._ahead = self._history = None
                if exhausted:
                    return
                continue
            yield from self.step()

    # ---- one engine step ---------------------------------------------------------------------
    def _admit(self, req: Request) -> SequenceGroup | Result:
        self._order += 1
        try:
            if not req.prompt_ids:
                raise ValueError("empty decoder prompt (it needs at least the decoder start token)")
            if req.params.num_beams > 1 and self.speculator is not None:
                raise ValueError(
                    "beam search cannot be combined with speculative decoding; use num_beams 1 or "
                    "turn speculation off"
                )
            if req.params.num_beams > self.config.max_num_seqs:  # it could never be scheduled
                raise ValueError(
                    f"num_beams {req.params.num_beams} exceeds max_num_seqs {self.config.max_num_seqs} "
                    "(the sequences one step can decode); raise --max-num-seqs"
                )
            enc_len = self.model.encoder_length(req.encoder_input)
            if enc_len > self.max_source_len:
                raise ValueError(
                    f"encoder input of {enc_len} tokens exceeds the engine's limit of "
                    f"{self.max_source_len} (truncate it or raise max_source_len)"
                )
            room = self.max_target_len - len(req.prompt_ids)
            max_new = min(req.params.max_new_tokens or room, room)
            if max_new < 1:
                raise ValueError(
                    f"decoder prompt of {len(req.prompt_ids)} tokens leaves no room in the "
                    f"{self.max_target_len} decoder positions"
                )
        except (ValueError, TypeError) as e:
            return Result(req.request_id, [], error=str(e))
        group = SequenceGroup(req, enc_len, max_new, self._order)
        if self.blocks.cache is not None:
            group.encoder_key = encoder_key(req.encoder_input, self._key_salt)
        return group

    def step(self) -> list[Result]:
        """Schedule, encode the newly admitted, decode one token for every running sequence;
        returns the requests that finished.

        Out of GPU memory in a step is not fatal: see :meth:`_recover_from_oom`.
        """
        results: list[Result] = []
        with torch.inference_mode():
            try:
                for result in self._step():
                    results.append(result)
            except torch.OutOfMemoryError as e:  # torch.cuda.OutOfMemoryError is the same class
                results += self._recover_from_oom(e)
            except PipelineFailure as e:  # a pipeline stage died: the job ends; name what it leaves
                groups = list(self.scheduler.running) + list(self.scheduler.waiting)
                ids = ", ".join(str(g.request.request_id) for g in groups[:20])
                ids += ", ..." if len(groups) > 20 else ""
                raise PipelineFailure(
                    f"{e}; {len(groups)} request(s) in flight were not finished ({ids}): what finished "
                    "is saved, run the same command again to resume"
                ) from None
        return results

    def _recover_from_oom(self, error: torch.OutOfMemoryError) -> list[Result]:
        """A step ran out of device memory: send its requests back to waiting (they re-encode and
        recompute their tokens when re-admitted: same outputs), halve the batch limits so fewer run
        together (floor 1), and free the allocator's cached blocks. An error raised in an encoder
        run halves only the encoder tokens a step (from that run's): the decode batch is not at
        fault (a vision tower's activations, say), and halving it would slow the rest of the job.
        Only a request that ran alone becomes an error Result: it cannot fit at all."""
        self._stats.oom_recoveries += 1
        encoding, self._encoding = self._encoding, 0
        self._ahead = self._history = None  # its rows are preempted with the rest and recomputed
        # a micro-batch step launched before the failing one ran whole on the device: its host part
        # takes its tokens first, so no request is preempted with its step in flight
        finished = list(self._finish_pending()) if self._pending is not None else []
        sched = self.scheduler
        groups = sched.preempt_all()
        self._forget_drafts(groups)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(groups) <= 1:
            for g in groups:
                sched.waiting.remove(g)  # preempt_all freed its blocks
            log.warning("out of device memory with a single request running; it fails (%s)", error)
            return finished + [
                Result(
                    g.request.request_id,
                    [],
                    error=f"out of device memory even when run alone (encoder input of {g.encoder_len} "
                    f"tokens, {g.params.num_beams} beam(s)); lower --gpu-memory-utilization or "
                    "shorten the input",
                )
                for g in groups
            ]
        seqs = sum(g.num_seqs_reserved for g in groups)
        was = sched.max_num_seqs, sched.max_encoder_tokens
        if encoding:
            sched.max_encoder_tokens = max(1, min(sched.max_encoder_tokens, encoding) // 2)
        else:
            sched.max_num_seqs = max(1, min(sched.max_num_seqs, seqs) // 2)
            sched.max_encoder_tokens = max(1, sched.max_encoder_tokens // 2)
        log.warning(
            "out of device memory in %s of %d requests (%s); recomputing them with at most %d "
            "sequences and %d encoder tokens per step (were %d and %d)",
            "the encoder run" if encoding else "a step",
            len(groups),
            error,
            sched.max_num_seqs,
            sched.max_encoder_tokens,
            *was,
        )
        return finished

    def _tick(self, phase: str) -> None:
        """With profiling on, add the time since the last tick to ``stats.phase_seconds[phase]``
        (GPU synced)."""
        if self._profile:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            phases = self._stats.phase_seconds
            phases[phase] = phases.get(phase, 0.0) + now - self._last_tick
            self._last_tick = now

    def _step(self) -> Iterator[Result]:
        """Schedule, run, sample, finish. A step whose model run the previous step launched ahead
        (see ``_can_run_ahead``) skips the first two."""
        self._tick("outside")
        self._stats.steps += 1
        spec = self.speculator
        if self._ahead is not None:
            if spec is not None:
                spec.tick()
            if isinstance(self._ahead, AheadVerify):
                yield from self._verify_ahead_step()
                return
            seqs, logits = self._take_ahead()
        else:
            cohort = self._step_cohort()
            if spec is not None:
                spec.tick(cohort)
            if cohort is not None:
                yield from self._micro_step(cohort)
                return
            if self._pending is not None:  # back to whole steps: the other cohort's step ends first
                yield from self._finish_pending()
            plan = self.scheduler.schedule()
            for group, msg in plan.failed:
                yield Result(group.request.request_id, [], error=msg)
            self._forget_drafts(plan.preempted)
            seqs, logits, drafts = self._run(plan)
            if drafts is not None:  # a verification step: launch (the next step too) and host part
                self._tick("decode")
                pending = spec.verify_launch(logits, seqs, drafts)
                if self._can_verify_ahead(seqs):
                    self._verify_ahead(pending)
                yield from self._finish_verified(pending)
                self._tick("sample")
                return
        if not seqs:
            return
        self._tick("decode")
        launch = None
        if seqs[0].group.params.num_beams > 1:
            plan = self._beams_ahead_plan(seqs)
            if plan is not None:
                launch = functools.partial(self._run_beams_ahead, plan, self._history)
        elif self._can_run_ahead(seqs):
            launch = functools.partial(self._run_ahead, seqs)
        history, self._history = self._history, None
        yield from self._finish(self.sampler(logits, seqs, self.blocks, launch, history))
        self._tick("sample")

    def _run(
        self, plan: StepPlan, keep: list[Sequence] | None = None
    ) -> tuple[list[Sequence], torch.Tensor | None, list[Draft | None] | None]:
        """The plan's block copies and encoder runs, then one decoder step: (rows, logits, drafts).
        With speculative decoding, rows with drafts make it a verification step (drafts not None:
        logits of every draft position, see ``ModelRunner.decode``). ``keep``: a micro-batch step's
        other cohort, whose rows of the runner's tables stay (``ModelRunner.decode``)."""
        self.runner.copy_blocks(plan.copies)
        self._tick("schedule")
        spec = self.speculator
        if plan.encode:
            clock = self._encoder_clock
            if clock is not None:
                clock.start()
            self._encoding = tokens = sum(g.encoder_len for g in plan.encode)
            hidden = self.runner.encode(plan.encode)
            self._encoding = 0
            if clock is not None:
                clock.stop(tokens)
            if spec is not None:
                spec.drafter.on_encode(plan.encode, hidden)
            self._tick("encode")
        if spec is not None and plan.reused:  # no encoder run of the target's for them
            spec.drafter.on_encode(plan.reused, None)
        if not plan.decode:
            self.blocks.commit_cached()
            return plan.decode, None, None
        if spec is not None:
            drafts, copies = spec.propose(plan.decode)
            if any(d is not None for d in drafts):
                self._tick("draft")
                self.runner.copy_blocks(copies)
                tokens = [d.tokens if d is not None else [] for d in drafts]
                if keep is None:
                    logits = self.runner.decode(plan.decode, drafts=tokens)
                else:  # a micro-batch step (a ModelRunner: no pipeline stages)
                    logits = self.runner.decode(plan.decode, drafts=tokens, keep=keep)
                self.blocks.commit_cached()  # this step's cache entries are written (queued)
                return plan.decode, logits, drafts
        if keep is None:
            logits = self.runner.decode(plan.decode)
        else:  # a micro-batch step (a ModelRunner: no pipeline stages)
            logits = self.runner.decode(plan.decode, keep=keep)
        self.blocks.commit_cached()  # this step's cache entries are written (queued)
        return plan.decode, logits, None

    def _forget_drafts(self, groups: list[SequenceGroup]) -> None:
        if self.speculator is not None:
            for g in groups:
                self.speculator.drafter.forget(g)

    def _finish_verified(self, pending: PendingVerify) -> Iterator[Result]:
        """A verification step's host part (``Speculator.verify_finish``: acceptance from the
        tokens copied to the host) and its tokens: each sequence takes its accepted drafts and one
        token of the target's (until a stop token or its length ends it); rejected drafts' slots
        go back."""
        verified = self.speculator.verify_finish(pending)
        seqs, drafts = pending.seqs, pending.drafts
        # the step launched ahead, if any, may write past these sequences' tokens: those slots stay
        ahead = self._ahead if isinstance(self._ahead, AheadVerify) else None
        stats, now = self._stats, time.perf_counter()
        stats.verify_steps += 1
        for s, d, v in zip(seqs, drafts, verified):
            group, before = s.group, len(s.tokens)
            proposed = len(d.tokens) if d is not None else 0
            group.decode_steps += 1
            group.draft_tokens += proposed
            group.accepted_tokens += v.accepted
            stats.decode_rows += 1
            stats.draft_tokens += proposed
            stats.accepted_tokens += v.accepted
            self.speculator.adapt(s, proposed, v.accepted, pending.clock)
            reserve = ahead.reserve.get(s, 0) if ahead is not None else 0
            p, n = group.params, len(v.tokens)
            if (
                v.logprobs is None
                and s.num_generated + n < group.max_new_tokens
                and not any(t in p.stop_token_ids for t in v.tokens)
            ):  # none of the tokens ends it: as _append one by one, at once
                s.tokens += v.tokens
                group.generated_tokens += n
                stats.generated_tokens += n
                self.speculator.settle(s, before, v.accepted, reserve)
                group.first_token = group.first_token or now
                continue
            lps = v.logprobs or itertools.repeat(None)
            for token, logprob in zip(v.tokens, lps):
                stats.generated_tokens += 1
                self._append(s, token, logprob)
                if s not in group.seqs:  # a stop token or the length ended it
                    break
            else:
                self.speculator.settle(s, before, v.accepted, reserve)
            group.first_token = group.first_token or now
            if group.done and group in self.scheduler.running:
                self._finish_group(group)
                yield self._result(group, now)

    def _finish_group(self, group: SequenceGroup) -> None:
        self.scheduler.finish(group)
        self._forget_drafts([group])

    def _finish(self, sampled: Sampled) -> Iterator[Result]:
        """Append the chosen tokens; the requests now done leave the scheduler as Results."""
        now = time.perf_counter()
        logprobs = sampled.logprobs or itertools.repeat(None)
        for seq, token, logprob in zip(sampled.seqs, sampled.tokens, logprobs):
            seq.group.decode_steps += 1
            self._append(seq, token, logprob)
        self._stats.decode_rows += len(sampled.seqs)
        self._stats.generated_tokens += len(sampled.seqs)
        for group in dict.fromkeys([s.group for s in sampled.seqs] + sampled.beam_groups):
            group.first_token = group.first_token or now
            if group.done and group in self.scheduler.running:
                self._finish_group(group)
                yield self._result(group, now)

    # ---- two micro-batches (see EngineConfig.micro_batches) --------------------------------------
    def _step_cohort(self) -> int | None:
        """The cohort the next step runs, or None for a whole step: with two micro-batches on, the
        cohort after the pending one, when both cohorts hold a sequence and some running request
        needs its tokens on the host before its next step: beam search, sampling and rules that
        read the tokens (what ``_can_run_ahead`` refuses) or a sequence that may take drafts
        (speculative verification, ``Speculator.drafts_next_step``); a whole step otherwise (one
        request, an empty cohort, all greedy without drafts: those run ahead instead)."""
        if self.micro_batches == 1:
            return None
        cohort = 1 - self._pending[0] if self._pending is not None else self._turn
        load = [0, 0]
        host_bound = False
        for g in self.scheduler.running:
            load[g.cohort] += g.num_seqs_reserved
            host_bound = host_bound or not (g.params.greedy and g.params.count_based_rules)
        if min(load) == 0:
            return None
        if not host_bound and self.speculator is not None:  # drafts follow from the last tokens
            host_bound = self.speculator.drafts_next_step([s for g in self.scheduler.running for s in g.seqs])
        return cohort if host_bound else None

    def _micro_step(self, cohort: int) -> Iterator[Result]:
        """One step of one cohort (micro-batch) X while the other cohort Y's previous step is
        pending: schedule X (admissions join the lighter cohort; only X's requests can be
        preempted), run its encoder work and decode, launch its token choice on the device
        (``Sampler.launch``: beam candidates, tokens, copies toward the host); only then finish Y's
        step on the host (``Sampler.finish``: it waits for Y's copies alone, queued before X's
        work), so Y's bookkeeping runs while the GPU computes X. X's step is then the pending one.
        On the CPU the same order runs without overlap.

        With speculative decoding X's step may be a verification step: X's drafts are proposed
        (its tokens are on the host: its previous host part ran), its verification run launched,
        then the device part of acceptance (``Speculator.verify_launch``); Y's pending step, a
        verification step or a plain one, finishes after that (``_finish_verified``)."""
        self._stats.micro_batch_steps += 1
        plan = self.scheduler.schedule(cohort)
        for group, msg in plan.failed:
            yield Result(group.request.request_id, [], error=msg)
        self._forget_drafts(plan.preempted)
        keep = [s for g in self.scheduler.running if g.cohort != cohort for s in g.seqs]
        seqs, logits, drafts = self._run(plan, keep)
        if seqs:
            self._tick("decode")
        launched: PendingSample | PendingVerify | None = None
        if drafts is not None:
            launched = self.speculator.verify_launch(logits, seqs, drafts)
        elif seqs:
            launched = self.sampler.launch(logits, seqs)
        if self._pending is not None:
            yield from self._finish_pending()
        if launched is not None:
            self._pending = (cohort, launched)
        self._turn = 1 - cohort
        self._tick("sample")

    def _finish_pending(self) -> Iterator[Result]:
        """The host part of the pending micro-batch step: its tokens appended (a verification
        step's: accepted, rejected drafts' slots given back), beams advanced, finished requests out
        as Results."""
        _, pending = self._pending
        self._pending = None
        if isinstance(pending, PendingVerify):
            yield from self._finish_verified(pending)
        else:
            yield from self._finish(self.sampler.finish(pending, self.blocks))

    # ---- one step ahead (see EngineConfig.lookahead) -----------------------------------------
    def _can_run_ahead(self, seqs: list[Sequence]) -> bool:
        """Whether the next step can be launched before this step's tokens reach the host: every
        row greedy with logits rules that depend only on token counts (they are applied once the
        tokens are known), not all rows finishing by length now, no request about to be admitted
        (it would only wait one step more), and a cache slot for every row's next token.

        With speculative decoding only when no row may take drafts in the next step (adaptive K
        backed off to none for every row, ``Speculator.drafts_next_step``): drafts follow from this
        step's tokens on the host, so a step launched ahead can verify none."""
        if not self.config.lookahead or self.scheduler.admits_next_step():
            return False
        if self.speculator is not None and self.speculator.drafts_next_step(seqs):
            return False
        bs = self.blocks.block_size
        checked: set[int] = set()  # SamplingParams objects (rows share a few)
        need = []  # rows whose next token starts a new block
        all_end = True
        for s in seqs:  # one pass: this runs on the way to the next launch
            p = s.group.params
            if id(p) not in checked:
                if not p.greedy or not p.count_based_rules:
                    return False
                checked.add(id(p))
            all_end = all_end and s.num_generated + 1 >= s.group.max_new_tokens
            if len(s.tokens) >= len(s.block_table) * bs:
                need.append(s)
        if all_end or len(need) > self.blocks.num_free:
            return False
        for s in need:
            s.block_table += self.blocks.allocate(1)
        return True

    def _may_verify_ahead(self) -> bool:
        """What lets this engine launch verification steps ahead at all (``_can_verify_ahead``
        checks the rest each step): look-ahead on, whole steps on one runner (no micro-batches:
        they hide the host's part their own way; no pipeline stages), a drafter that drafts ahead
        (``Drafter.drafts_ahead``)."""
        return (
            self.config.lookahead
            and self.config.micro_batches == 1
            and isinstance(self.runner, ModelRunner)
            and self.speculator.drafter.drafts_ahead
        )

    def _can_verify_ahead(self, seqs: list[Sequence]) -> bool:
        """Whether the step after this verification step can be launched before this one's
        outcome reaches the host (``_verify_ahead``): ``_may_verify_ahead``, no request about to
        be admitted, and every row greedy with count-based rules and no log-probabilities (its
        rules then need only its token count, known on the host when that step is taken)."""
        if not self._may_verify_ahead() or self.scheduler.admits_next_step():
            return False
        checked: set[int] = set()
        for s in seqs:
            p = s.group.params
            if id(p) not in checked:
                if not p.greedy or not p.count_based_rules or p.logprobs:
                    return False
                checked.add(id(p))
        return True

    def _verify_ahead(self, pending: PendingVerify) -> None:
        """Launch the next verification step before this one's outcome (``pending``) reaches the
        host: one kernel takes this step's argmax and drafts on the device to each sequence's
        accepted drafts and token, and lays out the next step's inputs from them and the drafter's
        candidates for every outcome (``Speculator.propose_ahead``, ``ModelRunner.decode_ahead``).
        The GPU then runs it while the host takes this step's tokens: a verification step no longer
        waits for the host's acceptance, drafting and input layout. Rows that this step ends
        compute once more for nothing and are dropped by ``_take_verify_ahead``."""
        seqs = pending.seqs
        if pending.device_drafts is not None:  # itself launched ahead: its drafts are on the device
            _, ks, starts, _ = pending.layout
            after, last = ks.tolist(), pending.device_drafts
        else:
            after = [len(d.tokens) if d is not None else 0 for d in pending.drafts]
            starts = packed_rows(np.asarray(after, np.int64) + 1)[0]
            last = np.full((len(seqs), max(after, default=0)), -1, np.int64)
            for b, d in enumerate(pending.drafts):
                if d is not None:
                    last[b, : len(d.tokens)] = d.tokens
        plan, copies = self.speculator.propose_ahead(seqs, after, self.runner.max_target_len)
        self.runner.copy_blocks(copies)
        if plan is None:
            return
        ks, candidates, ends = plan
        logits, drafts = self.runner.decode_ahead(seqs, pending.best, starts, last, ks, candidates)
        self._ahead = AheadVerify(seqs, logits, ks, drafts, dict(zip(seqs, ends.tolist())))

    def _verify_ahead_step(self) -> Iterator[Result]:
        """A step whose verification the previous step launched ahead: its acceptance (the next
        step launched ahead again where it can), then its tokens."""
        ahead = self._take_verify_ahead()
        if ahead is None:
            return
        self._tick("decode")
        pending = self.speculator.verify_launch_ahead(ahead)
        if self._can_verify_ahead(ahead.seqs):
            self._verify_ahead(pending)
        yield from self._finish_verified(pending)
        self._tick("sample")

    def _take_verify_ahead(self) -> AheadVerify | None:
        """The verification step launched ahead, without the rows that finished meanwhile (None:
        all did)."""
        ahead, self._ahead = self._ahead, None
        self._stats.ahead_steps += 1
        seqs = ahead.seqs
        live = [i for i, s in enumerate(seqs) if s in s.group.seqs]
        if len(live) == len(seqs):
            return ahead
        if not live:
            return None
        alive = np.zeros(len(seqs), bool)
        alive[live] = True
        rows = np.flatnonzero(alive[packed_rows(ahead.ks + 1)[1]])  # the live sequences' rows
        index = to_device(self.device, np.concatenate([rows, live]))
        return AheadVerify(
            [seqs[i] for i in live],
            ahead.logits.index_select(0, index[: len(rows)]),
            ahead.ks[live],
            ahead.drafts.index_select(0, index[len(rows) :]),
            ahead.reserve,
        )

    def _run_ahead(self, seqs: list[Sequence], tokens: torch.Tensor) -> None:
        """Launch the next step's model run with this step's tokens (on the device) as its input.
        Rows that this step finishes (a stop token) are computed once more for nothing and
        dropped by ``_take_ahead``."""
        self._ahead = (seqs, self.runner.decode(seqs, next_tokens=tokens))

    def _beams_ahead_plan(self, seqs: list[Sequence]) -> BeamsAhead | None:
        """Whether this beam-search step can launch the next step's model run before its beams
        reach the host (the device chooses them, ``beam_launch``'s ``ahead``), and with what: every
        row a beam search with one (N, K), every request at its N running beams in consecutive
        rows (not its first step), no log-probs asked for, no request about to be admitted,
        enough plain free blocks for every child that may need one (``ModelRunner.
        decode_children``), one process (no pipeline stages), no speculative decoding."""
        if (
            not self.config.lookahead
            or self.speculator is not None
            or not isinstance(self.runner, ModelRunner)
            or self.scheduler.admits_next_step()
        ):
            return None
        first = seqs[0].group
        n, k = first.params.num_beams, first.beam.beams_to_keep if first.beam is not None else 0
        bs = self.blocks.block_size
        groups, lengths, new_block = [], [], []
        need, all_end = 0, True
        for i in range(0, len(seqs), n):
            g = seqs[i].group
            st, p = g.beam, g.params
            if st is None or (st.num_beams, st.beams_to_keep) != (n, k) or p.logprobs:
                return None
            if g.seqs != seqs[i : i + n]:
                return None
            s = g.seqs[0]
            length = len(s.tokens)
            fresh = length // bs >= len(s.block_table)
            groups.append(g)
            lengths.append(length)
            new_block.append(fresh)
            need += n if fresh else n - 1
            all_end = all_end and length + 1 - s.num_prompt >= g.max_new_tokens
        if all_end or len(groups) * n != len(seqs) or need > len(self.blocks.free_blocks):
            return None
        ngrams = any(g.params.no_repeat_ngram_size for g in groups)
        return BeamsAhead(groups, n, lengths, new_block, need, ngrams)

    def _run_beams_ahead(self, plan: BeamsAhead, history: History | None, children: Children) -> AheadBlocks:
        """Launch the next step's model run on the children the device chose (a beam step that
        can run ahead, ``_beams_ahead_plan``), with the pool's first free blocks reserved for
        them; ``beam_finish`` then gives the host's children the same blocks. Where a request bans
        repeated n-grams, the children's tokens are made on the device too (from ``history``, this
        step's rows', or uploaded when a chain of such steps starts), for the next step's rule."""
        reserved = list(itertools.islice(self.blocks.free_blocks, plan.need))
        positions = np.repeat(np.asarray(plan.lengths, np.int64), plan.n)
        fresh = np.repeat(np.asarray(plan.new_block, np.int64), plan.n)
        self._ahead = (plan, self.runner.decode_children(children, positions, fresh, reserved))
        if plan.ngrams:  # the children's tokens on the device: their parents' and the new one
            parents = history if history is not None else self._upload_history(plan)
            lengths = parents.lengths.index_select(0, children.parents)
            tokens = parents.tokens.index_select(0, children.parents)
            tokens.scatter_(1, lengths[:, None].long(), children.tokens[:, None])
            plan.history = History(tokens, lengths + 1)
        return AheadBlocks(reserved, plan.new_block)

    def _upload_history(self, plan: BeamsAhead) -> History:
        """This step's rows' tokens (a chain of beam steps launched ahead starts: later steps make
        theirs on the device), -1 after each row's end, as wide as its longest request can get."""
        seqs = [s for g in plan.groups for s in g.seqs]
        width = max(g.seqs[0].num_prompt + g.max_new_tokens for g in plan.groups)
        tokens = np.full((len(seqs), width), -1, np.int64)
        for i, s in enumerate(seqs):
            tokens[i, : len(s.tokens)] = s.tokens
        lengths = [len(s.tokens) for s in seqs]
        return History(to_device(self.device, tokens), to_device(self.device, lengths))

    def _take_ahead(self) -> tuple[list[Sequence], torch.Tensor | None]:
        """(rows, logits) of the model run the previous step launched, without the rows that
        finished meanwhile."""
        rows, logits = self._ahead
        self._ahead = None
        if not isinstance(logits, torch.Tensor):  # a pipeline's step still in its stages
            logits = logits.wait()
        self._stats.ahead_steps += 1
        if isinstance(rows, BeamsAhead):  # request g's children are rows g * N ...; ended ones: none
            n, total = rows.n, len(rows.groups) * rows.n
            live = [i * n + j for i, g in enumerate(rows.groups) if g.seqs for j in range(n)]
            seqs = [s for g in rows.groups for s in g.seqs]
            history = rows.history
            if history is not None and len(live) < total:
                history = history.rows(to_device(self.device, live)) if live else None
            self._history = history
        else:
            total = len(rows)
            live = [i for i, s in enumerate(rows) if s in s.group.seqs]  # rows that hit EOS are dropped
            seqs = [rows[i] for i in live]
        if len(live) == total:
            return seqs, logits
        if isinstance(self.runner, ModelRunner):
            self.runner.keep_rows(live)
        return seqs, take_rows(logits, live) if live else None

    def _append(self, seq: Sequence, token: int, logprob: float | None) -> None:
        p = seq.group.params
        seq.group.generated_tokens += 1
        if token in p.stop_token_ids and seq.num_generated >= p.min_new_tokens:
            self._complete(seq, "stop")
            return
        seq.tokens.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
            seq.cum_logprob += logprob
        if seq.num_generated >= seq.group.max_new_tokens:
            self._complete(seq, "length")

    def _complete(self, seq: Sequence, reason: str) -> None:
        group = seq.group
        group.finished.append(
            Completion(
                seq.generated,
                seq.logprobs if group.params.logprobs else None,
                seq.cum_logprob,
                reason,
                seq.stop_logprob if reason == "stop" else None,
            )
        )
        group.seqs.remove(seq)
        self.scheduler.free_seq(seq)

    def _result(self, group: SequenceGroup, now: float) -> Result:
        best = sorted(group.finished, key=lambda c: -c.score)[: group.params.num_return_sequences]
        text = self.tokenizer.decode(best[0].token_ids, skip_special_tokens=True) if self.tokenizer else None
        return Result(
            group.request.request_id,
            best,
            text=text,
            metrics={
                "arrival": group.arrival,
                "first_token": group.first_token,
                "finish": now,
                "encoder_len": group.encoder_len,
                "encoder_cached": group.encoder_cached,
                "cached_prompt_tokens": group.cached_prompt_tokens,
                **(
                    {
                        "decode_steps": group.decode_steps,
                        "generated_tokens": group.generated_tokens,
                        "draft_tokens": group.draft_tokens,
                        "accepted_tokens": group.accepted_tokens,
                    }
                    if group.params.num_beams == 1
                    else {}
                ),
            },
            first_step_probs=group.first_step_probs,
        )


@dataclasses.dataclass
class BeamsAhead:
    """A beam-search step that launches the next one ahead (``Engine._beams_ahead_plan``): its
    requests in row order, N beams each, each request's length (the children's position) and
    whether its next token starts a new block; ``need``: the blocks its children may take."""

    groups: list[SequenceGroup]
    n: int
    lengths: list[int]
    new_block: list[bool]
    need: int
    ngrams: bool  # some request bans repeated n-grams: the children's tokens go on the device
    history: History | None = None  # the children's tokens (set at the launch, when ngrams)


def _runner_of(drafter) -> list:
    """A drafter's own runner (a draft model's), as a list: [] for drafters without a model."""
    runner = getattr(drafter, "runner", None)
    return [] if runner is None else [runner]


def _release_pools(runners: list) -> None:
    """What ``Engine.close`` releases of this process's pools, run when an engine is collected
    unclosed (``weakref.finalize``: it must not refer to the engine). Pipeline stages stop through
    their runner's own finalizer, never from here (it may run inside any allocation)."""
    for r in runners:
        if isinstance(r, ModelRunner):
            r.release()


def verify_queries(k: int) -> list[int]:
    """Query rows a sequence of the verification CUDA graphs of an engine drafting up to ``k``
    tokens: k + 1, k // 2 + 1, ..., 2."""
    return sorted({(k >> i) + 1 for i in range(k.bit_length())})


class _EncoderClock:
    """Encoder time per encoder token, measured on the runs that happen (with the prefix cache on:
    what a hit saves). On CUDA with events, read back only when asked, so nothing waits."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.tokens = 0
        self._open: list[tuple[object, object, int]] = []  # CUDA (start, end, tokens) not yet read
        self._begin: object = None

    def start(self) -> None:
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._begin = time.perf_counter()

    def stop(self, tokens: int) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._open.append((self._begin, end, tokens))
            if len(self._open) > 64:
                self._read(wait=False)
        else:
            self.seconds += time.perf_counter() - self._begin
            self.tokens += tokens

    def _read(self, wait: bool) -> None:
        keep = []
        for begin, end, tokens in self._open:
            if wait or end.query():
                end.synchronize()
                self.seconds += begin.elapsed_time(end) / 1000
                self.tokens += tokens
            else:
                keep.append((begin, end, tokens))
        self._open = keep

    def seconds_per_token(self) -> float:
        self._read(wait=True)
        return self.seconds / self.tokens if self.tokens else 0.0
