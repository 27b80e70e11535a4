"""Failed authentications: how the broker slows a guesser down, and logs it.

Both are kept per peer host, not per address (each connection of a peer has
another port), in one table (a :class:`broker.failures.FailureLog`):

* The delay. The first AUTH_FREE_FAILURES within AUTH_FAILURE_WINDOW seconds
  of each other are answered at once (a typo); each later one waits
  ``auth_failure_delay``, doubling up to AUTH_FAILURE_MAX_DELAY, so a peer
  guessing tokens gets a few a second per connection instead of thousands.

* The log. A burst of failures from a host is one INFO line when it starts,
  with the first failure's detail, and then at most one INFO line per
  ``auth_failure_log_interval`` seconds for as long as it goes on, counting
  the failures since the line before ("N more failed authentications from
  HOST in the last 10.0 s"); each failure's own detail is at DEBUG. 10,000
  wrong tokens from one host within a minute are 7 lines, not 10,000, and
  no failure goes uncounted (see :mod:`broker.failures`, which refused TLS
  handshakes share).
"""

from __future__ import annotations

import logging

from .config import AUTH_FAILURE_HOSTS, AUTH_FAILURE_MAX_DELAY, AUTH_FAILURE_WINDOW, AUTH_FREE_FAILURES, BrokerConfig
from .failures import FailureLog

__all__ = ["AuthFailures"]

logger = logging.getLogger(__name__)


class AuthFailures:
    """Failed authentications per host: the delay before each AUTH_FAILED, and the log.

    Args:
        config: the broker's configuration (``auth_failure_delay``,
            ``auth_failure_log_interval``).
    """

    def __init__(self, config: BrokerConfig) -> None:
        self._delay = config.auth_failure_delay
        self._log = FailureLog(
            logger, failed="authentication failed", noun="failed authentication",
            interval=config.auth_failure_log_interval, hosts=AUTH_FAILURE_HOSTS, window=AUTH_FAILURE_WINDOW,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self._log)

    def __repr__(self) -> str:
        return f"<AuthFailures {self._log!r}>"

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
        failures = self._log.failed(host, conn_id, peer, why)
        if self._delay <= 0 or failures <= AUTH_FREE_FAILURES:
            return 0.0
        if failures == AUTH_FREE_FAILURES + 1:
            logger.warning(
                "%s: %d wrong tokens within a minute: answering this one and each later one more slowly", host, failures
            )
        return float(min(AUTH_FAILURE_MAX_DELAY, self._delay * 2 ** (failures - AUTH_FREE_FAILURES - 1)))

    def close(self) -> None:
        """Write every count still owed and stop the timer (the broker is stopping)."""
        self._log.close()
