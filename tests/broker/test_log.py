"""The queue log on real files: append/read, rolls, recovery from torn and damaged files."""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker import faults
from broker.log import POINT_FILE, CorruptLogError, LogFailedError, QueueLog
from broker.segment import HEADER_SIZE, MAGIC, READ_CHUNK
from protocol import LOST_EVENT
from tests.helpers import records_end

SEG = 4096  # the smallest segment size the config allows: many rolls in small tests


def _body(i: int, size: int = 20) -> bytes:
    return f"{i:08d}".encode().ljust(size, b"x")


def _fill(path: Path, n: int, size: int = 20, segment_bytes: int = SEG) -> QueueLog:
    log = QueueLog.open(path, segment_bytes=segment_bytes)
    for i in range(n):
        log.append([_body(i, size)], 1000 + i)
    log.sync()
    return log


def _all(log: QueueLog) -> list[bytes]:
    out: list[bytes] = []
    offset = log.first_offset
    while offset < log.next_offset:
        got = log.read(offset, max_count=1000, max_bytes=1 << 20)
        assert got, f"read at {offset} returned nothing"
        assert [o for o, _, _ in got] == list(range(offset, offset + len(got)))
        out += [b for _, _, b in got]
        offset += len(got)
    return out


def _lost(bodies: list[bytes]) -> list[int]:
    """The offsets (from 0) of the lost markers among ``bodies``."""
    marker = b"\xac" + LOST_EVENT.encode()  # a record body starts with its event, a fixstr
    return [i for i, body in enumerate(bodies) if body.startswith(marker)]


def _segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.log"))


def _crash(log: QueueLog) -> None:
    """Stop without a clean close: the files are closed, no recovery point is saved."""
    for seg in log.segments:
        os.close(seg.fd)


def test_append_read_across_rolls_and_reopen(tmp_path: Path) -> None:
    log = _fill(tmp_path, 600)
    assert len(_segments(tmp_path)) > 3
    assert log.first_offset == 0 and log.next_offset == 600
    assert _all(log) == [_body(i) for i in range(600)]
    assert log.read(599, max_count=10, max_bytes=1)[0][0] == 599
    assert log.read(600, max_count=10, max_bytes=1 << 20) == []
    log.close()
    again = QueueLog.open(tmp_path, segment_bytes=SEG)
    assert again.next_offset == 600
    assert _all(again) == [_body(i) for i in range(600)]
    assert again.append([b"more"], 5000) == 600
    again.close()


def test_batches_and_max_bytes(tmp_path: Path) -> None:
    log = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert log.append([_body(i) for i in range(100)], 7) == 0
    got = log.read(10, max_count=1000, max_bytes=100)
    assert [o for o, _, _ in got] == [10, 11, 12, 13, 14]  # 5 x 20 bytes reach max_bytes
    assert all(ts == 7 for _, ts, _ in got)
    big = b"B" * 300_000  # bigger than one read chunk
    off = log.append([big], 8)
    assert log.read(off, max_count=1, max_bytes=1)[0][2] == big
    log.close()


@pytest.mark.parametrize("size", [300_000, 900_000, READ_CHUNK - HEADER_SIZE, READ_CHUNK - HEADER_SIZE + 1])
@pytest.mark.parametrize("at", [0, 1000, READ_CHUNK - 30, READ_CHUNK - 20, READ_CHUNK - 1])
def test_a_record_longer_than_a_read_chunk_reads_back(tmp_path: Path, size: int, at: int) -> None:
    """A record of any legal size (up to the 1 MiB frame limit) reads back
    whole wherever it starts in a read chunk: at the start of a read, in the
    middle, or with only part of its header (``READ_CHUNK - at`` bytes) in the
    chunk. So do the records after it, and all of them again after a restart,
    whose scan reads the file in the same chunks. (Such records used to read
    as damaged, "short", whenever their header did not show their length.)"""
    big, other = b"B" * size, b"b" * (size + 7)
    bodies = ([_body(0, at - HEADER_SIZE)] if at else []) + [big, _body(1), other, _body(2)]
    log = QueueLog.open(tmp_path, segment_bytes=4 << 20)
    log.append(bodies, 2)
    log.sync()
    first = bodies.index(big)
    for _ in range(2):
        assert _all(log) == bodies
        assert log.read(first, max_count=1, max_bytes=1) == [(first, 2, big)]
        assert [b for _, _, b in log.read(first, max_count=10, max_bytes=1 << 30)] == bodies[first:]
        log.close()
        log = QueueLog.open(tmp_path, segment_bytes=4 << 20)
        assert log.next_offset == len(bodies)
    log.close()


