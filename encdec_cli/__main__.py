"""``encdec`` (the console script) and ``python -m encdec_cli``.

Stop signals are routed before the command line module loads, so that a Ctrl-C or SIGTERM at any
moment ends in one line and status 130 / 143, never a traceback.
"""

import sys

from encdec_cli.tasks import interrupts


def main() -> None:
    interrupts.install()
    try:
        from encdec_cli.cli import main as cli_main
    except BaseException as e:
        if not interrupts.caused_by_stop(e):
            raise
        print(interrupts.stop_message(), file=sys.stderr)
        raise SystemExit(interrupts.exit_status()) from None
    cli_main()


if __name__ == "__main__":
    main()
