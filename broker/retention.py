"""Retention: whole segments past a queue's size or age limit are dropped,
oldest first, never past what is committed (nor, with ``keep_unacked``, past
any durable's ack floor). By age, the segment being written goes too once
its newest message is past the age: it is sealed first, so a queue nobody
publishes to any more keeps nothing past the age, and offsets go on from
where they were.

A queue's retention is the flags' (``--retention-bytes``, ``--retention-age``,
``--keep-unacked``) but for the keys its ``[queues.NAME]`` section of the
``--config`` file names (:meth:`broker.config.BrokerConfig.retention_for`);
:func:`retention_lines` says, at start-up, what is in force and from where.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from protocol.wording import many

from .config import BrokerConfig, Retention
from .log import LogFailedError
from .queue import Queue

if TYPE_CHECKING:
    from .store import Store

__all__ = ["enforce_retention", "retention_lines", "retention_summary"]

logger = logging.getLogger("broker.store")  # (the store's lines, as before)


def enforce_retention(store: Store, now_ms: int) -> int:
    """One retention pass over every queue of ``store``; the records dropped."""
    dropped = 0
    for queue in list(store.queues.values()):
        policy = store.config.retention_for(queue.name)
        if not (policy.max_bytes or policy.max_age):
            continue
        try:
            cut = _cut(queue, policy, now_ms)
        except LogFailedError as exc:  # sealing the last segment: fail-stop (R7)
            store.fail(f"fsync failed: {exc}")
            break
        if policy.keep_unacked and queue.groups:
            cut = min(cut, *(g.cursor.ack_floor for g in queue.groups.values()))
        log = queue.log
        if cut > log.first_offset and (n := log.drop_segments_before(cut)):
            logger.info("queue %s: retention dropped %s (now from offset %d)", queue.name, many(n, "message"),
                        log.first_offset)  # fmt: skip
            dropped += n
    return dropped


def _cut(queue: Queue, policy: Retention, now_ms: int) -> int:
    """The offset below which ``policy`` drops ``queue``'s records (sealing its
    last segment if all of it is past the age).

    Raises:
        LogFailedError: the seal's fsync failed.
    """
    log = queue.log
    sealed = log.segments[:-1]
    cut = log.first_offset
    if policy.max_bytes:
        size = log.size_bytes
        for seg in sealed:
            if size <= policy.max_bytes:
                break
            size -= seg.size
            cut = max(cut, seg.next_offset)
    if policy.max_age:
        oldest = now_ms - int(policy.max_age * 1000)
        for seg in sealed:
            if seg.last_ts >= oldest:
                break
            cut = max(cut, seg.next_offset)
        last = log.segments[-1]  # every segment before it past the age, and its newest message too?
        expired = cut >= last.base and last.last_ts < oldest and last.next_offset > last.base
        if expired and queue.committed == last.next_offset:
            try:
                log.seal()
            except LogFailedError:
                raise
            except OSError as exc:  # (its zero tail could not be cut: nothing changed)
                logger.warning("queue %s: cannot seal its segment for retention: %s", queue.name, exc)
            else:
                cut = log.next_offset
    return min(cut, queue.committed)


#: A ``[queues.NAME]`` key, and the flag that gives it when the section does not.
_KEYS: Final = (("retention_bytes", "--retention-bytes"), ("retention_age", "--retention-age"),
                ("keep_unacked", "--keep-unacked"))  # fmt: skip


def retention_lines(config: BrokerConfig, source: str) -> list[str]:
    """What the broker logs at start-up about the ``--config`` file: for each
    queue it has a section for, the retention in force, each key with where it
    comes from (the file ``source``, or the flag); then the other queues'.

    Example: ``queue audit: retention_bytes off (--retention-bytes),
    retention_age 2 s (--retention-age), keep_unacked true (retention.toml)``.
    """
    lines = []
    for name, own in sorted(config.queues.items()):
        policy = own.over(config.retention)
        mine = (own.max_bytes is not None, own.max_age is not None, own.keep_unacked is not None)
        said = [f"{key} {value} ({source if set_here else flag})"
                for (key, flag), value, set_here in zip(_KEYS, _values(policy), mine, strict=True)]  # fmt: skip
        lines.append(f"queue {name}: {', '.join(said)}")
    flags = ", ".join(f"{key} {value}" for (key, _), value in zip(_KEYS, _values(config.retention), strict=True))
    lines.append(f"{'other queues' if lines else 'every queue'}: {flags} (the flags)")
    return lines


def retention_summary(policy: Retention) -> str:
    """``policy`` in a few words: ``everything kept``, or its rules
    (``at most 1073741824 bytes, 86400 s; unacked kept``)."""
    limits = [f"{policy.max_bytes} bytes"] if policy.max_bytes else []
    limits += [f"{policy.max_age:g} s"] if policy.max_age else []
    if not limits:
        return "everything kept"
    return f"at most {', '.join(limits)}" + ("; unacked kept" if policy.keep_unacked else "")


def _values(policy: Retention) -> tuple[str, str, str]:
    """The three settings of ``policy`` as an operator reads them."""
    return (
        f"{policy.max_bytes} bytes" if policy.max_bytes else "off",
        f"{policy.max_age:g} s" if policy.max_age else "off",
        "true" if policy.keep_unacked else "false",
    )
