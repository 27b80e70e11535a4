"""The broker's TLS: its context, new certificate files on SIGHUP, and each
handshake that fails, in the log with why.

A certificate is renewed while the broker runs (a short-lived one every few
weeks), so SIGHUP reads ``--tls-cert``, ``--tls-key`` and ``--tls-client-ca``
again into a whole new context, checked before it is used: handshakes from
then on get it, connections already open keep the certificate they were
made with (each one's ``ssl.SSLObject`` holds its own reference to what it
uses), and files that cannot be used change nothing. (Loading new files into
the context in use would not be atomic: ``load_cert_chain`` installs the
certificate before it checks the key, so a key that does not match would
leave the new certificate beside the old key, and every later handshake
failing.)

Failed handshakes. ``create_server(ssl=ctx)`` tells nobody when a handshake
fails: asyncio and uvloop close the connection, and say so only in debug
mode, at DEBUG; an operator whose clients' certificates were refused saw
nothing at all. So the TLS port listens in plain TCP, and each accepted
connection's socket is handed to ``loop.connect_accepted_socket(ssl=...)``
in a task (:meth:`ServerTls.accept`), which raises the handshake's error to
us (and takes the newest context, which is how a reload reaches new
connections). :func:`refusal` puts the error in plain words, and a
:class:`broker.failures.FailureLog` logs it per host in bursts, as failed
authentications are, so that 10,000 bad handshakes make a handful of
lines. Two details:

* The socket is a duplicate, taken in ``connection_made`` before the plain
  transport is aborted: uvloop starts reading right after
  ``connection_made`` whatever it does (``pause_reading`` there is
  ignored), so a plain transport kept while the TLS one is set up could eat
  the ClientHello. The duplicate keeps the connection open (closing one of
  two descriptors sends nothing), and nothing reads from it until the TLS
  transport does.
* Whether the ClientHello arrived tells a client that closed the
  connection because it refused the broker's certificate (worth a line)
  from a port probe that connected and left (not worth one). OpenSSL calls
  ``sni_callback`` once it has read the ClientHello, in every handshake,
  whether or not the client named a server; the callback finds the attempt
  through a context variable set in the handshake's task, whose context the
  transport's callbacks run in (asyncio and uvloop both copy it).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

from protocol import ConfigError

from .config import AUTH_FAILURE_HOSTS, AUTH_FAILURE_WINDOW, BrokerConfig
from .failures import FailureLog

if TYPE_CHECKING:
    from .session import Session

__all__ = ["ServerTls", "refusal", "tls_context"]

logger = logging.getLogger(__name__)


def tls_context(config: BrokerConfig) -> ssl.SSLContext | None:
    """The server's TLS context (TLS 1.2 and later), or None without ``tls_cert``.

    Raises:
        ConfigError: a certificate, key or CA file cannot be read or used
            (the message names the file and says why).
    """
    if config.tls_cert is None or config.tls_key is None:
        return None
    # ssl's errors for a missing file name no file ("[Errno 2] No such file or
    # directory"): open each one first, to say which.
    for what, path in (("certificate", config.tls_cert), ("key", config.tls_key), ("client CA", config.tls_client_ca)):
        if path is not None:
            try:
                with open(path, "rb") as f:
                    pem = f.read()
            except OSError as exc:
                raise ConfigError(f"cannot read the TLS {what} file {path}: {exc.strerror or exc}") from exc
            # OpenSSL says "[SSL] PEM lib" for any of these, naming neither file nor fault.
            if (problem := _pem_problem(pem, what)) is not None:
                raise ConfigError(f"cannot use the TLS {what} file {path}: {problem}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use TLS certificate {config.tls_cert} with key {config.tls_key}: {exc}") from exc
    if config.tls_client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=config.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot use client CA file {config.tls_client_ca}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _pem_problem(pem: bytes, what: str) -> str | None:
    """What is wrong with a PEM file's blocks at a glance (not their contents), or None."""
    label = b"PRIVATE KEY-----" if what == "key" else b"CERTIFICATE-----"
    begin, end = pem.find(b"-----BEGIN "), pem.rfind(b"-----END ")
    if begin < 0 or label not in pem[begin:]:
        kind = "private key" if what == "key" else "certificate"
        return f"no PEM {kind} in it (a '-----BEGIN ...{label.decode()}' block)"
    if end < begin:
        return "its PEM block has no '-----END' line: the file is cut short"
    return None


class _Attempt:
    """One TLS handshake under way: the connection's session-to-be and what is known of it."""

    __slots__ = ("hello", "host", "peer", "session", "sock")

    def __init__(self, session: Session, sock: socket.socket, host: str, peer: str) -> None:
        self.session = session
        #: The accepted socket until the handshake's task takes it (then None):
        #: whoever holds it closes it.
        self.sock: socket.socket | None = sock
        self.host = host
        self.peer = peer
        #: Whether the client's ClientHello was read (see the module docstring).
        self.hello = False


