from encdec_cli.engine.config import EngineConfig
from encdec_cli.engine.engine import Engine
from encdec_cli.engine.sequence import Completion, Request, Result, SamplingParams

__all__ = ["Engine", "EngineConfig", "Request", "Result", "Completion", "SamplingParams"]
