"""The broker's configuration: one frozen dataclass, built by ``__main__`` and passed down.

Every default is a named constant with the reason for its value. Nothing
below the entry point reads the environment or module globals.
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from protocol import ConfigError, Limits, check_queue

__all__ = ["BrokerConfig", "FsyncPolicy", "QueueRetention", "Retention", "load_queue_config"]

#: The port in the README and every URL default (tidings://127.0.0.1:6464).
DEFAULT_PORT: Final = 6464
#: A data folder in the working directory: `make run` needs no other service.
DEFAULT_DATA_DIR: Final = Path("tidings-data")
#: 64 MiB segments: small enough that retention frees space in useful steps,
#: large enough that a busy queue rolls only every few seconds (Kafka: 1 GiB).
DEFAULT_SEGMENT_BYTES: Final = 64 * 1024 * 1024
#: Per-connection write buffer high-water mark. Set explicitly because
#: asyncio (64 KiB) and uvloop (its low-water default is 16 bytes) differ.
DEFAULT_WRITE_HIGH_WATER: Final = 256 * 1024
#: A subscriber whose socket stays over the high-water mark this long is
#: disconnected as a slow consumer (Redis pub/sub: 60 s soft limit).
DEFAULT_SLOW_CONSUMER_TIMEOUT: Final = 30.0
#: Unconfirmed publishes a connection may have before we stop reading from it:
#: TCP backpressure slows a publisher when storage falls behind.
DEFAULT_MAX_INFLIGHT_PUBLISHES: Final = 20_000
#: NATS AUTH_TIMEOUT is 2 s: long enough for a slow TLS client, short enough
#: that idle sockets cannot pile up.
DEFAULT_HANDSHAKE_TIMEOUT: Final = 2.0
#: Seconds between heartbeat checks: PING after one silent interval, drop the
#: connection after two in a row (NATS: a PING every 2 min, 2 unanswered = dead).
DEFAULT_HEARTBEAT: Final = 30.0
#: Redis maxclients default.
DEFAULT_MAX_CONNECTIONS: Final = 10_000
#: How often acked cursors are persisted; bounds redeliveries after a crash.
DEFAULT_CURSOR_FLUSH: Final = 0.2
#: A stored record may take the frame limit less this (see max_message_bytes).
RECORD_ROOM: Final = 512
#: Wrong tokens from one address: the first AUTH_FREE_FAILURES within
#: AUTH_FAILURE_WINDOW seconds are answered at once, each later one after a
#: delay that starts at ``auth_failure_delay`` and doubles up to
#: AUTH_FAILURE_MAX_DELAY. At most AUTH_FAILURE_HOSTS addresses are remembered.
DEFAULT_AUTH_FAILURE_DELAY: Final = 0.1
AUTH_FREE_FAILURES: Final = 3
AUTH_FAILURE_WINDOW: Final = 60.0
AUTH_FAILURE_MAX_DELAY: Final = 2.0
AUTH_FAILURE_HOSTS: Final = 10_000
#: A burst of failed authentications from one host is logged as one line per
#: this many seconds, with a count (see broker.auth): often enough to date an
#: attack and to see it go on, few enough lines (360 an hour) to read around.
DEFAULT_AUTH_FAILURE_LOG_INTERVAL: Final = 10.0
#: Seconds to finish a TLS handshake (NATS TLS_TIMEOUT: 2 s).
DEFAULT_TLS_HANDSHAKE_TIMEOUT: Final = 2.0
#: A second PUBLISH with the same message_id within this window is not stored
#: again (NATS JetStream duplicate window: 2 minutes).
DEFAULT_DEDUP_WINDOW: Final = 120.0
#: Graceful shutdown waits this long for write buffers to drain; a connection
#: that said BYE is kept this long at most for the replies it is owed.
DEFAULT_SHUTDOWN_GRACE: Final = 5.0
#: The smallest frame limit ``tidings-broker --max-frame-bytes`` accepts. A
#: STATUS page holds a 512-byte reserve (``broker.status.RESERVE``), the
#: server map (~200 bytes and the data directory's path) and at least one
#: whole entry (a connection's with a 256-character name: ~500 bytes); a
#: stored message gets the limit less 640 bytes (``RECORD_ROOM``, and 128
#: for a producer's sequence header). 4 KiB does both with room to spare: a
#: message of 3,456 bytes. With 100, every publish was refused (a message's
#: limit went negative) and STATUS could not be read (a page needs ~1 KiB).
#: (``BrokerConfig`` itself takes smaller limits: the tests use them.)
MIN_MAX_FRAME_BYTES: Final = 4096


class FsyncPolicy(enum.Enum):
    """When a PUBLISH is confirmed relative to fsync."""

    ALWAYS = "always"  # confirm after fsync; one fsync per group of publishes
    INTERVAL = "interval"  # confirm after write; fsync every fsync_interval seconds
    NEVER = "never"  # confirm after write; the OS decides when to flush


@dataclass(frozen=True, slots=True)
class Retention:
    """How long a queue keeps its messages (whole segments are dropped).

    Attributes:
        max_bytes: drop the oldest segments while the log is larger (0 = off).
        max_age: drop segments whose newest message is older, in seconds (0 = off).
        keep_unacked: never drop a message some durable has not acked.
    """

    max_bytes: int = 0
    max_age: float = 0.0
    keep_unacked: bool = False


@dataclass(frozen=True, slots=True)
class QueueRetention:
    """A ``[queues.NAME]`` section of the ``--config`` file: the retention keys
    it names. A key it leaves out (None) is the flags' (``--retention-bytes``,
    ``--retention-age``, ``--keep-unacked``); 0 or false switches that rule off
    for this queue whatever the flags say.

    Attributes:
        max_bytes: ``retention_bytes``, or None.
        max_age: ``retention_age`` in seconds, or None.
        keep_unacked: ``keep_unacked``, or None.
    """

    max_bytes: int | None = None
    max_age: float | None = None
    keep_unacked: bool | None = None

    def over(self, flags: Retention) -> Retention:
        """The retention in force: this section's keys, the flags' for the others."""
        return Retention(
            flags.max_bytes if self.max_bytes is None else self.max_bytes,
            flags.max_age if self.max_age is None else self.max_age,
            flags.keep_unacked if self.keep_unacked is None else self.keep_unacked,
        )


_RETENTION_KEYS: Final[dict[str, type | tuple[type, ...]]] = {
    "retention_bytes": int,
    "retention_age": (int, float),
    "keep_unacked": bool,
}


def load_queue_config(path: Path) -> dict[str, QueueRetention]:
    """Read per-queue settings from a TOML file::

        [queues.audit]
        retention_bytes = 1_073_741_824
        retention_age = 604800      # seconds
        keep_unacked = true

    A key a section leaves out stays None: the flags' value holds for it
    (see :class:`QueueRetention`).

    Raises:
        ConfigError: the file cannot be read, or names an unknown key or a bad value.
    """
    try:
        doc: dict[str, Any] = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    unknown = set(doc) - {"queues"}
    if unknown:
        raise ConfigError(f"config file {path}: unknown section(s) {sorted(unknown)}; only [queues.NAME] is known")
    out: dict[str, QueueRetention] = {}
    for name, table in (doc.get("queues") or {}).items():
        where = f"config file {path}, [queues.{name}]"
        if check_queue(name) is not None:
            raise ConfigError(f"{where}: {check_queue(name)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        for key, value in table.items():
            kind = _RETENTION_KEYS.get(key)
            if kind is None:
                raise ConfigError(f"{where}: unknown key {key!r}; known: {', '.join(_RETENTION_KEYS)}")
            negative = isinstance(value, int | float) and not isinstance(value, bool) and value < 0
            if not isinstance(value, kind) or negative or (kind is not bool and isinstance(value, bool)):
                raise ConfigError(f"{where}: {key} = {value!r} is not valid")
        size, age, keep = (table.get(key) for key in _RETENTION_KEYS)
        out[name] = QueueRetention(
            None if size is None else int(size),
            None if age is None else float(age),
            None if keep is None else bool(keep),
        )
    return out


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Everything the broker needs to run. All fields have sane defaults.

    Attributes:
        host: address to listen on.
        port: TCP port; 0 picks a free one (tests).
        data_dir: where queues and cursors live.
        fsync: the durability policy (see FsyncPolicy).
        fsync_interval: seconds between fsyncs with ``FsyncPolicy.INTERVAL``.
        limits: protocol frame limits.
        segment_bytes: roll a queue's segment file at this size.
        write_high_water: per-connection write buffer high-water mark.
        slow_consumer_timeout: seconds a connection may stay over it.
        max_inflight_publishes: unconfirmed publishes per connection before
            the broker stops reading from it.
        handshake_timeout: seconds to wait for HELLO.
        heartbeat: seconds between checks for a silent peer: PING after one
            silent interval, HEARTBEAT_TIMEOUT after two in a row (0 disables).
        max_connections: further connections get TOO_MANY_CONNECTIONS.
        cursor_flush: seconds between cursor persists.
        dedup_window: seconds a message_id is remembered.
        shutdown_grace: seconds to drain writes at shutdown, and the longest
            a connection that said BYE is kept for the replies it is owed.
        repair: truncate corrupt logs at the damage instead of refusing them.
        token: when set, HELLO must carry ``{"token": token}``.
        users_file: a users file (see :mod:`broker.users`): each client
            authenticates as one of its users and may do what that user may;
            re-read on SIGHUP. Not with ``token``.
        auth_failure_delay: the first delay before answering a wrong token
            from an address that already sent AUTH_FREE_FAILURES within a
            minute (doubling up to 2 s); 0 answers every failure at once.
        auth_failure_log_interval: a burst of failed authentications (or of
            failed TLS handshakes) from one host logs its first failure, then
            at most one line per this many seconds counting the others (each
            one is at DEBUG).
        retention_bytes: per queue, drop the oldest whole segments while the
            log is larger than this (0 = keep everything).
        retention_age: per queue, drop whole segments whose newest record is
            older than this many seconds, the one being written included
            (sealed first: see broker.retention); 0 = keep everything.
        retention_keep_unacked: never drop a record some durable has not acked.
        retention_check: seconds between retention passes.
        queues: per-queue retention from the ``--config`` file (see
            :class:`QueueRetention`): the keys a queue's section names
            override these flags for that queue, the others are the flags'.
        tls_cert: PEM certificate chain: serve TLS (``tidingss://``) only.
        tls_key: PEM private key of ``tls_cert``.
        tls_client_ca: PEM CA certificates: clients must present a
            certificate signed by one of them (mutual TLS).
        tls_handshake_timeout: seconds a new connection has to finish the
            TLS handshake (a peer that sends none is closed by then).
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: Path = DEFAULT_DATA_DIR
    fsync: FsyncPolicy = FsyncPolicy.ALWAYS
    fsync_interval: float = 1.0
    limits: Limits = field(default_factory=Limits)
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    write_high_water: int = DEFAULT_WRITE_HIGH_WATER
    slow_consumer_timeout: float = DEFAULT_SLOW_CONSUMER_TIMEOUT
    max_inflight_publishes: int = DEFAULT_MAX_INFLIGHT_PUBLISHES
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    heartbeat: float = DEFAULT_HEARTBEAT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    cursor_flush: float = DEFAULT_CURSOR_FLUSH
    dedup_window: float = DEFAULT_DEDUP_WINDOW
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    repair: bool = False
    token: str | None = None
    users_file: Path | None = None
    auth_failure_delay: float = DEFAULT_AUTH_FAILURE_DELAY
    auth_failure_log_interval: float = DEFAULT_AUTH_FAILURE_LOG_INTERVAL
    retention_bytes: int = 0
    retention_age: float = 0.0
    retention_keep_unacked: bool = False
    retention_check: float = 1.0
    queues: Mapping[str, QueueRetention] = field(default_factory=dict)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, not {self.port}")
        if self.fsync_interval <= 0:
            raise ConfigError("fsync interval must be positive")
        if self.segment_bytes < 4096:
            raise ConfigError("segment size must be at least 4096 bytes")
        if self.write_high_water < 1024:
            raise ConfigError("write high-water mark must be at least 1024 bytes")
        for name in (
            "slow_consumer_timeout",
            "handshake_timeout",
            "cursor_flush",
            "shutdown_grace",
            "retention_check",
            "tls_handshake_timeout",
            "dedup_window",
            "auth_failure_log_interval",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', ' ')} must be positive")
        if self.retention_bytes < 0 or self.retention_age < 0:
            raise ConfigError("retention limits must be 0 (off) or positive")
        if self.heartbeat < 0 or self.auth_failure_delay < 0:
            raise ConfigError("heartbeat and auth failure delay must be 0 (off) or positive")
        if self.max_connections < 1 or self.max_inflight_publishes < 1:
            raise ConfigError("connection and in-flight limits must be at least 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("a TLS certificate needs its key, and a key its certificate (--tls-cert, --tls-key)")
        if self.token is not None and self.users_file is not None:
            raise ConfigError("give TIDINGS_TOKEN or --users, not both (a users file can hold an all-rights user)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("client certificates (--tls-client-ca) need TLS: give --tls-cert and --tls-key too")

    @property
    def tls(self) -> bool:
        """Whether the broker serves TLS."""
        return self.tls_cert is not None

    @property
    def retention(self) -> Retention:
        """The flags' retention: every queue's but for the keys its ``queues`` section names."""
        return Retention(self.retention_bytes, self.retention_age, self.retention_keep_unacked)

    def retention_for(self, queue: str) -> Retention:
        """The retention of ``queue``: the keys its ``[queues.NAME]`` section
        names (``queues``), the flags' for the others."""
        own = self.queues.get(queue)
        return self.retention if own is None else own.over(self.retention)

    @property
    def max_message_bytes(self) -> int:
        """Largest stored record body, leaving room in a frame (``RECORD_ROOM``)
        for what goes around and into it at delivery: DELIVER or one-record
        BATCH framing (at most 44 bytes), an ``x-retention-gap`` header (at
        most 62), and, in a dead letter's copy, the ``x-dead-*`` headers (at
        most 378, with 128-character names)."""
        return self.limits.max_frame_size - RECORD_ROOM
