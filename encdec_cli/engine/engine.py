"""The engine: requests in (any iterable, streamed), results out as they finish."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator

import torch

import encdec_kernels
from encdec_cli.engine.beam import beam_step_batch
from encdec_cli.engine.block_manager import BlockManager
from encdec_cli.engine.config import EngineConfig, EngineStats
from encdec_cli.engine.runner import ModelRunner
from encdec_cli.engine.sampling import choose_tokens, process_logits
from encdec_cli.engine.scheduler import Scheduler
from encdec_cli.engine.sequence import Completion, Request, Result, Sequence, SequenceGroup
from encdec_cli.engine.transfer import take_rows, to_device
from encdec_models.loading import LoadedModel, load_model

# absorbed cross-attention by default from this many sequences per step (where the Hopper kernel runs):
# it reads each sequence's encoder rows with one CTA per 64-row tile, so a step of a few sequences
# leaves most SMs idle (H200, Whisper large-v3: batch 1 7 us per-layer K/V against 24-39 us, batch
# 32 1.06x, batch 256 1.24x; benchmarks/sweep_shared_kv.py)
ABSORB_MIN_SEQS = 16

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
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, device, dtype)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.config = EngineConfig(**config)
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_source_len = min(self.config.max_source_len or 4096, self.model.max_source_positions)
        self.max_target_len = min(self.config.max_target_len or 1024, self.model.max_target_positions)
        num_blocks = self.config.num_blocks or self._pool_blocks()
        absorb = self.config.absorb_cross
        if absorb is None:  # batched decoding on the Hopper kernel: half the bytes per step
            absorb = self.config.max_num_seqs >= ABSORB_MIN_SEQS and self._hopper_cross()
        self.runner = ModelRunner(
            self.model,
            num_blocks,
            self.config.block_size,
            self.device,
            self.dtype,
            self.config.max_num_seqs,
            self.max_source_len,
            self.max_target_len,
            absorb,
        )
        self.blocks = BlockManager(num_blocks, self.config.block_size, self.runner.cross_block_rows)
        if self.device.type == "cuda" and not self.config.enforce_eager:
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
            f"absorbed ({self.runner.cross_block_rows} encoder rows a block)" if absorb else "K/V per layer",
        )
        self.scheduler = Scheduler(self.config, self.blocks)
        self._order = 0
        # (rows, logits) of a step launched ahead by the previous one (see _choose_and_run_ahead)
        self._ahead: tuple[list[Sequence], torch.Tensor] | None = None
        self._host_tokens = torch.empty(
            self.config.max_num_seqs, dtype=torch.long, pin_memory=self.device.type == "cuda"
        )
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
        )

    def reset_stats(self, profile: bool | None = None) -> None:
        """Start the counters again; ``profile`` turns the per-phase timing (GPU synced) on or off."""
        if profile is not None:
            self._profile = profile
        self._stats = EngineStats()
        self._preemptions_before = self.scheduler.num_preemptions
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

    def _hopper_cross(self) -> bool:
        """Whether this model takes absorbed cross-attention by default here: encdec_kernels prefers
        it where its Hopper kernel runs this model's shape and dtype."""
        spec = self.model.cache_spec
        return self.model.absorb_cross_by_default and encdec_kernels.prefers_absorbed_cross(
            self.device, self.dtype, spec.num_heads, self.model.d_model
        )

    def _pool_blocks(self) -> int:
        per_block = ModelRunner.bytes_per_block(self.model, self.config.block_size, self.dtype)
        if self.device.type != "cuda":
            return max(16, self.config.cpu_kv_cache_bytes // per_block)
        free, total = torch.cuda.mem_get_info(self.device)
        # leave room for activations: the largest encoder batch and the step's logits
        spec = self.model.cache_spec
        d_model = spec.num_heads * spec.head_dim
        act = (
            self.config.max_encoder_tokens * d_model * 2 * 24
            + self.config.max_num_seqs * self.model.vocab_size * 16
        )
        budget = total * self.config.gpu_memory_utilization - (total - free) - act
        if budget < per_block * 64:
            raise RuntimeError(
                "not enough GPU memory left for the KV cache; lower --max-num-seqs or "
                "raise --gpu-memory-utilization"
            )
        return int(budget // per_block)

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
        self._tick("outside")
        self._stats.steps += 1
        if self._ahead is not None:  # this step's model run was launched by the previous step
            rows, logits = self._ahead
            self._ahead = None
            self._stats.ahead_steps += 1
            live = [i for i, s in enumerate(rows) if s in s.group.seqs]  # rows that hit EOS are dropped
            decode = [rows[i] for i in live]
            if not decode:
                return
            logits = logits if len(live) == len(rows) else take_rows(logits, live)
        else:
            plan = self.scheduler.schedule()
            for group, msg in plan.failed:
                yield Result(group.request.request_id, [], error=msg)
            self.runner.copy_blocks(plan.copies)
            self._tick("schedule")
            if plan.encode:
                self.runner.encode(plan.encode)
                self._tick("encode")
            if not plan.decode:
                return
            decode = plan.decode
            logits = self.runner.decode(decode)
        self._tick("decode")
        single: list[int] = []  # rows of greedy / sampled sequences
        beams: dict[SequenceGroup, list[int]] = {}  # beam-search request -> its rows
        for i, s in enumerate(decode):
            if s.group.params.num_beams > 1:
                group_rows = beams.get(s.group)
                if group_rows is None:
                    beams[s.group] = [i]
                else:
                    group_rows.append(i)
            else:
                single.append(i)
        if beams:  # beam search applies the logits processors to log-probs (as transformers)
            if single:
                idx = to_device(logits.device, [i for group_rows in beams.values() for i in group_rows])
                logits.index_copy_(0, idx, torch.log_softmax(logits.index_select(0, idx), -1))
            else:  # every row (the usual case): no gather and scatter of [B, V]
                logits = torch.log_softmax(logits, -1)
        process_logits(logits, decode)
        now = time.perf_counter()
        finished = []
        if single and len(single) == len(decode) and self._can_run_ahead(decode):
            tokens, logprobs = self._choose_and_run_ahead(logits, decode), None
        elif single:
            seqs = [decode[i] for i in single]
            rows_logits = take_rows(logits, single) if len(single) < len(decode) else logits
            tokens, logprobs = choose_tokens(rows_logits, seqs)
        if single:
            for j, i in enumerate(single):
                seq = decode[i]
                self._append(seq, tokens[j], logprobs[j] if logprobs is not None else None)
                finished.append(seq.group)
        if beams:  # every beam-search request at once: one device-to-host copy per step
            beam_step_batch(list(beams), logits, list(beams.values()), self.blocks)
            finished.extend(beams)
        for group in dict.fromkeys(finished):
            group.first_token = group.first_token or now
            if group.done and group in self.scheduler.running:
                self.scheduler.finish(group)
                yield self._result(group, now)
        self._tick("sample")

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
        for s in seqs:  # one pass: this runs between the step's argmax and the next launch
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

    def _choose_and_run_ahead(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """Greedy tokens of this step; on the way, launch the next step's model run with them as
        its input (device to device) before waiting for them on the host, so the GPU computes the
        next step while the host does this step's bookkeeping. Rows that this step finishes (a
        stop token) are computed once more for nothing and dropped by the next step."""
        tokens = logits.argmax(-1)
        if self.device.type != "cuda":
            self._ahead = (seqs, self.runner.decode(seqs, next_tokens=tokens))
            return tokens.tolist()
        host = self._host_tokens[: len(seqs)]
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._ahead = (seqs, self.runner.decode(seqs, next_tokens=tokens))
        done.synchronize()  # this step's tokens only; the next step keeps running
        return host.tolist()

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
