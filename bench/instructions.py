"""Instructions per message of the publish paths, for before/after comparisons.

Wall-clock figures on a shared VM swing by 2x; instruction counts do not
(the same run twice agrees to about 0.2%). This runs one path in-process
with the part to count inside ``functools.reduce``, so that callgrind,
told to count only inside that C function, sees nothing else::

    valgrind --tool=callgrind --toggle-collect=functools_reduce \\
        --callgrind-out-file=/dev/null .venv/bin/python -m bench.instructions broker 40000

It prints nothing itself: read "Collected" from valgrind's output, for two
counts (say 20,000 and 40,000), and divide the difference by the difference
of the counts (the marginal instructions per message). Paths:

* ``broker``: the broker's publish path, ``Session.data_received`` of N
  PUBLISH frames (100-byte payloads) as a socket would deliver them, into a
  real log with ``--fsync never``;
* ``broker-single``: the same, one frame per ``data_received`` (a lone
  publisher at window 1: every read is a batch of one, so what a batch
  costs is paid per message);
* ``client``: the client's publish path at window 1,000 against an in-process
  transport that answers every PUBLISH (``bench.codec``);
* ``client-single``: the same at window 1 (each PUBACK its own read).
"""

from __future__ import annotations

import asyncio
import functools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker import Broker, BrokerConfig
from broker.config import FsyncPolicy
from broker.session import Session
from protocol import PROTOCOL_VERSION, Connection, Hello, Limits, Publish, Role

from .adapters import EVENT
from .check import PayloadMaker
from .codec import CLIENT_WINDOW, _chunks, _client_publish, _pair, _Sink
from .workers import run_async


def measured(fn: Callable[[], Any]) -> None:
    """Run ``fn`` once inside ``functools.reduce`` (callgrind's toggle)."""
    functools.reduce(lambda _a, _b: fn(), [0, 0])


async def _broker(stream: list[bytes], count: int) -> None:
    with tempfile.TemporaryDirectory(prefix="tidings-instructions-") as tmp:
        broker = Broker(BrokerConfig(host="127.0.0.1", port=0, data_dir=Path(tmp), fsync=FsyncPolicy.NEVER))
        broker.store.open()
        session, sink = Session(broker), _Sink()
        session.connection_made(sink)  # type: ignore[arg-type]
        hello = Hello(1, PROTOCOL_VERSION, "bench", None, "bench-producer")
        session.data_received(Connection(Role.CLIENT, limits=Limits()).send(hello))

        def feed() -> None:
            for chunk in stream:
                session.data_received(chunk)

        measured(feed)
        queue = broker.store.get("bench", create=False)
        assert queue is not None and queue.log.next_offset == count, "not every message was stored"
        session.connection_lost(None)
        await broker.store.aclose()


def main(argv: list[str]) -> int:
    paths = ("broker", "broker-single", "client", "client-single")
    if len(argv) != 2 or argv[0] not in paths or not argv[1].isdigit():
        print(f"usage: python -m bench.instructions {'|'.join(paths)} COUNT (under callgrind: see the docstring)")
        return 2
    path, count = argv[0], int(argv[1])
    maker = PayloadMaker(0, 100)
    payloads = [maker.make(i, 0) for i in range(count)]
    if path.startswith("broker"):
        client, _ = _pair()
        frames = [client.send(Publish(i + 2, "bench", EVENT, p)) for i, p in enumerate(payloads)]
        asyncio.run(_broker(frames if path == "broker-single" else _chunks(b"".join(frames)), count))
    else:
        window = 1 if path == "client-single" else CLIENT_WINDOW
        measured(lambda: run_async(_client_publish(payloads, window)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
