"""kill -9 while subscribers consume and ack (RELIABILITY.md C3, E4).

A broker process is killed with SIGKILL ten times (T2: 20) and restarted on
its port while a reconnecting publisher stores a stream of messages and
three durables consume it with acks, through the real client, each with its
own subscriber; the third's subscriber is also killed (its client aborted,
with messages in flight) and replaced every 2,000 messages. Pass:

* every publish is confirmed once (the client resends what was in flight;
  R9 stores it once) and the log holds each exactly once, in order;
* every durable gets every message at least once, its first deliveries in
  log order;
* after a kill, a durable gets again at most what it held unacked
  (``prefetch``) plus what it acked in the last cursor-flush interval before
  the kill (acks the broker applied but had not saved yet; 0.5 s counted
  for the 0.2 s interval and the save): never what it acked and the broker
  had saved. Summed over the kills, as a redelivery may come after the next.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from broker.config import DEFAULT_CURSOR_FLUSH
from client import Client, ConnectionLost, Subscription
from tests.checker import History, check, read_all
from tests.helpers import BrokerProcess

pytestmark = pytest.mark.one_loop
SOAK = bool(os.environ.get("TIDINGS_SOAK"))
TOTAL = 100_000 if SOAK else 20_000
KILLS = 20 if SOAK else 10
PREFETCH = 100
DURABLES = ("d0", "d1", "d2")
SUBSCRIBER_KILL_EVERY = 2_000  # messages of d2's


class Consumer:
    """One durable: what it was given, and how many times again after each restart."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: set[int] = set()
        self.first_order: list[int] = []
        self.again = 0  # deliveries of what it had seen
        self.acks: list[float] = []  # when each ack was made
        self.kills: list[float] = []  # when a kill (of the broker, or of this subscriber) came
        self.done = asyncio.Event()

    def bound(self) -> int:
        """The redeliveries the kills may cause (see the module docstring)."""
        window = DEFAULT_CURSOR_FLUSH + 0.3
        return sum(PREFETCH + sum(1 for t in self.acks if k - window <= t <= k) for k in self.kills)

    def take(self, offset: int) -> None:
        if offset in self.seen:
            self.again += 1
        else:
            self.seen.add(offset)
            self.first_order.append(offset)
        if len(self.seen) == TOTAL:
            self.done.set()


async def _consume(url: str, consumer: Consumer, *, kill_every: int | None) -> None:
    """Ack everything ``consumer`` gets; with ``kill_every``, abort the client that often and start another."""
    while not consumer.done.is_set():
        try:
            c = await Client.open(url, name=consumer.name, reconnect_deadline=60)
        except (ConnectionLost, OSError):  # the broker was killed under the first HELLO: start again
            await asyncio.sleep(0.05)  # (a retry's backoff: Client.open itself fails fast, as connect() does)
            continue
        try:
            sub: Subscription = await c.subscribe("Q", durable=consumer.name, start="earliest", prefetch=PREFETCH)
            budget = kill_every
            async for msg in sub:
                consumer.take(msg.offset)
                if consumer.done.is_set():
                    break
                if budget is not None:
                    budget -= 1
                    if budget == 0:
                        break  # killed now: what it holds unacked goes back
                await msg.ack()
                consumer.acks.append(time.monotonic())
        finally:
            if consumer.done.is_set():
                await c.aclose()
            else:
                c.abort()
                consumer.kills.append(time.monotonic())


async def _status(url: str) -> object:
    """The durables as STATUS has them (for a failure's message)."""
    try:
        async with Client(url, name="status", reconnect=False, timeout=5) as c:
            return (await c.status())["durables"]
    except Exception as exc:
        return repr(exc)


def _restart(bp: BrokerProcess) -> BrokerProcess:
    bp.kill()
    return BrokerProcess(bp.data_dir, "--port", str(bp.port)).start()


async def test_broker_kills_while_durables_consume_and_ack(tmp_path: Path) -> None:
    bp = BrokerProcess(tmp_path).start()
    history = History()
    consumers = [Consumer(name) for name in DURABLES]
    try:
        tasks = [
            asyncio.ensure_future(_consume(bp.url, c, kill_every=SUBSCRIBER_KILL_EVERY if c.name == "d2" else None))
            for c in consumers
        ]
        async with Client(bp.url, name="pub", reconnect_deadline=60) as pub:
            window = asyncio.Semaphore(200)

            async def one(seq: int) -> None:
                try:
                    history.ok[(0, seq)] = ("Q", await pub.publish("Q", "E", [0, seq]))
                finally:
                    window.release()

            publishes = []
            kills = [TOTAL * (k + 1) // (KILLS + 1) for k in range(KILLS)]
            for seq in range(TOTAL):
                await window.acquire()
                publishes.append(asyncio.ensure_future(one(seq)))
                if kills and seq == kills[0]:
                    kills.pop(0)
                    for c in consumers:
                        c.kills.append(time.monotonic())
                    bp = _restart(bp)  # publishes in flight, deliveries and acks in flight
            await asyncio.gather(*publishes)  # none raised: each confirmed, resent if need be
            assert pub.reconnects == KILLS
        done = asyncio.gather(*(c.done.wait() for c in consumers))
        finished, _ = await asyncio.wait([done, *tasks], timeout=60, return_when=asyncio.FIRST_EXCEPTION)
        if done not in finished:
            done.cancel()
            info = {
                c.name: (len(c.seen), "running" if not t.done() else repr(t.exception()))
                for c, t in zip(consumers, tasks, strict=True)
            }
            status = await _status(bp.url)
            pytest.fail(f"consumers not done after 60 s: (messages seen, task) {info}; durables {status}")
        await asyncio.gather(*tasks)
        async with Client(bp.url, name="checker", reconnect=False) as checker:
            report = check(history, {"Q": await read_all(checker, "Q")})
        assert report.clean and report.order_inversions == 0, report
        assert sorted(offset for _queue, offset in history.ok.values()) == list(range(TOTAL))
        for c in consumers:
            assert c.seen == set(range(TOTAL)), f"{c.name}: missing {sorted(set(range(TOTAL)) - c.seen)[:10]}"
            assert c.first_order == sorted(c.first_order), f"{c.name}: first deliveries out of log order"
            assert 0 < c.again <= c.bound(), (c.name, c.again, c.bound())
    finally:
        bp.kill()
