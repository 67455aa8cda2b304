"""The engine's public surface: what tasks and other callers use (nothing else of encdec_cli.engine)."""

from encdec_cli.engine.config import EngineConfig, EngineStats
from encdec_cli.engine.engine import Engine
from encdec_cli.engine.sequence import Completion, Request, Result, SamplingParams, TimestampRules

__all__ = [
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "Request",
    "Result",
    "SamplingParams",
    "TimestampRules",
]
