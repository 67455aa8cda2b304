"""encdec: offline, throughput-first inference for encoder/decoder models.

The engine's names are imported on first use, so that ``encdec --help`` does not import torch.
"""

__all__ = ["Engine", "EngineConfig", "Request", "Result", "Completion", "SamplingParams"]


def __getattr__(name: str):
    if name in __all__:
        from encdec_cli import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'encdec_cli' has no attribute {name!r}")
