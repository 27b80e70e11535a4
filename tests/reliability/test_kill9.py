"""A broker killed with SIGKILL (or at a named point of its storage path) keeps
every message it confirmed: in order, at its offset, with no gap (R1, R2)."""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from client import Client
from protocol import ConnectionLost, ServerError, TidingsError
from tests.checker import History, check, read_all
from tests.helpers import BrokerProcess, TlsFiles, records_end

QUEUES = [f"q{i}" for i in range(8)]
pytestmark = pytest.mark.one_loop


class Goal:
    """Set once ``n`` publishes are confirmed: the moment to kill the broker."""

    def __init__(self, history: History, n: int) -> None:
        self.history, self.n, self.event = history, n, asyncio.Event()

    def check(self) -> None:
        if len(self.history.ok) >= self.n:
            self.event.set()


async def publish_stream(
    url: str, producer: int, history: History, start_seq: int, goal: Goal | None = None, **options: Any
) -> int:
    """Publish ``[producer, seq]`` round-robin over QUEUES, up to 64 in flight,
    until the connection breaks. Returns the next seq. ``options``: more Client options."""
    seq = start_seq
    try:
        client = await Client.open(url, name=f"p{producer}", timeout=5, reconnect=False, **options)
    except TidingsError:
        return seq
    window = asyncio.Semaphore(64)
    tasks: set[asyncio.Task[None]] = set()

    async def one(key: tuple[int, int], queue: str) -> None:
        try:
            offset = await client.publish(queue, "E", list(key))
            history.ok[key] = (queue, offset)
            if goal is not None:
                goal.check()
        except ServerError:
            history.failed.add(key)
        except (ConnectionLost, TidingsError, OSError):
            history.unknown.add(key)
        finally:
            window.release()

    try:
        while client._error is None:
            await window.acquire()
            key = (producer, seq)
            history.unknown.add(key)  # until answered
            task = asyncio.ensure_future(one(key, QUEUES[seq % len(QUEUES)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            seq += 1
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        client.abort()
    for key in history.ok:
        history.unknown.discard(key)
    for key in history.failed:
        history.unknown.discard(key)
    return seq


async def verify(url: str, history: History, **options: Any) -> None:
    async with Client(url, name="checker", **options) as c:
        logs = {q: await read_all(c, q) for q in QUEUES}
    report = check(history, logs)
    assert report.clean and report.order_inversions == 0, report


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_sigkill_during_confirmed_publishing_loses_nothing(
    tmp_path: Path, transport: str, tls_files: TlsFiles
) -> None:
    """RELIABILITY.md C1, and over TLS too in the soak tier (A5)."""
    soak = bool(os.environ.get("TIDINGS_SOAK"))
    if transport == "tls" and not soak:
        pytest.skip("over TLS in the soak tier (make soak)")
    kills, per_round = (50, 2000) if soak else (10, 2000)
    tls_args = ["--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key)] if transport == "tls" else []
    options = {"ssl_context": ssl.create_default_context(cafile=tls_files.ca)} if transport == "tls" else {}
    history = History()
    seqs = [0] * 4
    for _ in range(kills):
        bp = BrokerProcess(tmp_path, "--segment-bytes", "65536", *tls_args).start()
        try:
            goal = Goal(history, len(history.ok) + per_round)
            tasks = [
                asyncio.ensure_future(publish_stream(bp.url, p, history, seqs[p], goal, **options)) for p in range(4)
            ]
            reached = asyncio.ensure_future(goal.event.wait())
            await asyncio.wait([reached, *tasks], return_when=asyncio.FIRST_COMPLETED)
            reached.cancel()
            bp.kill()  # mid-stream: publishes are in flight right now
            seqs = list(await asyncio.gather(*tasks))
        finally:
            bp.kill()
    bp = BrokerProcess(tmp_path, *tls_args).start()
    try:
        await verify(bp.url, history, **options)
        assert len(history.ok) >= kills * per_round
    finally:
        assert bp.stop() == 0


@pytest.mark.parametrize(
    "fault",
    [
        "mid_write:crash:300",
        "after_write_before_sync:crash:300",
        "after_sync_before_confirm:crash:100",
        "during_segment_roll:crash:3",
        "extend:crash:20",  # 8 queues: the first 8 are their first appends
        "sync:crash:100",
    ],
)
async def test_crash_at_a_named_point_loses_nothing(tmp_path: Path, fault: str) -> None:
    history = History()
    bp = BrokerProcess(tmp_path, "--segment-bytes", "16384", env={"TIDINGS_FAULT": fault}).start()
    try:
        await asyncio.wait_for(asyncio.gather(*(publish_stream(bp.url, p, history, 0) for p in range(2))), 60)
        assert bp.wait(10) == 137, "the fault point was never reached"
    finally:
        bp.kill()
    assert history.ok, "nothing was confirmed before the crash"
    bp = BrokerProcess(tmp_path).start()
    try:
        await verify(bp.url, history)
    finally:
        assert bp.stop() == 0


async def test_sigkill_leaves_a_zero_tail_that_a_restart_keeps_and_appends_into(tmp_path: Path) -> None:
    """kill -9 leaves the last segment with its preallocated zero tail (S5). A
    restart reads it as the end of the data, quietly, and keeps it; appends go
    on at the end of the records; reads, STATUS bytes, rolls and retention use
    the records, never the file size; a clean stop cuts the tail."""
    seg0 = tmp_path / "queues" / "Q" / f"{0:020d}.log"
    payload = "p" * 300
    quiet = re.compile("torn tail|zero bytes|corrupt|cannot preallocate|Traceback", re.IGNORECASE)
    bp = BrokerProcess(tmp_path).start()  # 64 MiB segments: a 1 MiB allocation
    try:
        async with Client(bp.url, name="pub") as c:
            for i in range(100):
                assert await c.publish("Q", "E", [i, payload]) == i
    finally:
        bp.kill()
    end = records_end(seg0)
    assert seg0.stat().st_size == 1 << 20 > end
    assert set(seg0.read_bytes()[end:]) == {0}
    bp = BrokerProcess(tmp_path).start()
    try:
        async with Client(bp.url, name="pub") as c:
            info = (await c.status())["queues"][0]
            assert (info["next_offset"], info["bytes"]) == (100, end)
            for i in range(100, 150):
                assert await c.publish("Q", "E", [i, payload]) == i
            assert await read_all(c, "Q") == [(i, [i, payload]) for i in range(150)]
    finally:
        bp.kill()
    assert seg0.stat().st_size == 1 << 20  # kept, and written into
    # Small segments from now on: the next append rolls (cutting the old
    # segment's tail first), and retention drops the oldest segments.
    args = ("--segment-bytes", "8192", "--retention-bytes", "32768", "--retention-check", "0.2")
    bp = BrokerProcess(tmp_path, *args).start()
    try:
        async with Client(bp.url, name="pub") as c:
            for i in range(150, 400):
                assert await c.publish("Q", "E", [i, payload]) == i
            deadline = time.monotonic() + 10
            while (info := (await c.status())["queues"][0])["bytes"] > 32768 + 8192 + 400:
                assert time.monotonic() < deadline, "retention never ran"
                await asyncio.sleep(0.1)  # polling: the broker checks every 0.2 s
            segments = sorted(seg0.parent.glob("*.log"))
            assert info["bytes"] == sum(records_end(p) for p in segments)
            assert all(p.stat().st_size == records_end(p) for p in segments[:-1])
            assert int(segments[0].name[:-4]) == info["first_offset"]
            first = info["first_offset"]
            assert await read_all(c, "Q") == [(i, [i, payload]) for i in range(first, 400)]
    finally:
        assert bp.stop() == 0
    assert all(p.stat().st_size == records_end(p) for p in seg0.parent.glob("*.log"))
    bp = BrokerProcess(tmp_path).start()
    try:
        async with Client(bp.url, name="checker") as c:
            assert await read_all(c, "Q") == [(i, [i, payload]) for i in range(first, 400)]
    finally:
        assert bp.stop() == 0
    assert not [line for line in bp.log if quiet.search(line)]


async def test_a_failed_fsync_on_the_loop_thread_is_fail_stop_too(tmp_path: Path) -> None:
    """R7 for the small rounds the event loop fsyncs itself (a lone publisher,
    one message at a time): the fifth fsync fails, nothing more is confirmed,
    the broker exits 3, and a restart has exactly the four confirmed records."""
    bp = BrokerProcess(tmp_path, env={"TIDINGS_FAULT": "sync:eio:5"}).start()
    confirmed: list[int] = []
    try:
        async with Client(bp.url, name="lone", timeout=5, reconnect=False) as c:
            with pytest.raises(TidingsError):
                for i in range(10):
                    confirmed.append(await c.publish("Q", "E", i))
        assert bp.wait(10) == 3
        assert any("fsync failed" in line for line in bp.log)
    finally:
        bp.kill()
    assert confirmed == [0, 1, 2, 3]
    bp = BrokerProcess(tmp_path).start()
    try:
        async with Client(bp.url, name="checker") as c:
            stored = await read_all(c, "Q")
        assert stored[:4] == [(i, i) for i in range(4)] and len(stored) <= 5  # the fifth: written, never confirmed
    finally:
        assert bp.stop() == 0


async def test_a_failed_fsync_of_a_segment_roll_is_fail_stop(tmp_path: Path) -> None:
    """R7 for the fsync that seals a segment, which an append does on the loop
    (not the committer): the broker exits 3 as for any failed fsync; the
    publish that met it gets no answer (its outcome is unknown), the ones
    confirmed before are there after a restart."""
    bp = BrokerProcess(tmp_path, "--segment-bytes", "4096", env={"TIDINGS_FAULT": "roll_fsync:eio"}).start()
    confirmed: list[int] = []
    try:
        async with Client(bp.url, name="lone", timeout=5, reconnect=False) as c:
            with pytest.raises(ConnectionLost):  # no STORAGE_FAILED ("nothing stored"): the connection drops
                for _ in range(200):
                    confirmed.append(await c.publish("Q", "E", "x" * 100))
        assert bp.wait(10) == 3
        assert any("fsync failed" in line for line in bp.log)
    finally:
        bp.kill()
    assert 10 < len(confirmed) < 200  # a 4 KiB segment holds about 30 such records
    bp = BrokerProcess(tmp_path).start()
    try:
        async with Client(bp.url, name="checker") as c:
            stored = await read_all(c, "Q")
        assert [offset for offset, _ in stored[: len(confirmed)]] == confirmed
    finally:
        assert bp.stop() == 0


async def test_a_failed_fsync_is_fail_stop_and_recovers_on_restart(tmp_path: Path) -> None:
    """R7: fsync EIO -> nothing more is confirmed, the broker exits 3, a restart recovers."""
    history = History()
    bp = BrokerProcess(tmp_path, env={"TIDINGS_FAULT": "sync:eio:50"}).start()
    try:
        await asyncio.wait_for(publish_stream(bp.url, 0, history, 0), 60)
        assert bp.wait(10) == 3
        assert any("fsync failed" in line for line in bp.log)
    finally:
        bp.kill()
    assert history.ok, "nothing was confirmed before the failure"
    bp = BrokerProcess(tmp_path).start()
    try:
        await verify(bp.url, history)
    finally:
        assert bp.stop() == 0
