"""``--repair``: every intact record is kept, each lost one is marked (``tidings.lost``).

The log-level cases damage real segment files the ways a disk does (a
flipped byte, a zeroed sector, a lost file, a cut file) and open them with
``repair``; a property test does the same with random damage; the
end-to-end cases run a broker with ``--repair`` and read through the real
client.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker.log import POINT_FILE, CorruptLogError, QueueLog, write_point
from broker.repair import TEMP_SUFFIX
from broker.segment import HEADER_SIZE, encode_records
from protocol import LOST_EVENT, ErrorCode, LocalProtocolError, ServerError
from tests.helpers import RawPeer, connected, running_broker

SEG = 4096
SIZE = 20
REC = HEADER_SIZE + SIZE


def _body(i: int) -> bytes:
    return f"{i:08d}".encode().ljust(SIZE, b"x")


def _fill(path: Path, n: int, segment_bytes: int = SEG) -> None:
    log = QueueLog.open(path, segment_bytes=segment_bytes)
    for i in range(n):
        log.append([_body(i)], 1000 + i)
    log.sync()
    log.close()


def _read(log: QueueLog) -> list[tuple[int, int, bytes]]:
    """Every record: (offset, timestamp, body), checking that offsets are dense."""
    out: list[tuple[int, int, bytes]] = []
    while len(out) < log.next_offset - log.first_offset:
        out += log.read(log.first_offset + len(out), max_count=1 << 30, max_bytes=1 << 30)
    assert [o for o, _, _ in out] == list(range(log.first_offset, log.next_offset))
    return out


def _decode(body: bytes) -> list[Any]:
    """A record body's four values (event, timestamp, headers, payload), or [] if it is not one."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(body)
    try:
        return list(unpacker)
    except ValueError:
        return []


def _lost(records: list[tuple[int, int, bytes]]) -> list[int]:
    return [o for o, _, body in records if body.startswith(b"\xac" + LOST_EVENT.encode())]


def _segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.log"))


