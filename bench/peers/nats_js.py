"""NATS JetStream: file storage, durable consumers, explicit acks (nats-py).

The ``fetch`` scenario uses a durable pull consumer (``fetch(batch)``). The
streaming scenarios (latency, catch-up, fan-out) use a durable push consumer
with ``max_ack_pending`` = prefetch: nats-py's ``PullSubscription.fetch(n)``
waits until n messages or its timeout, which would add up to the timeout to
every latency at low rates.

Durability: JetStream confirms a publish once the message is written to its
file store, before fsync (the server syncs on its own schedule: every two
minutes by default in 2.9), so it is labelled "confirms before fsync". A
window of W publishes is W concurrent ``js.publish`` calls on one connection,
as for tidings.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

from ..adapters import Adapter, Consumer
from ..scenarios import Options
from ._server import PeerProcess, PeerTargetBase

STREAM = "BENCH"


class PeerTarget(PeerTargetBase):
    def __init__(self, opts: Options, kind: str, binary: str | None) -> None:
        super().__init__(opts, kind, binary)
        self.durability = "file storage, confirms before fsync (periodic sync)"
        self.fsync_before_confirm = False

    def process(self, data_dir: Path) -> PeerProcess:
        cmd = [self.binary, "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", str(data_dir)]
        return PeerProcess(cmd, r"Listening for client connections on [^ ]+:(?P<port>\d+)", "nats://127.0.0.1:{port}",
                           port_from_log=True)  # fmt: skip


def _config(name: str, start: str, max_ack_pending: int, deliver_subject: str | None = None) -> Any:
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    return ConsumerConfig(
        durable_name=name,
        deliver_policy=DeliverPolicy.NEW if start == "new" else DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        max_ack_pending=max_ack_pending,
        ack_wait=60,
        deliver_subject=deliver_subject,
    )


class NatsPushConsumer(Consumer):
    def __init__(self, sub: Any) -> None:
        self.sub = sub

    async def next_batch(self, timeout: float) -> list[tuple[bytes, Any]]:
        import nats.errors

        try:
            first = await self.sub.next_msg(timeout=timeout)
        except nats.errors.TimeoutError:
            return []
        out = [(first.data, first)]
        queue = self.sub._pending_queue  # what already arrived (nats-py has no public "drain now")
        while not queue.empty():
            m = queue.get_nowait()
            self.sub._pending_size -= len(m.data)
            out.append((m.data, m))
        return out

    async def ack(self, handles: list[Any]) -> None:
        for m in handles:
            await m.ack()

    async def close(self) -> None:
        await self.sub.unsubscribe()


class NatsConsumer(Consumer):
    def __init__(self, psub: Any, prefetch: int) -> None:
        self.psub = psub
        self.prefetch = prefetch

    async def _fetch(self, n: int, timeout: float) -> list[tuple[bytes, Any]]:
        import nats.errors

        try:
            msgs = await self.psub.fetch(n, timeout=timeout)
        except nats.errors.TimeoutError:
            return []
        return [(m.data, m) for m in msgs]

    async def next_batch(self, timeout: float) -> list[tuple[bytes, Any]]:
        return await self._fetch(self.prefetch, timeout)

    async def fetch(self, max_messages: int) -> list[tuple[bytes, Any]]:
        return await self._fetch(max_messages, 0.5)

    async def ack(self, handles: list[Any]) -> None:
        for m in handles:
            await m.ack()

    async def close(self) -> None:
        await self.psub.unsubscribe()


class PeerAdapter(Adapter):
    async def __aenter__(self) -> PeerAdapter:
        import nats
        from nats.js.api import StorageType

        self.nc = await nats.connect(self.url, max_reconnect_attempts=0)
        self.js = self.nc.jetstream(timeout=60)
        await self.js.add_stream(name=STREAM, subjects=[self.queue], storage=StorageType.FILE)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.drain()

    def publish(self, payload: bytes) -> Awaitable[Any]:
        return self.js.publish(self.queue, payload, timeout=60)

    async def create_durable(self, name: str, start: str) -> None:
        # A push consumer (see the module docstring) positioned at ``start``, nothing delivered yet.
        await self.js.add_consumer(STREAM, _config(name, start, 1000, self.nc.new_inbox()))

    async def consumer(self, name: str, start: str, prefetch: int) -> Consumer:
        if self.params.get("pull"):
            psub = await self.js.pull_subscribe(self.queue, durable=name, stream=STREAM,
                                                config=_config(name, start, max(prefetch, 1000) * 4))  # fmt: skip
            return NatsConsumer(psub, prefetch)
        try:
            await self.js.consumer_info(STREAM, name)
            config = None  # bind to the existing durable
        except Exception:
            config = _config(name, start, prefetch)
        sub = await self.js.subscribe(self.queue, durable=name, stream=STREAM, manual_ack=True, config=config,
                                      pending_msgs_limit=1_000_000)  # fmt: skip
        return NatsPushConsumer(sub)

    async def read_all(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        info = await self.js.stream_info(STREAM)
        total = info.state.messages
        psub = await self.js.pull_subscribe(
            self.queue, durable="verify", stream=STREAM,
            config=ConsumerConfig(durable_name="verify", deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
        )  # fmt: skip
        seen = 0
        c = NatsConsumer(psub, 1000)
        while seen < total:
            batch = await c.next_batch(2.0)
            if not batch:
                return
            for data, _ in batch:
                yield data
            seen += len(batch)

    async def sync(self) -> None:
        await self.nc.flush()
