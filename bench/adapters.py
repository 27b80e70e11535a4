"""One small interface over each broker's stock Python client.

The worker loops in :mod:`bench.workers` only speak this interface, so every
broker is driven the same way. An adapter is an async context manager
(connect / close) with:

* ``publish(payload)``: one message: an awaitable that completes once the
  broker confirmed it (the client's own coroutine, not wrapped in another:
  the harness must not add a coroutine per message to any broker's figure);
* ``publish_batch(payloads)`` (when ``BATCHED`` is true): the client's own
  pipelining (Redis pipelines) — the closed loop then sends windows as
  batches instead of running ``window`` concurrent ``publish`` calls;
* ``create_durable(name, start)``: a durable consumer/group positioned at
  ``"new"`` or ``"earliest"``, nothing consumed;
* ``consumer(name, start, prefetch)``: a :class:`Consumer` for that durable;
* ``read_all()``: every stored payload, in order (for the verifier);
* ``sync()``: a round trip that proves earlier acks were processed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any

EVENT = "bench"
QUEUE = "bench"


class Consumer:
    """A durable consumer: ``next_batch`` waits for what is available, ``ack`` settles it."""

    async def next_batch(self, timeout: float) -> list[tuple[bytes, Any]]:
        """Messages available now (waiting up to ``timeout`` for the first); [] if none."""
        raise NotImplementedError

    async def fetch(self, max_messages: int) -> list[tuple[bytes, Any]]:
        """Pull up to ``max_messages`` without waiting ([] when nothing is left)."""
        raise NotImplementedError

    async def ack(self, handles: list[Any]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class Adapter:
    BATCHED = False

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.url: str = params["url"]
        self.queue: str = params.get("queue", QUEUE)

    async def __aenter__(self) -> Adapter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    def publish(self, payload: bytes) -> Awaitable[Any]:
        raise NotImplementedError

    async def publish_batch(self, payloads: list[bytes]) -> None:
        raise NotImplementedError

    async def create_durable(self, name: str, start: str) -> None:
        raise NotImplementedError

    async def consumer(self, name: str, start: str, prefetch: int) -> Consumer:
        raise NotImplementedError

    def read_all(self) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def sync(self) -> None:
        pass


# --- tidings -----------------------------------------------------------------------


class TidingsConsumer(Consumer):
    def __init__(self, client: Any, queue: str, name: str, start: str, prefetch: int) -> None:
        self.client = client
        self.queue = queue
        self.name = name
        self.start = start
        self.prefetch = prefetch
        self.sub: Any = None

    async def open_push(self) -> None:
        self.sub = await self.client.subscribe(self.queue, durable=self.name, start=self.start, prefetch=self.prefetch)

    async def next_batch(self, timeout: float) -> list[tuple[bytes, Any]]:
        sub = self.sub
        try:
            first = await sub.next(timeout)
        except TimeoutError:
            return []
        out = [(first.payload, first)]
        anext = sub.__anext__
        while sub.pending:  # buffered: __anext__ returns without suspending
            m = await anext()
            out.append((m.payload, m))
        return out

    async def fetch(self, max_messages: int) -> list[tuple[bytes, Any]]:
        msgs = await self.client.fetch(
            self.queue, durable=self.name, max_messages=max_messages, wait=0, start=self.start
        )
        return [(m.payload, m) for m in msgs]

    async def ack(self, handles: list[Any]) -> None:
        for m in handles:
            await m.ack()  # queued; one ACK frame per event-loop turn (or per 128 acks)

    async def close(self) -> None:
        if self.sub is not None:
            await self.sub.close()


class TidingsAdapter(Adapter):
    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__(params)
        self.client: Any = None

    async def __aenter__(self) -> TidingsAdapter:
        from client import Client

        self.client = await Client.open(self.url, name=f"bench-{self.params.get('role')}", timeout=30.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    def publish(self, payload: bytes) -> Awaitable[Any]:
        return self.client.publish(self.queue, EVENT, payload)  # type: ignore[no-any-return]

    async def create_durable(self, name: str, start: str) -> None:
        sub = await self.client.subscribe(self.queue, durable=name, start=start, prefetch=1)
        await sub.close()

    async def consumer(self, name: str, start: str, prefetch: int) -> Consumer:
        c = TidingsConsumer(self.client, self.queue, name, start, prefetch)
        if not self.params.get("pull"):
            await c.open_push()
        return c

    async def read_all(self) -> AsyncIterator[bytes]:
        position = 0
        while True:
            msgs = await self.client.fetch(self.queue, max_messages=10_000, wait=0, start=position)
            if not msgs:
                return
            for m in msgs:
                yield m.payload
            position = msgs[-1].offset + 1

    async def sync(self) -> None:
        await self.client.ping()


def get_adapter(params: dict[str, Any]) -> Adapter:
    kind = params.get("broker", "tidings")
    if kind == "tidings":
        return TidingsAdapter(params)
    from .peers import adapter_class

    adapter: Adapter = adapter_class(kind)(params)
    return adapter