def _damage(path: Path, at: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(at)
        f.write(data)


def _repaired(path: Path, segment_bytes: int = SEG) -> QueueLog:
    """Refused without repair, then opened with it."""
    with pytest.raises(CorruptLogError):
        QueueLog.open(path, segment_bytes=segment_bytes)
    return QueueLog.open(path, segment_bytes=segment_bytes, repair=True)


def _reopened(log: QueueLog, segment_bytes: int = SEG) -> QueueLog:
    """Closed and opened again without repair: nothing is left to repair."""
    log.close()
    return QueueLog.open(log.directory, segment_bytes=segment_bytes)


def test_a_flipped_byte_loses_one_record_and_keeps_the_rest(tmp_path: Path) -> None:
    _fill(tmp_path, 20, segment_bytes=1 << 20)
    damaged = _segments(tmp_path)[0]
    _damage(damaged, 5 * REC + HEADER_SIZE + 3, b"\xff")
    log = _repaired(tmp_path, 1 << 20)
    records = _read(log)
    assert _lost(records) == [5]
    assert [b for o, _, b in records if o != 5] == [_body(i) for i in range(20) if i != 5]
    _, ts, marker = records[5]
    assert ts == 1004  # the record before's: timestamps stay in order
    event, stamp, headers, why = _decode(marker)
    assert (event, stamp, headers) == (LOST_EVENT, 1004, None)
    assert why.startswith(f"lost to damage in {damaged.name} (byte {5 * REC}: bad CRC (record 5)")
    assert "replaced by tidings-broker --repair at " in why
    assert log.append([b"after"], 2000) == 20  # R5: the log goes on
    log.sync()
    again = _reopened(log, 1 << 20)
    assert again.next_offset == 21 and _lost(_read(again)) == [5]
    again.close()


def test_a_zeroed_sector_across_a_segment_boundary(tmp_path: Path) -> None:
    """A run of zeros over the last records of one sealed segment: each gets a marker, later segments stay."""
    _fill(tmp_path, 300)
    names = _segments(tmp_path)
    first, second = names[:2]
    end = int(second.name[:-4])
    size = first.stat().st_size
    _damage(first, size - 2 * REC - 7, bytes(2 * REC + 7))  # the last two records and a bit
    log = _repaired(tmp_path)
    records = _read(log)
    assert _lost(records) == [end - 3, end - 2, end - 1]
    assert [b for o, _, b in records if o < end - 3 or o >= end] == [
        _body(i) for i in range(300) if i < end - 3 or i >= end
    ]
    assert _segments(tmp_path) == names  # rewritten in place: the same files
    _reopened(log).close()


def test_a_lost_segment_file_is_marked_and_the_later_ones_kept(tmp_path: Path) -> None:
    _fill(tmp_path, 400)
    names = _segments(tmp_path)
    assert len(names) >= 4
    gone = range(int(names[1].name[:-4]), int(names[2].name[:-4]))
    names[1].unlink()
    log = _repaired(tmp_path)
    records = _read(log)
    assert _lost(records) == list(gone)
    assert [b for o, _, b in records if o not in gone] == [_body(i) for i in range(400) if i not in gone]
    assert _segments(tmp_path)[1].name == names[1].name  # the next one was renamed after the gap's start
    _reopened(log).close()


def test_records_missing_at_the_end_are_marked_up_to_the_recovery_point(tmp_path: Path) -> None:
    _fill(tmp_path, 20, segment_bytes=1 << 20)
    seg = _segments(tmp_path)[0]
    seg.write_bytes(seg.read_bytes()[: 15 * REC])  # a clean cut between records, below the recovery point
    log = _repaired(tmp_path, 1 << 20)
    records = _read(log)
    assert log.next_offset == 20 and _lost(records) == [15, 16, 17, 18, 19]
    assert all(ts == 1014 for _, ts, _ in records[15:])
    assert log.append([b"next"], 3000) == 20  # no offset is given twice
    log.sync()
    _reopened(log, 1 << 20).close()


def test_a_repair_a_crash_interrupted_runs_again(tmp_path: Path) -> None:
    """The old file stays until the new one is renamed over it: a leftover
    temporary file is removed and the repair made afresh."""
    _fill(tmp_path, 20, segment_bytes=1 << 20)
    seg = _segments(tmp_path)[0]
    _damage(seg, 7 * REC + HEADER_SIZE, b"\x00\x00")
    leftover = tmp_path / (seg.name + TEMP_SUFFIX)
    leftover.write_bytes(b"half a repair")
    log = _repaired(tmp_path, 1 << 20)
    assert not leftover.exists()
    assert _lost(_read(log)) == [7]
    log.close()


def test_repair_changes_nothing_in_a_log_that_needs_none(tmp_path: Path) -> None:
    _fill(tmp_path, 300)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != POINT_FILE}
    QueueLog.open(tmp_path, segment_bytes=SEG, repair=True).close()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != POINT_FILE}
    assert after == before


_CASES = st.lists(
    st.tuples(st.sampled_from(["flip", "zeros", "garbage", "unlink"]), st.integers(0, 1 << 30), st.integers(1, 300)),
    min_size=1,
    max_size=3,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=_CASES, seed=st.integers(0, 1 << 16))
