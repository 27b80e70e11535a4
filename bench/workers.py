"""Load generators: each runs in its own process (multiprocessing, spawn).

A worker connects (through the broker's adapter, :mod:`bench.adapters`), does
its set-up (say, subscribing), reports ``ready``, waits for the
orchestrator's ``go`` event, runs, and reports its result: a picklable dict
with its timings (``time.monotonic_ns``: one clock for every process), its
client CPU seconds, and for consumers the checker's summary and latency
samples.

Roles (``params["role"]``):

* ``publish``: closed loop, at most ``window`` unconfirmed publishes in
  flight (``window`` coroutines each awaiting ``publish``, or pipelined
  batches of ``window`` for clients that batch); or, with ``rate``, open
  loop: message i scheduled at the first tick (default 1 ms) at or after
  ``i / rate`` s, or at ``i / rate`` itself with ``tick_ns`` 0, stamped with
  its scheduled time and sent when due whether or not earlier ones were
  confirmed (no coordinated omission); its lateness is recorded too.
* ``subscribe``: a durable consumer that checks and acks every message until
  it has seen every expected one (or nothing arrives for ``idle_timeout``).
* ``fetch``: a pull consumer: batches of ``batch`` for a durable, acking
  each, until a pull comes back empty.
* ``verify``: reads the whole queue back and checks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import time
import traceback
from array import array
from typing import Any

from .adapters import Adapter, get_adapter
from .check import PayloadMaker, SeqChecker


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_async(coro: Any) -> Any:
    """Run a coroutine on uvloop when installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main(wid: int, params: dict[str, Any], out: Any, go: Any) -> None:
    """Process entry point (must be importable for spawn)."""
    try:
        result = run_async(_main(wid, params, out, go))
        out.put(("result", wid, result))
    except BaseException:
        out.put(("error", wid, traceback.format_exc()))


async def _main(wid: int, params: dict[str, Any], out: Any, go: Any) -> dict[str, Any]:
    role = params["role"]
    fn = {"publish": _publish, "subscribe": _subscribe, "fetch": _fetch, "verify": _verify}[role]
    async with get_adapter(params) as adapter:
        ready = asyncio.Event()

        async def go_wait() -> None:
            await ready.wait()
            out.put(("ready", wid, None))
            loop = asyncio.get_running_loop()
            while not await loop.run_in_executor(None, go.wait, 0.5):
                pass

        return await fn(adapter, params, ready, go_wait)


async def _publish(a: Adapter, p: dict[str, Any], ready: asyncio.Event, go_wait: Any) -> dict[str, Any]:
    maker = PayloadMaker(p["producer"], p["payload"])
    count = p["count"]
    lat: array[int] = array("q")
    late: array[int] = array("q")
    ready.set()
    await go_wait()
    cpu0 = time.process_time()
    t_start = time.monotonic_ns()
    error = None
    try:
        if p.get("rate"):
            await _open_loop(a, maker, count, p["rate"], p.get("tick_ns", 1_000_000), lat, late)
        elif a.BATCHED and p["window"] > 1:
            await _batches(a, maker, count, p["window"], lat)
        else:
            await _closed_loop(a, maker, count, p["window"], lat)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    t_end = time.monotonic_ns()
    return {
        "t_start": t_start,
        "t_end": t_end,
        "confirmed": len(lat),
        "confirm_lat": lat.tobytes(),
        "send_late": late.tobytes(),
        "cpu": time.process_time() - cpu0,
        "error": error,
    }


async def _closed_loop(a: Adapter, maker: PayloadMaker, count: int, window: int, lat: array[int]) -> None:
    seqs = iter(range(count))
    mono = time.monotonic_ns
    make = maker.make
    publish = a.publish

    async def lane() -> None:
        for seq in seqs:  # shared: each lane takes the next sequence number
            t = mono()
            await publish(make(seq, t))
            lat.append(mono() - t)

    await asyncio.gather(*(lane() for _ in range(max(1, min(window, count)))))


async def _batches(a: Adapter, maker: PayloadMaker, count: int, window: int, lat: array[int]) -> None:
    mono = time.monotonic_ns
    for first in range(0, count, window):
        t = mono()
        await a.publish_batch([maker.make(seq, t) for seq in range(first, min(count, first + window))])
        done = mono() - t
        lat.extend([done] * (min(count, first + window) - first))


