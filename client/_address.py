"""Where a client connects: the URL (``tidings://host:port``, ``tidingss://``
for TLS, nothing more), and the errors, with what to try, when it cannot."""

from __future__ import annotations

import ssl
from typing import Final
from urllib.parse import urlsplit

from protocol import ConfigError, ConnectionLost

__all__ = ["DEFAULT_URL", "ClientCert", "connect_failed", "parse_url", "refused_handshake_hint", "tls_hint"]

DEFAULT_URL: Final = "tidings://127.0.0.1:6464"


def parse_url(url: str) -> tuple[str, int, bool]:
    """Split ``tidings://host:port`` (or ``tidingss://`` for TLS).

    Nothing else may be in it: a user or token (``tidings://s3cret@host``),
    a path, a query or a fragment would otherwise be ignored without a word,
    and the connection made without the credentials the caller meant to give
    (they go in ``token=``).

    Returns:
        ``(host, port, tls)``.

    Raises:
        ConfigError: not a tidings URL, or one with more in it (the error
            never repeats what came before an ``@``).
    """
    parts = urlsplit(url)
    _userinfo, at, hostport = parts.netloc.rpartition("@")
    shown = url.replace(parts.netloc, f"***@{hostport}", 1) if at else url  # never print a token back
    if parts.scheme not in ("tidings", "tidingss"):
        raise ConfigError(f"unsupported URL {shown!r}: use tidings://host:port or tidingss://host:port")
    if at:
        raise ConfigError(
            f"URL {shown!r} has a user or token before '@': give the token with token= "
            "(tidings: --token or $TIDINGS_TOKEN); the URL is tidings://host:port"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"URL {url!r} has more than tidings://host:port (a path, a query or a fragment)")
    try:
        port = parts.port or 6464
    except ValueError as exc:
        raise ConfigError(f"bad port in URL {url!r}") from exc
    return parts.hostname or "127.0.0.1", port, parts.scheme == "tidingss"


#: What a client presents as its certificate, as far as it knows: the
#: certificate's file (or other words naming it), True (one), False (none),
#: None (not known: the caller's ``ssl_context`` may hold one).
ClientCert = str | bool | None


def refused_handshake_hint(client_cert: ClientCert) -> str:
    """What to try when a TLS broker closed the connection before answering
    HELLO: most likely it refused the client certificate, or the lack of one
    (it does not say which to the client; its log does).

    Args:
        client_cert: what the client presents (see :data:`ClientCert`).
    """
    check = "check that it is signed by the broker's --tls-client-ca and has not expired (the broker's log says why)"
    give = "ssl_context.load_cert_chain(CERT, KEY), tidings --tls-cert CERT --tls-key KEY"
    if client_cert is False:
        return f"if the broker requires a client certificate (--tls-client-ca), give one: {give}"
    if client_cert is None:
        return (
            "if the broker requires a client certificate (--tls-client-ca), give one: "
            f"ssl_context.load_cert_chain(CERT, KEY); if ssl_context has one, the broker most likely refused it: {check}"
        )
    named = "the client certificate" if client_cert is True else f"the client certificate {client_cert}"
    return f"the broker refused the TLS handshake, most likely {named}: {check}"


def connect_failed(
    host: str, port: int, exc: OSError, tls: ssl.SSLContext | None, client_cert: ClientCert = None
) -> ConnectionLost:
    """The error for a connection that could not be opened, with what to try.

    Args:
        host: the broker's host.
        port: the broker's port.
        exc: why it could not be opened.
        tls: the TLS context, or None for plain TCP.
        client_cert: what ``tls`` presents as client certificate (see :data:`ClientCert`).
    """
    why = exc.strerror or str(exc)
    if not why and tls is not None and isinstance(exc, ConnectionResetError):
        why = "the broker closed the connection during the TLS handshake"  # (asyncio's error says nothing)
    return ConnectionLost(
        f"cannot connect to {host}:{port}: {why or type(exc).__name__}{tls_hint(exc, tls, client_cert)}"
    )


def tls_hint(exc: OSError, tls: ssl.SSLContext | None, client_cert: ClientCert = None) -> str:
    """What to try for the TLS errors a wrong URL, a private CA or a refused
    (or missing) client certificate cause: `` (...)``, or "" for others.

    Args:
        exc: the error.
        tls: the TLS context, or None for plain TCP.
        client_cert: what ``tls`` presents as client certificate (see :data:`ClientCert`).
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            " (for a private CA: Client(..., ssl_context=ssl.create_default_context(cafile=CA)), tidings --tls-ca CA)"
        )
    if isinstance(exc, ssl.SSLError) and exc.reason == "WRONG_VERSION_NUMBER":
        return " (the broker does not speak TLS there: use tidings://)"
    if tls is not None and isinstance(exc, (ssl.SSLError, ConnectionResetError)):
        return f" ({refused_handshake_hint(client_cert)})"
    return ""