# A file lost, and the first record of the file after it (the last) damaged:
# the intact records after the damage were disbelieved (their offsets were
# counted from the lost file's first) and marked lost.
@example(damage=[("unlink", 2, 1), ("flip", 230, 1)], seed=0)
def test_repair_keeps_every_record_the_damage_did_not_touch(tmp_path: Path, damage: list[Any], seed: int) -> None:
    """Random damage to a log of several segments: after a repair the offsets
    are dense up to the old end, every record whose bytes are unchanged is
    there as it was, every changed one is a lost marker (or, in a lost first
    file, gone as retention would have dropped it), timestamps stay in order,
    and the log opens again without repair."""
    root = tmp_path / f"case-{seed}"
    shutil.rmtree(root, ignore_errors=True)
    _fill(root, 250)
    original: dict[int, tuple[Path, int, bytes]] = {}  # offset -> (file, position, record bytes)
    for path in _segments(root):
        raw = path.read_bytes()
        for i in range(len(raw) // REC):
            original[int(path.name[:-4]) + i] = (path, i * REC, raw[i * REC : (i + 1) * REC])
    for kind, where, length in damage:
        files = _segments(root)
        path = files[where % len(files)]
        if kind == "unlink":
            path.unlink()
            continue
        raw = path.read_bytes()
        at = where % len(raw)
        data = {"flip": bytes([raw[at] ^ 0xFF]), "zeros": bytes(length), "garbage": bytes(range(256)) * 2}[kind]
        _damage(path, at, data[: min(length, len(raw) - at)])
    changed = {
        offset
        for offset, (path, pos, record) in original.items()
        if not path.exists() or path.read_bytes()[pos : pos + REC] != record
    }
    log = QueueLog.open(root, segment_bytes=SEG, repair=True)
    records = _read(log)
    assert log.next_offset == 250
    by_offset = {o: b for o, _, b in records}
    for offset in range(250):
        if offset not in changed:
            assert by_offset.get(offset) == _body(offset), f"record {offset} was not damaged but is lost or changed"
        elif offset >= log.first_offset:
            assert _lost([(offset, 0, by_offset[offset])]) == [offset], f"damaged record {offset} is not marked"
    timestamps = [ts for _, ts, _ in records]
    assert timestamps == sorted(timestamps)
    _reopened(log).close()


# --- end to end ----------------------------------------------------------------------------------


async def test_a_subscriber_gets_the_lost_marker_whatever_its_filter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker started with --repair: a durable that filters on one event
    gets the marker where a message was lost (it may have been one it wanted),
    with ``lost`` set, and acks it like any message."""
    caplog.set_level(logging.INFO)
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        await c.publish_many("Q", [("A" if i % 2 else "B", f"m{i}".encode()) for i in range(10)])
    seg = _segments(tmp_path / "queues" / "Q")[0]
    raw = seg.read_bytes()
    _damage(seg, raw.index(b"m3") + 1, b"!")
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        with pytest.raises(ServerError) as err:
            await c.fetch("Q")
        assert err.value.code == ErrorCode.QUEUE_CORRUPT
        assert "(tidings-broker --check says what --repair would do)" in str(err.value)
    assert f"data in {tmp_path.resolve()}: 0 queues, 1 refused (see above)" in caplog.text
    async with running_broker(tmp_path, repair=True) as broker, connected(broker) as c:
        got = await c.fetch("Q", durable="d", events=["A"], max_messages=100)
        assert [(m.offset, m.event, m.lost) for m in got] == [
            (1, "A", False), (3, LOST_EVENT, True), (5, "A", False), (7, "A", False), (9, "A", False),
        ]  # fmt: skip
        assert "lost to damage in" in got[1].payload
        for m in got:
            await m.ack(wait=True)
        assert [m.offset for m in await c.fetch("Q", durable="d", events=["A"])] == []


async def test_publishing_a_broker_event_name_is_refused(tmp_path: Path) -> None:
    """Names starting with ``tidings.`` are the broker's: the client refuses
    them before sending, and the broker answers INVALID_NAME to one sent raw."""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        with pytest.raises(LocalProtocolError, match=r"'tidings\.' are the broker's"):
            await c.publish("Q", LOST_EVENT, b"fake")
        peer = await RawPeer.connect(broker)
        peer.send_wire([3, 7, "Q", LOST_EVENT, b"fake", None, None])
        answer = await peer.recv()
        assert getattr(answer, "code", None) == ErrorCode.INVALID_NAME, answer
        assert "are the broker's" in answer.message  # type: ignore[attr-defined]
        peer.close()
        assert await c.publish("Q", "tidings", b"fine") == 0  # the prefix is "tidings.", not "tidings"


def test_a_record_with_a_wild_offset_is_not_believed(tmp_path: Path) -> None:
    """A record that checks but whose offset the bytes before it cannot explain
    (a hostile file, or garbage that happens to pass) is not kept: it would
    ask for a marker at every offset before it."""
    _fill(tmp_path, 20, segment_bytes=1 << 20)
    wild = encode_records([_body(5)], 10**12, 1005, 10**12)
    assert len(wild) == REC
    _damage(_segments(tmp_path)[0], 5 * REC, wild)
    log = _repaired(tmp_path, 1 << 20)
    records = _read(log)
    assert log.next_offset == 20 and _lost(records) == [5]
    log.close()


def test_a_recovery_point_far_past_the_log_is_not_believed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _fill(tmp_path, 20, segment_bytes=1 << 20)
    write_point(tmp_path, 10**15)
    log = _repaired(tmp_path, 1 << 20)
    assert log.next_offset == 20 and _lost(_read(log)) == []
    assert "the recovery point is wrong" in caplog.text
    log.close()


def test_a_segment_named_far_past_the_log_is_renamed_after_its_records(tmp_path: Path) -> None:
    """The records in a segment say their offsets: a wrong file name is repaired."""
    _fill(tmp_path, 300)
    names = _segments(tmp_path)
    names[-1].rename(names[-1].with_name(f"{10**12:020d}.log"))
    log = _repaired(tmp_path)
    assert _segments(tmp_path) == names and _lost(_read(log)) == []
    log.close()


def test_a_segment_far_past_the_log_is_beyond_repair(tmp_path: Path) -> None:
    """A gap of more records than a segment could hold (here a file of another
    log, from offset 10^12 on) is not lost records: even --repair refuses the
    queue, naming the file, and changes nothing."""
    _fill(tmp_path, 300)
    alien = tmp_path / f"{10**12:020d}.log"
    alien.write_bytes(encode_records([_body(i) for i in range(10)], 10**12, 5000, 10**12))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CorruptLogError, match="more than a segment could have held; a file name is wrong") as err:
        QueueLog.open(tmp_path, segment_bytes=SEG, repair=True)
    assert err.value.path == alien
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_log_with_no_segment_file_left_is_damage(tmp_path: Path) -> None:
    """A recovery point says records were stored; with every segment file gone
    they were lost. A start refuses the queue (it began again at offset 0,
    giving the lost records' offsets to new messages); --repair starts the log
    where they ended, so no offset is given twice."""
    _fill(tmp_path, 20, segment_bytes=1 << 20)
    for seg in _segments(tmp_path):
        seg.unlink()
    log = _repaired(tmp_path, 1 << 20)
    assert (log.first_offset, log.next_offset) == (20, 20)
    assert log.append([b"next"], 3000) == 20
    log.sync()
    _reopened(log, 1 << 20).close()


async def test_a_delete_that_a_crash_interrupted_leaves_no_queue_behind(tmp_path: Path) -> None:
    """DELETE renames the queue's directory away before removing its files, so
    a crash meanwhile leaves a renamed directory, never a queue with some of
    its files gone; the next start removes it."""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        await c.publish("Q", "E", 1)
        await c.delete_queue("Q")
        assert sorted(p.name for p in (tmp_path / "queues").iterdir()) == []
    leftover = tmp_path / "queues" / ".deleted-Q-1796316000000000000"
    (leftover / "durables").mkdir(parents=True)
    (leftover / POINT_FILE).write_bytes(b"x" * 16)  # what a crash in the middle of removing could leave
    stray = tmp_path / "queues" / ".deleted-notes.txt"  # a file of that name is no DELETE's: a start leaves it
    stray.write_text("kept")
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        assert not leftover.exists()
        status = await c.status()
        assert (status["queues"], status["failed_queues"]) == ([], [])
    assert stray.read_text() == "kept"


def test_a_lost_segment_of_thousands_of_records(tmp_path: Path) -> None:
    """More markers than one write takes (4,096): each offset gets one, claims and all."""
    _fill(tmp_path, 12_000, segment_bytes=1 << 18)
    names = _segments(tmp_path)
    gone = range(int(names[1].name[:-4]), int(names[2].name[:-4]))
    assert len(gone) > 4096
    names[1].unlink()
    log = _repaired(tmp_path, 1 << 18)
    records = _read(log)
    assert _lost(records) == list(gone)
    assert [b for o, _, b in records if o not in gone] == [_body(i) for i in range(12_000) if i not in gone]
    _reopened(log, 1 << 18).close()
