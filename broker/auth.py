"""Failed authentications: how the broker slows a guesser down, and logs it.

Both are kept per peer host, not per address (each connection of a peer has
another port), in one table:

* The delay. The first AUTH_FREE_FAILURES within AUTH_FAILURE_WINDOW seconds
  of each other are answered at once (a typo); each later one waits
  ``auth_failure_delay``, doubling up to AUTH_FAILURE_MAX_DELAY, so a peer
  guessing tokens gets a few a second per connection instead of thousands.

* The log. A burst of failures from a host is one INFO line when it starts,
  with the first failure's detail, and then at most one INFO line per
  ``auth_failure_log_interval`` seconds for as long as it goes on, counting
  the failures since the line before ("N more failed authentications from
  HOST in the last 10.0 s"); each failure's own detail is at DEBUG. A
  failure after a quiet interval starts a new burst. 10,000 wrong tokens
  from one host within a minute are 7 lines, not 10,000, and yet no failure
  goes uncounted: a count still owed is written when its interval ends (a
  timer), when the host is forgotten, and when the broker stops.

Rules: a host has a count owed (``unlogged`` > 0) only while a summary is
scheduled for it (an entry in ``_due``, at ``logged`` + the interval); its
last line was written at ``logged``. The table holds at most
AUTH_FAILURE_HOSTS hosts: past that the least recent is forgotten (its
count, if any, written first), so a spread of addresses cannot grow it.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time

from protocol.wording import many

from .config import AUTH_FAILURE_HOSTS, AUTH_FAILURE_MAX_DELAY, AUTH_FAILURE_WINDOW, AUTH_FREE_FAILURES, BrokerConfig

__all__ = ["AuthFailures"]

logger = logging.getLogger(__name__)

#: uvloop's timers count whole milliseconds and may fire up to one early:
#: a summary due that close to now is due now (not one more timer turn).
_TIMER_SLACK = 0.001


class _Host:
    """What is remembered of one host's failed authentications."""

    __slots__ = ("failures", "last", "logged", "name", "unlogged")

    def __init__(self, name: str, now: float) -> None:
        self.name = name
        #: Failures in a row, each within AUTH_FAILURE_WINDOW of the one before (the delay's count).
        self.failures = 0
        #: Monotonic time of the last failure.
        self.last = now
        #: Monotonic time of the last INFO line about this host (none yet: a new burst).
        self.logged = -math.inf
        #: Failures since that line, not yet in one.
        self.unlogged = 0


class AuthFailures:
    """Failed authentications per host: the delay before each AUTH_FAILED, and the log.

    Args:
        config: the broker's configuration (``auth_failure_delay``,
            ``auth_failure_log_interval``).
    """

    def __init__(self, config: BrokerConfig) -> None:
        self._delay = config.auth_failure_delay
        self._interval = config.auth_failure_log_interval
        #: Host -> its record, least recent first (a failure moves its host to the end).
        self._hosts: dict[str, _Host] = {}
        #: (when, tiebreak, host) of each summary owed, soonest first.
        self._due: list[tuple[float, int, _Host]] = []
        self._scheduled = 0
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._hosts)

    def __repr__(self) -> str:
        return f"<AuthFailures hosts={len(self._hosts)} summaries owed={len(self._due)}>"

    def failed(self, host: str, conn_id: int, peer: str, why: str) -> float:
        """Count and log a failed authentication of connection ``conn_id``
        from ``peer`` (on ``host``): the seconds to wait before saying so.

        Args:
            host: the peer's host, the key of the counts.
            conn_id: the connection's id, for the log.
            peer: the peer's address, for the log.
            why: what was wrong (no token, a wrong one), for the log.

        Returns:
            The delay before AUTH_FAILED (0: at once).
        """
        now = time.monotonic()
        record = self._hosts.pop(host, None)
        if record is None:
            record = _Host(host, now)
        elif now - record.last > AUTH_FAILURE_WINDOW:
            record.failures = 0
        self._hosts[host] = record  # (re-inserted: the dict is in order of recency)
        record.failures += 1
        record.last = now
        self._log(record, conn_id, peer, why, now)
        while len(self._hosts) > AUTH_FAILURE_HOSTS:
            self._summarise(self._hosts.pop(next(iter(self._hosts))), now)
        return self._delay_after(record)

    def close(self) -> None:
        """Write every count still owed and stop the timer (the broker is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = time.monotonic()
        for _, _, record in sorted(self._due):
            self._summarise(record, now)
        self._due.clear()

    def _delay_after(self, record: _Host) -> float:
        if self._delay <= 0 or record.failures <= AUTH_FREE_FAILURES:
            return 0.0
        if record.failures == AUTH_FREE_FAILURES + 1:
            logger.warning(
                "%s: %d wrong tokens within a minute: answering this one and each later one more slowly",
                record.name, record.failures,
            )  # fmt: skip
        return float(min(AUTH_FAILURE_MAX_DELAY, self._delay * 2 ** (record.failures - AUTH_FREE_FAILURES - 1)))

    def _log(self, record: _Host, conn_id: int, peer: str, why: str, now: float) -> None:
        if record.unlogged == 0 and now - record.logged >= self._interval:
            # A new burst (or the first failure since a quiet interval): said at once.
            record.logged = now
            logger.info(
                "conn %d %s: authentication failed: %s (more from %s within %g s are counted in one line)",
                conn_id, peer, why, record.name, self._interval,
            )  # fmt: skip
            return
        logger.debug("conn %d %s: authentication failed: %s", conn_id, peer, why)
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
            logger.info(
                "%s from %s in the last %.1f s",
                many(record.unlogged, "more failed authentication"), record.name, now - record.logged,
            )  # fmt: skip
            record.unlogged = 0
            record.logged = now
