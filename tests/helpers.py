"""Shared test helpers: brokers on port 0 (in-process and as a subprocess)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.broker import BrokerProcess as BrokerProcess  # (re-exported for the tests)
from bench.broker import TlsFiles as TlsFiles
from bench.broker import broker_process as broker_process
from bench.broker import make_tls_files as make_tls_files
from broker import Broker, BrokerConfig
from client import Client
from protocol import PROTOCOL_VERSION, Frame, FrameDecoder, Hello, Ping, Welcome, encode_frame
from protocol.framing import unpack_body
from protocol.messages import FRAME_CLASSES


@contextlib.asynccontextmanager
async def running_broker(data_dir: Path, **overrides: Any) -> AsyncIterator[Broker]:
    """An in-process broker on 127.0.0.1:0; ``broker.address`` has the real port."""
    config = replace(BrokerConfig(host="127.0.0.1", port=0, data_dir=data_dir), **overrides)
    broker = Broker(config)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.aclose()


def records_end(path: Path) -> int:
    """Where the records of a segment file end: the byte after the last whole
    record in sequence (what follows may be the preallocated zero tail)."""
    from broker.segment import HEADER_SIZE, MAGIC

    raw = path.read_bytes()
    pos = 0
    while pos + HEADER_SIZE <= len(raw) and int.from_bytes(raw[pos : pos + 2], "big") == MAGIC:
        end = pos + HEADER_SIZE + int.from_bytes(raw[pos + 2 : pos + 6], "big")
        if end > len(raw):
            break
        pos = end
    return pos


def url_of(broker: Broker) -> str:
    """The tidings:// (or, serving TLS, tidingss://) URL of a running in-process broker."""
    host, port = broker.address
    return f"tidings{'s' if broker.config.tls else ''}://{host}:{port}"


@contextlib.asynccontextmanager
async def connected(broker: Broker, name: str = "test", **options: Any) -> AsyncIterator[Client]:
    """A client connected to ``broker``."""
    async with Client(url_of(broker), name=name, **options) as client:
        yield client


class RawPeer:
    """A hand-driven socket to the broker: send any bytes, read frames back.

    Decoding is lenient (no state machine) so tests can see exactly what the
    broker answers to input a real client would never send.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(1 << 24)
        self.frames: list[Frame] = []

    @classmethod
    async def connect(
        cls,
        broker: Broker,
        *,
        hello: bool = True,
        producer: str | None = None,
        token: str | None = None,
        rcvbuf: int | None = None,
    ) -> RawPeer:
        """Connect (and say HELLO unless ``hello`` is False). ``rcvbuf`` caps the
        socket's receive buffer (SO_RCVBUF; Linux autotunes it up to
        ``net.ipv4.tcp_rmem``'s maximum otherwise, 32 MiB on some kernels)."""
        host, port = broker.address
        if rcvbuf is None:
            peer = cls(*await asyncio.open_connection(host, port))
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # (before connect: the window scale)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
            except BaseException:
                sock.close()
                raise
            peer = cls(*await asyncio.open_connection(sock=sock))
        if hello:
            peer.send_frame(Hello(1, PROTOCOL_VERSION, "raw", None if token is None else {"token": token}, producer))
            assert isinstance(await peer.recv(), Welcome)
        return peer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def send_frame(self, frame: Frame) -> None:
        self.send(encode_frame(frame.to_wire()))

    def send_wire(self, items: list[Any]) -> None:
        """Send a frame given as its raw wire list (unchecked)."""
        self.send(encode_frame(items))

    async def recv(self, *, pings: bool = False) -> Frame:
        """The next frame from the broker (skipping heartbeat PINGs unless ``pings``)."""
        while True:
            while not self.frames:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("broker closed the connection")
                for body in self.decoder.feed(data):
                    items = unpack_body(body, 1 << 24)
                    self.frames.append(FRAME_CLASSES[items[0]].from_wire(items))
            frame = self.frames.pop(0)
            if pings or not isinstance(frame, Ping):
                return frame

    async def expect_closed(self) -> None:
        """Wait until the broker closes the connection (any frames before are dropped)."""
        while await self.reader.read(65536):
            pass
        self.close()

    def close(self) -> None:
        self.writer.close()


