"""encdec: offline, throughput-first inference for encoder/decoder models."""

from encdec_cli.engine import Completion, Engine, EngineConfig, Request, Result, SamplingParams

__all__ = ["Engine", "EngineConfig", "Request", "Result", "Completion", "SamplingParams"]
