"""Redis Streams: XADD / XREADGROUP / XACK with redis-py's asyncio client.

Durability: AOF on, ``appendfsync always`` (Redis fsyncs the AOF before it
answers the write) or ``everysec`` (answers first, fsyncs once a second).
RDB snapshots off. A window of W publishes is one pipeline of W XADDs
(redis-py has no sliding window over one connection); window 1 is a plain
``await xadd``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..adapters import Adapter, Consumer
from ..scenarios import Options
from ._server import PeerProcess, PeerTargetBase, free_port

FIELD = b"d"


class PeerTarget(PeerTargetBase):
    def __init__(self, opts: Options, kind: str, binary: str | None, appendfsync: str = "always") -> None:
        super().__init__(opts, kind, binary)
        self.appendfsync = appendfsync
        self.durability = (
            "AOF appendfsync always (fsync before reply)"
            if appendfsync == "always"
            else f"AOF appendfsync {appendfsync} (confirms before fsync)"
        )
        self.fsync_before_confirm = appendfsync == "always"

    def process(self, data_dir: Path) -> PeerProcess:
        port = free_port()
        cmd = [self.binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir),
               "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no",
               "--protected-mode", "yes", "--logfile", "", "--loglevel", "notice"]  # fmt: skip
        return PeerProcess(cmd, r"Ready to accept connections", f"redis://127.0.0.1:{port}")


class RedisConsumer(Consumer):
    def __init__(self, r: Any, stream: str, group: str, prefetch: int) -> None:
        self.r = r
        self.stream = stream
        self.group = group
        self.name = f"c{id(self)}"
        self.prefetch = prefetch

    async def _read(self, count: int, block: int | None) -> list[tuple[bytes, Any]]:
        res = await self.r.xreadgroup(self.group, self.name, {self.stream: ">"}, count=count, block=block)
        if not res:
            return []
        return [(fields[FIELD], mid) for mid, fields in res[0][1]]

    async def next_batch(self, timeout: float) -> list[tuple[bytes, Any]]:
        return await self._read(self.prefetch, max(1, int(timeout * 1000)))

    async def fetch(self, max_messages: int) -> list[tuple[bytes, Any]]:
        return await self._read(max_messages, None)

    async def ack(self, handles: list[Any]) -> None:
        if handles:
            await self.r.xack(self.stream, self.group, *handles)


class PeerAdapter(Adapter):
    BATCHED = True

    async def __aenter__(self) -> PeerAdapter:
        import redis.asyncio as aioredis

        parts = urlsplit(self.url)
        self.r = aioredis.Redis(host=parts.hostname, port=parts.port, socket_timeout=60, max_connections=4096)
        await self.r.ping()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.r.aclose()

    def publish(self, payload: bytes) -> Awaitable[Any]:
        return self.r.xadd(self.queue, {FIELD: payload})

    async def publish_batch(self, payloads: list[bytes]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for p in payloads:
            pipe.xadd(self.queue, {FIELD: p})
        await pipe.execute()

    async def create_durable(self, name: str, start: str) -> None:
        from redis.exceptions import ResponseError

        try:
            await self.r.xgroup_create(self.queue, name, id="$" if start == "new" else "0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def consumer(self, name: str, start: str, prefetch: int) -> Consumer:
        await self.create_durable(name, start)
        return RedisConsumer(self.r, self.queue, name, prefetch)

    async def read_all(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        start = "-"
        while True:
            rows = await self.r.xrange(self.queue, min=start, max="+", count=10_000)
            if not rows:
                return
            for _mid, fields in rows:
                yield fields[FIELD]
            start = "(" + rows[-1][0].decode()

    async def sync(self) -> None:
        await self.r.ping()
