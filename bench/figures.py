"""The figures of tests/RELIABILITY.md: ``python -m bench.figures``.

Memory per idle connection, recovery time for 256 MiB of log, and the
broker's memory while a subscriber that never reads is sent 100 MB.
``stuck_subscriber`` and ``publish_rate`` are also used by
tests/reliability/test_resources.py, which asserts these bounds in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from broker.log import QueueLog
from client import Client
from protocol import PROTOCOL_VERSION, Frame, FrameDecoder, Hello, Ok, Subscribe, Welcome, encode_frame
from protocol.framing import unpack_body
from protocol.messages import FRAME_CLASSES

from .broker import BrokerProcess


@contextlib.contextmanager
def _broker(data: str, *extra: str) -> Iterator[BrokerProcess]:
    bp = BrokerProcess(Path(data), *extra).start()
    try:
        yield bp
    finally:
        bp.stop()


def _kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


async def idle_connections(n: int = 5000) -> str:
    with tempfile.TemporaryDirectory() as data, _broker(data, "--max-connections", str(n + 100)) as bp:
        base = _kib(bp.pid, "VmRSS")
        writers = []
        for _ in range(n):
            reader, writer = await asyncio.open_connection("127.0.0.1", bp.port)
            writer.write(encode_frame(Hello(1, PROTOCOL_VERSION, "idle").to_wire()))
            await reader.read(100)
            writers.append(writer)
        after = _kib(bp.pid, "VmRSS")
        for writer in writers:
            writer.close()
    return f"{n} idle connections: RSS {base / 1024:.1f} -> {after / 1024:.1f} MiB, {(after - base) / n:.2f} KiB each"


def recovery(mib: int = 256) -> str:
    logging.disable(logging.WARNING)
    directory = Path(tempfile.mkdtemp(dir="."))
    try:
        log = QueueLog.open(directory, segment_bytes=64 << 20)
        body, n = os.urandom(100), 0
        while log.size_bytes < mib << 20:
            log.append([body] * 1000, 1)
            n += 1000
        log.sync()
        log.close()
        started = time.perf_counter()
        QueueLog.open(directory, segment_bytes=64 << 20).close()
        return f"recovery of {mib} MiB ({n:,} records): {time.perf_counter() - started:.2f} s"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def _read_frame(reader: asyncio.StreamReader, decoder: FrameDecoder) -> Frame:
    """The next frame on a raw connection (PINGs included)."""
    while True:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("broker closed the connection")
        bodies = decoder.feed(data)
        if bodies:
            items = unpack_body(bodies[0], 1 << 24)
            return FRAME_CLASSES[items[0]].from_wire(items)


@contextlib.asynccontextmanager
async def stuck_subscriber(port: int, queue: str = "Q", durable: str = "slow") -> AsyncIterator[None]:
    """A durable subscriber of ``queue`` that subscribes, then never reads its socket.

    Its prefetch (2^20) is no limit: only the broker's write-buffer bound
    (``pause_writing``) keeps the broker from buffering the whole queue for it.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        decoder = FrameDecoder(1 << 24)
        writer.write(encode_frame(Hello(1, PROTOCOL_VERSION, "sleeper").to_wire()))
        welcome = await _read_frame(reader, decoder)
        assert isinstance(welcome, Welcome), welcome
        writer.write(encode_frame(Subscribe(2, 1, queue, (), durable, "earliest", None, 1 << 20).to_wire()))
        ok = await _read_frame(reader, decoder)
        assert isinstance(ok, Ok), ok
        yield  # from here on it reads nothing
    finally:
        writer.close()


async def publish_rate(url: str, queue: str, mb: int, size: int = 10_000) -> float:
    """Publish ``mb`` MB in confirmed batches of 100 messages of ``size`` bytes; return MB/s."""
    per_batch = 100
    batches = mb * 1_000_000 // (size * per_batch)
    async with Client(url, name="publisher") as c:
        started = time.perf_counter()
        for _ in range(batches):
            await c.publish_many(queue, [("E", b"x" * size)] * per_batch)
        return mb / (time.perf_counter() - started)


async def slow_consumer(mb: int = 100) -> str:
    with tempfile.TemporaryDirectory(dir=".") as data, _broker(data) as bp:
        async with stuck_subscriber(bp.port, "Q"):
            base = _kib(bp.pid, "VmRSS")
            rates = [await publish_rate(bp.url, queue, mb) for queue in ("Q", "other")]
            peak = _kib(bp.pid, "VmHWM")
    return (
        f"{mb} MB to a non-reading subscriber: RSS {base / 1024:.0f} -> peak {peak / 1024:.0f} MiB; "
        f"publisher {rates[0]:.0f} MB/s vs {rates[1]:.0f} MB/s with no subscriber ({rates[0] / rates[1]:.0%})"
    )


def main() -> int:
    print(asyncio.run(idle_connections()))
    print(recovery())
    print(asyncio.run(slow_consumer()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
