"""Simulated power loss (R1, R3): whatever the disk does with writes that were
never fsynced — drops them, tears them, reorders them into holes, loses a
new segment's directory entry — every record confirmed by a completed
``sync()`` survives, in order; the unsynced tail is either kept whole or cut.
A negative control (confirm before sync) must show loss, so the simulation
can tell the difference.

The disk model, per segment file: bytes up to the size at the last completed
``sync()`` are durable; after them, the file keeps any prefix of what was
written, with random pages of it replaced by zeros or garbage (writes that
never reached the platter, or reached it out of order). A segment created
after the last sync may be gone entirely.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.log import CorruptLogError, QueueLog

SOAK = bool(os.environ.get("TIDINGS_SOAK"))
CRASHES = 100_000 if SOAK else 10_000
PAGE = 512

OPS = st.lists(
    st.one_of(st.tuples(st.just("append"), st.integers(1, 6), st.integers(1, 300)), st.just(("sync", 0, 0))),
    min_size=1,
    max_size=25,
)


def run_and_crash(ops: list[tuple[str, int, int]], seed: int, *, confirm_before_sync: bool) -> tuple[int, int]:
    """Run ``ops`` on a log, crash it, recover. Returns (lost, recovered_records)."""
    rng = random.Random(seed)
    directory = Path(tempfile.mkdtemp(prefix="tidings-power-"))
    try:
        log = QueueLog.open(directory, segment_bytes=4096)
        confirmed: list[bytes] = []  # bodies in offset order, confirmed to a publisher
        written: list[bytes] = []
        synced_sizes: dict[str, int] = {}
        for op, count, size in ops:
            if op == "append":
                bodies = [rng.randbytes(size) for _ in range(count)]
                log.append(bodies, 1)
                written += bodies
                if confirm_before_sync:
                    confirmed = list(written)
            else:
                log.sync()
                synced_sizes = {p.name: p.stat().st_size for p in directory.glob("*.log")}
                confirmed = list(written)
        log.close()
        # The power goes out.
        for path in sorted(directory.glob("*.log")):
            durable = synced_sizes.get(path.name)
            if durable is None and rng.random() < 0.5 and path.name != "00000000000000000000.log":
                path.unlink()  # created after the last directory fsync: its entry never reached the disk
                continue
            durable = durable or 0
            data = bytearray(path.read_bytes())
            keep = rng.randint(durable, len(data))
            tail = data[durable:keep]
            for page in range(0, len(tail), PAGE):
                roll = rng.random()
                if roll < 0.2:
                    tail[page : page + PAGE] = bytes(len(tail[page : page + PAGE]))  # never written
                elif roll < 0.3:
                    tail[page : page + PAGE] = rng.randbytes(len(tail[page : page + PAGE]))  # garbage
            path.write_bytes(bytes(data[:durable]) + bytes(tail))
        try:
            log = QueueLog.open(directory, segment_bytes=4096)
        except CorruptLogError:
            # A hole in the unsynced tail with an intact record after it looks like
            # mid-file damage: the broker refuses the queue until --repair, which
            # cuts at the hole. Nothing confirmed lies after a hole, so:
            log = QueueLog.open(directory, segment_bytes=4096, repair=True)
        got = read_all(log)
        log.close()
        assert got == written[: len(got)], "recovered records are not a prefix of what was written"
        lost = max(0, len(confirmed) - len(got))
        return lost, len(got)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def read_all(log: QueueLog) -> list[bytes]:
    """Every record body (a read stops at a segment's end, so loop)."""
    out: list[bytes] = []
    offset = log.first_offset
    while offset < log.next_offset:
        records = log.read(offset, max_count=10_000, max_bytes=1 << 30)
        assert records, f"no record at offset {offset}"
        out += [body for _, _, body in records]
        offset = records[-1][0] + 1
    return out


@settings(max_examples=CRASHES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(OPS, st.integers(0, 2**32))
def test_nothing_synced_is_lost_across_power_loss(ops: list[tuple[str, int, int]], seed: int) -> None:
    lost, _ = run_and_crash(ops, seed, confirm_before_sync=False)
    assert lost == 0


def test_negative_control_confirming_before_sync_loses_messages() -> None:
    rng = random.Random(1)
    losses = 0
    for i in range(300):
        ops = [("append", rng.randint(1, 6), rng.randint(1, 300)) for _ in range(rng.randint(1, 10))]
        lost, _ = run_and_crash(ops, i, confirm_before_sync=True)
        losses += lost > 0
    assert losses > 50, "the simulation cannot tell a broker that confirms before fsync from one that does not"


@pytest.mark.parametrize("seed", range(3))
def test_a_crash_during_recovery_is_harmless(tmp_path: Path, seed: int) -> None:
    """Recovery truncates a torn tail; a crash in the middle of it (modelled as
    recovery running again on the half-done state) reaches the same result."""
    rng = random.Random(seed)
    log = QueueLog.open(tmp_path, segment_bytes=4096)
    bodies = [rng.randbytes(100) for _ in range(50)]
    log.append(bodies, 1)
    log.sync()
    log.close()
    segment = sorted(tmp_path.glob("*.log"))[-1]
    with segment.open("ab") as f:
        f.write(rng.randbytes(77))  # a torn append
    first = QueueLog.open(tmp_path, segment_bytes=4096)
    a = read_all(first)
    first.close()
    second = QueueLog.open(tmp_path, segment_bytes=4096)
    b = read_all(second)
    second.close()
    assert a == b == bodies