def test_offset_for_time(tmp_path: Path) -> None:
    log = _fill(tmp_path, 300)  # timestamps 1000..1299
    assert log.offset_for_time(0) == 0
    assert log.offset_for_time(1000) == 0
    assert log.offset_for_time(1150) == 150
    assert log.offset_for_time(1299) == 299
    assert log.offset_for_time(1300) == 300
    log.append([b"late"], 10)  # a clock that went back: timestamps stay monotonic
    assert log.read(300, max_count=1, max_bytes=1)[0][1] == 1299
    log.close()


def test_torn_tail_at_every_byte_of_the_last_records(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """S1: cut the file at every byte of the last 3 records: exactly the whole records survive."""
    src = tmp_path / "src"
    _fill(src, 50, segment_bytes=1 << 20).close()
    seg = _segments(src)[0]
    data = seg.read_bytes()
    rec = HEADER_SIZE + 20
    for cut in range(len(data) - 3 * rec, len(data)):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / seg.name).write_bytes(data[:cut])
        with caplog.at_level(logging.WARNING):
            log = QueueLog.open(d, segment_bytes=1 << 20)
        whole = cut // rec
        assert log.next_offset == whole
        assert (d / seg.name).stat().st_size == whole * rec
        if cut % rec:
            assert "torn tail" in caplog.text
        caplog.clear()
        assert log.append([b"after"], 1) == whole  # R5: appends after recovery are valid
        log.close()
        again = QueueLog.open(d, segment_bytes=1 << 20)
        assert _all(again)[-1] == b"after" and again.next_offset == whole + 1
        again.close()


def test_zero_filled_tail_reads_as_end(tmp_path: Path) -> None:
    _fill(tmp_path, 10, segment_bytes=1 << 20).close()
    seg = _segments(tmp_path)[0]
    with seg.open("ab") as f:
        f.write(bytes(8192))
    log = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert log.next_offset == 10
    assert log.append([b"x"], 1) == 10
    log.close()


def test_a_file_cut_shorter_during_the_scan_ends_it_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recovery reads a segment up to the size ``fstat`` gave. Something
    else cutting the file right after that (inside record 40, here) must not
    keep the scan re-reading the missing bytes for ever, as it did: the
    file ends where the reads end, and the cut record is a torn tail."""
    _crash(_fill(tmp_path, 50, segment_bytes=1 << 20))
    seg = _segments(tmp_path)[0]
    inode = seg.stat().st_ino
    cut_at = records_end(seg) // 50 * 40 + 7  # inside record 40 (records of one size)
    real_fstat = os.fstat

    def fstat(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        if st.st_ino == inode and st.st_size > cut_at:
            os.truncate(seg, cut_at)  # after the size was taken
        return st

    monkeypatch.setattr(os, "fstat", fstat)
    opened: list[QueueLog] = []
    scan = threading.Thread(target=lambda: opened.append(QueueLog.open(tmp_path, segment_bytes=1 << 20)), daemon=True)
    scan.start()
    scan.join(30)
    assert not scan.is_alive(), "the recovery scan never ended"
    monkeypatch.undo()
    (log,) = opened
    assert log.next_offset == 40 and _all(log) == [_body(i) for i in range(40)]
    assert log.append([b"x"], 1) == 40
    log.close()


def test_a_zero_tail_after_a_crash_is_kept_quietly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """S5 with preallocation: after an unclean stop the last segment ends in
    zeros (its preallocated tail). That is the end of the data, not damage: no
    warning, nothing cut, the allocation kept, appends go on at the end of the
    records (not of the file), reads stop there."""
    log = _fill(tmp_path, 10, segment_bytes=1 << 20)
    log.append([_body(i) for i in range(10, 13)], 1)  # written, never synced
    _crash(log)
    seg = _segments(tmp_path)[0]
    os.truncate(seg, 300_000)  # whatever the allocation was: zeros up to here
    with caplog.at_level(logging.WARNING):
        log = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert not caplog.records
    assert seg.stat().st_size == 300_000
    assert log.next_offset == 13 and log.size_bytes == 13 * (HEADER_SIZE + 20)
    assert log.read(13, max_count=10, max_bytes=1 << 20) == []
    assert log.append([_body(13)], 1) == 13
    assert seg.stat().st_size == 300_000  # written over the zeros
    assert _all(log) == [_body(i) for i in range(14)]
    log.sync()
    _crash(log)
    with caplog.at_level(logging.WARNING):
        log = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert not caplog.records
    assert _all(log) == [_body(i) for i in range(14)]
    log.close()
    assert seg.stat().st_size == 14 * (HEADER_SIZE + 20)  # a clean close cuts the tail


def test_a_torn_record_followed_by_zeros_is_cut(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The first page of the last (never synced) record reached the disk, the
    rest of it is zeros up to the end of the allocation: a torn tail, cut with a
    warning (R3), the allocation with it; appends work again (R5)."""
    log = _fill(tmp_path, 10, segment_bytes=1 << 20)
    log.append([_body(10, 5000)], 1)
    _crash(log)
    seg = _segments(tmp_path)[0]
    start = 10 * (HEADER_SIZE + 20)
    size = seg.stat().st_size
    _hole(seg, start + 100, size - start - 100)
    with caplog.at_level(logging.WARNING):
        log = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert (
        f"torn tail (no fsync known to cover it): cutting {size - start} bytes from byte {start} on: bad CRC"
        in caplog.text
    )
    assert log.next_offset == 10 and seg.stat().st_size == start
    assert log.append([b"after"], 1) == 10
    log.sync()
    log.close()
    again = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert _all(again) == [_body(i) for i in range(10)] + [b"after"]
    again.close()


