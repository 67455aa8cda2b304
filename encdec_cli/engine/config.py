"""Engine options and statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_K = 4  # draft tokens per step when ``--speculative`` names none
MAX_K = 16
USAGE = "off, ngram[:K] or model:DIR[:K]"
KV_DTYPES = ("auto", "fp8")  # EngineConfig.kv_dtype


@dataclass(frozen=True)
class SpeculativeSpec:
    """A parsed ``--speculative`` value."""

    kind: str  # "ngram" | "model"
    k: int  # draft tokens per step (at most)
    path: str | None = None  # the draft model (kind "model")


def _k(text: str, whole: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_K:
        raise ValueError(f"--speculative {whole!r}: K must be a whole number from 1 to {MAX_K}")
    return int(text)


def parse_speculative(text: str | None) -> SpeculativeSpec | None:
    """``off`` / ``ngram[:K]`` / ``model:DIR[:K]`` -> a spec (None for off); ValueError otherwise."""
    if text is None or text.strip().lower() in ("", "off", "none"):
        return None
    t = text.strip()
    if t == "ngram" or t.startswith("ngram:"):
        return SpeculativeSpec("ngram", _k(t[6:], text) if t != "ngram" else DEFAULT_K)
    if t.startswith("model:"):
        rest = t[6:]
        head, sep, tail = rest.rpartition(":")
        path, k = (head, _k(tail, text)) if sep and head and tail.isdigit() else (rest, DEFAULT_K)
        if not path:
            raise ValueError(f"--speculative {text!r}: name the draft model's folder, e.g. model:DIR:4")
        return SpeculativeSpec("model", k, path)
    raise ValueError(f"--speculative takes {USAGE}; got {text!r}")


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 256  # decoder sequences per step (beams count singly)
    max_encoder_tokens: int = 16384  # encoder tokens admitted per step (Whisper: 1500 a window)
    window: int = 1024  # look-ahead of waiting requests, sorted by encoder length
    gpu_memory_utilization: float = 0.90  # fraction of the GPU's memory the engine may use
    cpu_kv_cache_bytes: int = 1 << 30  # KV pool size on the CPU
    num_blocks: int | None = None  # fixed KV pool size in blocks (overrides the two above)
    enforce_eager: bool = False  # no CUDA graphs
    max_source_len: int | None = None  # encoder tokens per request; None: model limit, at most 4096
    profile: bool = False  # time each step phase (synchronizes the GPU: slower)
    max_target_len: int | None = None  # decoder tokens per sequence; None: model limit, at most 1024
    # greedy steps whose logits rules depend only on token counts launch the next step's model run
    # before their tokens reach the host (GPU and host overlap; see Sampler._argmax_ahead)
    lookahead: bool = True
    # cross-attention over the encoder output itself, K/V projections absorbed into the query and
    # the output (ModelRunner): half the bytes per decode step and no K/V projections in the
    # encoder, for two small matmuls per layer and step. None: on where the model asks for it
    # (Whisper), its steps run on the Hopper kernel and max_num_seqs >= runner.ABSORB_MIN_SEQS,
    # without speculative decoding (runner.absorb_by_default)
    absorb_cross: bool | None = None
    # pipeline parallelism (encdec_cli/engine/pipeline.py): the layers in this many stages, one
    # process and device each (cuda:N, cuda:N+1, ...); pp_layers: layers per stage, encoder layers
    # first (None: balanced by estimated cost)
    pipeline_parallel: int = 1
    pp_layers: tuple[int, ...] | None = None
    # automatic prefix caching (engine/prefix_cache.py): requests with the same encoder input share
    # one encoder run and its cross blocks, and full blocks of a shared decoder prompt prefix; the
    # blocks stay cached once free until the pool needs them
    prefix_cache: bool = True
    # speculative decoding (engine/speculative.py): None / "off", "ngram[:K]" (prompt lookup) or
    # "model:DIR[:K]" (a draft model with the same tokenizer); K draft tokens per step (default 4)
    speculative: str | None = None
    # adaptive drafting: a sequence whose drafts are all rejected takes fewer (down to none, with
    # a retry now and then), one whose drafts are all accepted more again (Speculator); False: K
    # drafts every step (measuring a fixed K)
    speculative_adaptive: bool = True
    # KV pool values (runner.cache_dtype): "auto" = the model's dtype; "fp8" = e4m3 with one float32
    # scale per cached row (a (token, head) row of K/V, an encoder row in the absorbed layout), read
    # by the kernels in fp8: half the bytes of bf16 and about twice the blocks in the same memory.
    # It covers decoder self-attention and cross-attention alike: one pool holds both kinds of block
    # (with pipeline stages, each stage's pool of its own layers: values and scales alike)
    kv_dtype: str = "auto"
    # micro-batches (Engine._micro_step): steps whose tokens must reach the host before the next one
    # alternate between two cohorts of the running requests, so one cohort's host work (beam
    # bookkeeping, speculative acceptance and drafting) overlaps the other's GPU step. 1: off (the
    # default: on the H200 two cohorts ran W3's beam search 7% slower, benchmarks/README.md); 2: for
    # every step that cannot run ahead (beam search, verification, sampling, rules reading the
    # tokens) whenever both cohorts have a sequence
    micro_batches: int = 1

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.max_num_seqs < 1 or self.max_encoder_tokens < 1 or self.window < 1:
            raise ValueError("max_num_seqs, max_encoder_tokens and window must be >= 1")
        if self.pipeline_parallel < 1:
            raise ValueError(f"pipeline_parallel must be >= 1, got {self.pipeline_parallel}")
        if self.pp_layers is not None and self.pipeline_parallel == 1 and len(self.pp_layers) != 1:
            raise ValueError("--pp-layers needs --pipeline-parallel (one number per stage)")
        parse_speculative(self.speculative)  # ValueError on a bad value, before anything loads
        if self.micro_batches not in (1, 2):
            raise ValueError(f"micro_batches must be 1 or 2, got {self.micro_batches!r}")
        if self.micro_batches == 2 and self.pipeline_parallel > 1:
            raise ValueError(
                "two micro-batches (--micro-batches 2) are not built for pipeline stages: use "
                "--micro-batches 1"
            )
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")


@dataclass
class EngineStats:
    """What an engine did since it was made or since ``Engine.reset_stats`` (``Engine.stats`` gives a
    copy)."""

    steps: int = 0  # engine steps (encoder runs and/or one decode step each)
    ahead_steps: int = 0  # steps whose model run the previous step launched (EngineConfig.lookahead)
    micro_batch_steps: int = 0  # steps of one of two cohorts (EngineConfig.micro_batches)
    oom_recoveries: int = 0  # steps that ran out of device memory and were recomputed with lower limits
    preemptions: int = 0  # requests sent back to waiting for want of KV blocks
    # prefix cache (EngineConfig.prefix_cache): requests that found their encoder output cached or
    # shared it with a request admitted in the same step (no encoder run), requests with a
    # cacheable input that ran the encoder, cached entries evicted for room, decoder prompt tokens
    # whose K/V were reused, and the encoder time the hits saved (their encoder tokens x the
    # measured encoder seconds per token)
    prefix_cache_hits: int = 0
    prefix_cache_misses: int = 0
    prefix_cache_evictions: int = 0
    prefix_cache_prompt_tokens: int = 0
    encoder_seconds_saved: float = 0.0
    # seconds per step phase (schedule / encode / decode / sample ...), with profiling on (GPU synced)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # pipeline parallelism: seconds each stage spent computing (not waiting), stage 0 first; a
    # stage far busier than the others shows a bad split (--pp-layers). Empty with one stage.
    stage_busy_seconds: list[float] = field(default_factory=list)
    # greedy / sampled sequences (not beams): one row per sequence and decode step, and the tokens
    # they generated (more than rows with speculative decoding)
    decode_rows: int = 0
    generated_tokens: int = 0
    # speculative decoding: steps that verified drafts, draft tokens proposed and accepted
    verify_steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Share of the proposed draft tokens that were accepted (None: none proposed)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def tokens_per_step(self) -> float | None:
        """Mean tokens a sequence generated per decode step (1.0 without speculative decoding)."""
        return self.generated_tokens / self.decode_rows if self.decode_rows else None

    def speculation_summary(self) -> str | None:
        """One line for a job summary when drafts were proposed, else None."""
        if not self.draft_tokens:
            return None
        return (
            f"speculative decoding: {self.acceptance_rate:.0%} of {self.draft_tokens:,} draft tokens "
            f"accepted, {self.tokens_per_step:.2f} tokens per sequence and step"
        )
