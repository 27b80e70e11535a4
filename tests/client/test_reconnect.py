"""Client(reconnect=True): a broker restart under a busy client loses no
confirmed publish, stores nothing twice, and subscriptions carry on."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from client import Client, ServerError
from protocol import ConnectionLost, ErrorCode, LocalProtocolError, PayloadTooLarge
from tests.checker import History, check, read_all
from tests.helpers import BrokerProcess, CuttingProxy, RawPeer, running_broker, url_of

pytestmark = pytest.mark.one_loop


def restart_on_same_port(bp: BrokerProcess, *, kill: bool) -> BrokerProcess:
    if kill:
        bp.kill()
    else:
        assert bp.stop() == 0
    return BrokerProcess(bp.data_dir, "--port", str(bp.port)).start()


async def test_kill9_under_a_publisher_loses_nothing_and_stores_nothing_twice(tmp_path: Path) -> None:
    """Plain publishes (no message_id): the client resends what was in flight
    and the broker, its producer index rebuilt from the log, stores each once."""
    bp = BrokerProcess(tmp_path).start()
    history = History()
    try:
        async with Client(bp.url, name="pub", reconnect_deadline=30) as c:
            sem = asyncio.Semaphore(100)
            restarted = asyncio.Event()

            async def one(seq: int) -> None:
                try:
                    history.ok[(0, seq)] = ("Q", await c.publish("Q", "E", [0, seq]))
                finally:
                    sem.release()

            tasks = []
            for seq in range(6000):
                await sem.acquire()
                tasks.append(asyncio.ensure_future(one(seq)))
                if seq in (2000, 4000):
                    bp = restart_on_same_port(bp, kill=True)  # publishes are in flight right now
                    restarted.set()
            await asyncio.gather(*tasks)  # no publish raised
            assert c.reconnects == 2
        report = check(history, {"Q": await _read(bp)})
        assert report.clean and report.order_inversions == 0, report
        assert len(history.ok) == 6000
    finally:
        bp.kill()


async def _read(bp: BrokerProcess) -> list[tuple[int, object]]:
    async with Client(bp.url, reconnect=False) as c:
        return await read_all(c, "Q")


async def test_dropped_connections_under_a_busy_publisher_store_each_message_once(tmp_path: Path) -> None:
    """Ten drops of the publisher's connection, each with up to 500 plain
    publishes in flight over two queues (runs of sequence numbers broken by
    the other queue): every publish confirmed, each stored once, in order."""
    history = History()
    async with running_broker(tmp_path) as broker, Client(url_of(broker), name="pub", reconnect_deadline=30) as c:
        sem = asyncio.Semaphore(500)

        async def one(seq: int) -> None:
            queue = "Q" if seq % 3 else "R"
            try:
                history.ok[(0, seq)] = (queue, await c.publish(queue, "E", [0, seq]))
            finally:
                sem.release()

        def stored_unconfirmed() -> bool:
            return any(q.log.next_offset > q.committed for q in broker.store.queues.values())

        tasks = []
        caught = 0
        for seq in range(10_000):
            await sem.acquire()
            tasks.append(asyncio.ensure_future(one(seq)))
            if seq % 1000 == 500:
                # Drop it while the broker holds stored, unconfirmed publishes (an
                # fsync is running), so that resends must be recognised; every turn
                # of the loop lets the broker read and store more.
                for _ in range(10_000):
                    if stored_unconfirmed():
                        caught += 1
                        break
                    await asyncio.sleep(0)
                for session in list(broker.sessions):  # the network drops it, under load
                    if session.conn_id == c.conn_id and session.transport is not None:
                        session.transport.abort()
        await asyncio.gather(*tasks)  # no publish raised
        assert c.reconnects == 10
        assert caught >= 5, f"only {caught} drops came while publishes were stored but unconfirmed"
        logs = {q: await read_all(c, q) for q in ("Q", "R")}
    report = check(history, logs)
    assert report.clean and report.order_inversions == 0, report
    assert len(history.ok) == 10_000


async def test_subscriptions_continue_across_a_broker_restart(tmp_path: Path) -> None:
    bp = BrokerProcess(tmp_path).start()
    try:
        async with Client(bp.url, name="sub") as sc, Client(bp.url, name="pub") as pc:
            durable = await sc.subscribe("Q", durable="d", start="earliest", prefetch=10)
            live = await sc.subscribe("Q")
            await pc.publish_many("Q", [("E", i) for i in range(5)])
            got = [await durable.next(timeout=5) for _ in range(5)]
            assert [(await live.next(timeout=5)).payload for _ in range(5)] == list(range(5))
            for m in got[:3]:
                await m.ack(wait=True)
            bp = restart_on_same_port(bp, kill=False)  # graceful: clients get SHUTTING_DOWN
            # Acks of messages delivered before the restart are applied after it.
            await got[3].ack(wait=True)
            await pc.publish_many("Q", [("E", i) for i in range(5, 8)])
            again = [await durable.next(timeout=10) for _ in range(4)]
            assert [(m.payload, m.redelivered) for m in again] == [(4, True), (5, False), (6, False), (7, False)]
            # The ephemeral one resumes after the last message it saw.
            assert [(await live.next(timeout=10)).payload for _ in range(3)] == [5, 6, 7]
            assert sc.reconnects == 1 and pc.reconnects == 1
    finally:
        bp.kill()


async def test_a_subscription_the_restarted_broker_refuses_ends_with_the_reason(tmp_path: Path) -> None:
    """The broker comes back without queue Q (its log lost records that had
    been fsynced: QUEUE_CORRUPT). The subscription to Q ends with that error
    and is forgotten (no later reconnect tries it again); the one to R
    carries on."""
    bp = BrokerProcess(tmp_path).start()
    try:
        async with Client(bp.url, name="sub", reconnect_deadline=30) as c:
            lost = await c.subscribe("Q", durable="d", start="earliest")
            kept = await c.subscribe("R", durable="d", start="earliest")
            await c.publish("Q", "E", 0)
            await c.publish("R", "E", 0)
            assert (await lost.next(timeout=5)).payload == 0 and (await kept.next(timeout=5)).payload == 0
            assert bp.stop() == 0
            for segment in (tmp_path / "queues" / "Q").glob("*.log"):
                os.truncate(segment, 0)
            bp = BrokerProcess(tmp_path, "--port", str(bp.port)).start()
            with pytest.raises(ServerError) as refused:
                await lost.next(timeout=10)
            assert refused.value.code is ErrorCode.QUEUE_CORRUPT
            assert "subs=1>" in repr(c)
            await lost.close()  # harmless: it has ended
            await c.publish("R", "E", 1)
            got = [await kept.next(timeout=10) for _ in range(2)]
            assert [(m.payload, m.redelivered) for m in got] == [(0, True), (1, False)]
            for m in got:
                await m.ack(wait=True)
            bp = restart_on_same_port(bp, kill=False)
            await c.publish("R", "E", 2)
            assert (await kept.next(timeout=10)).payload == 2
            assert c.reconnects == 2 and "subs=1>" in repr(c)
    finally:
        bp.kill()


@pytest.mark.parametrize("point", ["before_write", "after_write_before_sync", "after_sync_before_confirm"])
async def test_a_publish_in_flight_at_a_crash_is_resent_and_stored_once(tmp_path: Path, point: str) -> None:
    """The broker dies before storing the record, after writing it, or after
    syncing it (never confirmed): either way the resend leaves one copy."""
    bp = BrokerProcess(tmp_path, env={"TIDINGS_FAULT": f"{point}:crash:1"}).start()
    try:
        async with Client(bp.url, reconnect_deadline=30) as c:
            inflight = asyncio.ensure_future(c.publish("Q", "E", "in flight at the crash"))
            assert bp.proc is not None
            assert await asyncio.to_thread(bp.proc.wait) == 137  # the fault fired
            assert not inflight.done()
            bp.kill()  # reaps it
            bp = BrokerProcess(bp.data_dir, "--port", str(bp.port)).start()
            assert await inflight == 0
            assert await c.publish("Q", "E", "after") == 1
            assert c.reconnects == 1
        assert await _read(bp) == [(0, "in flight at the crash"), (1, "after")]
    finally:
        bp.kill()


async def test_a_resend_too_large_for_the_restarted_broker_fails_alone(tmp_path: Path) -> None:
    """The broker comes back with a smaller frame limit: the in-flight publish
    that no longer fits fails with PayloadTooLarge; the client carries on."""
    bp = BrokerProcess(tmp_path, env={"TIDINGS_FAULT": "before_write:crash:2"}).start()
    try:
        async with Client(bp.url, reconnect_deadline=30) as c:
            await c.publish("Q", "E", "names known: the next publish takes the fast path")
            big = asyncio.ensure_future(c.publish("Q", "E", b"x" * 100_000))
            assert bp.proc is not None
            assert await asyncio.to_thread(bp.proc.wait) == 137  # the fault fired
            bp.kill()
            bp = BrokerProcess(bp.data_dir, "--port", str(bp.port), "--max-frame-bytes", "65536").start()
            with pytest.raises(PayloadTooLarge) as caught:
                await asyncio.wait_for(big, 30)
            assert isinstance(caught.value, LocalProtocolError) and caught.value.code is ErrorCode.PAYLOAD_TOO_LARGE
            assert await c.publish("Q", "E", "after") == 1
        assert await _read(bp) == [(0, "names known: the next publish takes the fast path"), (1, "after")]
    finally:
        bp.kill()


async def test_the_client_gives_up_after_the_deadline(tmp_path: Path) -> None:
    bp = BrokerProcess(tmp_path).start()
    c = await Client.open(bp.url, reconnect_deadline=0.5)
    try:
        bp.kill()
        started = time.monotonic()
        with pytest.raises(ConnectionLost, match="unreachable"):
            while True:
                await c.publish("Q", "E", message_id=f"m{time.monotonic()}")
        assert time.monotonic() - started < 5
    finally:
        c.abort()
        bp.kill()


async def test_a_broker_at_its_connection_limit_is_tried_again(tmp_path: Path) -> None:
    """TOO_MANY_CONNECTIONS is retriable: a reconnect attempt the broker
    refuses for its connection limit is tried again with backoff, like an
    unreachable broker. (It ended the reconnect at once, as AUTH_FAILED
    does: every pending request failed, every subscription ended.)"""
    async with (
        running_broker(tmp_path / "a") as a,
        running_broker(tmp_path / "b", max_connections=1) as b,
        CuttingProxy(a) as proxy,
    ):
        c = await Client.open(proxy.url, name="mover")
        try:
            assert await c.publish("Q", "E", "to a") == 0
            holder = await RawPeer.connect(b)  # b is full from now on
            proxy.target = b.address  # the next connections through the proxy go to b
            accepted = len(proxy.accepted)
            proxy.cut_all()
            pending = asyncio.ensure_future(c.publish("Q", "E", "to b"))  # held while reconnecting
            await asyncio.wait_for(proxy.wait_for(lambda: len(proxy.accepted) >= accepted + 2), 10)
            assert not pending.done()  # two attempts refused, and still trying
            holder.close()
            assert await asyncio.wait_for(pending, 10) == 0
            assert c.reconnects == 1
        finally:
            await c.aclose()
