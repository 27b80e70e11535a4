"""The tidings async client library.

from client import Client
async with Client("tidings://127.0.0.1:6464", name="api") as c:
    await c.publish("DB", "CREATE", {"id": 7})
"""

from protocol import (
    AuthFailed,
    BadRequest,
    ConfigError,
    ConnectionClosed,
    ConnectionLost,
    ErrorCode,
    InvalidName,
    LocalProtocolError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RequestTimeout,
    ServerError,
    ShuttingDown,
    StorageFull,
    TidingsError,
    TooManyConnections,
)

from .client import DEFAULT_URL, Client, parse_url
from .subscription import Message, Subscription

__all__ = [
    "DEFAULT_URL",
    "AuthFailed",
    "BadRequest",
    "Client",
    "ConfigError",
    "ConnectionClosed",
    "ConnectionLost",
    "ErrorCode",
    "InvalidName",
    "LocalProtocolError",
    "Message",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "RequestTimeout",
    "ServerError",
    "ShuttingDown",
    "StorageFull",
    "Subscription",
    "TidingsError",
    "TooManyConnections",
    "parse_url",
]
