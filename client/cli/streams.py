"""Non-blocking stdin and stdout for the event loop.

Both run in daemon threads using raw ``os.read``/``os.write`` on the file
descriptors, so that

* the event loop keeps answering heartbeats while a slow reader (``| less``)
  blocks stdout, and Ctrl-C still works then;
* stdin may be a pipe, a terminal or a regular file (the loop's pipe
  transports refuse regular files);
* a thread blocked in a read or write at exit holds no Python-level lock, so
  the interpreter exits cleanly.

A closed stdout pipe (``| head -1``) surfaces as ``BrokenPipeError`` from
:meth:`Output.write`, and :func:`watch_pipe_close` notices it even when
nothing is being written (a subscriber waiting for its next message).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import select
import stat
import threading
from collections.abc import Callable
from typing import Final

__all__ = ["LineReader", "Output", "silence_stdout", "watch_pipe_close"]

CHUNK: Final = 64 * 1024


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:  # someone left the descriptor non-blocking
            select.select([], [fd], [])
            continue
        view = view[n:]


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


class Output:
    """Writes to a file descriptor from a daemon thread; ``await write()`` returns once written."""

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd
        self._queue: queue.SimpleQueue[tuple[bytes, asyncio.Future[None], asyncio.AbstractEventLoop]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self.broken = False

    async def write(self, data: bytes) -> None:
        """Write ``data`` completely.

        Raises:
            BrokenPipeError: the reader went away (now or earlier).
        """
        if self.broken:
            raise BrokenPipeError("stdout is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tidings-stdout", daemon=True)
            self._thread.start()
        self._queue.put((data, fut, loop))
        try:
            await fut
        except BrokenPipeError:
            self.broken = True
            raise

    async def line(self, text: str) -> None:
        """Write one line of text (UTF-8) and a newline."""
        await self.write(text.encode("utf-8", "backslashreplace") + b"\n")

    def _run(self) -> None:
        while True:
            data, fut, loop = self._queue.get()
            error: BaseException | None = None
            try:
                _write_all(self.fd, data)
            except OSError as exc:
                error = BrokenPipeError(str(exc)) if isinstance(exc, BrokenPipeError) else exc
            try:
                loop.call_soon_threadsafe(_settle, fut, error)
            except RuntimeError:  # the loop is gone: we are exiting
                return


class LineReader:
    """Async iterator over the lines of a file descriptor (bytes, without the newline)."""

    def __init__(self, fd: int = 0, *, max_chunks: int = 16) -> None:
        self.fd = fd
        self._chunks: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(max_chunks)
        self._buf = b""
        self._eof = False
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tidings-stdin", daemon=True)
        self._thread.start()

    def _put(self, item: bytes | BaseException | None) -> bool:
        try:
            asyncio.run_coroutine_threadsafe(self._chunks.put(item), self._loop).result()
        except BaseException:  # the loop closed or the put was cancelled: stop reading
            return False
        return True

    def _run(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, CHUNK)
            except OSError as exc:
                self._put(exc)
                return
            if not chunk:
                self._put(None)
                return
            if not self._put(chunk):
                return

    def __aiter__(self) -> LineReader:
        return self

    async def __anext__(self) -> bytes:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = self._buf[:nl], self._buf[nl + 1 :]
                return line.removesuffix(b"\r")
            if self._eof:
                if self._buf:
                    line, self._buf = self._buf, b""
                    return line
                raise StopAsyncIteration
            item = await self._chunks.get()  # cancellation-safe: nothing consumed yet
            if item is None:
                self._eof = True
            elif isinstance(item, BaseException):
                self._eof = True
                raise item
            else:
                self._buf += item


def watch_pipe_close(fd: int, on_close: Callable[[], None]) -> None:
    """Call ``on_close`` (in the event loop) when the reader of pipe ``fd`` goes away.

    Only pipes and sockets are watched; for terminals and files this does nothing.
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return
    loop = asyncio.get_running_loop()

    def run() -> None:
        poller = select.poll()
        poller.register(fd, 0)  # POLLERR/POLLHUP are always reported
        while True:
            try:
                events = poller.poll()
            except InterruptedError:  # pragma: no cover - PEP 475 retries already
                continue
            except OSError:
                return
            if any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in events):
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(on_close)
                return

    threading.Thread(target=run, name="tidings-pipe-watch", daemon=True).start()


def silence_stdout() -> None:
    """Point fd 1 at /dev/null so that nothing at exit complains about a closed pipe."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
