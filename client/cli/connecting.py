"""Connecting a command's client, and waiting for a broker that is not up yet.

Every command but ``raw`` connects once and exits 2 when the broker cannot be
reached. ``sub --follow`` promises to carry on across restarts and lost
connections for up to the client's ``reconnect_deadline`` (60 s); the client
library keeps that promise once connected, but its ``connect()`` tries once
(``Client.open()`` too). So here the first connect of ``--follow`` is retried
the way the library retries a lost connection (``client._reconnect``): the
same errors, the same backoff (BACKOFF_MIN doubling up to
``reconnect_max_delay``), the same deadline, with one line on stderr saying
it waits. Errors that trying again will not mend fail at once: a refusal
(AUTH_FAILED, ...), a peer that is not a broker, TLS that does not agree.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable
from typing import Final

from protocol import ConnectionLost, RequestTimeout, ServerError

from .._reconnect import BACKOFF_MIN, RECONNECT_CODES
from ..client import Client
from .common import Stopped, Stopper, one_line

__all__ = ["StoppedWaiting", "connect", "connect_error"]

#: What ``connect_error`` rewrites: the start of the client's message for a failed connect.
_CANNOT: Final = "cannot connect to "


class StoppedWaiting(Stopped):
    """Ctrl-C while ``sub --follow`` waited for the broker at start: nothing
    was done yet, so the exit is 130 (interrupted), not the 0 of a stopped
    ``sub``."""


def connect_error(exc: BaseException) -> str:
    """'cannot connect to HOST:PORT: Connection refused' rather than asyncio's 'Connect call failed (...)'."""
    text = one_line(exc)
    cause = exc.__cause__
    if (text.startswith(_CANNOT) and isinstance(cause, OSError) and cause.errno
            and not isinstance(cause, ssl.SSLError)):  # (its errno is OpenSSL's, not the OS's)  # fmt: skip
        where = text[len(_CANNOT) :].split(": ", 1)[0]
        why = cause.strerror if isinstance(cause, socket.gaierror) else os.strerror(cause.errno)
        return f"{_CANNOT}{where}: {why}"
    return text


def _worth_retrying(exc: BaseException) -> bool:
    """Whether a failed first connect may succeed later (the broker starting, restarting, full)."""
    if isinstance(exc, ServerError):
        return exc.code in RECONNECT_CODES  # TOO_MANY_CONNECTIONS, SHUTTING_DOWN, ...
    if isinstance(exc.__cause__, ssl.SSLError):  # a certificate, a TLS version: the same next time
        return False
    return isinstance(exc, ConnectionLost | RequestTimeout | OSError)


async def connect(
    make_client: Callable[[], Client], stopper: Stopper, *, wait: bool, warn: Callable[[str], None]
) -> Client:
    """A connected client; with ``wait``, retry until the broker is up.

    Each attempt has a client of its own, from ``make_client``: one whose
    connect failed may keep that failure (the broker's ERR before its
    WELCOME fails the client for good), and nothing of it is needed.

    Args:
        make_client: makes the command's client (not connected).
        stopper: Ctrl-C ends the attempt (and the waiting).
        wait: retry within the client's ``reconnect_deadline`` (``sub
            --follow``), with one line on stderr once the first attempt failed.
        warn: prints one line on stderr (``Context.warn``).

    Raises:
        Stopped: Ctrl-C during the first attempt; StoppedWaiting after it.
        ConnectionLost: the broker stayed unreachable for the deadline.
        TidingsError, OSError: the first attempt failed for good (or any
            attempt without ``wait``).
    """
    loop = asyncio.get_running_loop()
    deadline: float | None = None
    delay = 0.0
    while True:
        client = make_client()
        try:
            await stopper.race(client.connect())
            return client
        except BaseException as exc:
            client.abort()
            if isinstance(exc, Stopped) and deadline is not None:
                raise StoppedWaiting from None
            if not wait or not isinstance(exc, Exception) or not _worth_retrying(exc):
                raise
            failed = exc
        if deadline is None:  # the first attempt failed: say so, once
            deadline = loop.time() + client.reconnect_deadline
            warn(f"waiting for the broker at {client.host}:{client.port} ({connect_error(failed)}): "
                 f"--follow tries again for up to {client.reconnect_deadline:g} s, Ctrl-C to stop")  # fmt: skip
        delay = min(max(delay * 2, BACKOFF_MIN), client.reconnect_max_delay)
        if loop.time() + delay > deadline:
            error = ConnectionLost(
                f"the broker at {client.host}:{client.port} stayed unreachable for "
                f"{client.reconnect_deadline:g} s: {connect_error(failed)}"
            )
            raise error from failed
        try:
            await stopper.race(asyncio.sleep(delay))  # the backoff between two attempts
        except Stopped:
            raise StoppedWaiting from None
