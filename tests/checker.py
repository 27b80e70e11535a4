"""The history checker: what publishers were told against what the log holds.

Every published payload is ``[producer, seq]``. A publish ends as
``ok(offset)``, ``fail(error)`` (the broker refused: it must not be stored)
or ``unknown`` (the connection broke before an answer: either is fine).
:func:`check` reads the log back and counts every way it could be wrong.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from client import Client


@dataclass
class History:
    """What publishers were told, keyed by ``(producer, seq)``."""

    ok: dict[tuple[int, int], tuple[str, int]] = field(default_factory=dict)  # -> (queue, offset)
    failed: set[tuple[int, int]] = field(default_factory=set)
    unknown: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class Report:
    lost: int = 0  # confirmed but missing, or at another offset
    unexpected: int = 0  # in the log but never published
    failed_but_present: int = 0  # refused, yet stored
    duplicated: int = 0  # stored more than once
    recovered: int = 0  # unknown outcome, and stored
    order_inversions: int = 0  # a producer's seqs out of order within a queue
    holes: int = 0  # offsets missing inside [first, next)
    details: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.unexpected or self.failed_but_present or self.duplicated or self.holes)


async def read_all(client: Client, queue: str) -> list[tuple[int, Any]]:
    """Every ``(offset, payload)`` of ``queue``, with plain FETCH reads."""
    out: list[tuple[int, Any]] = []
    position = 0
    while True:
        batch = await client.fetch(queue, start=position, max_messages=5000)
        if not batch:
            return out
        out += [(m.offset, m.payload) for m in batch]
        position = batch[-1].offset + 1


def check(history: History, logs: dict[str, list[tuple[int, Any]]]) -> Report:
    """Compare ``history`` with the records read back from each queue."""
    r = Report()
    where: dict[tuple[int, int], list[tuple[str, int]]] = {}
    for queue, records in logs.items():
        offsets = [o for o, _ in records]
        if offsets and offsets != list(range(offsets[0], offsets[0] + len(offsets))):
            r.holes += 1
            r.details.append(f"{queue}: offsets not dense")
        last_seq: dict[int, int] = {}
        for offset, payload in records:
            key = (int(payload[0]), int(payload[1])) if isinstance(payload, list) and len(payload) == 2 else None
            if key is None or not (key in history.ok or key in history.failed or key in history.unknown):
                r.unexpected += 1
                r.details.append(f"{queue}@{offset}: unexpected {payload!r}")
                continue
            where.setdefault(key, []).append((queue, offset))
            if last_seq.get(key[0], -1) > key[1]:
                r.order_inversions += 1
            last_seq[key[0]] = key[1]
    counts = Counter({k: len(v) for k, v in where.items()})
    r.duplicated = sum(n - 1 for n in counts.values() if n > 1)
    for key, place in history.ok.items():
        if place not in where.get(key, []):
            r.lost += 1
            if len(r.details) < 20:
                r.details.append(f"lost {key} confirmed at {place}, found at {where.get(key)}")
    r.failed_but_present = sum(1 for key in history.failed if key in where)
    r.recovered = sum(1 for key in history.unknown if key in where)
    return r
