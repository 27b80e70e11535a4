"""``tidings-broker --check``: a start's verdict on each queue, and what --repair would do, changing nothing.

Each case builds a data directory of real files (logs written by
``QueueLog``, cursors by ``CursorStore``), damages them the ways a disk or a
crash does, runs the real command line as a subprocess, and checks its
output, its exit code, and that every file and directory is as it was
(bytes and mtimes). Where the check announces what a start or ``--repair``
would do, the start or the repair is then made and compared with it.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from broker import BrokerConfig
from broker.check import EXIT_CANNOT_CHECK, EXIT_DAMAGED, EXIT_OK
from broker.cursors import Cursor, CursorState, CursorStore
from broker.log import POINT_FILE, CorruptLogError, QueueLog
from broker.router import Group
from broker.segment import HEADER_SIZE
from broker.store import Store
from client import Message, Subscription
from protocol import LOST_EVENT
from tests.helpers import broker_process, connected, running_broker

ROOT = Path(__file__).resolve().parents[2]
SEG = 4096
SIZE = 20
REC = HEADER_SIZE + SIZE  # 50 bytes: 82 records to a 4096-byte segment


def _body(i: int) -> bytes:
    return f"{i:08d}".encode().ljust(SIZE, b"x")


def _fill(queue: Path, n: int, segment_bytes: int = SEG) -> None:
    log = QueueLog.open(queue, segment_bytes=segment_bytes)
    for i in range(n):
        log.append([_body(i)], 1000 + i)
    log.sync()
    log.close()


def _saved(
    cursors: CursorStore,
    name: str,
    floor: int,
    acked: Iterable[int] = (),
    *,
    events: Iterable[str] = (),
    delivered: int = 0,
) -> None:
    """Save a durable's cursor as a broker does, its settings included (``Store.state_of``)."""
    group = Group(cursors.directory.parent.name, name, events, Cursor(floor, set(acked)), max(floor, delivered))
    cursors.save(name, Store.state_of(group))


def _data_dir(tmp_path: Path, **queues: int) -> Path:
    """A data directory as a stopped broker leaves it (its LOCK, unlocked), with queues of so many records."""
    root = tmp_path / "data"
    (root / "queues").mkdir(parents=True)
    (root / "LOCK").write_text("4242\n")
    for name, n in queues.items():
        _fill(root / "queues" / name, n)
    return root


def _segments(queue: Path) -> list[Path]:
    return sorted(queue.glob("*.log"))


def _flip(path: Path, at: int) -> None:
    with path.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))


