"""The tidings async client library.

from client import Client
async with Client("tidings://127.0.0.1:6464", name="api") as c:
    await c.publish("DB", "CREATE", {"id": 7})
"""

import logging

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

# A library logs, the application decides where it goes: without this, Python's
# last-resort handler printed every WARNING (a lost connection, AUTH_FAILED,
# which is also raised) on stderr of an application that configured no logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())

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
