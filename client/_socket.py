"""The client's socket callbacks: one TCP connection's bytes, straight to its :class:`Transport`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from ._transport import Transport

__all__ = ["_Socket"]


class _Socket(asyncio.Protocol):
    """One TCP connection's callbacks, handed to the :class:`Transport` that opened it.

    Why a Protocol and not asyncio streams (the design's default): a
    StreamReader copies each read into its buffer and out again, and wakes a
    reader task one loop turn later, which then resolves the futures whose
    callers run a turn after that. Here the bytes are decoded and the futures
    resolved in the read callback itself: a lone publisher's round trip
    went from 78k to 63k instructions in the client, and one loop turn less
    (bench/RESULTS.md, session 9).
    """

    def __init__(self, owner: Transport) -> None:
        self._owner = owner
        self.transport: asyncio.Transport | None = None
        self.write: Callable[[bytes], None] = _not_connected
        self.finished = False  # the owner is done with this connection (see Transport._finish)
        self.reads = 0  # data_received calls: more than one, the broker sent something after the WELCOME
        self.closed: asyncio.Future[None] = owner._loop.create_future()
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.write = self.transport.write

    def data_received(self, data: bytes) -> None:
        self.reads += 1
        self._owner._received(self, data)

    def eof_received(self) -> bool:
        return False  # the broker closed: close our side too (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("connection lost"))
            self._drained.exception()  # retrieved: the drainer may have gone
        self._owner._lost(self, exc)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its low-water mark."""
        if self.closed.done():
            raise ConnectionResetError("connection lost")
        if self._write_paused:
            if self._drained is None or self._drained.done():
                self._drained = self._owner._loop.create_future()
            await asyncio.shield(self._drained)


def _not_connected(data: bytes) -> None:
    raise ConnectionResetError("not connected")