async def assert_broker_healthy(
    target: Broker | str, *, baseline: int = 0, pong_within: float = 0.1, settle: float = 10.0, **options: Any
) -> None:
    """After a hostile case: a control client gets PONG within ``pong_within``
    seconds (100 ms), and the broker's connection count (STATUS
    ``server.conn_count``, the control client not counted) returns to
    ``baseline`` within ``settle`` seconds.

    Args:
        target: an in-process broker, or the URL of a broker subprocess.
        baseline: connections that are meant to be open besides the control client.
        options: more Client options (``ssl_context``...).
    """
    url = target if isinstance(target, str) else url_of(target)
    async with Client(url, name="control", **options) as c:
        rtt = await c.ping()
        assert rtt < pong_within, f"PONG after {rtt * 1000:.0f} ms (limit {pong_within * 1000:.0f} ms)"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settle
        while (count := (await c.status())["server"]["conn_count"] - 1) != baseline:
            assert loop.time() < deadline, f"{count} connections {settle} s later, baseline {baseline}"
            await asyncio.sleep(0.02)  # polling a condition with a deadline; closes take a few loop turns


class CuttingProxy:
    """A TCP proxy in front of a broker that cuts connections (asyncpg's
    ``TCPFuzzingProxy`` idea), for tests of the client's reconnecting.

    Frames pass whole and in order. A connection is cut, its two sockets
    closed:

    * when the client sends a frame for which ``poison(frame)`` is true (that
      frame is not passed on): a request the broker drops the connection for;
    * right after the broker's WELCOME, for the next ``flaps`` connections
      accepted (decided when each is accepted): a connection that comes back
      and drops at once;
    * on :meth:`cut_all`.

    Attributes:
        accepted: the loop time of each connection accepted, in order.
        cuts: how many connections it cut.
    """

    def __init__(self, broker: Broker, *, poison: Callable[[Frame], bool] | None = None) -> None:
        self.target = broker.address
        self.poison = poison
        self.flaps = 0
        self.accepted: list[float] = []
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()  # set (and replaced) on each accept and cut

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"tidings://{host}:{port}"

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for link in list(self._links):
            self._close(link)
        await asyncio.gather(*self._handlers)
        await self._server.wait_closed()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is checked whenever a connection is accepted or cut."""
        while not predicate():
            await self._changed.wait()

    def cut_all(self) -> None:
        """Cut every connection open now."""
        for link in list(self._links):
            self._cut(link)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted.append(asyncio.get_running_loop().time())
        flap, self.flaps = self.flaps > 0, max(self.flaps - 1, 0)
        try:
            self._notify()
            try:
                broker_reader, broker_writer = await asyncio.open_connection(*self.target)
            except OSError:
                client_writer.transport.abort()
                return
            link = (client_writer, broker_writer)
            self._links.add(link)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._pump(client_reader, broker_writer, link, upstream=True))
                    tg.create_task(self._pump(broker_reader, client_writer, link, upstream=False, flap=flap))
            finally:
                self._close(link)
                self._links.discard(link)
        finally:
            self._handlers.discard(task)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        *,
        upstream: bool,
        flap: bool = False,
    ) -> None:
        decoder = FrameDecoder(1 << 24)
        try:
            while data := await reader.read(65536):
                for body in decoder.feed(data):
                    items = unpack_body(body, 1 << 24)
                    frame = FRAME_CLASSES[items[0]].from_wire(items)
                    if upstream and self.poison is not None and self.poison(frame):
                        self._cut(link)
                        return
                    writer.write(len(body).to_bytes(4, "big") + body)
                    if flap and isinstance(frame, Welcome):
                        self._cut(link)  # after the WELCOME: closing flushes it to the client first
                        return
        except (OSError, ConnectionError):
            pass
        finally:
            self._close(link)  # one side ended: so does the other

    def _cut(self, link: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        if link in self._links and not link[0].is_closing():
            self.cuts += 1
            self._notify()
        self._close(link)

    def _close(self, link: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        for writer in link:
            writer.close()
