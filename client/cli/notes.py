"""What ``sub`` and ``fetch`` say on stderr about what they read, from STATUS.

Two things the protocol does without a word, and a user would not guess:

* A durable keeps its event filter when a SUBSCRIBE or FETCH gives none
  (SPEC section 5: "``events`` empty keeps the durable's filter"), so
  ``tidings sub Q --durable d`` without ``-e`` reads only the events
  ``d`` was made with, and skips the others for good (they count as
  done). The note names the filter in force, and ``-e '*'`` to widen it.
* A plain FETCH of a queue that does not exist reads as an empty queue
  (and creates nothing), and one that waits, or a durable's, creates it
  (SPEC section 5, "FETCH"): a typo in the queue name prints nothing and
  exits 0. The note says the queue does not exist, or that the fetch made it.

The answers come from STATUS (its ``durables`` and ``queues``), asked only
when a note may be due. A broker that refuses STATUS (a user without the
``status`` right) gets no note: a note is not worth failing a command for.
"""

from __future__ import annotations

from typing import Any

from protocol import ServerError

from ..client import Client

__all__ = ["created_note", "filter_note", "missing_note", "queue_exists", "status_or_none"]


async def status_or_none(client: Client) -> dict[str, Any] | None:
    """The broker's STATUS, or None when it refuses it.

    Raises:
        ServerError: one that ends the connection (SHUTTING_DOWN, ...).
        ConnectionLost: the connection broke.
    """
    try:
        return await client.status()
    except ServerError as exc:
        if exc.fatal:
            raise
        return None


def _durable(info: dict[str, Any], queue: str, durable: str) -> dict[str, Any] | None:
    return next((d for d in info.get("durables", []) if d.get("queue") == queue and d.get("name") == durable), None)


def filter_note(info: dict[str, Any], queue: str, durable: str) -> str | None:
    """The note for a ``sub``/``fetch --durable`` given no ``-e``: the filter
    the durable keeps, or None when it takes every event (or does not exist:
    a new durable takes every event)."""
    found = _durable(info, queue, durable)
    events = found.get("events") if found is not None else None
    if not events or not isinstance(events, list) or "*" in events:
        return None
    return (
        f"durable {durable!r} keeps its event filter: {','.join(map(str, events))} "
        f"(without -e a durable keeps the filter it has; -e '*' for every event)"
    )


def queue_exists(info: dict[str, Any], queue: str) -> bool:
    """Whether STATUS lists ``queue`` (served, or refused at start-up)."""
    names = {q.get("name") for q in info.get("queues", [])} | {f.get("name") for f in info.get("failed_queues", [])}
    return queue in names


def missing_note(queue: str) -> str:
    """The note for a plain fetch without --wait that found no such queue (it created none)."""
    return f"queue {queue!r} does not exist (nothing fetched)"


def created_note(queue: str) -> str:
    """The note for a fetch that waited, or a durable's, that found no such
    queue before it: the broker created it (empty)."""
    return f"queue {queue!r} did not exist: this fetch created it, empty (tidings delete {queue} removes it)"
