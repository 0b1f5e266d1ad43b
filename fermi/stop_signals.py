"""SIGINT and SIGTERM once a server has begun to stop.

A server's own handler takes the first signal (drain, then stop). Once it has stopped, its
handlers are gone: asyncio restores the default action when its loop closes, and Python does
the same for its handlers while the interpreter finalizes. A second signal in that window
(a supervisor's retry, a user pressing Ctrl-C twice) would then kill the process with exit 143
instead of letting it exit 0. An ignored signal stays ignored through both, so the servers
call `ignore_stop_signals` as soon as nothing is left for a signal to do.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals() -> None:
    """Ignore SIGINT and SIGTERM from now on. A no-op outside the main thread (a server
    embedded in another program, whose signals are its own)."""
    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            return
