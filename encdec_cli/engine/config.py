"""Engine options and statistics."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # (Whisper), its steps run on the Hopper kernel and max_num_seqs >= runner.ABSORB_MIN_SEQS
    absorb_cross: bool | None = None
    # automatic prefix caching (engine/prefix_cache.py): requests with the same encoder input share
    # one encoder run and its cross blocks, and full blocks of a shared decoder prompt prefix; the
    # blocks stay cached once free until the pool needs them
    prefix_cache: bool = True

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.max_num_seqs < 1 or self.max_encoder_tokens < 1 or self.window < 1:
            raise ValueError("max_num_seqs, max_encoder_tokens and window must be >= 1")


@dataclass
class EngineStats:
    """What an engine did since it was made or since ``Engine.reset_stats`` (``Engine.stats`` gives a
    copy)."""

    steps: int = 0  # engine steps (encoder runs and/or one decode step each)
    ahead_steps: int = 0  # steps whose model run the previous step launched (EngineConfig.lookahead)
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