async def _open_loop(
    a: Adapter, maker: PayloadMaker, count: int, rate: float, tick: int, lat: array[int], late: array[int]
) -> None:
    """Send message i at ``t0 + i / rate``, or at the first ``tick`` (ns) boundary after
    it (0: no ticks, evenly spaced), whether or not earlier ones were confirmed.

    Each message is stamped with its *scheduled* time, so any lateness counts
    (no coordinated omission), and ``late`` records it (send time - scheduled
    time): the harness's own share of the latency. The event loop's timers
    have 1 ms resolution (libuv), which alone made messages leave 0.30 ms late
    at p50 and 0.65 ms at p99 with nothing else running; a Linux ``timerfd``
    in the loop's selector wakes it on time (0.02 / 0.06 ms), where a thread
    sleeping to each due time cost the publisher more CPU (GIL hand-offs) and
    was ms late under load. Without timerfd the loop's own timers are used.
    """
    interval = 1e9 / rate
    if tick:

        def due_by(now: int) -> int:  # messages 0 .. due-1 are scheduled at or before now
            return int((now - t0) // tick * tick / interval) + 1

        def scheduled(j: int) -> int:
            return t0 + math.ceil(j * interval / tick) * tick

    else:

        def due_by(now: int) -> int:
            return int((now - t0) // interval) + 1

        def scheduled(j: int) -> int:
            return t0 + int(j * interval)

    mono = time.monotonic_ns
    make = maker.make
    publish = a.publish
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []
    finished = loop.create_future()
    t0 = mono() + 1_000_000
    sent = 0  # messages 0 .. sent-1 have been handed to the client
    # Clients that pipeline (Redis): one pipeline at a time on one connection (order kept);
    # what fell due meanwhile goes in the next one.
    backlog: list[tuple[int, int]] = []
    sender: list[asyncio.Task[None]] = []

    async def one(seq: int, sched: int) -> None:
        await publish(make(seq, sched))
        lat.append(mono() - sched)

    async def send_backlog() -> None:
        while backlog:
            items = backlog[:]
            backlog.clear()
            await a.publish_batch([make(seq, t) for seq, t in items])
            now = mono()
            lat.extend([now - t for _, t in items])

    def done(t: asyncio.Task[None]) -> None:
        tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            errors.append(t.exception())  # type: ignore[arg-type]
            if not finished.done():
                finished.set_result(None)

    def send_due() -> None:
        nonlocal sent
        now = mono()
        due = min(count, due_by(now)) if now >= t0 else 0
        if due <= sent or errors:
            return
        scheds = [scheduled(j) for j in range(sent, due)]
        late.extend([now - t for t in scheds])
        if a.BATCHED:
            backlog.extend(zip(range(sent, due), scheds, strict=True))
            new_tasks = []
            if not (sender and not sender[-1].done()):
                sender[:] = [loop.create_task(send_backlog())]
                new_tasks = sender[:]
        else:
            new_tasks = [loop.create_task(one(j, t)) for j, t in zip(range(sent, due), scheds, strict=True)]
        for task in new_tasks:
            tasks.add(task)
            task.add_done_callback(done)
        sent = due
        if sent >= count and not finished.done():
            finished.set_result(None)

    timer = _timerfd(t0, tick or max(int(interval), 50_000))
    if timer is not None:

        def on_timer() -> None:
            with contextlib.suppress(BlockingIOError):
                os.read(timer, 8)  # the number of expirations; send_due counts by the clock
                send_due()

        loop.add_reader(timer, on_timer)
        try:
            await finished
        finally:
            loop.remove_reader(timer)
            os.close(timer)
    else:
        while not finished.done():
            send_due()
            await asyncio.sleep(max(0.0, (scheduled(sent) - mono()) / 1e9))
    if tasks:
        await asyncio.wait(set(tasks))
    if errors:
        raise errors[0]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _timerfd(first_ns: int, period_ns: int) -> int | None:
    """A non-blocking Linux timerfd on CLOCK_MONOTONIC firing at ``first_ns``, then every
    ``period_ns``; None where there is none (then the loop's 1 ms timers do)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    fd: int = create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        return None
    spec = _Itimerspec(_Timespec(*divmod(period_ns, 1_000_000_000)), _Timespec(*divmod(first_ns, 1_000_000_000)))
    if settime(fd, 1, ctypes.byref(spec), None) != 0:  # 1: TFD_TIMER_ABSTIME
        os.close(fd)
        return None
    return fd


def _expected(p: dict[str, Any]) -> dict[int, int]:
    return {int(k): v for k, v in p["expected"].items()}


async def _subscribe(a: Adapter, p: dict[str, Any], ready: asyncio.Event, go_wait: Any) -> dict[str, Any]:
    durable, start, prefetch = p["durable"], p.get("start", "new"), p.get("prefetch", 1000)
    checker = SeqChecker(_expected(p))
    target = checker.total
    record_lat = p.get("latency", False)
    lat: array[int] = array("q")
    idle = p.get("idle_timeout", 10.0)
    if p.get("resubscribe"):
        # Catch-up: the durable exists (created now, positioned at the start)
        # and the consumer "comes back" after the messages were stored.
        await a.create_durable(durable, start)
        ready.set()
        await go_wait()
        cpu0 = time.process_time()
        t_start = time.monotonic_ns()
        consumer = await a.consumer(durable, start, prefetch)
    else:
        consumer = await a.consumer(durable, start, prefetch)
        ready.set()
        await go_wait()
        cpu0 = time.process_time()
        t_start = time.monotonic_ns()
    mono = time.monotonic_ns
    see = checker.see_payload
    t_first = t_last = 0
    last_progress = time.monotonic()
    error = None
    try:
        while checker.unique < target:
            batch = await consumer.next_batch(1.0)
            now = mono()
            if not batch:
                if time.monotonic() - last_progress > idle:
                    break
                continue
            last_progress = time.monotonic()
            if not t_first:
                t_first = now
            for payload, _ in batch:
                new, t = see(payload)
                if record_lat and new:
                    lat.append(now - t)
            await consumer.ack([h for _, h in batch])
            t_last = now
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    if not t_last:
        t_last = mono()
    # Acks may leave with the next write: a round trip after them proves they were read.
    with contextlib.suppress(Exception):
        await a.sync()
    t_acked = mono()
    with contextlib.suppress(Exception):
        await consumer.close()
    return {
        "t_start": t_start,
        "t_first": t_first,
        "t_last": t_last,
        "t_acked": t_acked,
        "check": checker.summary(),
        "deliver_lat": lat.tobytes(),
        "cpu": time.process_time() - cpu0,
        "error": error,
    }


async def _fetch(a: Adapter, p: dict[str, Any], ready: asyncio.Event, go_wait: Any) -> dict[str, Any]:
    durable, batch = p["durable"], p["batch"]
    checker = SeqChecker(_expected(p))
    stop_at = checker.total if p.get("alone") else 0
    consumer = await a.consumer(durable, "earliest", batch)
    ready.set()
    await go_wait()
    cpu0 = time.process_time()
    t_start = time.monotonic_ns()
    fetches = 0
    error = None
    try:
        while True:
            msgs = await consumer.fetch(batch)
            fetches += 1
            if not msgs:
                break
            see = checker.see_payload
            for payload, _ in msgs:
                see(payload)
            await consumer.ack([h for _, h in msgs])
            if stop_at and checker.unique >= stop_at:
                break  # a lone consumer has everything: no need for a last, empty pull
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    with contextlib.suppress(Exception):
        await a.sync()
    t_end = time.monotonic_ns()
    with contextlib.suppress(Exception):
        await consumer.close()
    return {
        "t_start": t_start,
        "t_last": t_end,
        "fetches": fetches,
        "check": checker.summary(),
        "cpu": time.process_time() - cpu0,
        "error": error,
    }


async def _verify(a: Adapter, p: dict[str, Any], ready: asyncio.Event, go_wait: Any) -> dict[str, Any]:
    """Read the whole queue back and check every message once."""
    checker = SeqChecker(_expected(p))
    ready.set()
    await go_wait()
    error = None
    try:
        async for payload in a.read_all():
            checker.see_payload(payload)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {"check": checker.summary(), "error": error}
