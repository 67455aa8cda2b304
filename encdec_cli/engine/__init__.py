"""The engine's public surface: what tasks and other callers use (nothing else of encdec_cli.engine)."""

from encdec_cli.engine.config import EngineConfig, EngineStats, SpeculativeSpec, parse_speculative
from encdec_cli.engine.engine import Engine
from encdec_cli.engine.sequence import Completion, Request, Result, SamplingParams, TimestampRules
from encdec_cli.engine.speculative import Drafter, OracleDrafter

__all__ = [
    "Completion",
    "Drafter",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "OracleDrafter",
    "Request",
    "Result",
    "SamplingParams",
    "SpeculativeSpec",
    "TimestampRules",
    "parse_speculative",
]
