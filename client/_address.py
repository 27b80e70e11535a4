"""Where a client connects: the URL (``tidings://host:port``, ``tidingss://``
for TLS, nothing more), and the errors, with what to try, when it cannot."""

from __future__ import annotations

import ssl
from typing import Final
from urllib.parse import urlsplit

from protocol import ConfigError, ConnectionLost

__all__ = ["CLIENT_CERT_HINT", "DEFAULT_URL", "connect_failed", "parse_url", "tls_hint"]

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


CLIENT_CERT_HINT = (
    "if the broker requires a client certificate: ssl_context.load_cert_chain(CERT, KEY), tidings --tls-cert --tls-key"
)


def connect_failed(host: str, port: int, exc: OSError, tls: ssl.SSLContext | None) -> ConnectionLost:
    """The error for a connection that could not be opened, with what to try."""
    why = exc.strerror or str(exc) or type(exc).__name__
    return ConnectionLost(f"cannot connect to {host}:{port}: {why}{tls_hint(exc, tls)}")


def tls_hint(exc: OSError, tls: ssl.SSLContext | None) -> str:
    """What to try for the TLS errors a wrong URL, a private CA or a missing
    client certificate cause."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            " (for a private CA: Client(..., ssl_context=ssl.create_default_context(cafile=CA)), tidings --tls-ca CA)"
        )
    if isinstance(exc, ssl.SSLError) and exc.reason == "WRONG_VERSION_NUMBER":
        return " (the broker does not speak TLS there: use tidings://)"
    if tls is not None and isinstance(exc, (ssl.SSLError, ConnectionResetError)):
        return f" ({CLIENT_CERT_HINT})"
    return ""
