"""Durable cursors: the ack model, and files that may be damaged but never skip."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import faults
from broker.cursors import Cursor, CursorState, CursorStore, decode_state, encode_state
from broker.log import POINT_FILE
from tests.helpers import connected, running_broker

ACKS = st.lists(
    st.one_of(st.tuples(st.just("ack"), st.integers(0, 60)), st.tuples(st.just("upto"), st.integers(0, 60)))
)


@given(st.integers(0, 10), ACKS)
def test_cursor_matches_a_set_of_acked_offsets(start: int, ops: list[tuple[str, int]]) -> None:
    cursor, model = Cursor(start), set(range(start))
    for op, offset in ops:
        if op == "ack":
            cursor.ack(offset)
            model.add(offset)
        else:
            cursor.ack_upto(offset)
            model.update(range(offset + 1))
        floor = 0
        while floor in model:
            floor += 1
        assert cursor.ack_floor == floor
        assert cursor.acked == {o for o in model if o > floor}
        assert all(cursor.is_acked(o) is (o in model) for o in range(70))


@given(
    st.integers(0, 1 << 40),
    st.frozensets(st.integers(1, 1000)),
    st.dictionaries(st.text(max_size=5), st.integers(-(1 << 63), 1 << 63)),
)
def test_state_round_trips(floor: int, above: frozenset[int], meta: dict[str, int]) -> None:
    state = CursorState(floor, frozenset(floor + o for o in above), meta)
    assert decode_state(encode_state(state)) == state


def test_every_truncation_and_bit_flip_is_detected() -> None:
    data = encode_state(CursorState(41, frozenset({43, 50}), {"events": ["CREATE"], "start": "earliest"}))
    for cut in range(len(data)):
        assert decode_state(data[:cut]) is None
    for i in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[i] ^= 1 << bit
            assert decode_state(bytes(damaged)) is None


def test_save_and_load(tmp_path: Path) -> None:
    store = CursorStore(tmp_path / "durables")
    assert store.names() == set() and store.load_all() == {}
    store.save("logger", CursorState(5, frozenset({7}), {"events": []}))
    store.save("logger", CursorState(9))
    store.save("dash.board", CursorState(2))
    assert store.load_all() == {"dash.board": CursorState(2), "logger": CursorState(9)}
    assert {p.name for p in (tmp_path / "durables").iterdir()} == {
        "logger.cursor", "logger.cursor.prev", "dash.board.cursor",
    }  # fmt: skip
    store.delete("logger")
    assert store.names() == {"dash.board"}


def _saved_twice(tmp_path: Path) -> CursorStore:
    store = CursorStore(tmp_path)
    store.save("d", CursorState(10))
    store.save("d", CursorState(20))
    return store


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "missing"])
def test_damaged_cursor_falls_back_to_the_previous_one(tmp_path: Path, damage: str) -> None:
    store = _saved_twice(tmp_path)
    path = tmp_path / "d.cursor"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:3] + bytes([data[3] ^ 0x40]) + data[4:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    assert store.load("d") == CursorState(10)  # older: redeliveries, never a skip


def test_with_every_copy_damaged_the_durable_restarts_from_the_oldest_message(tmp_path: Path) -> None:
    store = _saved_twice(tmp_path)
    for path in tmp_path.iterdir():
        path.write_bytes(b"\x00" * 8)
    assert store.load("d") == CursorState(0)


def test_a_failure_between_the_renames_loses_nothing(tmp_path: Path) -> None:
    """``.cursor`` was moved to ``.prev`` but ``.tmp`` not yet into place."""
    store = _saved_twice(tmp_path)
    faults.configure("during_cursor_rename:eio")
    try:
        with pytest.raises(OSError):
            store.save("d", CursorState(30))
    finally:
        faults.configure(None)
    assert not (tmp_path / "d.cursor").exists()
    assert store.names() == {"d"}
    assert store.load("d") == CursorState(30)  # the fsynced temp file is the newest whole copy
    (tmp_path / "d.cursor.tmp").write_bytes(b"torn")
    assert store.load("d") == CursorState(20)  # and if it was torn, the previous one


def test_a_leftover_torn_temp_file_is_ignored(tmp_path: Path) -> None:
    store = _saved_twice(tmp_path)
    (tmp_path / "d.cursor.tmp").write_bytes(encode_state(CursorState(99))[:-1])
    assert store.load("d") == CursorState(20)
    store.save("d", CursorState(25))
    assert store.load("d") == CursorState(25)


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=6), st.integers(0, 200), st.data())
def test_random_damage_never_yields_a_cursor_ahead_of_the_last_save(
    tmp_path_factory: pytest.TempPathFactory, floors: list[int], where: int, data: st.DataObject
) -> None:
    floors = sorted(floors)
    directory = tmp_path_factory.mktemp("c")
    store = CursorStore(directory)
    for floor in floors:
        store.save("d", CursorState(floor))
    files = sorted(directory.iterdir())
    victim = data.draw(st.sampled_from(files))
    raw = bytearray(victim.read_bytes())
    if raw:
        raw[where % len(raw)] ^= data.draw(st.integers(1, 255))
    victim.write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw)))]))
    loaded = store.load("d")
    assert loaded.ack_floor in (*floors, 0) and loaded.ack_floor <= floors[-1]


async def test_a_durable_past_the_end_of_a_log_that_lost_records_takes_the_new_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Records a durable acknowledged can be lost after all: never fsynced
    (--fsync never) before a power cut, or files lost with the recovery point. Their
    offsets then go to new messages, which the durable gets: it goes on from
    the log's end, with a warning. (It took them for acknowledged and skipped
    them, silently; found after a --repair by an operator walkthrough.)"""
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        await c.publish_many("Q", [("E", i) for i in range(10)])
        for m in await c.fetch("Q", durable="d", max_messages=10):
            await m.ack(wait=True)
    queue_dir = tmp_path / "queues" / "Q"
    for lost in [*queue_dir.glob("*.log"), queue_dir / POINT_FILE]:  # as a cut at offset 0 leaves it
        lost.unlink()
    async with running_broker(tmp_path) as broker, connected(broker) as c:
        assert await c.publish_many("Q", [("E", f"new {i}") for i in range(3)]) == [0, 1, 2]
        assert [m.payload for m in await c.fetch("Q", durable="d")] == ["new 0", "new 1", "new 2"]
    assert any("past the log's end (0): records were lost" in r.getMessage() for r in caplog.records)
