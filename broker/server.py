"""The broker: listening socket, sessions, status, orderly shutdown.

    broker = Broker(BrokerConfig(port=0, data_dir=tmp))
    await broker.start()          # returns once the socket listens
    host, port = broker.address
    ...
    await broker.aclose()

Shutdown order (uvicorn's, adapted; ``Server.close_clients()`` is not used
because uvloop and Python < 3.13 lack it, so sessions are tracked here):

1. stop accepting;
2. stop reading from every session (no new requests);
3. sync every queue and confirm what was stored; persist cursors;
4. send ERR SHUTTING_DOWN (req 0) to every session and close it once its buffer drains, bounded
   by ``shutdown_grace``; abort the stragglers;
5. close the files.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final

from protocol import ConfigError, ErrorCode
from protocol.wording import many

from .auth import AuthFailures
from .config import BrokerConfig
from .session import Session
from .status import status_page
from .store import Store
from .tls import ServerTls
from .users import Users, load_users

__all__ = ["Broker"]

logger = logging.getLogger(__name__)

#: ``extra`` of the log lines that ``tidings-broker`` writes whatever its
#: ``--log-level`` (see ``broker.__main__``): ``listening on HOST:PORT``, the
#: sign that the broker is ready and, with ``--port 0``, the only place that
#: says its port (PostgreSQL's "listening on" is likewise a LOG line, which
#: its default threshold, WARNING, keeps).
ALWAYS_LOGGED_KEY: Final = "always_logged"
ALWAYS_LOGGED: Final = {ALWAYS_LOGGED_KEY: True}

#: ``Client(reconnect_deadline=...)``'s default: how long after a lost connection it may resend a publish.
CLIENT_RECONNECT_DEADLINE: Final = 60.0


def package_version() -> str:
    """The installed tidings distribution's version: STATUS, WELCOME and ``--version`` say it."""
    try:
        return version("tidings")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


