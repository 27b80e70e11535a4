"""The queue's in-memory tail: bounded by its limits, and reads through it
return exactly what was appended (the real log and queue, the limits made
small so that a few dozen records cross them)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import broker.queue as queue_module
from broker.log import QueueLog
from broker.queue import Queue
from protocol import encode_record

MAX_RECORDS, MAX_BYTES = 16, 3000


@settings(max_examples=80, deadline=None)
@given(
    batches=st.lists(st.lists(st.integers(0, 1200), min_size=1, max_size=20), min_size=1, max_size=25),
    span=st.integers(1, 40),
)
def test_the_tail_stays_within_its_limits_and_reads_return_what_was_appended(
    batches: list[list[int]], span: int
) -> None:
    with tempfile.TemporaryDirectory(prefix="tidings-tail-") as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(queue_module, "TAIL_MAX_RECORDS", MAX_RECORDS)
        mp.setattr(queue_module, "TAIL_MAX_BYTES", MAX_BYTES)
        queue = Queue("Q", QueueLog.open(Path(tmp), segment_bytes=8192))
        stored: list[bytes] = []
        try:
            for sizes in batches:
                bodies = [encode_record("e", 1, None, bytes([len(stored) % 251]) * n) for n in sizes]
                assert queue.append(bodies, 1, dedup_until=0) == len(stored)
                stored += bodies
                queue.commit(queue.log.next_offset)
                tail = queue._tail
                assert queue._tail_base + len(tail) == len(stored)
                assert tail == stored[queue._tail_base :]
                assert queue._tail_bytes == sum(map(len, tail))
                assert len(tail) <= MAX_RECORDS
                assert queue._tail_bytes <= MAX_BYTES or len(tail) == 1
                expected = list(enumerate(stored))
                for offset in range(len(stored)):
                    got = queue.read(offset, span)
                    if offset >= queue._tail_base:  # from the tail: all of it
                        assert got == expected[offset : offset + span]
                    else:  # from the log: a read may stop early (at a segment's end), never empty
                        assert got and got == expected[offset : offset + len(got)]
        finally:
            queue.log.close()
