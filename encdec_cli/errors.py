"""Exit statuses of ``encdec`` and the one-line messages of the faults that end a command.

README.md ("Exit status") documents the codes; the command wrapper (``commands/common.py``) maps
exceptions to them.
"""

from __future__ import annotations

import contextlib
import errno
import os

OK = 0  # everything done
ITEMS_FAILED = 1  # the job ran; some items or rows failed (each has its error record)
USAGE = 2  # the command cannot run as given: an option, an input or the model; nothing was done
IO_FAILURE = 3  # reading or writing files failed mid-job (disk full, no permission, ...)
# 130 (Ctrl-C) and 143 (SIGTERM): see encdec_cli.tasks.interrupts


class PipelineFailure(RuntimeError):
    """A stage of a pipeline-parallel engine stopped (killed, crashed): the job ends (exit status 1);
    what finished is saved, so the same command run again resumes."""


class UsageError(ValueError):
    """The command cannot run as given (exit status 2); the message says which flag fixes it."""


_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space and run the same command again; it resumes where "
    "it stopped",
    errno.EDQUOT: "the disk quota is used up: free some space and run the same command again; it resumes "
    "where it stopped",
    errno.EFBIG: "the file is larger than the file system or your limits allow (see ulimit -f)",
    errno.EACCES: "no permission: choose a folder you can write to (-o) or fix the permissions",
    errno.EPERM: "not permitted: choose a folder you can write to (-o) or fix the permissions",
    errno.EROFS: "the file system is read-only: choose another output (-o)",
    errno.EISDIR: "it is a folder where a file belongs: move it away or choose another output (-o)",
    errno.ENOTDIR: "part of the path is a file where a folder belongs: choose another output (-o)",
}


def describe_os_error(e: OSError) -> str:
    """``PATH: what failed; what to do`` for a read or write that failed."""
    where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None) or "a file"
    reason = e.strerror or str(e)
    advice = _ADVICE.get(e.errno, "check the path and the disk, then run the same command again")
    return f"cannot read or write {where}: {reason}; {advice}"


@contextlib.contextmanager
def writing_to(path: str | os.PathLike):
    """A job's block writing ``path``: an OSError that names no file (pyarrow's do not) names it."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = os.fspath(path)
        raise
