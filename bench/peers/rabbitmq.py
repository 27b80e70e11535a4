"""RabbitMQ: durable quorum queues, publisher confirms, manual acks with prefetch (aio-pika).

Messages are published (persistent) to a durable fanout exchange; every
durable is a quorum queue bound to it (so a durable sees what was published
after it was created), plus one ``store`` queue that keeps everything for
the verifier. Quorum queues fsync before confirming. Pull (``fetch``) is
``basic.get`` one message at a time, AMQP's only pull.

The server is started from Debian's ``rabbitmq-server`` script with every
path and port in a temporary folder: its own ``epmd`` on a free port
(started and stopped by pid), the node on another, loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

from ..adapters import Adapter, Consumer
from ..scenarios import Options
from ._server import PeerProcess, PeerTargetBase, free_port

EXCHANGE = "bench-x"
STORE = "store"
QUEUE_ARGS = {"x-queue-type": "quorum"}
SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


class RabbitProcess(PeerProcess):
    def __init__(self, data_dir: Path, binary: str) -> None:
        port, dist, epmd = free_port(), free_port(), free_port()
        (data_dir / "enabled_plugins").write_text("[].\n")
        (data_dir / "rabbitmq.conf").write_text("loopback_users = none\n")
        (data_dir / "rabbitmq-env.conf").write_text("")
        env = {
            "HOME": str(data_dir), "RABBITMQ_NODENAME": f"bench{port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist), "ERL_EPMD_PORT": str(epmd), "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(data_dir / "mnesia"), "RABBITMQ_LOG_BASE": str(data_dir / "log"),
            "RABBITMQ_LOGS": "-", "RABBITMQ_ENABLED_PLUGINS_FILE": str(data_dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(data_dir / "rabbitmq"),
            "RABBITMQ_CONF_ENV_FILE": str(data_dir / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(data_dir / "rabbit.pid"),
        }  # fmt: skip
        script = SCRIPT if os.path.exists(SCRIPT) else binary
        super().__init__([script], r"Server startup complete", f"amqp://guest:guest@127.0.0.1:{port}/", env=env)
        self.epmd_port = epmd
        self.epmd: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> RabbitProcess:
        self.epmd = subprocess.Popen(
            ["epmd", "-address", "127.0.0.1", "-port", str(self.epmd_port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            super().start(timeout)
        except BaseException:
            self._stop_epmd()
            raise
        assert self.proc is not None
        # The script runs the Erlang VM (beam.smp) as its child: measure that.
        kids = _children(self.proc.pid)
        self.server_pid = kids[0] if kids else None
        return self

    def _stop_epmd(self) -> None:
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.send_signal(signal.SIGTERM)
            try:
                self.epmd.wait(10)
            except subprocess.TimeoutExpired:
                self.epmd.kill()
                self.epmd.wait()

    def stop(self, timeout: float = 30.0) -> None:
        try:
            super().stop(timeout)
        finally:
            self._stop_epmd()


class PeerTarget(PeerTargetBase):
    def __init__(self, opts: Options, kind: str, binary: str | None) -> None:
        super().__init__(opts, kind, binary)
        self.durability = "quorum queue, publisher confirms (fsync before confirm)"
        self.fsync_before_confirm = True

    def process(self, data_dir: Path) -> PeerProcess:
        return RabbitProcess(data_dir, self.binary)


class RabbitConsumer(Consumer):
    def __init__(self, queue: Any, prefetch: int) -> None:
        self.queue = queue
        self.prefetch = prefetch
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.tag: str | None = None

    async def start(self) -> None:
        self.tag = await self.queue.consume(self.inbox.put, no_ack=False)

    async def next_batch(self, timeout: float) -> list[tuple[bytes, Any]]:
        try:
            first = await asyncio.wait_for(self.inbox.get(), timeout)
        except TimeoutError:
            return []
        out = [(first.body, first)]
        while not self.inbox.empty():
            m = self.inbox.get_nowait()
            out.append((m.body, m))
        return out

    async def fetch(self, max_messages: int) -> list[tuple[bytes, Any]]:
        out = []
        for _ in range(max_messages):
            m = await self.queue.get(no_ack=False, fail=False)
            if m is None:
                break
            out.append((m.body, m))
        return out

    async def ack(self, handles: list[Any]) -> None:
        if handles:
            await handles[-1].ack(multiple=True)  # one ack for everything delivered up to it

    async def close(self) -> None:
        if self.tag is not None:
            with contextlib.suppress(Exception):
                await self.queue.cancel(self.tag)


class PeerAdapter(Adapter):
    async def __aenter__(self) -> PeerAdapter:
        import aio_pika

        self.conn = await aio_pika.connect(self.url, timeout=60)
        self.channel = await self.conn.channel(publisher_confirms=True)
        self.exchange = await self.channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
        await self._queue(STORE)
        self.message = aio_pika.Message
        self.persistent = aio_pika.DeliveryMode.PERSISTENT
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    async def _queue(self, name: str, prefetch: int | None = None) -> Any:
        channel = self.channel
        if prefetch is not None:
            channel = await self.conn.channel()
            await channel.set_qos(prefetch_count=prefetch)
        q = await channel.declare_queue(f"{self.queue}.{name}", durable=True, arguments=QUEUE_ARGS)
        await q.bind(EXCHANGE)
        return q

    def publish(self, payload: bytes) -> Awaitable[Any]:
        return self.exchange.publish(self.message(payload, delivery_mode=self.persistent), routing_key="")

    async def create_durable(self, name: str, start: str) -> None:
        await self._queue(name)  # gets every message published from now on

    async def consumer(self, name: str, start: str, prefetch: int) -> Consumer:
        q = await self._queue(name, prefetch)
        c = RabbitConsumer(q, prefetch)
        if not self.params.get("pull"):
            await c.start()
        return c

    async def read_all(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        q = await self._queue(STORE, 1000)
        total = q.declaration_result.message_count
        c = RabbitConsumer(q, 1000)
        await c.start()
        seen = 0
        while seen < total:
            batch = await c.next_batch(5.0)
            if not batch:
                return
            for body, _ in batch:
                yield body
            seen += len(batch)
            await c.ack([h for _, h in batch])
        await c.close()
