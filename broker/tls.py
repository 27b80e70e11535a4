"""The broker's TLS: its server context, and new certificate files on SIGHUP.

A certificate is renewed while the broker runs (a short-lived one every few
weeks), so SIGHUP reads ``--tls-cert``, ``--tls-key`` and ``--tls-client-ca``
again: new handshakes get the new files, connections already open keep the
certificate they were made with (each one's ``ssl.SSLObject`` holds its own
reference to what it uses), and files that cannot be used change nothing.

Why the swap goes through ``sni_callback``: ``loop.create_server(ssl=ctx)``
keeps ``ctx`` for the server's life, and neither asyncio nor uvloop offers a
public way to hand it another. Loading the new files into that same context
is not atomic either: ``load_cert_chain`` installs the certificate before it
checks the key, so a key that does not match would leave the new certificate
beside the old key, and every later handshake failing. So the server keeps
its first context (the *front*), whose ``sni_callback``, which OpenSSL calls
in every handshake once it has read the ClientHello, whether or not the
client named a server, points the connection at the newest context
(``SSLObject.context = ...``, as the ``ssl`` docs suggest for SNI). Each
reload builds a whole new context, checked before it is used.

What comes from which context: OpenSSL has chosen the protocol version and
the verify mode from the front before the callback runs; the certificate,
its key and the store client certificates are verified against come from
the newest. A reload cannot change the former (the same options build both
contexts), so that split is invisible.
"""

from __future__ import annotations

import logging
import ssl

from protocol import ConfigError

from .config import BrokerConfig

__all__ = ["ServerTls", "tls_context"]

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


class ServerTls:
    """The context a TLS listener is created with, and the newest files behind it.

    Args:
        config: the broker's configuration, with ``tls_cert`` and ``tls_key``.

    Raises:
        ConfigError: the files cannot be read or used (see :func:`tls_context`).
    """

    def __init__(self, config: BrokerConfig) -> None:
        front = tls_context(config)
        if front is None:
            raise ConfigError("TLS needs a certificate and its key (--tls-cert, --tls-key)")
        self._config = config
        #: What the listener holds for its whole life: give it to ``create_server``.
        self.context = front
        #: What new handshakes use: the front until a reload replaces it.
        self.current = front
        front.sni_callback = self._switch

    def __repr__(self) -> str:
        return f"<ServerTls {self._config.tls_cert} reloaded={self.current is not self.context}>"

    def reload(self) -> bool:
        """Read the certificate, key and client CA files again.

        On success, handshakes from now on use them and an INFO line says so;
        otherwise an ERROR names the file and the reason, and the certificate
        in force stays. Connections already open are never touched.

        Returns:
            Whether the files were loaded.
        """
        try:
            new = tls_context(self._config)
        except ConfigError as exc:
            logger.error("TLS files not reloaded, the certificate in force stays: %s", exc)
            return False
        assert new is not None  # (ServerTls exists only with a certificate and a key)
        self.current = new
        ca = f" and client CA {self._config.tls_client_ca}" if self._config.tls_client_ca is not None else ""
        logger.info(
            "TLS certificate %s, key %s%s reloaded: new connections use them, open ones keep theirs",
            self._config.tls_cert, self._config.tls_key, ca,
        )  # fmt: skip
        return True

    def _switch(self, conn: ssl.SSLObject, server_name: str | None, front: ssl.SSLContext) -> None:
        """The front's ``sni_callback``: hand this handshake the newest context."""
        if self.current is not front:
            conn.context = self.current