#: The attempt whose handshake runs in this context (see the module docstring).
_ATTEMPT: Final = contextvars.ContextVar[_Attempt]("tidings_tls_attempt")


class ServerTls:
    """The broker's TLS: the context of new handshakes, the handshakes under way, their failures.

    Args:
        config: the broker's configuration, with ``tls_cert`` and ``tls_key``.

    Raises:
        ConfigError: the files cannot be read or used (see :func:`tls_context`).
    """

    def __init__(self, config: BrokerConfig) -> None:
        self._config = config
        #: What new handshakes use: replaced by :meth:`reload`.
        self.current = self._checked_context()
        #: The handshakes under way (each a task), and what is known of each.
        self._attempts: dict[asyncio.Task[None], _Attempt] = {}
        #: Failed handshakes per host, in the log (the same intervals as failed authentications).
        self.failures = FailureLog(
            logger, failed="TLS handshake failed", noun="failed TLS handshake",
            interval=config.auth_failure_log_interval, hosts=AUTH_FAILURE_HOSTS, window=AUTH_FAILURE_WINDOW,
        )  # fmt: skip

    def __len__(self) -> int:
        """The handshakes under way."""
        return len(self._attempts)

    def __repr__(self) -> str:
        return f"<ServerTls {self._config.tls_cert} handshakes={len(self._attempts)}>"

    def _checked_context(self) -> ssl.SSLContext:
        ctx = tls_context(self._config)
        if ctx is None:
            raise ConfigError("TLS needs a certificate and its key (--tls-cert, --tls-key)")
        ctx.sni_callback = _hello_read
        return ctx

    def reload(self) -> bool:
        """Read the certificate, key and client CA files again.

        On success, handshakes from now on use them and an INFO line says so;
        otherwise an ERROR names the file and the reason, and the certificate
        in force stays. Connections already open are never touched.

        Returns:
            Whether the files were loaded.
        """
        try:
            self.current = self._checked_context()
        except ConfigError as exc:
            logger.error("TLS files not reloaded, the certificate in force stays: %s", exc)
            return False
        ca = f" and client CA {self._config.tls_client_ca}" if self._config.tls_client_ca is not None else ""
        logger.info(
            "TLS certificate %s, key %s%s reloaded: new connections use them, open ones keep theirs",
            self._config.tls_cert, self._config.tls_key, ca,
        )  # fmt: skip
        return True

    def listener(self, new_session: Callable[[], Session]) -> Callable[[], asyncio.Protocol]:
        """The protocol factory of the TLS port (plain TCP): each connection it
        accepts goes to :meth:`accept`, with a session from ``new_session``."""
        return lambda: _Accepted(self, new_session)

    def accept(self, transport: asyncio.Transport, session: Session) -> None:
        """Take a connection accepted in plain TCP and start its handshake in a
        task; the session gets the connection once the handshake succeeds, a
        failure is logged (see the module docstring).

        Args:
            transport: the plain transport, in its ``connection_made``: aborted here.
            session: the connection's session-to-be (its id names the connection in the log).
        """
        peername = transport.get_extra_info("peername")
        host, peer = (peername[0], f"{peername[0]}:{peername[1]}") if isinstance(peername, tuple) else ("?", "?")
        raw = transport.get_extra_info("socket")
        try:
            if raw is None:
                raise OSError("the connection has no socket")
            sock = socket.socket(fileno=os.dup(raw.fileno()))
        except OSError as exc:  # (out of descriptors: EMFILE)
            transport.abort()
            logger.warning("conn %d %s: dropped: %s", session.conn_id, peer, exc.strerror or exc)
            return
        transport.abort()  # (its descriptor only: the duplicate keeps the connection)
        attempt = _Attempt(session, sock, host, peer)
        task = asyncio.get_running_loop().create_task(self._handshake(attempt))
        self._attempts[task] = attempt
        task.add_done_callback(self._attempts.pop)

    async def _handshake(self, attempt: _Attempt) -> None:
        sock, attempt.sock = attempt.sock, None
        assert sock is not None
        _ATTEMPT.set(attempt)  # (this task's context: the transport's callbacks run in a copy)
        session = attempt.session
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: session, sock, ssl=self.current, ssl_handshake_timeout=self._config.tls_handshake_timeout
            )
        except OSError as exc:  # (ssl.SSLError, ConnectionError and TimeoutError are OSErrors)
            why = refusal(exc, hello=attempt.hello, config=self._config)
            if why is None:
                logger.debug("conn %d %s: closed before its TLS handshake began", session.conn_id, attempt.peer)
            else:
                self.failures.failed(attempt.host, session.conn_id, attempt.peer, why)
        except Exception:  # a bug: this connection is lost, the broker goes on
            logger.exception("conn %d %s: TLS handshake", session.conn_id, attempt.peer)

    async def aclose(self) -> None:
        """Abandon the handshakes under way and write the counts of failures
        still owed (the broker is stopping; its port is closed)."""
        for task, attempt in list(self._attempts.items()):
            task.cancel()
            if attempt.sock is not None:  # (its task never ran)
                attempt.sock.close()
                attempt.sock = None
        await asyncio.gather(*self._attempts, return_exceptions=True)
        self.failures.close()