class Broker:
    """A tidings broker bound to one address and one data directory.

    Args:
        config: the configuration.
        on_fatal: called with a reason when storage fails; the daemon exits
            non-zero from it. Default: log and keep refusing publishes.
    """

    def __init__(self, config: BrokerConfig, *, on_fatal: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.version = package_version()
        self.store = Store(config, self._storage_failed)
        self.sessions: set[Session] = set()
        self.started = time.time()
        self._on_fatal = on_fatal
        #: The frame limits served: the configured ones, or a larger frame limit
        #: that stored records need (see Store.frame_limit); set by start().
        self.limits = config.limits
        self._server: asyncio.Server | None = None
        self._next_id = 0
        self._closed = asyncio.Event()
        self._idle = asyncio.Event()  # set when the last session is gone
        self._closing = False
        #: The users file's users (None without ``--users``); replaced by :meth:`reload_users`.
        self.users: Users | None = None
        #: Failed authentications per host: the delay before each AUTH_FAILED, and their log.
        self.auth_failures = AuthFailures(config)
        #: The TLS context and the files behind it (None without TLS); set by start(),
        #: reloaded by :meth:`reload`.
        self.tls: ServerTls | None = None

    def __repr__(self) -> str:
        return f"<Broker {self.config.host}:{self.config.port} connections={len(self.sessions)}>"

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound; the port is the OS's pick when 0 was asked."""
        assert self._server is not None, "start() first"
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def start(self) -> None:
        """Recover the data directory and start listening.

        Raises:
            OSError: the address cannot be bound, or the data directory not
                created, or another broker uses it (``DataDirInUse``).
            ConfigError: the TLS files or the users file cannot be used.
        """
        if self.config.dedup_window < CLIENT_RECONNECT_DEADLINE:
            logger.warning("--dedup-window %gs is shorter than the clients' default reconnect deadline (%gs): a "
                           "publish a client resends after a longer outage may be stored twice",
                           self.config.dedup_window, CLIENT_RECONNECT_DEADLINE)  # fmt: skip
        # The TLS files' errors first: before any file is touched.
        self.tls = tls = ServerTls(self.config) if self.config.tls else None
        if self.config.users_file is not None:
            self.users = load_users(self.config.users_file)
            logger.info("%s from %s", many(len(self.users), "user"), self.config.users_file)
            if (exposed := self.users.exposed()) is not None:
                logger.warning("%s", exposed)
        # Bound first (not yet serving), so that a port in use is said at once,
        # not after reading back a large data directory.
        loop = asyncio.get_running_loop()
        # With TLS the port listens in plain TCP and ServerTls shakes hands with
        # each connection itself, so that a failed handshake reaches the log.
        self._server = server = await loop.create_server(
            (lambda: Session(self)) if tls is None else tls.listener(lambda: Session(self)),
            self.config.host,
            self.config.port,
            backlog=4096,  # somaxconn here is 4096; asyncio's default 100 drops bursts
            reuse_address=True,
            start_serving=False,
        )
        try:
            self.store.open()
            try:
                frame_limit = self.store.frame_limit(self.config.limits.max_frame_size)
                self.limits = replace(self.config.limits, max_frame_size=frame_limit)
                self.store.start()
                await server.start_serving()
            except BaseException:
                await self.store.aclose()  # (its files and the data directory's lock)
                raise
        except BaseException:
            server.close()
            self._server = None
            raise
        host, port = self.address
        mtls = ", client certificates required" if self.config.tls_client_ca is not None else ""
        logger.info("listening on %s:%d%s", host, port, f" (TLS{mtls})" if tls is not None else "", extra=ALWAYS_LOGGED)

    async def serve_forever(self) -> None:
        """Wait until :meth:`aclose` has finished."""
        await self._closed.wait()

    @property
    def closing(self) -> bool:
        """Whether :meth:`aclose` has begun: sessions then stop handing out messages
        (the store closes the logs before the last sessions are gone)."""
        return self._closing

    # --- sessions -----------------------------------------------------------

    def next_conn_id(self) -> int:
        """A fresh connection id."""
        self._next_id += 1
        return self._next_id

    def register(self, session: Session) -> bool:
        """Track a new session. Returns False when over the connection limit."""
        if self._closing or len(self.sessions) >= self.config.max_connections:
            return False
        self.sessions.add(session)
        return True

    def reload(self) -> bool:
        """What SIGHUP does: read the users file and the TLS files again.

        Each is reloaded on its own (see :meth:`reload_users` and
        :meth:`broker.tls.ServerTls.reload`): files that cannot be used leave
        what they would replace in force, and the other still reloads.

        Returns:
            Whether everything there was to reload was loaded.
        """
        if self.config.users_file is None and self.tls is None:
            logger.warning("nothing to reload: no --users file and no TLS")
            return False
        users = self.config.users_file is None or self.reload_users()
        tls = self.tls is None or self.tls.reload()
        return users and tls

    def reload_users(self) -> bool:
        """Read the users file again (the daemon does on SIGHUP).

        New connections authenticate against the new users at once. Of the
        connections already open, those whose user is gone, or no longer has
        the token the connection presented (another of its tokens may stay:
        see soft rotation in :mod:`broker.users`), are closed with
        AUTH_FAILED (so the client stops: its token is no longer good);
        those of a user whose rights no longer cover
        what the connection is consuming (a queue it subscribed to or fetched
        from, or a dead-letter queue its subscriptions may write) are closed
        with PERMISSIONS_CHANGED, so the client reconnects and resubscribes,
        and what is no longer allowed is refused then; the others carry on
        under the new rights, which their next requests meet. A file that
        cannot be used changes nothing.

        Returns:
            Whether the file was loaded.
        """
        path = self.config.users_file
        if path is None:
            logger.warning("no --users file to reload")
            return False
        try:
            users = load_users(path)
        except ConfigError as exc:
            logger.error("users not reloaded, the old ones stay in force: %s", exc)
            return False
        self.users = users
        if (exposed := users.exposed()) is not None:
            logger.warning("%s", exposed)
        revoked = narrowed = 0
        for session in list(self.sessions):
            old = session.user
            if old is None:
                continue
            # By the token it presented, so that a user's other tokens may go
            # (soft rotation); a token now given to another user goes too.
            new = users.login(old.token_hash)
            if new is None or new.name != old.name:
                gone = "was removed" if old.name not in users.by_name else "no longer has this connection's token"
                session.fatal(ErrorCode.AUTH_FAILED, f"user {old.name!r} {gone}")
                revoked += 1
            elif new.keeps_rights_of(old) or session.consumes_within(new):
                session.user = new  # its next requests are checked against the new rights
            else:
                session.fatal(ErrorCode.PERMISSIONS_CHANGED, f"the rights of user {old.name!r} changed; reconnect")
                narrowed += 1
        logger.info(
            "users reloaded from %s (%s); connections closed: %d of removed users or tokens, %d with narrowed rights",
            path, many(len(users), "user"), revoked, narrowed,
        )  # fmt: skip
        return True

    def unregister(self, session: Session) -> None:
        """Forget a closed session."""
        self.sessions.discard(session)
        if not self.sessions:
            self._idle.set()

    def _storage_failed(self, reason: str) -> None:
        # Publishes written but not yet synced may or may not be on disk: an ERR
        # would claim they are not. Their clients see the connection drop
        # instead (outcome unknown; retried safely with a message_id).
        for queue in self.store.queues.values():
            queue.fail_pending(lambda confirmer, acks: None)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.abort()
        if self._on_fatal is not None:
            self._on_fatal(reason)

    # --- status -------------------------------------------------------------

    def status(self, page: dict[str, Any] | None = None) -> dict[str, Any]:
        """One STATUS page: server, connections, queues, durables (see :mod:`broker.status`).

        Raises:
            StatusPageError: ``page`` is not a ``more`` this broker handed out.
        """
        return status_page(self, page, self.limits.max_frame_size)

    # --- shutdown -----------------------------------------------------------

    async def aclose(self) -> None:
        """Stop gracefully (see the module docstring). Safe to call twice."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        logger.info("shutting down: %s", many(len(self.sessions), "connection"))
        if self._server is not None:
            self._server.close()
        if self.tls is not None:
            await self.tls.aclose()  # (the handshakes under way: they would make sessions)
        for session in list(self.sessions):
            if session.transport is not None and not session.closed:
                session.transport.pause_reading()
        await self.store.aclose()
        grace = self.config.shutdown_grace
        for session in list(self.sessions):
            if not session.closed:
                session.write(session.conn.send_error(0, ErrorCode.SHUTTING_DOWN, "broker is shutting down"))
                session.close(abort_after=grace)
        if self.sessions:
            self._idle.clear()
            try:
                async with asyncio.timeout(grace + 0.5):
                    await self._idle.wait()
            except TimeoutError:
                pass
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
        self.auth_failures.close()  # (the failures it has not written a count of yet)
        self._closed.set()
        logger.info("stopped")
