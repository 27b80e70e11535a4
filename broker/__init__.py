"""The tidings broker daemon: storage, routing, sessions, the ``tidings-broker`` command."""

from .config import BrokerConfig, FsyncPolicy
from .server import Broker

__all__ = ["Broker", "BrokerConfig", "FsyncPolicy"]
