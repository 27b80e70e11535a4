"""Dead letters: a durable's messages past ``max_deliveries`` are copied to its
dead-letter queue (``<queue>.dead``, or the one its SUBSCRIBE named), and
acknowledged in the original only once the copy is stored (SPEC section 5).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import msgpack

from protocol import PRODUCER_HEADER, ErrorCode, check_queue, encode_record
from protocol.wording import many

from .log import LogFailedError
from .queue import Queue, QueueUnavailable
from .router import Group

if TYPE_CHECKING:
    from .store import Store

__all__ = ["dead_letter"]

logger = logging.getLogger("broker.store")  # (the store's lines, as before)


def dead_letter(store: Store, queue: Queue, group: Group) -> None:
    """Copy the group's dead offsets to its dead-letter queue; ack them once stored.

    The copy keeps event and payload and adds the headers ``x-dead-queue``,
    ``x-dead-offset``, ``x-dead-durable``, ``x-dead-reason`` and
    ``x-deliveries``. The original is acked only after the copy is
    committed, so a crash in between can duplicate a dead letter but
    never lose the message.
    """
    dead = group.take_dead()
    name = group.dead_letter_queue
    try:
        if name == queue.name or check_queue(name) is not None:
            raise ValueError(f"{name!r} cannot be a dead-letter queue for {queue.name!r}")
        target = store.get(name, create=True)
        assert target is not None
    except (ValueError, OSError, QueueUnavailable) as exc:
        logger.warning("cannot dead-letter messages of %s/%s: %s", queue.name, group.name, exc)
        group.dead_letter_failed(o for o, _ in dead)
        return
    bodies, now_ms = [], store.now_ms()
    for offset, deliveries in dead:
        body = queue.body(offset)
        if body is None:  # dropped by retention meanwhile: nothing to keep
            group.dead_letter_failed((offset,))
            continue
        # The record's four values, read as one array (no Unpacker: making one clears ~40 KB).
        event, _ts, headers, payload = msgpack.unpackb(b"\x94" + body, raw=False)
        headers = dict(headers or {})
        headers.pop(PRODUCER_HEADER, None)  # the original queue's bookkeeping
        headers.update({
            "x-dead-queue": queue.name, "x-dead-offset": str(offset), "x-dead-durable": group.name or "",
            "x-dead-reason": "max_deliveries", "x-deliveries": str(deliveries),
        })  # fmt: skip
        bodies.append((offset, encode_record(event, now_ms, headers, payload)))
    if not bodies:
        return
    offsets = [o for o, _ in bodies]
    try:
        first = target.append([b for _, b in bodies], now_ms, dedup_until=0)
    except LogFailedError as exc:  # a roll's fsync, or the cut of a failed write: fail-stop (R7)
        store.fail(f"fsync failed: {exc}")
        group.dead_letter_failed(offsets)
        return
    except OSError as exc:
        logger.warning("cannot dead-letter %s of %s/%s: %s", many(len(bodies), "message"), queue.name, group.name, exc)
        group.dead_letter_failed(offsets)
        return
    target.expect_confirm(first + len(bodies), _DeadLetterDone(queue, group, offsets), [])
    store.appended(target)
    where = f"offset {offsets[0]}" if len(offsets) == 1 else f"offsets {min(offsets)} to {max(offsets)}"
    logger.info("queue %s, durable %s: %s (%s) moved to %s after %s without an ack", queue.name, group.name,
                many(len(offsets), "message"), where, target.name, many(group.max_deliveries, "delivery", "deliveries"))  # fmt: skip


class _DeadLetterDone:
    """The Confirmer of a dead-letter append: acks the originals once it is stored."""

    def __init__(self, queue: Queue, group: Group, offsets: list[int]) -> None:
        self.queue, self.group, self.offsets = queue, group, offsets

    def confirm(self, acks: list[tuple[int, int, bool]]) -> None:
        self.group.dead_lettered(self.offsets)
        self.queue.pump(self.group, time.monotonic())

    def fail(self, acks: list[tuple[int, int, bool]], code: ErrorCode, message: str) -> None:
        self.group.dead_letter_failed(self.offsets)
