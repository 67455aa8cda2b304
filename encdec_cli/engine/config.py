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
    # pipeline parallelism (encdec_cli/engine/pipeline.py): the layers in this many stages, one
    # process and device each (cuda:N, cuda:N+1, ...); pp_layers: layers per stage, encoder layers
    # first (None: balanced by estimated cost)
    pipeline_parallel: int = 1
    pp_layers: tuple[int, ...] | None = None

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


@dataclass
class EngineStats:
    """What an engine did since it was made or since ``Engine.reset_stats`` (``Engine.stats`` gives a
    copy)."""

    steps: int = 0  # engine steps (encoder runs and/or one decode step each)
    ahead_steps: int = 0  # steps whose model run the previous step launched (EngineConfig.lookahead)
    oom_recoveries: int = 0  # steps that ran out of device memory and were recomputed with lower limits
    preemptions: int = 0  # requests sent back to waiting for want of KV blocks
    # seconds per step phase (schedule / encode / decode / sample ...), with profiling on (GPU synced)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # pipeline parallelism: seconds each stage spent computing (not waiting), stage 0 first; a
    # stage far busier than the others shows a bad split (--pp-layers). Empty with one stage.
    stage_busy_seconds: list[float] = field(default_factory=list)