def test_a_long_record_torn_or_damaged_is_judged_as_any_other(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The scan reads a record longer than a read chunk whole too: cut short in
    the unsynced tail it is a torn tail (cut, R3); a byte flipped past its first
    chunk once it was synced is damage (R4)."""
    big = b"B" * 900_000
    log = _fill(tmp_path, 10, segment_bytes=4 << 20)
    log.append([big], 1)  # written, never synced
    _crash(log)
    seg = _segments(tmp_path)[0]
    start = 10 * (HEADER_SIZE + 20)
    os.truncate(seg, start + 600_000)
    with caplog.at_level(logging.WARNING):
        log = QueueLog.open(tmp_path, segment_bytes=4 << 20)
    assert f"torn tail (no fsync known to cover it): cutting 600000 bytes from byte {start} on: short" in caplog.text
    assert log.next_offset == 10
    assert log.append([big], 1) == 10
    log.sync()
    log.close()  # the recovery point says 11
    raw = bytearray(seg.read_bytes())
    raw[start + 800_000] ^= 1
    seg.write_bytes(bytes(raw))
    with pytest.raises(CorruptLogError, match=f"corrupt record at byte {start}: bad CRC"):
        QueueLog.open(tmp_path, segment_bytes=4 << 20)


def test_zeros_where_synced_records_were_are_damage(tmp_path: Path) -> None:
    """A zero tail is the end of the data only after what was synced: zeros
    over records below the recovery point are lost synced records (R4)."""
    log = _fill(tmp_path, 20, segment_bytes=1 << 20)
    log.close()
    seg = _segments(tmp_path)[0]
    rec = HEADER_SIZE + 20
    _hole(seg, 15 * rec, 5 * rec)
    os.truncate(seg, 1 << 20)
    with pytest.raises(CorruptLogError, match="below the recovery point 20"):
        QueueLog.open(tmp_path, segment_bytes=1 << 20)


def test_a_clean_stop_cuts_the_zero_tail_and_a_restart_extends_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = _fill(tmp_path, 10, segment_bytes=1 << 20)
    seg = _segments(tmp_path)[0]
    rec = HEADER_SIZE + 20
    assert seg.stat().st_size == 1 << 20  # preallocated: a step, up to the segment size
    log.close()
    assert seg.stat().st_size == 10 * rec and (tmp_path / POINT_FILE).exists()
    with caplog.at_level(logging.WARNING):
        again = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert not caplog.records
    assert again.append([_body(10)], 1) == 10
    assert seg.stat().st_size == 1 << 20
    again.sync()
    again.close()
    third = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert _all(third) == [_body(i) for i in range(11)]
    third.close()


def test_sealed_segments_never_have_a_zero_tail(tmp_path: Path) -> None:
    """A roll cuts the old segment's zero tail before fsyncing it (zeros in a
    sealed segment are damage); extensions go in steps, never past the segment size."""
    log = QueueLog.open(tmp_path, segment_bytes=16384, extend_bytes=4096)
    for i in range(300):
        log.append([_body(i, 100)], 1)
        if i % 7 == 0:
            log.sync()
        last = log.segments[-1]
        assert last.size <= last.allocated <= max(16384, last.size)
        assert last.allocated - last.size < 4096 + HEADER_SIZE + 100
        assert last.path.stat().st_size == last.allocated
    assert len(log.segments) > 2
    for seg in log.segments[:-1]:
        assert seg.path.stat().st_size == seg.size == records_end(seg.path)
    last = log.segments[-1]
    assert last.path.stat().st_size > last.size == records_end(last.path)
    _crash(log)
    log = QueueLog.open(tmp_path, segment_bytes=16384, extend_bytes=4096)
    assert _all(log) == [_body(i, 100) for i in range(300)]
    log.close()
    assert all(p.stat().st_size == records_end(p) for p in _segments(tmp_path))


def test_a_failed_extension_falls_back_to_plain_appends(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """R7 with preallocation: ENOSPC while writing the zeros refuses nothing
    (the append goes on as a plain one), and the next try comes a step later."""
    log = QueueLog.open(tmp_path, segment_bytes=1 << 20, extend_bytes=4096)
    seg = log.segments[-1]
    faults.configure("extend:enospc:1+")
    try:
        with caplog.at_level(logging.WARNING):
            for i in range(100):  # 13,000 bytes: four steps' worth
                assert log.append([_body(i, 100)], 1) == i
    finally:
        faults.configure(None)
    assert seg.path.stat().st_size == seg.size == 100 * (HEADER_SIZE + 100)
    assert len([r for r in caplog.records if "cannot preallocate 4096 bytes" in r.getMessage()]) == 4
    for i in range(100, 140):  # space is back: a step on, the zeros are written again
        log.append([_body(i, 100)], 1)
    assert seg.path.stat().st_size > seg.size
    log.sync()
    _crash(log)
    log = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert _all(log) == [_body(i, 100) for i in range(140)]
    log.close()


def test_garbage_tail_is_cut(tmp_path: Path) -> None:
    _fill(tmp_path, 10, segment_bytes=1 << 20).close()
    seg = _segments(tmp_path)[0]
    with seg.open("ab") as f:
        f.write(random.Random(1).randbytes(5000))
    log = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert log.next_offset == 10
    log.close()


def test_damage_in_the_middle_refuses_the_log(tmp_path: Path) -> None:
    """R4/S4: a bad record followed by valid ones is damage, named by file and byte."""
    _fill(tmp_path, 20, segment_bytes=1 << 20).close()
    seg = _segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    rec = HEADER_SIZE + 20
    data[5 * rec + HEADER_SIZE + 3] ^= 0xFF  # a payload byte of record 5
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError) as err:
        QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert seg.name in str(err.value) and f"byte {5 * rec}" in str(err.value)
    log = QueueLog.open(tmp_path, segment_bytes=1 << 20, repair=True)  # the operator's choice
    assert log.next_offset == 20  # the records after it are kept (tests/broker/test_repair.py)
    assert _lost(_all(log)) == [5]
    log.close()


def test_damage_in_a_sealed_segment_refuses_the_log(tmp_path: Path) -> None:
    _fill(tmp_path, 400).close()
    first = _segments(tmp_path)[0]
    data = bytearray(first.read_bytes())
    data[-3] ^= 0x01  # the last record of a sealed segment
    first.write_bytes(bytes(data))
    with pytest.raises(CorruptLogError):
        QueueLog.open(tmp_path, segment_bytes=SEG)
    log = QueueLog.open(tmp_path, segment_bytes=SEG, repair=True)
    kept = _all(log)
    assert len(kept) == 400 and _lost(kept) == [log.segments[1].base - 1]  # later segments kept
    log.close()


def _groups(path: Path, *, synced: int, unsynced: int, size: int = 20) -> tuple[QueueLog, int]:
    """Write ``synced`` groups of 5 records, each fsynced before the next (as the
    committer does), then ``unsynced`` groups that never were; crash."""
    log = QueueLog.open(path, segment_bytes=1 << 20)
    n = 0
    for g in range(synced + unsynced):
        log.append([_body(n + i, size) for i in range(5)], 1)
        n += 5
        if g < synced:
            log.sync()
    _crash(log)
    return log, HEADER_SIZE + size


def _hole(seg: Path, start: int, length: int) -> None:
    raw = bytearray(seg.read_bytes())
    raw[start : start + length] = bytes(length)
    seg.write_bytes(bytes(raw))


@pytest.mark.parametrize("record", [1, 5, 12, 14])
def test_a_hole_before_a_later_sync_group_is_damage(tmp_path: Path, record: int) -> None:
    """R4: records 0-14 were fsynced group by group; records 15-19 (written after
    the last fsync) say so. A hole in 0-14 is damage, even with no recovery point."""
    _groups(tmp_path, synced=3, unsynced=1)
    assert not (tmp_path / POINT_FILE).exists()
    seg = _segments(tmp_path)[0]
    rec = HEADER_SIZE + 20
    _hole(seg, record * rec + 7, 40)  # a dropped sector: the rest of the file is intact
    with pytest.raises(CorruptLogError, match="had been fsynced") as err:
        QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert err.value.path == seg and err.value.position == record * rec
    assert f"byte {record * rec}" in str(err.value)
    log = QueueLog.open(tmp_path, segment_bytes=1 << 20, repair=True)
    assert log.next_offset == 20 and _lost(_all(log)) == [record]
    log.close()


@pytest.mark.parametrize("record", [15, 16, 19, 22, 24])
def test_a_hole_in_the_unsynced_tail_is_a_torn_tail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, record: int
) -> None:
    """R3: 15 records fsynced, then two groups (15-19, 20-24) written and never
    fsynced (the second while the first one's fsync would still be running). A
    power loss drops a page of them: cut at the hole, keep 0..record-1, start."""
    _groups(tmp_path, synced=3, unsynced=2)
    seg = _segments(tmp_path)[0]
    rec = HEADER_SIZE + 20
    _hole(seg, record * rec + 3, 40)
    with caplog.at_level(logging.WARNING):
        log = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert log.next_offset == record
    assert f"{seg}: torn tail (no fsync known to cover it): cutting" in caplog.text
    assert f"from byte {record * rec} on" in caplog.text
    assert seg.stat().st_size == record * rec
    assert _all(log) == [_body(i) for i in range(record)]
    assert log.append([b"after"], 1) == record  # R5
    log.sync()
    log.close()
    again = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert again.next_offset == record + 1
    again.close()


def test_records_after_a_restart_vouch_for_records_before_it(tmp_path: Path) -> None:
    """After an unclean stop, opening fsyncs what no record vouches for (it may
    have been only in the page cache), so the first record after it claims all."""
    _groups(tmp_path, synced=2, unsynced=0)  # 0-9 fsynced, no later record says so
    log = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    log.append([_body(10)], 1)
    _crash(log)
    seg = _segments(tmp_path)[0]
    _hole(seg, 7 * (HEADER_SIZE + 20), 10)
    with pytest.raises(CorruptLogError, match="had been fsynced"):
        QueueLog.open(tmp_path, segment_bytes=1 << 20)


def test_the_recovery_point_covers_the_last_fsync(tmp_path: Path) -> None:
    """After sync and close, no record vouches for the last group, the recovery point does."""
    log, rec = _groups(tmp_path, synced=2, unsynced=0)
    assert not (tmp_path / POINT_FILE).exists()  # a crash saved none
    log = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    log.close()  # a clean close saves it
    seg = _segments(tmp_path)[0]
    _hole(seg, 8 * rec, 10)
    with pytest.raises(CorruptLogError, match="below the recovery point 10"):
        QueueLog.open(tmp_path, segment_bytes=1 << 20)


def test_synced_records_missing_at_the_end_are_damage(tmp_path: Path) -> None:
    _fill(tmp_path, 20, segment_bytes=1 << 20).close()
    seg = _segments(tmp_path)[0]
    rec = HEADER_SIZE + 20
    seg.write_bytes(seg.read_bytes()[: 15 * rec])  # a clean cut between records
    with pytest.raises(CorruptLogError, match="ends at record 15, but records below 20"):
        QueueLog.open(tmp_path, segment_bytes=1 << 20)
    log = QueueLog.open(tmp_path, segment_bytes=1 << 20, repair=True)  # marks 15-19 lost
    assert log.next_offset == 20 and _lost(_all(log)) == [15, 16, 17, 18, 19]
    log.append([b"x", b"y"], 1)
    _crash(log)
    size = records_end(seg)
    with seg.open("r+b") as f:  # the unsynced y is torn: a torn tail again, not damage
        f.truncate(size - 5)
    log = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert log.next_offset == 21
    log.close()


def test_a_damaged_recovery_point_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _fill(tmp_path, 20, segment_bytes=1 << 20).close()
    point = tmp_path / POINT_FILE
    raw = bytearray(point.read_bytes())
    raw[9] ^= 1
    point.write_bytes(bytes(raw))
    seg = _segments(tmp_path)[0]
    with seg.open("r+b") as f:
        f.truncate(seg.stat().st_size - 3)
    with caplog.at_level(logging.WARNING):
        log = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert "not a valid recovery point" in caplog.text
    assert log.next_offset == 19  # without it, a torn last record
    log.close()


def test_a_roll_leaves_only_the_newest_segment_unsynced(tmp_path: Path) -> None:
    """Every sealed segment was fsynced with its directory entry at the roll,
    and the new segment's records claim nothing of the old one."""
    log = QueueLog.open(tmp_path, segment_bytes=SEG)
    for i in range(400):
        log.append([_body(i)], 1)  # never synced by sync(): only rolls fsync
    assert len(log.segments) > 3
    last = log.segments[-1]
    _crash(log)
    _hole(last.path, 0, 10)  # the newest segment's first record never reached the disk
    log = QueueLog.open(tmp_path, segment_bytes=SEG)
    assert log.next_offset == last.base
    log.close()


def test_a_log_of_format_version_1_is_refused_not_cut(tmp_path: Path) -> None:
    """Version 1 records (no sync claim) must not read as one long torn tail."""
    import struct
    import zlib

    head = struct.pack(">HIQq", 0x7D01, 5, 0, 1)
    record = head + struct.pack(">I", zlib.crc32(b"hello", zlib.crc32(head))) + b"hello"
    (tmp_path / f"{0:020d}.log").write_bytes(record * 3)
    with pytest.raises(CorruptLogError, match="format version 1"):
        QueueLog.open(tmp_path, segment_bytes=1 << 20)


@settings(max_examples=30)
@given(st.data())
def test_bit_rot_is_always_detected(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """S3: flip one byte anywhere: the log either refuses or keeps a valid prefix, never serves it.

    50 records were fsynced, 10 more written after it and never fsynced: damage
    in the first 50 refuses (R4); in the last 10 it can be a torn write (R3).
    """
    d = tmp_path_factory.mktemp("rot")
    log = _fill(d, 50, segment_bytes=1 << 20)
    for i in range(50, 60):
        log.append([_body(i)], 1)
    log.close()  # the recovery point says 50
    seg = _segments(d)[0]
    raw = bytearray(seg.read_bytes())
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    seg.write_bytes(bytes(raw))
    rec = HEADER_SIZE + 20
    try:
        log = QueueLog.open(d, segment_bytes=1 << 20)
    except CorruptLogError as err:
        assert at < 50 * rec
        assert err.position == at // rec * rec
        return
    assert at >= 50 * rec and log.next_offset == at // rec  # never fsynced: cut there
    assert _all(log) == [_body(i) for i in range(at // rec)]
    log.close()


@settings(max_examples=60)
@given(cuts=st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=64)), max_size=4))
def test_loader_never_crashes_on_mangled_files(
    tmp_path_factory: pytest.TempPathFactory, cuts: list[tuple[int, bytes]]
) -> None:
    """S7: any overwrite of segment bytes loads a valid prefix or fails with CorruptLogError."""
    d = tmp_path_factory.mktemp("fuzz")
    _fill(d, 300).close()
    segs = _segments(d)
    for i, (at, junk) in enumerate(cuts):
        seg = segs[i % len(segs)]
        raw = bytearray(seg.read_bytes())
        at %= max(1, len(raw))
        raw[at : at + len(junk)] = junk
        seg.write_bytes(bytes(raw))
    try:
        log = QueueLog.open(d, segment_bytes=SEG)
    except CorruptLogError:
        return
    assert _all(log) == [_body(i) for i in range(log.next_offset)]
    log.close()


def test_enospc_write_is_cut_and_appends_resume(tmp_path: Path) -> None:
    """R7: a failed write leaves the log valid, and later appends work."""
    log = _fill(tmp_path, 5, segment_bytes=1 << 20)
    size = log.segments[-1].size
    assert _segments(tmp_path)[0].stat().st_size == 1 << 20  # preallocated
    faults.configure("mid_write:enospc")
    try:
        with pytest.raises(OSError, match="No space"):
            log.append([b"lost"], 1)
    finally:
        faults.configure(None)
    assert log.segments[-1].size == size
    assert _segments(tmp_path)[0].stat().st_size == size  # the half record is cut, the zero tail with it
    assert log.append([b"kept"], 1) == 5
    log.sync()
    log.close()
    again = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert _all(again)[-1] == b"kept"
    again.close()


def test_a_short_write_is_cut_durably_before_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """R7: when some of a failed batch reached the page cache, the cut is fsynced
    before append raises (else a power loss can bring back records answered
    STORAGE_FULL: ``reliability/test_power_loss.py``). A write that put nothing in
    the file costs no fsync: the cut then drops only zeros."""
    log = _fill(tmp_path, 5, segment_bytes=1 << 20)
    seg = log.segments[-1]
    size = seg.size
    events: list[str] = []
    real_fsync, real_ftruncate, real_pwrite = os.fsync, os.ftruncate, os.pwrite

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def ftruncate(fd: int, length: int) -> None:
        events.append(f"ftruncate {length}")
        real_ftruncate(fd, length)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "ftruncate", ftruncate)
    faults.configure("mid_write:enospc")  # half of the batch (two whole records) is written first
    try:
        with pytest.raises(OSError) as info:
            log.append([b"a" * 50, b"b" * 50, b"c" * 50, b"d" * 50], 1)
    finally:
        faults.configure(None)
    assert info.value.errno == errno.ENOSPC
    assert events == [f"ftruncate {size}", "fsync"]
    assert seg.path.stat().st_size == seg.size == size
    events.clear()

    def full(fd: int, data: bytes, position: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    log.append([b"e"], 1)  # preallocates again
    assert seg.path.stat().st_size > seg.size
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="No space"):
        log.append([b"lost"], 1)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert events == [f"ftruncate {seg.size}"]  # the zero tail given back, no fsync
    assert seg.path.stat().st_size == seg.size
    assert log.append([b"kept"], 1) == 6
    log.sync()
    log.close()
    again = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    assert _all(again)[5:] == [b"e", b"kept"]
    again.close()


