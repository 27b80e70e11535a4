"""Disk full: every publish after the disk fills gets STORAGE_FULL at once,
subscribers keep reading, publishing resumes by itself once space is freed,
and nothing confirmed is lost (R5). On a real size-limited tmpfs when we may
mount one (root), and always with the in-process ENOSPC injector."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import faults
from broker.log import QueueLog
from broker.segment import HEADER_SIZE
from client import Client
from protocol import StorageFull
from tests.checker import History, check, read_all
from tests.helpers import BrokerProcess, connected, running_broker

PAYLOAD = b"x" * 1000


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); the injector test covers it")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def fill_until_full(c: Client, history: History, seq: int) -> int:
    """Publish until the broker says STORAGE_FULL; then check it keeps saying so, quickly."""
    while True:
        try:
            history.ok[(0, seq)] = ("Q", await c.publish("Q", "E", [0, seq, PAYLOAD]))
        except StorageFull:
            history.failed.add((0, seq))
            seq += 1
            break
        seq += 1
        assert seq < 100_000, "the disk never filled"
    for _ in range(20):
        started = time.monotonic()
        with pytest.raises(StorageFull) as info:
            await c.publish("Q", "E", [0, seq, PAYLOAD])
        assert time.monotonic() - started < 1.0
        assert "No space left" in str(info.value)
        history.failed.add((0, seq))
        seq += 1
    return seq


def _payload_key_check(history: History, records: list[tuple[int, object]]) -> None:
    logs = {"Q": [(o, p[:2] if isinstance(p, list) else p) for o, p in records]}
    report = check(history, logs)
    assert report.clean, report


@pytest.mark.one_loop
async def test_disk_full_on_a_real_tmpfs(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "3m") as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (1 << 20))  # 1 MiB to give back later
        history = History()
        bp = BrokerProcess(disk / "data", "--segment-bytes", "262144").start()
        try:
            async with Client(bp.url, name="pub") as pub, Client(bp.url, name="sub") as sub_client:
                sub = await sub_client.subscribe("Q", durable="reader", start="earliest", prefetch=500)
                seq = await fill_until_full(pub, history, 0)
                # The subscriber still reads everything that was confirmed.
                confirmed = len(history.ok)
                for i in range(confirmed):
                    msg = await sub.next(timeout=10)
                    assert msg.offset == i
                    await msg.ack()
                # Free space: publishing resumes by itself.
                filler.unlink()
                for _ in range(50):
                    history.ok[(0, seq)] = ("Q", await pub.publish("Q", "E", [0, seq, PAYLOAD]))
                    seq += 1
                assert (await pub.status())["server"]["conn_count"] == 2
        finally:
            bp.kill()
        bp = BrokerProcess(disk / "data").start()
        try:
            async with Client(bp.url) as c:
                _payload_key_check(history, await read_all(c, "Q"))
        finally:
            assert bp.stop() == 0


def test_a_disk_too_full_for_the_zeros_takes_every_record_that_fits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """R7 with preallocation, on a real full disk: the 1 MiB of zeros does not
    fit, what it took is given back, and plain appends take records until the
    space is really gone, as without preallocation; then ENOSPC (nothing half
    written), and appends resume once space is freed."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\1" * (640 << 10))
        log = QueueLog.open(disk / "q", segment_bytes=4 << 20)
        stat = os.statvfs(disk)
        free = stat.f_bavail * stat.f_frsize
        body = b"r" * (1024 - HEADER_SIZE)
        n = 0
        with caplog.at_level(logging.WARNING), pytest.raises(OSError) as info:
            while True:
                log.append([body], 1)
                n += 1
        assert info.value.errno == errno.ENOSPC
        assert "cannot preallocate 1048576 bytes, appending without" in caplog.text
        seg = log.segments[-1]
        assert seg.path.stat().st_size == seg.size == n * 1024
        assert n * 1024 >= free - 2 * 4096, (n, free)  # every record that fitted was taken
        log.sync()
        filler.unlink()
        for _ in range(10):
            log.append([body], 1)
        log.sync()
        log.close()
        again = QueueLog.open(disk / "q", segment_bytes=4 << 20)
        assert again.next_offset == n + 10
        again.close()


async def test_disk_full_with_the_enospc_injector(tmp_path: Path) -> None:
    history = History()
    async with running_broker(tmp_path) as broker, connected(broker, "pub") as pub, connected(broker, "sub") as sc:
        sub = await sc.subscribe("Q", durable="reader", start="earliest")
        for seq in range(100):
            history.ok[(0, seq)] = ("Q", await pub.publish("Q", "E", [0, seq]))
        faults.configure("before_write:enospc:1+,during_segment_roll:enospc:1+")
        try:
            for seq in range(100, 120):
                started = time.monotonic()
                with pytest.raises(StorageFull):
                    await pub.publish("Q", "E", [0, seq])
                assert time.monotonic() - started < 1.0
                history.failed.add((0, seq))
            assert [(await sub.next(timeout=5)).offset for _ in range(100)] == list(range(100))
        finally:
            faults.configure(None)
        for seq in range(120, 150):
            history.ok[(0, seq)] = ("Q", await pub.publish("Q", "E", [0, seq]))
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        report = check(history, {"Q": await read_all(c, "Q")})
        assert report.clean, report
