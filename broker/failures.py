"""Failures of one kind, per peer host, in the log: a burst is a few lines.

The broker logs two kinds of failure that a peer can repeat as fast as it
likes: failed authentications (:mod:`broker.auth`) and refused TLS
handshakes (:mod:`broker.tls`). Each kind has one :class:`FailureLog`,
which counts them per peer host, not per address (each connection of a
peer has another port):

* A burst of failures from a host is one INFO line when it starts, with
  the first failure's detail, and then at most one INFO line per
  ``interval`` seconds for as long as it goes on, counting the failures
  since the line before ("N more failed authentications from HOST in the
  last 10.0 s"); each failure's own detail is at DEBUG. A failure after a
  quiet interval starts a new burst. 10,000 failures from one host within
  a minute are 7 lines, not 10,000, and yet no failure goes uncounted: a
  count still owed is written when its interval ends (a timer), when the
  host is forgotten, and when the broker stops.

* The streak: how many failures in a row came from the host, each within
  ``window`` seconds of the one before (what the authentication delay
  grows with).

Rules: a host has a count owed (``unlogged`` > 0) only while a summary is
scheduled for it (an entry in ``_due``, at ``logged`` + the interval); its
last line was written at ``logged``. The table holds at most ``hosts``
hosts: past that the least recent is forgotten (its count, if any, written
first), so a spread of addresses cannot grow it.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time

from protocol.wording import many

__all__ = ["FailureLog"]

#: uvloop's timers count whole milliseconds and may fire up to one early:
#: a summary due that close to now is due now (not one more timer turn).
_TIMER_SLACK = 0.001


class _Host:
    """What is remembered of one host's failures."""

    __slots__ = ("last", "logged", "name", "streak", "unlogged")

    def __init__(self, name: str, now: float) -> None:
        self.name = name
        #: Failures in a row, each within the window of the one before.
        self.streak = 0
        #: Monotonic time of the last failure.
        self.last = now
        #: Monotonic time of the last INFO line about this host (none yet: a new burst).
        self.logged = -math.inf
        #: Failures since that line, not yet in one.
        self.unlogged = 0


class FailureLog:
    """One kind of failure, counted and logged per peer host (see the module docstring).

    Args:
        logger: where the lines go (the caller's module logger).
        failed: what failed, as the lines say it after the peer
            ("authentication failed").
        noun: one failure, for the counts ("failed authentication").
        interval: at most one INFO line per host per this many seconds.
        hosts: how many hosts are remembered at most.
        window: failures further apart than this end a host's streak.
    """

    def __init__(
        self, logger: logging.Logger, *, failed: str, noun: str, interval: float, hosts: int, window: float
    ) -> None:
        self._logger = logger
        self._failed = failed
        self._noun = noun
        self._interval = interval
        self._max_hosts = hosts
        self._window = window
        #: Host -> its record, least recent first (a failure moves its host to the end).
        self._hosts: dict[str, _Host] = {}
        #: (when, tiebreak, host) of each summary owed, soonest first.
        self._due: list[tuple[float, int, _Host]] = []
        self._scheduled = 0
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._hosts)

    def __repr__(self) -> str:
        return f"<FailureLog {self._noun!r} hosts={len(self._hosts)} summaries owed={len(self._due)}>"

    def failed(self, host: str, conn_id: int, peer: str, why: str) -> int:
        """Count and log a failure of connection ``conn_id`` from ``peer`` (on ``host``).

        Args:
            host: the peer's host, the key of the counts.
            conn_id: the connection's id, for the log.
            peer: the peer's address, for the log.
            why: what was wrong, in plain words, for the log.

        Returns:
            The host's streak: failures in a row, this one included, each
            within the window of the one before.
        """
        now = time.monotonic()
        record = self._hosts.pop(host, None)
        if record is None:
            record = _Host(host, now)
        elif now - record.last > self._window:
            record.streak = 0
        self._hosts[host] = record  # (re-inserted: the dict is in order of recency)
        record.streak += 1
        record.last = now
        self._log(record, conn_id, peer, why, now)
        while len(self._hosts) > self._max_hosts:
            self._summarise(self._hosts.pop(next(iter(self._hosts))), now)
        return record.streak

    def close(self) -> None:
        """Write every count still owed and stop the timer (the broker is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = time.monotonic()
        for _, _, record in sorted(self._due):
            self._summarise(record, now)
        self._due.clear()

    def _log(self, record: _Host, conn_id: int, peer: str, why: str, now: float) -> None:
        if record.unlogged == 0 and now - record.logged >= self._interval:
            # A new burst (or the first failure since a quiet interval): said at once.
            record.logged = now
            self._logger.info(
                "conn %d %s: %s: %s (more from %s within %g s are counted in one line)",
                conn_id, peer, self._failed, why, record.name, self._interval,
            )  # fmt: skip
            return
        self._logger.debug("conn %d %s: %s: %s", conn_id, peer, self._failed, why)
        record.unlogged += 1
        if record.unlogged == 1:
            self._schedule(record, record.logged + self._interval)

    def _schedule(self, record: _Host, when: float) -> None:
        self._scheduled += 1
        heapq.heappush(self._due, (when, self._scheduled, record))
        if self._due[0][2] is record:  # the soonest now: (re)arm the timer for it
            if self._timer is not None:
                self._timer.cancel()
            delay = max(0.0, when - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = time.monotonic()
        while self._due and self._due[0][0] <= now + _TIMER_SLACK:
            _, _, record = heapq.heappop(self._due)
            self._summarise(record, now)
        if self._due:
            self._timer = asyncio.get_running_loop().call_later(self._due[0][0] - now, self._on_timer)

    def _summarise(self, record: _Host, now: float) -> None:
        """Write the count owed for ``record``, if any."""
        if record.unlogged:
            self._logger.info(
                "%s from %s in the last %.1f s",
                many(record.unlogged, f"more {self._noun}"), record.name, now - record.logged,
            )  # fmt: skip
            record.unlogged = 0
            record.logged = now
