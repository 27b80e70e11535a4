"""The ``codec`` scenario: frames <-> bytes in this process, no sockets.

Four measurements, each over ``count`` messages carrying checked payloads:

* ``publish-encode``: the client's ``Connection.send(Publish(...))``;
* ``publish-decode``: the broker's ``Connection.receive_data`` + ``events()``
  over the whole stream fed in 256 KiB chunks (as a socket would);
* ``deliver-encode``: the broker's hot path, ``encode_deliver`` around a
  stored record body (``encode_record`` once per message, as on publish);
* ``deliver-decode``: the client's ``Connection`` decoding DELIVER frames;
* ``client-publish``: the client's whole publish path without a socket or
  broker: a real ``Client`` whose writer answers every PUBLISH with a
  PUBACK (fixed-width, as the broker writes them) on the next loop turn,
  driven by ``window`` concurrent ``publish`` calls like the bench's
  publisher. Its CPU time per message is the client's own cost of a
  publish (encode, bookkeeping, PUBACK decode, future and coroutine
  resume), minus the syscalls; the fake broker's frame walk is counted in
  it too (about 0.1 us).
* ``broker-publish``: the broker's whole publish path without a socket: a
  real ``Broker`` (``--fsync never``, temporary data dir) and one ``Session``
  fed the PUBLISH stream in 256 KiB chunks: decode, checks, append to the
  log, PUBACKs written to a sink. Its CPU time per message is the broker's
  own cost of a publish, free of socket and scheduler noise.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from broker import Broker, BrokerConfig
from broker.config import FsyncPolicy
from broker.session import Session
from client import Client
from client._socket import _Socket
from protocol import (
    PROTOCOL_VERSION,
    Connection,
    Deliver,
    Hello,
    Limits,
    Publish,
    Role,
    Welcome,
    encode_deliver,
    encode_pubacks,
    encode_record,
)

from .adapters import EVENT
from .check import PayloadMaker, SeqChecker
from .workers import run_async

CHUNK = 256 * 1024
#: The client-publish row's concurrency: the publish scenario's default window.
CLIENT_WINDOW = 1000


def _pair() -> tuple[Connection, Connection]:
    """A client and a broker Connection, both READY."""
    client, broker = Connection(Role.CLIENT, limits=Limits()), Connection(Role.BROKER, limits=Limits())
    broker.receive_data(client.send(Hello(1, PROTOCOL_VERSION, "bench", None, "bench-producer")))
    broker.events()
    client.receive_data(broker.send(Welcome(1, PROTOCOL_VERSION, "bench", 1, Limits().max_frame_size, 0.0)))
    client.events()
    return client, broker


def _chunks(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    cpu0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - cpu0


def run(count: int, payload_size: int) -> list[dict[str, Any]]:
    maker = PayloadMaker(0, payload_size)
    payloads = [maker.make(i, 0) for i in range(count)]
    client, broker = _pair()
    out: list[dict[str, Any]] = []

    def record(variant: str, seconds: float, cpu: float, checker: SeqChecker | None) -> None:
        check: dict[str, Any]
        if checker is None:
            check = {"expected": count, "received": count, "lost": 0, "duplicated": 0, "out_of_order": 0}
        else:
            check = {"expected": count, "received": checker.received, "lost": count - checker.unique,
                     "duplicated": checker.dups, "out_of_order": checker.ooo}  # fmt: skip
        out.append({
            "scenario": "codec", "variant": variant, "params": {"count": count, "payload": payload_size},
            "messages": count, "seconds": round(seconds, 4), "msgs_per_s": round(count / seconds, 1),
            "client_cpu_s": round(cpu, 3), "check": check, "errors": [],
        })  # fmt: skip

    # 1. PUBLISH encode (client side).
    def enc_publish() -> list[bytes]:
        send = client.send
        return [send(Publish(i + 2, "bench", EVENT, p)) for i, p in enumerate(payloads)]

    frames, secs, cpu = _timed(enc_publish)
    record("publish-encode", secs, cpu, None)
    stream = publish_stream = _chunks(b"".join(frames))
    del frames

    # 2. PUBLISH decode (broker side).
    checker, secs, cpu = _timed(lambda: _decode_all(broker, stream, count))
    record("publish-decode", secs, cpu, checker)

    # 3. DELIVER encode (broker hot path, stored record bodies).
    now_ms = int(time.time() * 1000)
    bodies = [encode_record(EVENT, now_ms, None, p) for p in payloads]

    def enc_deliver() -> list[bytes]:
        return [encode_deliver(1, i, 1, b) for i, b in enumerate(bodies)]

    frames, secs, cpu = _timed(enc_deliver)
    record("deliver-encode", secs, cpu, None)
    broker.check_send(Deliver.TYPE)
    stream = _chunks(b"".join(frames))
    del frames

    # 4. DELIVER decode (client side).
    checker, secs, cpu = _timed(lambda: _decode_all(client, stream, count))
    record("deliver-decode", secs, cpu, checker)

    # 5. The client's publish path, in-process (window 1,000, as the publish scenario).
    secs, cpu = run_async(_client_publish(payloads, CLIENT_WINDOW))
    record("client-publish", secs, cpu, None)
    out[-1]["client_cpu_us_per_msg"] = round(cpu / count * 1e6, 2)

    # 6. The broker's publish path, in-process.
    (checker, secs, cpu) = asyncio.run(_broker_publish(publish_stream, count))
    record("broker-publish", secs, cpu, checker)
    out[-1]["broker_cpu_us_per_msg"] = round(cpu / count * 1e6, 2)
    return out


def _decode_all(conn: Connection, stream: list[bytes], count: int) -> SeqChecker:
    """Feed ``stream`` to ``conn`` chunk by chunk, checking every frame's payload."""
    checker = SeqChecker({0: count})
    see = checker.see_payload
    for chunk in stream:
        conn.receive_data(chunk)
        for ev in conn.events():
            see(ev.payload)  # type: ignore[union-attr]
    return checker


