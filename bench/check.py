"""Payloads that carry (producer, seq, intended send time), and the checker.

Every benchmark message's payload is a msgpack ``bin`` value whose first 20
bytes are ``struct(">IQq")``: producer id, sequence number (dense, from 0 per
producer) and the intended send time in ``time.monotonic_ns()`` (one clock for
every process on the machine: CLOCK_MONOTONIC). Padding brings it to the
requested payload size.

:class:`SeqChecker` keeps one bitmap per producer and counts what a consumer
saw: unique, duplicated and out-of-order messages (out of order = a sequence
number below one already seen from that producer). Lost messages are computed
by the orchestrator once every consumer's bitmap is merged (:func:`merge`).
"""

from __future__ import annotations

import struct
from array import array
from typing import Any, Final

HEAD: Final = struct.Struct(">IQq")
HEAD_SIZE: Final = HEAD.size
_pack_head = HEAD.pack
_unpack_head = HEAD.unpack_from


class PayloadMaker:
    """Builds payloads of a fixed size for one producer."""

    __slots__ = ("pad", "producer")

    def __init__(self, producer: int, size: int) -> None:
        self.producer = producer
        self.pad = b"\x00" * max(0, size - HEAD_SIZE)

    def make(self, seq: int, t_ns: int) -> bytes:
        return _pack_head(self.producer, seq, t_ns) + self.pad


def parse(payload: bytes) -> tuple[int, int, int]:
    """``(producer, seq, intended_ns)`` of a benchmark payload."""
    return _unpack_head(payload)


class SeqChecker:
    """Counts unique, duplicated and out-of-order (producer, seq) pairs.

    Args:
        expected: producer id -> number of messages it sends.
    """

    def __init__(self, expected: dict[int, int]) -> None:
        self.expected = dict(expected)
        self.bitmaps = {p: bytearray(n) for p, n in expected.items()}
        self.last = dict.fromkeys(expected, -1)
        self.received = 0
        self.unique = 0
        self.dups = 0
        self.ooo = 0
        self.unknown = 0

    def see(self, producer: int, seq: int) -> bool:
        """Record one message; returns True if it was new."""
        self.received += 1
        bm = self.bitmaps.get(producer)
        if bm is None or seq >= len(bm):
            self.unknown += 1
            return False
        if bm[seq]:
            self.dups += 1
            return False
        bm[seq] = 1
        self.unique += 1
        if seq < self.last[producer]:
            self.ooo += 1
        else:
            self.last[producer] = seq
        return True

    def see_payload(self, payload: bytes) -> tuple[bool, int]:
        """Record one message by its payload; returns (new, intended_ns)."""
        producer, seq, t = _unpack_head(payload)
        return self.see(producer, seq), t

    @property
    def total(self) -> int:
        return sum(self.expected.values())

    def summary(self) -> dict[str, Any]:
        """A picklable summary (bitmaps included, for merging)."""
        return {
            "received": self.received,
            "unique": self.unique,
            "dups": self.dups,
            "ooo": self.ooo,
            "unknown": self.unknown,
            "bitmaps": {p: bytes(b) for p, b in self.bitmaps.items()},
        }


def merge(summaries: list[dict[str, Any]], expected: dict[int, int], *, each: bool) -> dict[str, int]:
    """Combine consumers' checker summaries into lost/dup/ooo counts.

    Args:
        summaries: one per consumer.
        expected: producer id -> messages sent (confirmed).
        each: True when every consumer must see every message (fan-out):
            losses add up over consumers; False when the consumers share the
            messages (competing consumers): the union must be complete and a
            message seen by two consumers is a duplicate.
    """
    total = sum(expected.values())
    dups = sum(s["dups"] for s in summaries)
    ooo = sum(s["ooo"] for s in summaries)
    unknown = sum(s["unknown"] for s in summaries)
    received = sum(s["received"] for s in summaries)
    if each:
        lost = sum(max(0, total - s["unique"]) for s in summaries)
    else:
        lost = 0
        for p, n in expected.items():
            union = bytearray(n)
            for s in summaries:
                bm = s["bitmaps"].get(p)
                if bm is None:
                    continue
                for i in _ones(bm):
                    if union[i]:
                        dups += 1
                    else:
                        union[i] = 1
            lost += n - sum(union)
    return {"expected": total * (len(summaries) if each else 1), "received": received, "lost": lost,
            "duplicated": dups, "out_of_order": ooo, "unknown": unknown}  # fmt: skip


def _ones(bm: bytes) -> list[int]:
    return [i for i, b in enumerate(bm) if b]


def percentiles(samples_ns: array[int] | list[int]) -> dict[str, float | None]:
    """p50/p90/p99/p99.9/max (and mean) in milliseconds."""
    n = len(samples_ns)
    if n == 0:
        return {"n": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None,
                "mean_ms": None}  # fmt: skip
    s = sorted(samples_ns)

    def q(p: float) -> float:
        return round(s[min(n - 1, int(p * n))] / 1e6, 4)

    return {
        "n": n,
        "p50_ms": q(0.50),
        "p90_ms": q(0.90),
        "p99_ms": q(0.99),
        "p999_ms": q(0.999),
        "max_ms": round(s[-1] / 1e6, 4),
        "mean_ms": round(sum(s) / n / 1e6, 4),
    }
