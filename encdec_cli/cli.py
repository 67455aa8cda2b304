"""The ``encdec`` command line: the app with its commands (``encdec_cli/commands/``, one small
module each; the work is in tasks/) and the console script's ``main``.

Importing this module imports neither torch nor transformers (``encdec --help`` stays fast): each
command imports what it needs when it runs. Every command runs through ``commands.common.command``,
which turns its faults into one ``error:`` line and the exit status README.md documents
(encdec_cli.errors).
"""

from __future__ import annotations

import logging
import os
import sys

import typer

# isort: off
# importing a command module registers its commands, in this (--help) order
from encdec_cli.commands import transcribe, text, image_to_text, evaluate, bench  # noqa: F401

# isort: on
from encdec_cli.commands import common
from encdec_cli.commands.common import app
from encdec_cli.commands.text import TEXT_TASKS
from encdec_cli.tasks import interrupts


def main():
    """The ``encdec`` console script (through encdec_cli.__main__, which routes stop signals first)."""
    interrupts.install()
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        app()
    except SystemExit as e:
        if e.code not in interrupts.STOP_SIGNALS.values():
            raise
        _stopped(common.job_stopped)
    except BaseException as e:  # a stop signal while Typer still builds the commands, before click runs
        if not interrupts.caused_by_stop(e):
            raise
        _stopped(common.job_stopped)


def _stopped(job_took_over: bool):
    """Leave on a stop signal: one line unless a job took over (it printed its summary), then the
    signal's exit status, without the interpreter's teardown, where native extensions report the
    objects still alive (soxr's "nanobind: leaked ..."): the job, if any, has saved what it had."""
    if not job_took_over:  # stopped before a job took over (parsing, imports, loading)
        typer.echo(interrupts.stop_message(), err=True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(interrupts.exit_status())


__all__ = ["TEXT_TASKS", "app", "main"]
