"""The figures of tests/RELIABILITY.md: ``python -m bench.figures``.

Memory per idle connection, recovery time for 256 MiB of log, and the
broker's memory while a subscriber that never reads is sent 100 MB.
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
from collections.abc import Iterator
from pathlib import Path

from broker.log import QueueLog
from client import Client
from protocol import PROTOCOL_VERSION, Hello, Subscribe, encode_frame

from .broker import BrokerProcess


@contextlib.contextmanager
def _broker(data: str, *extra: str) -> Iterator[BrokerProcess]:
    bp = BrokerProcess(Path(data), extra=extra).start()
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


async def slow_consumer(mb: int = 100) -> str:
    with tempfile.TemporaryDirectory(dir=".") as data, _broker(data) as bp:
        reader, writer = await asyncio.open_connection("127.0.0.1", bp.port)
        writer.write(encode_frame(Hello(1, PROTOCOL_VERSION, "sleeper").to_wire()))
        await reader.read(100)
        writer.write(encode_frame(Subscribe(2, 1, "Q", (), "slow", "earliest", None, 1 << 20).to_wire()))
        await reader.read(100)  # from here on it reads nothing
        base = _kib(bp.pid, "VmRSS")
        rates = []
        for queue in ("Q", "other"):
            async with Client(bp.url) as c:
                started = time.perf_counter()
                for _ in range(mb):
                    await c.publish_many(queue, [("E", b"x" * 10_000)] * 100)
                rates.append(mb / (time.perf_counter() - started))
        peak = _kib(bp.pid, "VmHWM")
        writer.close()
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
