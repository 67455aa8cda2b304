"""The engine: requests in (any iterable, streamed), results out as they finish."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Iterable, Iterator

import torch

from encdec_cli.engine.block_manager import BlockManager
from encdec_cli.engine.config import EngineConfig, EngineStats
from encdec_cli.engine.runner import ModelRunner
from encdec_cli.engine.sampling import Sampled, Sampler
from encdec_cli.engine.scheduler import Scheduler, StepPlan
from encdec_cli.engine.sequence import Completion, Request, Result, Sequence, SequenceGroup
from encdec_cli.engine.transfer import take_rows
from encdec_cli.errors import PipelineFailure
from encdec_models.loading import LoadedModel, load_model

log = logging.getLogger("encdec")


class Engine:
    """Continuous-batching encoder/decoder generation.

    ``model``: a name or path (see ``encdec_models.loading.load_model``) or a ``LoadedModel``.
    ``device``: "auto", "cpu", "cuda", "cuda:N"; ``dtype``: "auto", "float32", "bfloat16", "float16".
    Further keyword arguments are ``EngineConfig`` fields.
    """

    def __init__(
        self, model: str | LoadedModel = "tiny.en", device: str = "auto", dtype: str = "auto", **config
    ):
        self.config = EngineConfig(**config)
        prune = None
        if self.config.pipeline_parallel > 1:  # stage 0 allocates only its own layers' weights
            from encdec_cli.engine.pipeline import stage_pruner

            prune = stage_pruner(self.config, 0)
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, device, dtype, prune)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        if self.config.pipeline_parallel > 1:  # stage 0 of a pipeline: see engine/pipeline.py
            from encdec_cli.engine.pipeline import PipelineRunner

            self.runner = PipelineRunner(self.loaded, self.config)
        else:
            self.runner = ModelRunner(self.model, self.config)
        self.device, self.dtype = self.runner.device, self.runner.dtype
        self.max_source_len, self.max_target_len = self.runner.max_source_len, self.runner.max_target_len
        num_blocks = self.runner.num_blocks
        self.blocks = BlockManager(num_blocks, self.config.block_size, self.runner.cross_block_rows)
        graphs = self.config.pipeline_parallel == 1 and not self.config.enforce_eager  # none across stages
        if self.device.type == "cuda" and graphs:
            from encdec_cli.engine.cuda_graphs import CudaGraphs

            graphs = CudaGraphs(self.runner, self.config.max_num_seqs)
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
            num_blocks * ModelRunner.bytes_per_block(self.model, self.config.block_size, self.dtype) / 2**20,
            self.device,
            str(self.dtype).removeprefix("torch."),
            f"absorbed ({self.runner.cross_block_rows} encoder rows a block)"
            if self.absorbs_cross
            else "K/V per layer",
        )
        self.scheduler = Scheduler(self.config, self.blocks)
        self._order = 0
        self.sampler = Sampler(self.device, self.config.max_num_seqs)
        # (rows, logits) of a step launched ahead by the previous one (see _run_ahead)
        self._ahead: tuple[list[Sequence], torch.Tensor] | None = None
        self._profile = self.config.profile
        self.reset_stats()

    # ---- what callers may read ------------------------------------------------------------------
    @property
    def stats(self) -> EngineStats:
        """Counters since the engine was made or since ``reset_stats`` (a snapshot)."""
        return dataclasses.replace(
            self._stats,
            preemptions=self.scheduler.num_preemptions - self._preemptions_before,
            phase_seconds=dict(self._stats.phase_seconds),
            stage_busy_seconds=self._stage_busy(),
        )

    def _stage_busy(self) -> list[float]:
        if not hasattr(self.runner, "stage_busy"):
            return []
        return [b - b0 for b, b0 in zip(self.runner.stage_busy(), self._busy_before)]

    def close(self) -> None:
        """Stop the pipeline's worker stages, if any (they also stop when this process exits)."""
        if hasattr(self.runner, "close"):
            self.runner.close()

    def reset_stats(self, profile: bool | None = None) -> None:
        """Start the counters again; ``profile`` turns the per-phase timing (GPU synced) on or off."""
        if profile is not None:
            self._profile = profile
        self._stats = EngineStats()
        self._preemptions_before = self.scheduler.num_preemptions
        self._busy_before = self.runner.stage_busy() if hasattr(self.runner, "stage_busy") else []
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
        return self.runner.graphs is not None

    @property
    def absorbs_cross(self) -> bool:
        """Cross-attention reads the encoder output itself (absorbed) rather than per-layer K/V."""
        return self.runner.encoder_rows is not None

    # ---- public API -------------------------------------------------------------------------
    def generate(self, requests: Iterable[Request | None]) -> Iterator[Result]:
        """Yield one Result per request, in completion order (match them by ``request_id``).

        ``requests`` is consumed lazily, only while the engine has room. A streaming source may
        yield ``None`` for "nothing ready yet": the engine then runs a step (or, when idle, asks
        again), so a source can wait briefly for audio decoding or for earlier results.
        """
        it = iter(requests)
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
                self._ahead = None  # rows that all finished (stop tokens) while it was launched
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
        return SequenceGroup(req, enc_len, max_new, self._order)

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
        together (floor 1), and free the allocator's cached blocks. Only a request that ran alone
        becomes an error Result: it cannot fit at all."""
        self._stats.oom_recoveries += 1
        self._ahead = None  # its rows are preempted with the rest and recomputed
        sched = self.scheduler
        groups = sched.preempt_all()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(groups) <= 1:
            for g in groups:
                sched.waiting.remove(g)  # preempt_all freed its blocks
            log.warning("out of device memory with a single request running; it fails (%s)", error)
            return [
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
        sched.max_num_seqs = max(1, min(sched.max_num_seqs, seqs) // 2)
        sched.max_encoder_tokens = max(1, sched.max_encoder_tokens // 2)
        log.warning(
            "out of device memory in a step of %d requests (%s); recomputing them with at most %d "
            "sequences and %d encoder tokens per step (were %d and %d)",
            len(groups),
            error,
            sched.max_num_seqs,
            sched.max_encoder_tokens,
            *was,
        )
        return []

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
        if self._ahead is not None:
            seqs, logits = self._take_ahead()
        else:
            plan = self.scheduler.schedule()
            for group, msg in plan.failed:
                yield Result(group.request.request_id, [], error=msg)
            seqs, logits = self._run(plan)
        if not seqs:
            return
        self._tick("decode")
        launch = functools.partial(self._run_ahead, seqs) if self._can_run_ahead(seqs) else None
        yield from self._finish(self.sampler(logits, seqs, self.blocks, launch))
        self._tick("sample")

    def _run(self, plan: StepPlan) -> tuple[list[Sequence], torch.Tensor | None]:
        """The plan's block copies and encoder runs, then one decoder step: (rows, logits)."""
        self.runner.copy_blocks(plan.copies)
        self._tick("schedule")
        if plan.encode:
            self.runner.encode(plan.encode)
            self._tick("encode")
        return plan.decode, self.runner.decode(plan.decode) if plan.decode else None

    def _finish(self, sampled: Sampled) -> Iterator[Result]:
        """Append the chosen tokens; the requests now done leave the scheduler as Results."""
        now = time.perf_counter()
        logprobs = sampled.logprobs or itertools.repeat(None)
        for seq, token, logprob in zip(sampled.seqs, sampled.tokens, logprobs):
            self._append(seq, token, logprob)
        for group in dict.fromkeys([s.group for s in sampled.seqs] + sampled.beam_groups):
            group.first_token = group.first_token or now
            if group.done and group in self.scheduler.running:
                self.scheduler.finish(group)
                yield self._result(group, now)

    # ---- one step ahead (see EngineConfig.lookahead) -----------------------------------------
    def _can_run_ahead(self, seqs: list[Sequence]) -> bool:
        """Whether the next step can be launched before this step's tokens reach the host: every
        row greedy with logits rules that depend only on token counts (they are applied once the
        tokens are known), not all rows finishing by length now, no request about to be admitted
        (it would only wait one step more), and a cache slot for every row's next token."""
        if not self.config.lookahead or self.scheduler.admits_next_step():
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

    def _run_ahead(self, seqs: list[Sequence], tokens: torch.Tensor) -> None:
        """Launch the next step's model run with this step's tokens (on the device) as its input.
        Rows that this step finishes (a stop token) are computed once more for nothing and
        dropped by ``_take_ahead``."""
        self._ahead = (seqs, self.runner.decode(seqs, next_tokens=tokens))

    def _take_ahead(self) -> tuple[list[Sequence], torch.Tensor | None]:
        """(rows, logits) of the model run the previous step launched, without the rows that
        finished meanwhile."""
        rows, logits = self._ahead
        self._ahead = None
        self._stats.ahead_steps += 1
        live = [i for i, s in enumerate(rows) if s in s.group.seqs]  # rows that hit EOS are dropped
        if len(live) == len(rows):
            return rows, logits
        return [rows[i] for i in live], take_rows(logits, live) if live else None

    def _append(self, seq: Sequence, token: int, logprob: float | None) -> None:
        p = seq.group.params
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
            },
            first_step_probs=group.first_step_probs,
        )