class _Sink:
    """The transport a Session writes to: counts the bytes."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass


async def _broker_publish(stream: list[bytes], count: int) -> tuple[SeqChecker, float, float]:
    with tempfile.TemporaryDirectory(prefix="tidings-bench-") as tmp:
        config = BrokerConfig(host="127.0.0.1", port=0, data_dir=Path(tmp), fsync=FsyncPolicy.NEVER)
        broker = Broker(config)
        broker.store.open()
        session, sink = Session(broker), _Sink()
        session.connection_made(sink)  # type: ignore[arg-type]
        session.data_received(
            Connection(Role.CLIENT, limits=Limits()).send(Hello(1, PROTOCOL_VERSION, "bench", None, "bench-producer"))
        )

        def feed() -> None:
            for chunk in stream:
                session.data_received(chunk)

        _, secs, cpu = _timed(feed)
        # Check what was stored, outside the timing: every message, in order.
        checker = SeqChecker({0: count})
        queue = broker.store.get("bench", create=False)
        offset = 0
        while queue is not None and offset < queue.log.next_offset:
            records = queue.log.read(offset, max_count=4096, max_bytes=1 << 22)
            for _offset, _ts, body in records:
                checker.see_payload(_record_payload(body))
            offset = records[-1][0] + 1
        session.connection_lost(None)
        await broker.store.aclose()
    return checker, secs, cpu


def _record_payload(body: bytes) -> Any:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(body)
    _event, _ts, _headers, payload = (unpacker.unpack() for _ in range(4))
    return payload


class _AckingTransport:
    """The client's transport: every PUBLISH written is answered with a PUBACK.

    The client numbers its requests 1, 2, 3... and sends them in order, so
    counting frames (walking the length prefixes) is enough to know which
    reqs to confirm; their PUBACKs (offset = req - 1) are encoded before the
    timing starts. The replies are handed to the client's socket protocol on
    the next loop turn, as a socket read would deliver them.
    """

    def __init__(self, sock: asyncio.Protocol, count: int) -> None:
        self._sock = sock
        self._acks = encode_pubacks([(req, req - 1, False) for req in range(1, count + 1)])
        self._sent = 0
        self._loop = asyncio.get_running_loop()
        self._closing = False

    def write(self, data: bytes) -> None:
        n, pos, end = 0, 0, len(data)
        while pos < end:
            pos += 4 + int.from_bytes(data[pos : pos + 4], "big")
            n += 1
        first, self._sent = self._sent, self._sent + n
        self._loop.call_soon(self._sock.data_received, self._acks[first * 25 : self._sent * 25])

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self._closing

    def abort(self) -> None:
        if not self._closing:
            self._closing = True
            self._loop.call_soon(self._sock.connection_lost, None)


async def _client_publish(payloads: list[bytes], window: int) -> tuple[float, float]:
    """``window`` lanes publish ``payloads`` through a Client wired to :class:`_AckingTransport`."""
    loop = asyncio.get_running_loop()
    client = Client(timeout=30.0)
    # Wire the client by hand (what connect() does after the handshake): no socket.
    conn = client._conn
    broker_side = Connection(Role.BROKER, limits=Limits())
    broker_side.receive_data(conn.send(Hello(0, PROTOCOL_VERSION, "bench")))
    broker_side.events()
    conn.receive_data(broker_side.send(Welcome(0, PROTOCOL_VERSION, "bench", 1, Limits().max_frame_size, 0.0)))
    conn.events()
    client._loop = loop
    sock = _Socket(client)
    sock.connection_made(_AckingTransport(sock, len(payloads)))  # type: ignore[arg-type]
    client._sock = sock
    client._established = True
    client._sweep()
    items = iter(payloads)
    publish = client.publish

    async def lane() -> None:
        for payload in items:
            await publish("bench", EVENT, payload)

    try:
        _, secs, cpu = await _timed_async(asyncio.gather(*(lane() for _ in range(window))))
    finally:
        client.abort()
    return secs, cpu


async def _timed_async(aw: Any) -> tuple[Any, float, float]:
    cpu0, t0 = time.process_time(), time.perf_counter()
    out = await aw
    return out, time.perf_counter() - t0, time.process_time() - cpu0
