"""The ``codec`` scenario: frames <-> bytes in this process, no sockets.

Four measurements, each over ``count`` messages carrying checked payloads:

* ``publish-encode``: the client's ``Connection.send(Publish(...))``;
* ``publish-decode``: the broker's ``Connection.receive_data`` + ``events()``
  over the whole stream fed in 256 KiB chunks (as a socket would);
* ``deliver-encode``: the broker's hot path, ``encode_deliver`` around a
  stored record body (``encode_record`` once per message, as on publish);
* ``deliver-decode``: the client's ``Connection`` decoding DELIVER frames.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

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
    encode_record,
)

from .adapters import EVENT
from .check import PayloadMaker, SeqChecker

CHUNK = 256 * 1024


def _pair() -> tuple[Connection, Connection]:
    """A client and a broker Connection, both READY."""
    client, broker = Connection(Role.CLIENT, limits=Limits()), Connection(Role.BROKER, limits=Limits())
    broker.receive_data(client.send(Hello(1, PROTOCOL_VERSION, "bench")))
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
    stream = _chunks(b"".join(frames))
    del frames

    # 2. PUBLISH decode (broker side).
    def dec_publish() -> SeqChecker:
        checker = SeqChecker({0: count})
        see = checker.see_payload
        for chunk in stream:
            broker.receive_data(chunk)
            for ev in broker.events():
                see(ev.payload)  # type: ignore[union-attr]
        return checker

    checker, secs, cpu = _timed(dec_publish)
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
    def dec_deliver() -> SeqChecker:
        checker = SeqChecker({0: count})
        see = checker.see_payload
        for chunk in stream:
            client.receive_data(chunk)
            for ev in client.events():
                see(ev.payload)  # type: ignore[union-attr]
        return checker

    checker, secs, cpu = _timed(dec_deliver)
    record("deliver-decode", secs, cpu, checker)
    return out
