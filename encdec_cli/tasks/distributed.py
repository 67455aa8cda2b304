"""Many machines: a job started by ``torchrun`` (or any launcher that sets torch.distributed's
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``).

Each process is one rank on device ``cuda:LOCAL_RANK`` (or the CPU with ``--device cpu``). Every rank
plans the whole job in the same order and takes a fixed share of its work units: unit ``i`` belongs to
rank ``i % WORLD_SIZE`` (an audio input; a block of ``UNIT_ROWS`` table rows). The ranks write into
the shared output without clobbering each other: transcripts are one file per input, committed
atomically, and each rank records them in its own manifest (``.encdec-manifest.rank-R.jsonl``); a
table job's ranks commit part files named by rank into the output's one parts folder. After a barrier
on a gloo process group, rank 0 folds the manifests into one (or merges the parts into the output),
prints the whole job's summary and exits with its status (README.md, "Exit status"); the other ranks
exit with 0 unless they fail themselves, so torchrun's own status is 0 when the job is all done and 1
otherwise (its report names rank 0's status). Under torchrun, ``--data-parallel`` and ``-`` (stdin,
stdout) are usage errors.

Whatever any rank finished is on disk, and every rank reads all of it before any rank writes, so a
re-run with another world size (or without torchrun) skips it and does the rest.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from encdec_cli.errors import UsageError

TIMEOUT = datetime.timedelta(days=7)  # a barrier waits for the slowest rank's share of a long job


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job."""

    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_env(cls) -> Distributed | None:
        """This process's rank, when started by torchrun with more than one process; else None."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise UsageError(
                "RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (as torchrun sets them)"
            ) from None
        if world <= 1:
            return None
        if not 0 <= rank < world:
            raise UsageError(f"RANK={rank} is not in 0..WORLD_SIZE-1 ({world})")
        return cls(rank, world, local)

    def device(self, device: str, data_parallel: int | None) -> str:
        """This rank's device: the CPU with ``--device cpu``, else ``cuda:LOCAL_RANK``."""
        if data_parallel not in (None, 1) or "," in device:
            raise UsageError(
                "under torchrun each process is one rank: leave out --data-parallel and device lists "
                "(--nproc-per-node sets the processes per machine)"
            )
        if device == "cpu":
            return "cpu"
        if device not in ("auto", "cuda"):
            raise UsageError(
                f"--device {device} under torchrun: each rank takes cuda:LOCAL_RANK; pass --device "
                "cuda (the default) or cpu"
            )
        import torch

        if not torch.cuda.is_available():
            if device == "cuda":
                raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
            return "cpu"
        device = f"cuda:{self.local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)  # kernels and CUDA graphs run on the current device
        return device

    def start(self) -> None:
        """Join the job's gloo process group (CPU tensors only: it carries barriers and small counts)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=TIMEOUT)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def gather(self, value) -> list:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def owns(self, unit: int) -> bool:
        """Whether work unit number ``unit`` (in the job's planning order) is this rank's."""
        return unit % self.world == self.rank

    def stop(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