def test_a_failed_fsync_of_a_cut_is_final(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """R7: the cut's fsync failing is a failed fsync like any other: the log refuses all later work."""
    log = _fill(tmp_path, 3)

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    faults.configure("mid_write:enospc")
    try:
        with pytest.raises(LogFailedError, match="cut-off failed write"):
            log.append([b"a" * 50, b"b" * 50], 1)
    finally:
        faults.configure(None)
    monkeypatch.undo()
    assert log.failed is not None
    with pytest.raises(LogFailedError):
        log.append([b"y"], 1)
    with pytest.raises(LogFailedError):
        log.sync()
    log.close()


def test_a_failed_cut_fsync_takes_turns_with_a_committer_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """R7: the cut's fsync (on the loop) never overlaps a committer round's fdatasync of
    the same log: the kernel reports a writeback error to only one of two concurrent
    syncs, so an EIO the cut got could belong to pages the round then confirms. It
    waits its turn, and its failure fails the log for every later round."""
    log = QueueLog.open(tmp_path, segment_bytes=1 << 20)
    log.append([b"a" * 120], 1)
    inside, release = threading.Event(), threading.Event()
    real_datasync = os.fdatasync
    calls: list[str] = []

    def slow_datasync(fd: int) -> None:
        calls.append("datasync in")
        inside.set()
        release.wait(10)
        real_datasync(fd)
        calls.append("datasync out")

    def failing_fsync(fd: int) -> None:
        calls.append("fsync in")
        calls.append("fsync out")
        raise OSError(errno.EIO, "injected")

    outcomes: list[str] = []

    def committer() -> None:
        try:
            log.sync()
            outcomes.append("sync ok")
        except LogFailedError:
            outcomes.append("sync failed")

    def publisher() -> None:
        with pytest.raises(LogFailedError):
            log.append([b"b" * 50, b"c" * 50], 1)
        outcomes.append("cut failed")

    monkeypatch.setattr(os, "fdatasync", slow_datasync)
    a = threading.Thread(target=committer)
    a.start()
    assert inside.wait(10)
    monkeypatch.setattr(os, "fsync", failing_fsync)
    faults.configure("mid_write:enospc")
    try:
        b = threading.Thread(target=publisher)
        b.start()
        b.join(0.5)  # without turns, the cut's fsync runs now, inside the round's fdatasync
        release.set()
        a.join(10)
        b.join(10)
    finally:
        faults.configure(None)
    assert calls == ["datasync in", "datasync out", "fsync in", "fsync out"]
    assert outcomes == ["sync ok", "cut failed"]  # the round ended before the failure
    with pytest.raises(LogFailedError):
        log.sync()
    monkeypatch.undo()
    log.close()


def test_failed_fsync_is_final(tmp_path: Path) -> None:
    """R7: after a failed fsync the log refuses every later append and sync."""
    log = _fill(tmp_path, 3)
    log.append([b"x"], 1)
    faults.configure("sync:eio")
    try:
        with pytest.raises(LogFailedError):
            log.sync()
    finally:
        faults.configure(None)
    with pytest.raises(LogFailedError):
        log.append([b"y"], 1)
    with pytest.raises(LogFailedError):
        log.sync()
    log.close()


def test_a_sync_overlapping_a_failed_roll_does_not_succeed_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """R7 with two syncs of one file at once (the committer's round, a roll's seal on
    the loop): the kernel reports a writeback error to only one of them, so a sync
    must never return success after the other one failed. They take turns."""
    log = QueueLog.open(tmp_path, segment_bytes=100)
    log.append([b"a" * 120], 1)  # over the segment size: the next append rolls
    inside, release = threading.Event(), threading.Event()
    real_datasync = os.fdatasync

    def slow_datasync(fd: int) -> None:
        inside.set()
        release.wait(10)
        real_datasync(fd)

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    events: list[str] = []

    def committer() -> None:
        try:
            log.sync()
            events.append("sync ok")
        except LogFailedError:
            events.append("sync failed")

    def roller() -> None:
        with pytest.raises(LogFailedError):
            log.append([b"b"], 1)
        events.append("roll failed")

    monkeypatch.setattr(os, "fdatasync", slow_datasync)
    a = threading.Thread(target=committer)
    a.start()
    assert inside.wait(10)
    monkeypatch.setattr(os, "fsync", failing_fsync)
    b = threading.Thread(target=roller)
    b.start()
    b.join(0.5)  # without turns, the roll's fsync fails now, while the sync is still in fdatasync
    release.set()
    a.join(10)
    b.join(10)
    assert "roll failed" in events
    assert events != ["roll failed", "sync ok"]
    with pytest.raises(LogFailedError):
        log.sync()
    monkeypatch.undo()
    log.close()


def test_retention_drops_whole_segments(tmp_path: Path) -> None:
    log = _fill(tmp_path, 500)
    second = log.segments[1].base
    assert log.drop_segments_before(second) == second
    assert log.first_offset == second
    assert log.read(0, max_count=1, max_bytes=1)[0][0] == second
    log.close()
    again = QueueLog.open(tmp_path, segment_bytes=SEG)
    assert again.first_offset == second and again.next_offset == 500
    again.close()


def test_a_crash_between_roll_and_first_write_leaves_an_empty_segment(tmp_path: Path) -> None:
    log = _fill(tmp_path, 10)
    end = log.next_offset
    log.close()
    (tmp_path / f"{end:020d}.log").touch()
    again = QueueLog.open(tmp_path, segment_bytes=SEG)
    assert again.next_offset == end
    assert again.append([b"x"], 1) == end
    again.close()


def test_a_gap_between_segments_is_damage(tmp_path: Path) -> None:
    _fill(tmp_path, 400).close()
    gone, after = _segments(tmp_path)[1:3]
    os.unlink(gone)
    with pytest.raises(CorruptLogError, match=rf"no segment file holds offsets {int(gone.name[:-4])} to "
                       rf"{int(after.name[:-4]) - 1} \({after.name} starts after them\)"):  # fmt: skip
        QueueLog.open(tmp_path, segment_bytes=SEG)


class LogModel(RuleBasedStateMachine):
    """A stateful model: appends, syncs, reads, crashes that drop the unsynced tail, retention."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="tidings-model-"))
        self.log = QueueLog.open(self.dir, segment_bytes=SEG)
        self.model: list[bytes] = []
        self.first = 0
        self.synced = 0

    def teardown(self) -> None:
        import shutil

        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(bodies=st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=20))
    def append(self, bodies: list[bytes]) -> None:
        assert self.log.append(bodies, 1) == len(self.model)
        self.model += bodies

    @rule()
    def sync(self) -> None:
        self.log.sync()
        self.synced = len(self.model)

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        if len(self.model) == self.first:
            return
        offset = data.draw(st.integers(self.first, len(self.model) - 1))
        n = data.draw(st.integers(1, 50))
        got = self.log.read(offset, max_count=n, max_bytes=1 << 20)
        assert [b for _, _, b in got] == self.model[offset : offset + len(got)]
        assert 1 <= len(got) <= n

    @rule(tear=st.integers(0, 400))
    def crash(self, tear: int) -> None:
        """Power loss: synced bytes stay; the unsynced tail is kept, torn, or lost."""
        self.log.sync()  # what the OS already wrote back is just 'synced' to us
        self.log.close()
        last = sorted(self.dir.glob("*.log"))[-1]
        with last.open("ab") as f:
            f.write(MAGIC.to_bytes(2, "big") + bytes(tear))  # a torn record header + zeros
        self.log = QueueLog.open(self.dir, segment_bytes=SEG)
        self.synced = len(self.model)

    @precondition(lambda self: len(self.log.segments) > 2)
    @rule()
    def retention(self) -> None:
        cut = self.log.segments[1].base
        self.log.drop_segments_before(cut)
        self.first = cut

    @invariant()
    def offsets(self) -> None:
        assert self.log.next_offset == len(self.model)
        assert self.log.first_offset == self.first


TestLogModel = LogModel.TestCase
TestLogModel.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
