"""The benchmark scenarios, for tidings and (through adapters) its peers.

Each run starts a fresh server (own temporary data folder, loopback),
drives it from worker processes (:mod:`bench.workers`), and emits one record
per run (the common fields are added by :func:`bench.report.finish`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .adapters import QUEUE
from .broker import BrokerProcess, machine_cpu_seconds, make_tls_files, proc_cpu_seconds
from .check import merge, percentiles
from .runner import Group, Progress, run_group

Emit = Callable[[dict[str, Any]], None]


@dataclass
class Options:
    count: int | None
    payload: int
    publishers: int
    subscribers: int
    fetchers: int
    window: int
    prefetch: int
    batch: int
    fsync: str
    rate: float
    tick_ms: float
    duration: float
    quick: bool
    profile_dir: Path | None = None
    tls: bool = False


def default_count(opts: Options, scenario: str) -> int:
    if opts.count is not None:
        return opts.count
    if scenario == "latency":
        return int(opts.rate * opts.duration)
    if scenario == "codec":
        return 20_000 if opts.quick else 200_000
    return 5_000 if opts.quick else 100_000


# --- the server under measurement -------------------------------------------


class Server(Protocol):
    @property
    def url(self) -> str: ...

    @property
    def pid(self) -> int: ...

    def cpu_seconds(self) -> float | None: ...

    def peak_rss_kb(self) -> int | None: ...

    def fsyncs(self) -> int | None: ...


class Target:
    """A broker to benchmark: how to start it, and its label."""

    kind = "tidings"

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.durability = f"fsync {opts.fsync}" + (", TLS" if opts.tls else "")
        # Whether a publish is confirmed only once it is on disk: the like-for-like
        # bar in the versus lines (bench.report.versus). Peers set their own.
        self.fsync_before_confirm = opts.fsync == "always"

    @contextlib.contextmanager
    def server(self, tag: str) -> Iterator[Server]:
        opts = self.opts
        with tempfile.TemporaryDirectory(prefix="tidings-bench-") as tmp:
            prefix = None
            if opts.profile_dir is not None:
                opts.profile_dir.mkdir(parents=True, exist_ok=True)
                prefix = [sys.executable, "-m", "cProfile", "-o", str(opts.profile_dir / f"broker-{tag}.prof")]
            args = ["--fsync", opts.fsync]
            trusted = os.environ.get("SSL_CERT_FILE")
            if opts.tls:
                # Workers are spawned while this server runs and inherit the
                # environment: with SSL_CERT_FILE their default TLS context
                # (and this process's, for STATUS) trusts the throwaway CA.
                tls = make_tls_files(Path(tmp))
                args += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
                os.environ["SSL_CERT_FILE"] = str(tls.ca)
            try:
                bp = BrokerProcess(Path(tmp) / "data", *args, prefix=prefix).start()
                try:
                    yield bp
                finally:
                    bp.stop()
            finally:
                if opts.tls:
                    if trusted is None:
                        os.environ.pop("SSL_CERT_FILE", None)
                    else:
                        os.environ["SSL_CERT_FILE"] = trusted

    def durable_lag(self, server: Server, name: str) -> int | None:
        assert isinstance(server, BrokerProcess)
        # Acks are applied as they arrive; give the broker a moment, then ask.
        lag = None
        for _ in range(20):
            status = server.status() or {}
            for d in status.get("durables", []):
                if d.get("name") == name:
                    lag = d.get("lag")
                    break
            else:
                return None
            if lag == 0:
                return 0
            time.sleep(0.1)
        return lag


class Meter:
    """Broker CPU time, peak RSS and fsync count over a measured interval."""

    def __init__(self, bp: Server) -> None:
        self.bp = bp
        self.cpu0: float | None = None
        self.fsyncs0: int | None = None
        self.busy0: tuple[float, float] | None = None

    @staticmethod
    def _own_cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def begin(self, group: Group | None = None) -> None:
        """Start measuring; ``group``: the (running) workers, whose CPU so far is not ours to count."""
        self.fsyncs0 = self.bp.fsyncs()
        pids = [p.pid for p in group.procs.values()] if group is not None else []
        self.workers0 = sum(proc_cpu_seconds(pid) or 0.0 for pid in pids)
        self.own0 = self._own_cpu()
        self.t0 = time.monotonic()
        self.cpu0 = self.bp.cpu_seconds()
        self.busy0 = machine_cpu_seconds()

    def end(self, messages: int, confirmed: int | None = None) -> dict[str, Any]:
        """Measurements; ``confirmed`` = publishes confirmed in the interval (for fsyncs/1000)."""
        cpu1 = self.bp.cpu_seconds()
        busy1 = machine_cpu_seconds()
        wall = time.monotonic() - self.t0
        # Everything this harness ran (itself, its reaped workers, the broker) vs the machine's busy
        # time (the kernel's work for us, softirqs and fsync writeback, counts as other); steal apart.
        ours = self._own_cpu() - self.own0 - self.workers0 + ((cpu1 or 0.0) - (self.cpu0 or 0.0))
        other = steal = None
        if busy1 is not None and self.busy0 is not None:
            other = max(0.0, busy1[0] - self.busy0[0] - ours)
            steal = busy1[1] - self.busy0[1]
        fsyncs1 = self.bp.fsyncs()
        cpu = None if cpu1 is None or self.cpu0 is None else round(cpu1 - self.cpu0, 3)
        fsyncs = None if fsyncs1 is None or self.fsyncs0 is None else fsyncs1 - self.fsyncs0
        rss = self.bp.peak_rss_kb()
        return {
            "broker_cpu_s": cpu,
            "broker_cpu_us_per_msg": round(cpu * 1e6 / messages, 2) if cpu is not None and messages else None,
            "broker_peak_rss_kb": rss,
            "other_cpu_share": None if other is None else round(other / wall, 2),
            "steal_share": None if steal is None else round(steal / wall, 2),
            "fsyncs": fsyncs if confirmed else None,
            "fsyncs_per_1000": round(fsyncs * 1000 / confirmed, 2) if fsyncs is not None and confirmed else None,
        }


# --- helpers -------------------------------------------------------------------


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _lat(results: list[dict[str, Any]], key: str) -> dict[str, Any]:
    samples: array[int] = array("q")
    for r in results:
        a: array[int] = array("q")
        a.frombytes(r[key])
        samples.extend(a)
    return percentiles(samples)


def _errors(results: list[dict[str, Any]]) -> list[str]:
    return [r["error"] for r in results if r.get("error")]


def _client_cpu(results: list[dict[str, Any]]) -> float:
    return round(float(sum(r.get("cpu", 0.0) for r in results)), 3)


def _publishers(t: Target, url: str, count: int, window: int, rate: float | None = None) -> list[dict[str, Any]]:
    opts = t.opts
    return [
        {"role": "publish", "broker": t.kind, "url": url, "queue": QUEUE, "producer": i, "count": n, "window": window,
         "payload": opts.payload, "rate": rate, "tick_ns": int(opts.tick_ms * 1e6)}
        for i, n in enumerate(_split(count, opts.publishers))
    ]  # fmt: skip


def _expected(specs: list[dict[str, Any]]) -> dict[int, int]:
    return {s["producer"]: s["count"] for s in specs}


def _verify(t: Target, url: str, expected: dict[int, int], progress: Progress) -> dict[str, Any]:
    spec = {"role": "verify", "broker": t.kind, "url": url, "queue": QUEUE, "expected": expected}
    [res] = run_group([spec], progress, "verifying")
    check = merge([res["check"]], expected, each=False)
    if res.get("error"):
        check["verify_error"] = res["error"]
    return check


def _preload(t: Target, url: str, count: int, progress: Progress) -> dict[int, int]:
    specs = _publishers(t, url, count, max(t.opts.window, 1))
    results = run_group(specs, progress, f"storing {count} messages")
    errors = _errors(results)
    if errors:
        raise RuntimeError(f"preload failed: {errors[0]}")
    return _expected(specs)


# --- scenarios -------------------------------------------------------------------


def publish(t: Target, progress: Progress, emit: Emit) -> None:
    """Confirmed publish throughput, pipelined (--window) and sequential (window 1)."""
    opts = t.opts
    count = default_count(opts, "publish")
    for window, n in ((opts.window, count), (1, max(opts.publishers, count // 10))):
        progress.start(f"publish window={window}")
        with t.server(f"publish-w{window}") as bp:
            specs = _publishers(t, bp.url, n, window)
            g = Group(progress)
            try:
                for s in specs:
                    g.add(s)
                g.wait_ready()
                meter = Meter(bp)
                meter.begin(g)
                g.go()
                results = list(g.wait(f"publishing {n}").values())
            finally:
                g.close()
            confirmed = sum(r["confirmed"] for r in results)
            seconds = (max(r["t_end"] for r in results) - min(r["t_start"] for r in results)) / 1e9
            m = meter.end(confirmed, confirmed)
            check = _verify(t, bp.url, _expected(specs), progress)
        emit({
            "broker": t.kind, "durability": t.durability, "fsync_before_confirm": t.fsync_before_confirm,
            "scenario": "publish", "variant": f"window={window}",
            "params": {"count": n, "window": window, "publishers": opts.publishers, "payload": opts.payload},
            "messages": confirmed, "seconds": round(seconds, 4),
            "msgs_per_s": round(confirmed / seconds, 1) if seconds else None,
            "latency": {"publish_confirm_closed_loop": _lat(results, "confirm_lat")},
            "client_cpu_s": _client_cpu(results), **m, "check": check, "errors": _errors(results),
        })  # fmt: skip


def latency(t: Target, progress: Progress, emit: Emit) -> None:
    """Open-loop publisher at --rate to one durable subscriber."""
    opts = t.opts
    count = default_count(opts, "latency")
    progress.start(f"latency {opts.rate:g} msg/s")
    with t.server("latency") as bp:
        pubs = _publishers(t, bp.url, count, 0, rate=opts.rate / opts.publishers)
        expected = _expected(pubs)
        sub = {"role": "subscribe", "broker": t.kind, "url": bp.url, "queue": QUEUE, "durable": "latency", "start": "new",
               "prefetch": opts.prefetch, "expected": expected, "latency": True}  # fmt: skip
        g = Group(progress)
        try:
            g.add(sub)
            g.wait_ready()  # subscribed before anything is published
            for s in pubs:
                g.add(s)
            g.wait_ready()
            meter = Meter(bp)
            meter.begin(g)
            g.go()
            res = g.wait(f"{count} messages at {opts.rate:g}/s")
        finally:
            g.close()
        sres, presults = res[0], [res[i] for i in sorted(res) if i != 0]
        confirmed = sum(r["confirmed"] for r in presults)
        m = meter.end(confirmed, confirmed)
    t0 = min(r["t_start"] for r in presults)
    seconds = (sres["t_last"] - t0) / 1e9
    check = merge([sres["check"]], expected, each=True)
    emit({
        "broker": t.kind, "durability": t.durability, "fsync_before_confirm": t.fsync_before_confirm,
        "scenario": "latency", "variant": f"rate={opts.rate:g}/s" + ("" if opts.tick_ms == 1 else f" tick={opts.tick_ms:g}ms"),
        "params": {"count": count, "rate": opts.rate, "publishers": opts.publishers, "payload": opts.payload,
                   "prefetch": opts.prefetch, "tick_ms": opts.tick_ms,
                   "schedule": f"open loop, {f'{opts.tick_ms:g} ms ticks' if opts.tick_ms else 'evenly spaced'}"},
        "messages": check["received"], "seconds": round(seconds, 4),
        "msgs_per_s": round(check["received"] / seconds, 1) if seconds else None,
        "latency": {"publish_deliver": _lat([sres], "deliver_lat"),
                    "publish_confirm": _lat(presults, "confirm_lat"),
                    "schedule_send": _lat(presults, "send_late")},
        "client_cpu_s": _client_cpu([sres, *presults]), **m, "check": check,
        "errors": _errors([sres, *presults]),
    })  # fmt: skip


def catchup(t: Target, progress: Progress, emit: Emit) -> None:
    """N stored messages; a durable subscriber comes back and consumes + acks all."""
    opts = t.opts
    count = default_count(opts, "catchup")
    progress.start(f"catchup {count}")
    with t.server("catchup") as bp:
        expected = {i: n for i, n in enumerate(_split(count, opts.publishers))}
        sub = {"role": "subscribe", "broker": t.kind, "url": bp.url, "queue": QUEUE, "durable": "catchup", "start": "earliest",
               "prefetch": opts.prefetch, "expected": expected, "resubscribe": True}  # fmt: skip
        g = Group(progress)
        try:
            g.add(sub)
            g.wait_ready()  # the durable exists, its cursor at the start
            _preload(t, bp.url, count, progress)
            meter = Meter(bp)
            meter.begin(g)
            g.go()
            [sres] = g.wait(f"consuming {count}").values()
        finally:
            g.close()
        m = meter.end(count)
        lag = t.durable_lag(bp, "catchup")
    seconds = (sres["t_acked"] - sres["t_start"]) / 1e9
    check = merge([sres["check"]], expected, each=True)
    emit({
        "broker": t.kind, "durability": t.durability, "fsync_before_confirm": t.fsync_before_confirm,
        "scenario": "catchup", "variant": f"n={count}",
        "params": {"count": count, "prefetch": opts.prefetch, "payload": opts.payload},
        "messages": check["received"], "seconds": round(seconds, 4),
        "msgs_per_s": round(check["received"] / seconds, 1) if seconds else None,
        "client_cpu_s": sres["cpu"], **m, "check": {**check, "durable_lag_after": lag},
        "errors": _errors([sres]),
    })  # fmt: skip


def fanout(t: Target, progress: Progress, emit: Emit) -> None:
    """One publisher, K durable subscribers each receiving everything."""
    opts = t.opts
    count = default_count(opts, "fanout")
    k = opts.subscribers
    progress.start(f"fanout x{k}")
    with t.server("fanout") as bp:
        pubs = _publishers(t, bp.url, count, opts.window)
        expected = _expected(pubs)
        g = Group(progress)
        try:
            for i in range(k):
                g.add({"role": "subscribe", "broker": t.kind, "url": bp.url, "queue": QUEUE, "durable": f"fan{i}", "start": "new",
                       "prefetch": opts.prefetch, "expected": expected})  # fmt: skip
            g.wait_ready()
            for s in pubs:
                g.add(s)
            g.wait_ready()
            meter = Meter(bp)
            meter.begin(g)
            g.go()
            res = g.wait(f"{count} messages to {k} subscribers")
        finally:
            g.close()
        subs = [res[i] for i in range(k)]
        presults = [res[i] for i in sorted(res) if i >= k]
        confirmed = sum(r["confirmed"] for r in presults)
        delivered = sum(s["check"]["received"] for s in subs)
        m = meter.end(delivered, confirmed)
    t0 = min(r["t_start"] for r in presults)
    seconds = (max(s["t_last"] for s in subs) - t0) / 1e9
    pub_seconds = (max(r["t_end"] for r in presults) - t0) / 1e9
    check = merge([s["check"] for s in subs], expected, each=True)
    emit({
        "broker": t.kind, "durability": t.durability, "fsync_before_confirm": t.fsync_before_confirm,
        "scenario": "fanout", "variant": f"subscribers={k}",
        "params": {"count": count, "subscribers": k, "window": opts.window, "prefetch": opts.prefetch,
                   "publishers": opts.publishers, "payload": opts.payload},
        "messages": delivered, "seconds": round(seconds, 4),
        "msgs_per_s": round(delivered / seconds, 1) if seconds else None,
        "publish_msgs_per_s": round(confirmed / pub_seconds, 1) if pub_seconds else None,
        "latency": {"publish_confirm_closed_loop": _lat(presults, "confirm_lat")},
        "client_cpu_s": _client_cpu(subs + presults), **m, "check": check, "errors": _errors(subs + presults),
    })  # fmt: skip


def fetch(t: Target, progress: Progress, emit: Emit) -> None:
    """Pull consumers (FETCH batches of --batch, acking each) drain N stored messages."""
    opts = t.opts
    count = default_count(opts, "fetch")
    progress.start(f"fetch batch={opts.batch}")
    with t.server("fetch") as bp:
        expected = {i: n for i, n in enumerate(_split(count, opts.publishers))}
        g = Group(progress)
        try:
            for _ in range(opts.fetchers):
                g.add({"role": "fetch", "broker": t.kind, "url": bp.url, "queue": QUEUE, "durable": "puller",
                       "batch": opts.batch, "pull": True, "alone": opts.fetchers == 1, "expected": expected})  # fmt: skip
            g.wait_ready()  # the pull consumers exist (positioned at the start) before anything is stored
            _preload(t, bp.url, count, progress)
            meter = Meter(bp)
            meter.begin(g)
            g.go()
            results = list(g.wait(f"fetching {count}").values())
        finally:
            g.close()
        m = meter.end(count)
    seconds = (max(r["t_last"] for r in results) - min(r["t_start"] for r in results)) / 1e9
    check = merge([r["check"] for r in results], expected, each=False)
    emit({
        "broker": t.kind, "durability": t.durability, "fsync_before_confirm": t.fsync_before_confirm,
        "scenario": "fetch", "variant": f"batch={opts.batch} consumers={opts.fetchers}",
        "params": {"count": count, "batch": opts.batch, "consumers": opts.fetchers, "payload": opts.payload},
        "messages": check["received"], "seconds": round(seconds, 4),
        "msgs_per_s": round(check["received"] / seconds, 1) if seconds else None,
        "fetches": sum(r["fetches"] for r in results),
        "client_cpu_s": _client_cpu(results), **m, "check": check, "errors": _errors(results),
    })  # fmt: skip
