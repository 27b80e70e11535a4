"""Names of queues, durables and events, and event filters.

Queue and durable names become directory and file names on the broker, so
their alphabet is closed: ASCII letters, digits, ``_``, ``-`` and ``.``, at
most 128 characters, not starting with ``.`` (so ``.``, ``..`` and hidden
files are impossible) and never containing ``/`` or NUL. Event names allow
``:`` and ``/`` as well, since they never touch the file system.

An event *filter* is an event name in which ``*`` matches any run of
characters (``user.*`` matches ``user.created`` and ``user.a.b``). An empty
filter list means "every event".

Event names starting with ``tidings.`` are the broker's: a PUBLISH may not
use them. The broker's one so far is :data:`LOST_EVENT`, the record that
``--repair`` puts where a damaged message was (see :mod:`broker.repair`);
every subscription's filter passes it (:func:`subscription_filter`): the
lost message may have been one it wanted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Final

__all__ = [
    "LOST_EVENT",
    "MAX_NAME_LENGTH",
    "RESERVED_EVENT_PREFIX",
    "EventFilter",
    "check_durable",
    "check_event",
    "check_pattern",
    "check_queue",
    "subscription_filter",
]

#: Long enough for dotted names such as ``orders.eu-west.dead``; short enough
#: that a path built from a queue and a durable stays far below PATH_MAX.
MAX_NAME_LENGTH: Final = 128
#: Event names the broker writes itself; a PUBLISH may not use them.
RESERVED_EVENT_PREFIX: Final = "tidings."
#: The event of a record that stands for a message lost to damage (``--repair``).
LOST_EVENT: Final = RESERVED_EVENT_PREFIX + "lost"

_QUEUE_RE: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_EVENT_RE: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._:/-]{0,127}")
_PATTERN_RE: Final = re.compile(r"[A-Za-z0-9_*-][A-Za-z0-9._:/*-]{0,127}")


def _check(kind: str, value: object, pattern: re.Pattern[str]) -> str | None:
    if not isinstance(value, str):
        return f"{kind} must be a string, not {type(value).__name__}"
    if pattern.fullmatch(value) is None:
        shown = value if len(value) <= 40 else value[:40] + "..."
        return (
            f"invalid {kind} {shown!r}: use 1-{MAX_NAME_LENGTH} characters from "
            f"{'A-Z a-z 0-9 _ - .' if pattern is _QUEUE_RE else 'A-Z a-z 0-9 _ - . : /'}"
            f"{' and *' if pattern is _PATTERN_RE else ''}, not starting with '.'"
        )
    return None


def check_queue(value: object) -> str | None:
    """Return why ``value`` is not a valid queue name, or None if it is."""
    return _check("queue name", value, _QUEUE_RE)


def check_durable(value: object) -> str | None:
    """Return why ``value`` is not a valid durable name, or None if it is."""
    return _check("durable name", value, _QUEUE_RE)


def check_event(value: object) -> str | None:
    """Return why ``value`` is not a valid event name to publish, or None if it is."""
    why = _check("event name", value, _EVENT_RE)
    if why is None and isinstance(value, str) and value.startswith(RESERVED_EVENT_PREFIX):
        return f"invalid event name {value!r}: names starting with {RESERVED_EVENT_PREFIX!r} are the broker's"
    return why


def check_pattern(value: object) -> str | None:
    """Return why ``value`` is not a valid event filter, or None if it is."""
    return _check("event filter", value, _PATTERN_RE)


def _glob(pattern: str) -> Callable[[str], bool]:
    """Compile a ``*`` pattern into a matcher that runs in linear time.

    A regular expression of ``.*`` runs backtracks exponentially on patterns
    such as ``*a*a*a*a*b`` (a client could stall the broker with one filter).
    With ``*`` as the only wildcard, matching the fixed parts greedily from
    the left is exact: the prefix and suffix are anchored, and each middle
    part is taken at its first occurrence, which leaves the most room for
    the rest.
    """
    parts = pattern.split("*")
    head, tail, middle = parts[0], parts[-1], parts[1:-1]
    fixed = len(head) + len(tail)

    def match(event: str) -> bool:
        if len(event) < fixed or not event.startswith(head) or not event.endswith(tail):
            return False
        pos, end = len(head), len(event) - len(tail)
        for part in middle:
            found = event.find(part, pos, end)
            if found < 0:
                return False
            pos = found + len(part)
        return True

    return match


class EventFilter:
    """Matches event names against a list of exact names and ``*`` patterns.

    Exact names are a set lookup; each pattern is a linear-time glob matcher
    (see :func:`_glob`), so no filter a client sends can make matching slow.

    Args:
        patterns: event names or patterns; empty means every event matches.
        always: names that pass whatever the patterns (see :func:`subscription_filter`).
    """

    __slots__ = ("_exact", "_globs", "match_all", "patterns")

    def __init__(self, patterns: Iterable[str], *, always: Iterable[str] = ()) -> None:
        self.patterns = tuple(patterns)
        self.match_all = not self.patterns or "*" in self.patterns
        self._exact = frozenset(p for p in self.patterns if "*" not in p).union(always)
        self._globs = tuple(_glob(p) for p in self.patterns if "*" in p)

    def __call__(self, event: str) -> bool:
        """Return whether ``event`` passes the filter."""
        if self.match_all or event in self._exact:
            return True
        return any(match(event) for match in self._globs)

    def __repr__(self) -> str:
        return f"EventFilter({list(self.patterns)!r})"


def subscription_filter(events: Iterable[str]) -> EventFilter:
    """The filter of a subscription to ``events``: it passes :data:`LOST_EVENT` too."""
    return EventFilter(events, always=(LOST_EVENT,))
