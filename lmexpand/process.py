"""Around every command of one lmexpand process: logs on stderr, third-party progress bars,
SIGTERM, and the exit-code contract: 0 ok; 2 a user's mistake (:class:`LmexpandError` or a
usage error: one message, no traceback); 1 an internal error (traceback: please report it);
130 Ctrl-C; 143 SIGTERM (both run the same clean-up: no half-written output is left).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Sequence

import click

from lmexpand.errors import LmexpandError

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class Terminated(BaseException):
    """SIGTERM (``kill``, a scheduler, a container stopping), raised in the main thread so
    that every clean-up a Ctrl-C runs (partial outputs removed, checkpoints kept) runs too."""


def _on_sigterm(signum, frame) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean-up: a second TERM does not interrupt it
    raise Terminated()


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(verbose: int, quiet: bool) -> None:
    """lmexpand's log on stderr ("lmexpand: ..."): warnings and errors only with ``quiet``,
    debug from -vv; third-party progress bars from -v."""
    log = logging.getLogger("lmexpand")
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("lmexpand: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    third_party_progress(verbose > 0)


# a user's own HF_HUB_DISABLE_PROGRESS_BARS (set before lmexpand started) is kept
_USER_SET_HF_BARS = "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ


def third_party_progress(show: bool) -> None:
    """transformers' and the hub's own progress bars ("Loading weights" for every model
    loaded) only with -v; lmexpand's own progress is unaffected."""
    if _USER_SET_HF_BARS:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "0" if show else "1"  # read when transformers is imported
    if "transformers" in sys.modules:  # already imported (lmexpand called in-process)
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar() if show else hf_logging.disable_progress_bar()


def run_command(group: click.Group, argv: Sequence[str] | None = None) -> int:
    """Run the command line ``group``; returns the exit code instead of exiting."""
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(group, argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(group: click.Group, argv: Sequence[str] | None) -> int:
    try:
        rv = group.main(args=list(argv) if argv is not None else None, prog_name="lmexpand", standalone_mode=False)
    except LmexpandError as e:
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return EXIT_USER
    except (KeyboardInterrupt, click.Abort):  # click turns Ctrl-C into Abort
        click.echo("interrupted (Ctrl-C): stopped; no half-written output was left in place (a training run keeps its "
                   "checkpoints for --resume) and the inputs are untouched", err=True)
        return EXIT_INTERRUPTED
    except Terminated:
        click.echo("terminated (SIGTERM): stopped; no half-written output was left in place (a training run keeps its "
                   "checkpoints for --resume) and the inputs are untouched", err=True)
        return EXIT_TERMINATED
    except BrokenPipeError:
        return EXIT_OK
    except Exception:
        import traceback

        traceback.print_exc()
        click.echo(
            "error: internal error in lmexpand (the traceback above); please report it with the command you ran.",
            err=True,
        )
        return EXIT_INTERNAL
    return rv if isinstance(rv, int) else EXIT_OK
