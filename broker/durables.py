"""A durable's settings as its cursor file keeps them, and as a start restores them.

A durable's cursor file (:mod:`broker.cursors`) holds, beside the ack
floor and the offsets acked above it, a ``meta`` map written by
:meth:`broker.store.Store.state_of`: the event filter, the ack wait, the
delivery limit and dead-letter queue, and how far messages were handed
out. A start rebuilds the durable from it (:func:`broker.store.group_from_state`)
and ``tidings-broker --check`` shows it (:mod:`broker.check`); both read it
through :func:`settings_of`, so the check shows what the start restores.

A value that is missing or not valid (a file of an older broker, one
edited by hand; an ack wait under 1 ms, the least a consumer can ask for)
is not an error: the start uses the default, as for a new
durable, and the next save writes the durable's settings whole again. The
defaults hold until a consumer subscribes with its own settings
(``broker.consuming``): its events replace the filter (a FETCH without
events keeps it), and a delivery limit, dead-letter queue or ack wait it
gives replaces the one restored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from protocol import check_pattern, check_queue

from .router import DEFAULT_ACK_WAIT, MIN_ACK_WAIT

__all__ = ["SETTINGS", "DurableSettings", "settings_of"]

#: The keys of ``meta`` that are a durable's settings, as an operator calls them.
SETTINGS: Final = {"events": "events", "ack_wait": "ack wait", "max_deliveries": "max deliveries",
                   "dead_letter": "dead letter"}  # fmt: skip
#: Every key a start reads ("delivered" is bookkeeping, not a setting).
_KNOWN: Final = frozenset(SETTINGS) | {"delivered"}


@dataclass(frozen=True, slots=True)
class DurableSettings:
    """A durable's settings as a start restores them.

    Attributes:
        events: the event filter's patterns; empty passes every event.
        ack_wait: seconds before a message handed out and not acked goes out again.
        max_deliveries: hand-outs of a message before it is dead-lettered (0: no limit).
        dead_letter: the queue its dead letters go to (None: ``<queue>.dead``).
        delivered: every offset below it was handed out at some point (None: not recorded;
            the start takes the ack floor).
        defaulted: the keys of :data:`SETTINGS` that ``meta`` holds no valid value for: the default is used.
        ignored: keys of ``meta`` a start does not read.
    """

    events: tuple[str, ...] = ()
    ack_wait: float = DEFAULT_ACK_WAIT
    max_deliveries: int = 0
    dead_letter: str | None = None
    delivered: int | None = None
    defaulted: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()


def settings_of(meta: Mapping[str, Any]) -> DurableSettings:
    """The settings a start restores from a cursor file's ``meta`` (defaults for what is missing or not valid)."""
    defaulted: list[str] = []
    events = meta.get("events")
    if not isinstance(events, list) or not all(isinstance(e, str) and check_pattern(e) is None for e in events):
        events = []
        defaulted.append("events")
    ack_wait = _number(meta.get("ack_wait"))
    if ack_wait is not None and ack_wait < MIN_ACK_WAIT:  # 0 would hand every message out again at each tick
        ack_wait = None
    if ack_wait is None:
        defaulted.append("ack_wait")
    max_deliveries = _number(meta.get("max_deliveries"))
    if max_deliveries is None:
        defaulted.append("max_deliveries")
    dead = meta.get("dead_letter")
    if "dead_letter" not in meta or (dead is not None and not (isinstance(dead, str) and check_queue(dead) is None)):
        dead = None
        defaulted.append("dead_letter")
    delivered = _number(meta.get("delivered"))
    return DurableSettings(
        tuple(events),
        DEFAULT_ACK_WAIT if ack_wait is None else ack_wait,
        0 if max_deliveries is None else int(max_deliveries),
        dead,
        None if delivered is None else int(delivered),
        tuple(defaulted),
        tuple(sorted(str(key) for key in meta if key not in _KNOWN)),
    )


def _number(value: object) -> float | None:
    """A number of a cursor file's ``meta`` (not negative), or None if it is not one."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 else None