class _Accepted(asyncio.Protocol):
    """A connection just accepted on the TLS port: handed to :meth:`ServerTls.accept` at once."""

    def __init__(self, tls: ServerTls, new_session: Callable[[], Session]) -> None:
        self._tls = tls
        self._new_session = new_session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self._tls.accept(cast(asyncio.Transport, transport), self._new_session())


def _hello_read(conn: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
    """Every context's ``sni_callback``: the attempt under way read its ClientHello."""
    attempt = _ATTEMPT.get(None)
    if attempt is not None:
        attempt.hello = True


# --- why a handshake failed, in plain words --------------------------------------------

#: OpenSSL's X509_V_ERR_* codes (``SSLCertVerificationError.verify_code``)
#: that mean the client certificate's issuer is not among the trusted CAs.
_NOT_SIGNED: Final = frozenset({2, 7, 18, 19, 20, 21, 27})
_EXPIRED: Final = 10
_NOT_YET_VALID: Final = 9
_INVALID_PURPOSE: Final = 26
#: OpenSSL's reasons for bytes that are no TLS record at all.
_NOT_TLS: Final = frozenset({"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG"})
#: The alerts a client sends when it does not accept the broker's certificate.
_CERTIFICATE_ALERTS: Final = frozenset(
    {"UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "CERTIFICATE_EXPIRED", "UNSUPPORTED_CERTIFICATE",
     "CERTIFICATE_REVOKED"}
)  # fmt: skip
_GIVE_CA: Final = "give it the CA that signed the certificate (tidings --tls-ca)"


def refusal(exc: OSError, *, hello: bool, config: BrokerConfig) -> str | None:
    """Why a TLS handshake failed, in plain words for the broker's log.

    Args:
        exc: what the handshake raised.
        hello: whether the client's ClientHello had been read.
        config: the broker's configuration (the CA file and the timeout are named).

    Returns:
        The reason, or None for a peer that closed the connection before
        sending a ClientHello (a port probe: not worth an INFO line).
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, said = exc.verify_code, exc.verify_message
        if code in _NOT_SIGNED:
            return f"client certificate not signed by --tls-client-ca (CA file {config.tls_client_ca}): {said}"
        if code == _EXPIRED:
            return "client certificate expired"
        if code == _NOT_YET_VALID:
            return "client certificate not valid yet (is a clock wrong?)"
        if code == _INVALID_PURPOSE:
            return "client certificate not for client authentication (its extendedKeyUsage)"
        return f"client certificate refused: {said}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no client certificate, which --tls-client-ca requires"
        if reason in _NOT_TLS:
            return "not TLS (a plain tidings:// client?)"
        if reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST"):
            return "not TLS: an HTTP request"
        if reason == "UNSUPPORTED_PROTOCOL":
            return "the client offers only TLS versions older than 1.2"
        if reason == "NO_SHARED_CIPHER":
            return "no cipher suite in common with the client"
        if "_ALERT_" in reason:
            alert = reason.partition("_ALERT_")[2]
            words = alert.lower().replace("_", " ").replace(" ca", " CA")
            if alert in _CERTIFICATE_ALERTS:
                return f"the client refused the broker's certificate (its alert: {words}): {_GIVE_CA}"
            return f"the client ended the handshake (its alert: {words})"
        return f"TLS error: {reason or exc}"
    timeout = config.tls_handshake_timeout
    if isinstance(exc, ConnectionAbortedError) and exc.errno is None:  # (the loop's handshake timeout)
        if hello:
            return f"handshake timeout: not finished within {timeout:g} s"
        return f"handshake timeout: no TLS ClientHello within {timeout:g} s"
    if isinstance(exc, ConnectionError):  # closed or reset by the client
        if not hello:
            return None
        return (
            "the client closed the connection during the handshake, as one that does not trust the broker's "
            f"certificate does: {_GIVE_CA}"
        )
    return exc.strerror or str(exc) or type(exc).__name__