def _snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every file's bytes and every entry's mtime (a directory's changes when an entry is made or removed)."""
    seen: dict[str, tuple[bytes | None, int]] = {".": (None, root.stat().st_mtime_ns)}
    for path in root.rglob("*"):
        data = path.read_bytes() if path.is_file() else None
        seen[str(path.relative_to(root))] = (data, path.stat().st_mtime_ns)
    return seen


def _check(root: Path, *more: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m broker --data-dir ROOT --check``, asserting that it changed nothing."""
    before = _snapshot(root) if root.exists() else None
    result = subprocess.run(
        [sys.executable, "-m", "broker", "--data-dir", str(root), "--segment-bytes", str(SEG), "--check", *more],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr
    if before is not None:
        assert _snapshot(root) == before, "--check changed the data directory"
    return result


def _line(result: subprocess.CompletedProcess[str], queue: str) -> str:
    [line] = [line for line in result.stdout.splitlines() if line.startswith(f"{queue}: ")]
    return line


def _repair_counts(line: str) -> tuple[int, int]:
    """(intact records kept, offsets marked lost) that a check's line announces for --repair."""
    m = re.search(r"--repair would keep (\d+) intact records? and mark (\d+) offsets? lost", line)
    assert m is not None, line
    return int(m.group(1)), int(m.group(2))


def _repaired_counts(queue: Path, segment_bytes: int = SEG) -> tuple[int, int]:
    """Repair the queue for real (as ``--repair`` does at start-up): (intact records, lost markers) it then holds."""
    log = QueueLog.open(queue, segment_bytes=segment_bytes, repair=True)
    try:
        bodies: list[bytes] = []
        while len(bodies) < log.next_offset - log.first_offset:
            batch = log.read(log.first_offset + len(bodies), max_count=1 << 20, max_bytes=1 << 30)
            bodies += [body for _, _, body in batch]
    finally:
        log.close()
    lost = sum(body.startswith(b"\xac" + LOST_EVENT.encode()) for body in bodies)
    return len(bodies) - lost, lost


def test_a_clean_data_dir_is_ok(tmp_path: Path) -> None:
    root = _data_dir(tmp_path, orders=300, empty=0)
    cursors = CursorStore(root / "queues" / "orders" / "durables")
    _saved(cursors, "billing", 120, {125}, events=("CREATE", "UPDATE"), delivered=130)
    result = _check(root)
    assert result.returncode == EXIT_OK, result
    assert result.stdout.splitlines() == [
        "empty: ok, no records (next offset 0)",
        "orders: ok, 300 records, offsets 0 to 299",
        "  durable billing: ok, acked below 120 (and 1 above)",
        "    settings: events CREATE, UPDATE; ack wait 30 s; no delivery limit; 9 messages handed out and not acked: "
        "a start hands them out again, redelivered",
        f"{root}: 2 queues checked: a start would serve every one",
    ], result.stdout


def test_a_torn_tail_is_reported_and_left_for_the_start_to_cut(tmp_path: Path) -> None:
    """A tail no record or recovery point vouches for: exit 0, and the start cuts exactly what was announced."""
    root = _data_dir(tmp_path, jobs=10)
    queue = root / "queues" / "jobs"
    (queue / POINT_FILE).unlink()  # an unclean stop: nothing says the last records were fsynced
    [segment] = _segments(queue)
    with segment.open("ab") as f:
        f.write(b"\x7d\x02" + b"half a record" * 3)  # 41 bytes of a record the crash cut
    result = _check(root)
    assert result.returncode == EXIT_OK, result
    assert _line(result, "jobs") == (
        f"jobs: torn tail: 41 bytes from byte {10 * REC} of {segment.name} would be cut at start-up (no fsync known to cover it: "
        "short (record 10); 0 intact records after it), leaving 10 records, offsets 0 to 9"
    )
    log = QueueLog.open(queue, segment_bytes=SEG)
    log.close()
    assert segment.stat().st_size == 10 * REC and log.next_offset == 10


@pytest.mark.parametrize(
    ("where", "record"),
    [
        ("a sealed segment", 5),  # the first file of four
        ("the last segment, below the recovery point", 3 * 82 + 10),
    ],
)
def test_a_flipped_byte_in_a_fsynced_record(tmp_path: Path, where: str, record: int) -> None:
    """Exit 1, the file and byte named, and --repair's counts: those a real repair then makes."""
    root = _data_dir(tmp_path, audit=300)
    queue = root / "queues" / "audit"
    segment = _segments(queue)[record // 82]
    position = (record % 82) * REC
    _flip(segment, position + HEADER_SIZE + 3)  # in the body: a bad CRC
    result = _check(root)
    assert result.returncode == EXIT_DAMAGED, result
    line = _line(result, "audit")
    assert line.startswith(
        f"audit: DAMAGED, a start refuses it (QUEUE_CORRUPT): {segment.name} byte {position}: bad CRC (record {record})"
    ), line
    assert line.endswith("then 300 records, offsets 0 to 299"), line
    assert _repair_counts(line) == (299, 1) == _repaired_counts(queue)
    assert result.stdout.splitlines()[-1] == f"{root}: 1 queue checked: 1 damaged (a start refuses it)"


def test_a_zeroed_sector_across_records(tmp_path: Path) -> None:
    """Several records lost at once (512 bytes of zeros in the middle of a sealed segment)."""
    root = _data_dir(tmp_path, audit=300)
    queue = root / "queues" / "audit"
    with _segments(queue)[1].open("r+b") as f:
        f.seek(1000)
        f.write(bytes(512))
    result = _check(root)
    assert result.returncode == EXIT_DAMAGED, result
    kept, lost = _repair_counts(_line(result, "audit"))
    assert kept + lost == 300 and lost > 1
    assert (kept, lost) == _repaired_counts(queue)


def test_a_missing_segment_file(tmp_path: Path) -> None:
    root = _data_dir(tmp_path, audit=300)
    queue = root / "queues" / "audit"
    lost = _segments(queue)[1]
    lost.unlink()
    result = _check(root)
    assert result.returncode == EXIT_DAMAGED, result
    line = _line(result, "audit")
    assert "no segment file holds offsets 82 to 163 (00000000000000000164.log starts after them)" in line, line
    assert _repair_counts(line) == (218, 82) == _repaired_counts(queue)


def test_beyond_repair(tmp_path: Path) -> None:
    """A gap longer than a segment could have held records (four files lost, or a name that is wrong):
    --repair refuses it too, and the check says so."""
    root = _data_dir(tmp_path, audit=600)
    queue = root / "queues" / "audit"
    for lost in _segments(queue)[1:5]:
        lost.unlink()
    result = _check(root)
    assert result.returncode == EXIT_DAMAGED, result
    line = _line(result, "audit")
    assert line.endswith(
        "--repair cannot repair it either: 00000000000000000410.log: 328 records would be marked lost, more than a "
        "segment could have held (a file name is wrong)"
    ), line
    with pytest.raises(CorruptLogError, match="cannot repair"):
        _repaired_counts(queue)


def test_damaged_cursors(tmp_path: Path) -> None:
    """A start serves the queue from an older copy (or from the oldest message), so exit 0, but each is named."""
    root = _data_dir(tmp_path, orders=100)
    cursors = CursorStore(root / "queues" / "orders" / "durables")
    for name in ("fallback", "lost"):
        _saved(cursors, name, 40, events=("CREATE",))
        _saved(cursors, name, 60, events=("CREATE", "DELETE"))  # the first is now NAME.cursor.prev
    _flip(cursors.directory / "fallback.cursor", 2)
    _flip(cursors.directory / "lost.cursor", 2)
    _flip(cursors.directory / "lost.cursor.prev", 2)
    _saved(cursors, "ahead", 500, delivered=505)  # records were lost since it acked them
    result = _check(root)
    assert result.returncode == EXIT_OK, result
    assert result.stdout.splitlines()[1:7] == [
        "  durable ahead: past the log's end: acked below 500, but the log ends at 100 (records were lost); "
        "a start moves it back to 100",
        "    settings: events *; ack wait 30 s; no delivery limit",
        "  durable fallback: damaged: fallback.cursor is damaged; a start uses fallback.cursor.prev "
        "(acked below 40): what was acked after it is delivered again",
        "    settings (as fallback.cursor.prev has them: a change after it is lost): events CREATE; ack wait 30 s; "
        "no delivery limit",
        "  durable lost: damaged: no whole cursor file (lost.cursor is damaged; lost.cursor.prev is damaged); "
        "a start restarts it at the oldest message",
        "    settings: lost with its cursor file; a start restores the defaults (events *; ack wait 30 s; no "
        "delivery limit) until a consumer subscribes again with its own (a FETCH without events keeps every event)",
    ], result.stdout
    assert cursors.load("fallback").ack_floor == 40 and cursors.load("fallback").meta["events"] == ["CREATE"]
    assert cursors.load("lost") == CursorState(0)


def test_a_data_dir_in_use_by_a_broker(tmp_path: Path) -> None:
    """The broker's lock is held: exit 3 naming its pid, nothing read; once it stops, the check runs."""
    root = _data_dir(tmp_path, orders=10)
    with broker_process(root) as broker:
        result = _check_live(root)
        assert result.returncode == EXIT_CANNOT_CHECK, result
        assert result.stdout == ""
        assert result.stderr.strip() == (
            f"tidings-broker: cannot check: data directory {root.resolve()} is in use by a broker (pid {broker.pid}): "
            "stop it first"
        )
        assert broker.stop() == 0
    assert _check(root).returncode == EXIT_OK


def _check_live(root: Path) -> subprocess.CompletedProcess[str]:
    """``--check`` against a directory a broker may change meanwhile (no before/after comparison)."""
    return subprocess.run(
        [sys.executable, "-m", "broker", "--data-dir", str(root), "--check"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_a_check_holds_the_lock_shared(tmp_path: Path) -> None:
    """Checks may run side by side (a shared flock), and a broker cannot take the directory from one: the
    lock a check takes is the broker's, so a broker never changes the files under a check."""
    root = _data_dir(tmp_path, orders=10)
    fd = os.open(root / "LOCK", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # another check, running
        assert _check(root).returncode == EXIT_OK
        start = subprocess.run(
            [sys.executable, "-m", "broker", "--data-dir", str(root), "--port", "0"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert start.returncode == 1 and "is in use (tidings-broker --check is reading it)" in start.stderr, start
    finally:
        os.close(fd)


def test_what_cannot_be_checked(tmp_path: Path) -> None:
    missing = _check(tmp_path / "nothing-here")
    assert missing.returncode == EXIT_CANNOT_CHECK and "no data directory" in missing.stderr, missing
    assert not (tmp_path / "nothing-here").exists()
    fresh = tmp_path / "fresh"  # made by hand, never used by a broker: no LOCK, no queues/
    fresh.mkdir()
    result = _check(fresh)
    assert result.returncode == EXIT_OK and result.stdout.endswith("0 queues checked: a start would serve every one\n")
    assert sorted(os.listdir(fresh)) == []


def test_with_repair_it_is_a_usage_error(tmp_path: Path) -> None:
    root = _data_dir(tmp_path, orders=1)
    result = _check(root, "--repair")
    assert result.returncode == 2 and "--check changes nothing and already says what --repair would do" in (
        result.stderr
    ), result


def test_help_documents_the_exit_codes() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "broker", "--help"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout  # fmt: skip
    assert "exit codes of --check: 0 every queue would be served" in out
    assert "1 some\nqueue is damaged" in out and "3 could not check" in out


def test_damage_in_two_files_adds_up(tmp_path: Path) -> None:
    """Damage in two segment files of one queue: the counts add up across them."""
    root = _data_dir(tmp_path, audit=300)
    queue = root / "queues" / "audit"
    segments = _segments(queue)
    _flip(segments[0], 7 * REC + HEADER_SIZE)
    _flip(segments[2], 20 * REC + 2)  # in a header: a bad CRC (the length field's low byte)
    result = _check(root)
    line = _line(result, "audit")
    assert line.count(".log byte ") == 2, line
    assert _repair_counts(line) == (298, 2) == _repaired_counts(queue)


def test_a_queue_with_no_segment_file_left_and_a_delete_a_crash_interrupted(tmp_path: Path) -> None:
    """Every segment file of a queue gone (its recovery point left) is damage, as at a start; a directory an
    interrupted DELETE renamed away is no queue (a start removes it)."""
    root = _data_dir(tmp_path, orders=20, billing=5)
    for seg in _segments(root / "queues" / "orders"):
        seg.unlink()
    (root / "queues" / ".deleted-jobs-1796316000000000000").mkdir()
    (root / "queues" / ".deleted-notes.txt").write_text("a file of that name is no DELETE's")
    result = _check(root)
    assert result.returncode == EXIT_DAMAGED, result
    assert result.stdout.splitlines() == [
        "(.deleted-jobs-1796316000000000000: left by an interrupted DELETE; a start removes it)",
        "(.deleted-notes.txt: not a queue's directory; a start ignores it)",
        "billing: ok, 5 records, offsets 0 to 4",
        "orders: DAMAGED, a start refuses it (QUEUE_CORRUPT): no segment file is left, but records below 20 had "
        "been stored (the recovery point says); --repair would start its log at offset 20: the records below it "
        "are lost, unmarked",
        f"{root}: 2 queues checked: 1 damaged (a start refuses it)",
    ]
    with pytest.raises(CorruptLogError, match="no segment file is left, but records below 20 had been stored"):
        QueueLog.open(root / "queues" / "orders", segment_bytes=SEG)
    repaired = QueueLog.open(root / "queues" / "orders", segment_bytes=SEG, repair=True)
    assert (repaired.first_offset, repaired.next_offset) == (20, 20)  # as announced
    repaired.close()


def test_a_closed_pipe_does_not_change_the_verdict(tmp_path: Path) -> None:
    """``--check | head -1``: once the reader is gone the check goes on unprinted and exits with what it
    found (it said 'cannot check', exit 3, on the broken pipe). Here the reader (``true``) is gone before
    the check prints anything (Python takes far longer to start)."""
    root = _data_dir(tmp_path, billing=5, orders=20)
    _flip(_segments(root / "queues" / "orders")[0], 5 * REC + HEADER_SIZE + 3)
    result = subprocess.run(
        f"{sys.executable} -m broker --data-dir {root} --check | true; exit ${{PIPESTATUS[0]}}",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == EXIT_DAMAGED, result
    assert (result.stdout, result.stderr) == ("", ""), result


def test_the_segment_size_is_the_brokers_and_a_larger_one_on_disk_is_noted(tmp_path: Path) -> None:
    """The segment size bounds what --repair may mark lost, so the verdict is that of a start with the same
    --segment-bytes; files a broker with a larger one wrote are a sign it was left out, and the check says so."""
    big = 2 * SEG  # 164 records to a file: 0, 164, 328, 492, 656 (44 records)
    root = _data_dir(tmp_path)
    queue = root / "queues" / "audit"
    _fill(queue, 700, segment_bytes=big)
    for lost in _segments(queue)[2:4]:  # offsets 328 to 655: more than a 4096-byte segment can hold, not 8192
        lost.unlink()
    forgotten = _check(root)  # --segment-bytes 4096
    assert forgotten.returncode == EXIT_DAMAGED, forgotten
    assert "--repair cannot repair it either" in _line(forgotten, "audit")
    assert forgotten.stdout.splitlines()[-2] == (
        "note: audit/00000000000000000000.log was appended to after byte 8000: the broker that wrote it ran with a "
        "--segment-bytes above 8000, not 4096 as given here; give --check the broker's own options (the segment "
        "size bounds how many offsets --repair may mark lost, so a verdict above may differ from its start's)"
    ), forgotten.stdout
    given = _check(root, "--segment-bytes", str(big))
    assert given.returncode == EXIT_DAMAGED, given
    assert _repair_counts(_line(given, "audit")) == (372, 328) == _repaired_counts(queue, segment_bytes=big)
    assert not any(line.startswith("note:") for line in given.stdout.splitlines()), given.stdout


def test_no_note_for_files_rolled_at_the_size_given(tmp_path: Path) -> None:
    """A segment file passes --segment-bytes by the last append before its roll, by up to a whole batch
    (here 100 records in one append: 5,000 bytes): no sign of another size, so no note."""
    root = _data_dir(tmp_path)
    log = QueueLog.open(root / "queues" / "jobs", segment_bytes=SEG)
    log.append([_body(i) for i in range(100)], 1000)
    log.append([_body(100)], 1001)  # rolls: the first file is sealed at 5,000 bytes
    log.sync()
    log.close()
    assert [p.stat().st_size for p in _segments(root / "queues" / "jobs")] == [100 * REC, REC]
    result = _check(root)
    assert result.returncode == EXIT_OK and result.stdout.splitlines() == [
        "jobs: ok, 101 records, offsets 0 to 100",
        f"{root}: 1 queue checked: a start would serve every one",
    ], result.stdout


def test_the_brokers_config_file_is_read_as_a_start_reads_it(tmp_path: Path) -> None:
    """--check takes the broker's options, --config included: a file a start would refuse is a usage error
    (exit 2: a start with these options would not serve anything), one it takes is checked with."""
    root = _data_dir(tmp_path, orders=3)
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("[queues.orders]\nretention_bytes = 1_000_000\n")
    bad.write_text("[queues.orders]\nretention_byte = 1_000_000\n")
    assert _check(root, "--config", str(good)).returncode == EXIT_OK
    refused = _check(root, "--config", str(bad))
    assert refused.returncode == 2 and refused.stdout == "", refused
    assert (
        f"a start with these options would fail, so --check cannot say what it would do: config file {bad}, "
        "[queues.orders]: unknown key 'retention_byte'" in refused.stderr
    ), refused.stderr


def test_files_a_start_removes_or_ignores_are_named(tmp_path: Path) -> None:
    """A repair's temporary file (a crash cut the repair short), a cursor save's (likewise), a damaged recovery
    point and files tidings never wrote: each named with what a start does with it, none removed by the check;
    then the start does what was announced."""
    root = _data_dir(tmp_path, audit=300, orders=10)
    audit, orders = root / "queues" / "audit", root / "queues" / "orders"
    sealed = _segments(audit)[1]
    _flip(sealed, 5 * REC + HEADER_SIZE + 3)
    temp = audit / f"{sealed.name}.repair"
    temp.write_bytes(sealed.read_bytes()[: 40 * REC])  # what the crash left of the rewrite
    (audit / "notes.txt").write_text("restored from backup on Monday\n")
    cursors = CursorStore(orders / "durables")
    _saved(cursors, "billing", 4)
    (cursors.directory / "billing.cursor.tmp").write_bytes(b"\x94\x01\x06")  # the crash cut the save short
    (cursors.directory / "README").write_text("hands off\n")
    _flip(orders / POINT_FILE, 6)
    (root / "queues" / "stray.tar").write_bytes(b"")
    result = _check(root)
    assert result.returncode == EXIT_DAMAGED, result
    lines = result.stdout.splitlines()
    assert lines[0].startswith("audit: DAMAGED, a start refuses it (QUEUE_CORRUPT): "), lines
    assert lines[1:] == [
        f"  ({sealed.name}.repair: left by a --repair that a crash interrupted (the file it was rewriting is still "
        "in place); a start with --repair removes it and repairs again, one without leaves it)",
        "  (notes.txt: not a file of the log; a start ignores it)",
        "orders: ok, 10 records, offsets 0 to 9",
        "  durable billing: ok, acked below 4",
        "    settings: events *; ack wait 30 s; no delivery limit",
        "  (recovery-point: damaged; a start ignores it and trusts only the records' own sync claims)",
        "  (durables/README: not a cursor file; a start ignores it)",
        "  (durables/billing.cursor.tmp: left by a cursor save that a crash interrupted; a start ignores it "
        "(billing.cursor is whole), and the durable's next save replaces it)",
        "(stray.tar: not a queue's directory; a start ignores it)",
        f"{root}: 2 queues checked: 1 damaged (a start refuses it)",
    ], result.stdout
    with pytest.raises(CorruptLogError):
        QueueLog.open(audit, segment_bytes=SEG)
    assert temp.exists()  # a start without --repair leaves it
    assert _repaired_counts(audit) == (299, 1) and not temp.exists()
    assert cursors.load("billing").ack_floor == 4
    log = QueueLog.open(orders, segment_bytes=SEG)  # the recovery point ignored: the records tell
    log.close()
    assert log.next_offset == 10


async def test_each_durables_settings_as_a_start_restores_them(tmp_path: Path) -> None:
    """Settings a real consumer gave, one file of an older broker with some missing (and a key it does not
    know), and one durable whose only copy is damaged: each shown as a start restores it, said plainly where
    the start falls back on the defaults; then a start restores exactly that."""
    root = tmp_path / "data"
    async with running_broker(root) as broker, connected(broker) as client:
        for i in range(6):
            await client.publish("orders", "CREATE" if i % 2 == 0 else "UPDATE", {"i": i})
        async with await client.subscribe(
            "orders", events=["CREATE", "UPDATE"], durable="billing", start="earliest", prefetch=6, ack_wait=5,
            max_deliveries=3, dead_letter="orders.failed",
        ) as sub:  # fmt: skip
            got = [message async for message in _take(sub, 6)]
            for message in (got[0], got[1], got[3]):
                await message.ack(wait=True)
        async with await client.subscribe("orders", events=["CREATE"], durable="audit", start="earliest"):
            pass
    cursors = CursorStore(root / "queues" / "orders" / "durables")
    for copy in cursors.directory.glob("audit.cursor*"):
        copy.unlink()
    (cursors.directory / "audit.cursor").write_bytes(b"\x94\x01\x00")  # a disk error left only a damaged copy
    cursors.save("legacy", CursorState(2, meta={"events": ["CREATE"], "ack_wait": "soon", "colour": "blue"}))
    result = _check(root, "--segment-bytes", str(BrokerConfig().segment_bytes))
    assert result.returncode == EXIT_OK, result
    assert result.stdout.splitlines()[1:] == [
        "  durable audit: damaged: no whole cursor file (audit.cursor is damaged); a start restarts it at the "
        "oldest message",
        "    settings: lost with its cursor file; a start restores the defaults (events *; ack wait 30 s; no "
        "delivery limit) until a consumer subscribes again with its own (a FETCH without events keeps every event)",
        "  durable billing: ok, acked below 2 (and 1 above)",
        "    settings: events CREATE, UPDATE; ack wait 5 s; at most 3 deliveries, then to orders.failed; "
        "3 messages handed out and not acked: a start hands them out again, redelivered",
        "  durable legacy: ok, acked below 2",
        "    settings: events CREATE; ack wait 30 s; no delivery limit; ack wait, max deliveries, dead letter not "
        "in its file (missing or not valid): a start uses the default until a consumer subscribes with its own; "
        "ignored by a start: colour",
        f"{root}: 1 queue checked: a start would serve every one",
    ], result.stdout
    async with running_broker(root) as broker:
        groups = broker.store.queues["orders"].groups
        restored = {
            name: (g.filter.patterns, g.ack_wait, g.max_deliveries, g.dead_letter, sorted(g.deliveries))
            for name, g in groups.items()
        }
    assert restored == {
        "audit": ((), 30.0, 0, None, []),
        "billing": (("CREATE", "UPDATE"), 5.0, 3, "orders.failed", [2, 4, 5]),
        "legacy": (("CREATE",), 30.0, 0, None, []),
    }


async def _take(sub: Subscription, n: int) -> AsyncIterator[Message]:
    """The first ``n`` messages of ``sub``."""
    async for message in sub:
        yield message
        n -= 1
        if n == 0:
            return


async def test_an_ack_wait_under_a_millisecond_in_a_cursor_file_restores_the_default(tmp_path: Path) -> None:
    """A consumer cannot ask for less than 1 ms (``ack_wait_ms``; 0 asks for
    the default), so a cursor file holding 0 or less (one edited by hand) is
    not valid there: a start restores the 30 s default and --check says so.
    (A start restored 0: each message handed out went out again at every
    check, 5 times a second.)"""
    root = tmp_path / "data"
    async with running_broker(root) as broker, connected(broker) as client:
        await client.publish("orders", "CREATE", 1)
    cursors = CursorStore(root / "queues" / "orders" / "durables")
    for name, wait in (("ms", 0.001), ("tiny", 0.0004), ("zero", 0)):
        cursors.save(name, CursorState(0, meta={"events": [], "ack_wait": wait, "max_deliveries": 0,
                                                "dead_letter": None}))  # fmt: skip
    result = _check(root)
    assert result.returncode == EXIT_OK, result
    defaulted = (
        "    settings: events *; ack wait 30 s; no delivery limit; ack wait not in its file (missing or not "
        "valid): a start uses the default until a consumer subscribes with its own"
    )
    assert result.stdout.splitlines()[1:-1] == [
        "  durable ms: ok, acked below 0",
        "    settings: events *; ack wait 0.001 s; no delivery limit",
        "  durable tiny: ok, acked below 0",
        defaulted,
        "  durable zero: ok, acked below 0",
        defaulted,
    ], result.stdout
    async with running_broker(root) as broker:
        waits = {name: g.ack_wait for name, g in broker.store.queues["orders"].groups.items()}
    assert waits == {"ms": 0.001, "tiny": 30.0, "zero": 30.0}
