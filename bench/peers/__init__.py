"""Optional peers: the brokers a user would pick instead, driven by their stock Python clients.

Each peer is a :class:`~bench.scenarios.Target` (how to start its server on
loopback with data in a temporary folder, stopped by pid) plus an
:class:`~bench.adapters.Adapter` (its client). A peer whose server binary or
client library is missing is skipped with a message saying what to install
(``make bench-peers`` installs them: Debian packages redis-server,
nats-server, rabbitmq-server; pip packages redis, nats-py, aio-pika).

| peer | durability it runs with |
|---|---|
| ``redis-always`` | Redis Streams, AOF ``appendfsync always`` (fsync before reply) |
| ``redis-everysec`` | Redis Streams, AOF ``appendfsync everysec`` (confirms before fsync) |
| ``nats`` | NATS JetStream, file storage (confirms before fsync; the server syncs periodically) |
| ``rabbitmq`` | RabbitMQ quorum queue, publisher confirms (fsync before confirm) |
"""

from __future__ import annotations

import importlib
import shutil
from typing import Any

from ..scenarios import Options, Target

#: kind -> (module, server binary, client module, pip package, Debian package, variant options)
PEERS: dict[str, tuple[str, str, str, str, str, dict[str, Any]]] = {
    "redis-always": ("redis_streams", "redis-server", "redis", "redis", "redis-server", {"appendfsync": "always"}),
    "redis-everysec": ("redis_streams", "redis-server", "redis", "redis", "redis-server", {"appendfsync": "everysec"}),
    "nats": ("nats_js", "nats-server", "nats", "nats-py", "nats-server", {}),
    "rabbitmq": ("rabbitmq", "rabbitmq-server", "aio_pika", "aio-pika", "rabbitmq-server", {}),
}


def _binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/lib/rabbitmq/bin:/usr/local/sbin")


def missing(kind: str) -> str | None:
    """Why the peer cannot run here, or None."""
    module, binary, client, pip_name, deb, _ = PEERS[kind]
    why = []
    if _binary(binary) is None:
        why.append(f"no {binary} binary (apt-get install {deb})")
    try:
        importlib.import_module(client)
    except ImportError:
        why.append(f"no {client} client library (pip install {pip_name})")
    try:
        importlib.import_module(f"{__name__}.{module}")
    except ImportError as exc:
        why.append(f"adapter not importable: {exc}")
    return "; ".join(why) or None


def describe() -> list[str]:
    return [f"peer {kind}: " + (f"skipped: {why}" if (why := missing(kind)) else "available") for kind in PEERS]


def targets(opts: Options, only: list[str] | None = None) -> list[Target]:
    out = []
    for kind, (module, binary, *_rest, variant) in PEERS.items():
        if (not only or kind in only) and missing(kind) is None:
            mod = importlib.import_module(f"{__name__}.{module}")
            out.append(mod.PeerTarget(opts, kind, _binary(binary), **variant))
    return out


def adapter_class(kind: str) -> Any:
    module = PEERS[kind][0]
    return importlib.import_module(f"{__name__}.{module}").PeerAdapter
