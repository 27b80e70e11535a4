"""The subcommands that inspect and manage the broker: status, queues, durables, ping, delete, seek."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import Any

from protocol import ErrorCode, ServerError, check_queue
from protocol.errors import local_error
from protocol.wording import many

from ..client import Client
from .common import EXIT_OK, EXIT_REFUSED, Context, Stopped
from .values import to_json

__all__ = ["render_durables", "render_queues", "render_status", "run_delete", "run_durables", "run_ping",
           "run_queues", "run_seek", "run_status"]  # fmt: skip


# --- status -------------------------------------------------------------------


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _size(n: Any) -> str:
    if not isinstance(n, int | float):
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _age(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d"


def _user(conn: dict[str, Any]) -> str:
    """A connection's user, and which of its tokens (the start of its SHA-256): ``orders (5e884898)``."""
    user, token = conn.get("user"), conn.get("token")
    return "-" if not user else f"{user} ({token})" if token else str(user)


def _events(events: Any) -> str:
    return ",".join(events) if events else "*"


def _cursor(durable: dict[str, Any], first: Any) -> str:
    """A durable's cursor (its ack floor), marked when it is behind its queue's
    first retained message: retention dropped messages the durable had not
    acked (they count as done; its next message says so in x-retention-gap),
    and its LAG leaves them out, so "CURSOR 0  LAG 0" beside FIRST 200 read as
    a durable at the start with nothing to read."""
    floor = durable.get("ack_floor")
    if isinstance(floor, int) and isinstance(first, int) and floor < first:
        return f"{floor} (behind FIRST {first})"
    return str(floor)


def render_status(info: dict[str, Any], rates: dict[str, float] | None = None) -> str:
    """Format a STATUS reply as aligned tables.

    Args:
        info: the reply.
        rates: messages/s per queue measured between two polls (``--watch``);
            without it the broker's average since it started is shown.
    """
    s = info.get("server", {})
    now = time.time()
    count = s.get("conn_count")
    out = [
        f"tidings {s.get('version', '?')}  up {_age(s.get('uptime'))}  "
        f"{many(count, 'connection') if isinstance(count, int) else '? connections'}  "
        f"fsync={s.get('fsync', '?')}  data={s.get('data_dir', '?')}",
        "",
    ]
    conns, subs = [], []
    for c in info.get("connections", []):
        since = c.get("since")
        age = _age(now - since) if isinstance(since, int | float) and since > 1e9 else "-"
        mine = c.get("subscriptions", [])
        pulls = c.get("pulls", [])
        omitted = c.get("omitted") or {}  # lists too long for a STATUS page: only counted
        conns.append(
            [c.get("id"), c.get("name"), _user(c), c.get("producer") or "-", c.get("address"), age,
             len(mine) + omitted.get("subscriptions", 0), len(pulls) + omitted.get("pulls", 0)]
        )  # fmt: skip
        for x in mine:
            subs.append([c.get("id"), x.get("queue"), _events(x.get("events")), x.get("durable") or "-",
                         x.get("prefetch", "-"), x.get("in_flight", "-")])  # fmt: skip
        for x in pulls:
            subs.append([c.get("id"), x.get("queue"), "(fetch)", x.get("durable") or "-", "-", "-"])
    headers = ["ID", "NAME", "USER", "PRODUCER", "ADDRESS", "AGE", "SUBS", "PULLS"]
    if not any(row[2] != "-" for row in conns):  # a broker without --users
        headers.pop(2)
        conns = [row[:2] + row[3:] for row in conns]
    out += ["CONNECTIONS", _table(conns, headers), ""]
    if subs:
        out += ["SUBSCRIPTIONS",
                _table(subs, ["CONN", "QUEUE", "EVENTS", "DURABLE", "PREFETCH", "IN FLIGHT"]), ""]  # fmt: skip
    out += ["QUEUES", render_queues(info, rates), "", "DURABLES", render_durables(info)]
    failed = info.get("failed_queues") or []
    if failed:
        out += ["", "FAILED QUEUES", _table([[f.get("name"), f.get("error")] for f in failed], ["QUEUE", "ERROR"])]
    damaged = [[q.get("name"), q["damaged"].get("offset"), q["damaged"].get("error")]
               for q in info.get("queues", []) if q.get("damaged")]  # fmt: skip
    if damaged:
        out += ["", "DAMAGED RECORDS (readers stop before them; tidings seek past)",
                _table(damaged, ["QUEUE", "OFFSET", "ERROR"])]  # fmt: skip
    return "\n".join(out)


def render_queues(info: dict[str, Any], rates: dict[str, float] | None = None) -> str:
    """The QUEUES table of a STATUS reply (``rates`` as for :func:`render_status`)."""
    queues = []
    for q in info.get("queues", []):
        rate = rates.get(q.get("name", ""), 0.0) if rates is not None else q.get("publish_rate", "-")
        queues.append([q.get("name"), q.get("first_offset"), q.get("next_offset"), q.get("messages"),
                       _size(q.get("bytes")), rate if isinstance(rate, str) else f"{rate:.1f}"])  # fmt: skip
    rate_head = "MSG/S" if rates is not None else "MSG/S (AVG)"
    return _table(queues, ["QUEUE", "FIRST", "NEXT", "MESSAGES", "SIZE", rate_head])


def render_durables(info: dict[str, Any]) -> str:
    """The DURABLES table of a STATUS reply (its ``queues`` too, for :func:`_cursor`)."""
    firsts = {q.get("name"): q.get("first_offset") for q in info.get("queues", [])}
    durs = [[d.get("queue"), d.get("name"), _events(d.get("events")), _cursor(d, firsts.get(d.get("queue"))),
             d.get("lag"), d.get("in_flight"), d.get("consumers"), d.get("fetchers", "-")]
            for d in info.get("durables", [])]  # fmt: skip
    return _table(durs, ["QUEUE", "DURABLE", "EVENTS", "CURSOR", "LAG", "IN FLIGHT", "CONSUMERS", "FETCHERS"])


async def run_queues(ctx: Context, client: Client) -> int:
    info = await client.status()
    if ctx.args.json:
        await ctx.out.line(json.dumps(info.get("queues", []), indent=2, default=str))
    else:
        await ctx.out.line(render_queues(info))
    if failed := [str(f.get("name")) for f in info.get("failed_queues", [])]:
        ctx.warn(f"not listed, cannot be served (see tidings status): {', '.join(failed)}")
    return EXIT_OK


async def run_durables(ctx: Context, client: Client) -> int:
    queue = ctx.args.queue
    if queue is not None and (why := check_queue(queue)) is not None:
        raise local_error(ErrorCode.INVALID_NAME, why)
    info = await client.status()
    if queue is not None and queue not in {q.get("name") for q in info.get("queues", [])}:
        failed = {f.get("name") for f in info.get("failed_queues", [])}
        ctx.warn(f"queue {queue!r} {'cannot be served (see tidings status)' if queue in failed else 'does not exist'}")
        return EXIT_REFUSED
    durables = [d for d in info.get("durables", []) if queue in (None, d.get("queue"))]
    if ctx.args.json:
        await ctx.out.line(json.dumps(durables, indent=2, default=str))
    else:
        await ctx.out.line(render_durables({"durables": durables, "queues": info.get("queues", [])}))
    return EXIT_OK


async def run_status(ctx: Context, client: Client) -> int:
    args = ctx.args
    if args.watch is None:
        info = await client.status()
        await ctx.out.line(json.dumps(info, indent=2, default=str) if args.json else render_status(info))
        return EXIT_OK
    tty = os.isatty(ctx.out.fd)
    before: tuple[float, dict[str, int]] | None = None
    try:
        while True:
            info = await ctx.stopper.race(client.status())
            now = time.monotonic()
            nexts = {q["name"]: q.get("next_offset", 0) for q in info.get("queues", []) if "name" in q}
            rates = None
            if before is not None:
                dt = max(now - before[0], 1e-6)
                rates = {n: max(v - before[1].get(n, v), 0) / dt for n, v in nexts.items()}
            before = (now, nexts)
            try:
                if args.json:
                    await ctx.out.line(to_json(info))
                else:
                    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                    text = render_status(info, rates)
                    head = "\x1b[H\x1b[2J" if tty else ""
                    await ctx.out.line(f"{head}{stamp}  (every {args.watch:g}s, Ctrl-C to stop)\n{text}\n")
            except BrokenPipeError:
                return EXIT_OK
            await ctx.stopper.race(asyncio.sleep(args.watch))
    except Stopped:
        return EXIT_OK


# --- ping ---------------------------------------------------------------------


async def run_ping(ctx: Context, client: Client) -> int:
    args = ctx.args
    rtts: list[float] = []
    try:
        while args.count == 0 or len(rtts) < args.count:
            if rtts and args.interval:
                await ctx.stopper.race(asyncio.sleep(args.interval))
            rtt = await ctx.stopper.race(client.ping())
            rtts.append(rtt * 1000)
            seq = f" seq={len(rtts)}" if args.count != 1 else ""
            await ctx.out.line(
                f"pong from {client.host}:{client.port} (tidings {client.server_version}){seq} time={rtts[-1]:.2f} ms"
            )
    except (Stopped, BrokenPipeError):
        pass
    if len(rtts) > 1:
        with contextlib.suppress(BrokenPipeError):
            await ctx.out.line(f"{len(rtts)} pings, min/avg/max = "
                               f"{min(rtts):.2f}/{sum(rtts) / len(rtts):.2f}/{max(rtts):.2f} ms")  # fmt: skip
    return EXIT_OK


# --- delete -------------------------------------------------------------------


async def run_delete(ctx: Context, client: Client) -> int:
    args = ctx.args
    if args.durable:
        await client.delete_durable(args.queue, args.durable)
        await ctx.out.line(f"deleted durable {args.durable} of {args.queue}")
    else:
        await client.delete_queue(args.queue)
        await ctx.out.line(f"deleted queue {args.queue}")
    return EXIT_OK


async def run_seek(ctx: Context, client: Client) -> int:
    args = ctx.args
    await client.seek(args.queue, args.durable, args.to)
    # SEEK's OK does not say where the durable went (an offset past the end of
    # the log goes to the end, one before the first message kept to that one):
    # its cursor in STATUS does.
    try:
        info = await client.status()
    except ServerError as exc:  # a user without the status right, say: the seek is done all the same
        await ctx.out.line(f"durable {args.durable} of {args.queue} moved to {args.to} "
                           f"(or to the nearest end of the log; STATUS, which would say, was refused: {exc})")  # fmt: skip
        return EXIT_OK
    cursor = next((d.get("ack_floor") for d in info.get("durables", [])
                   if (d.get("queue"), d.get("name")) == (args.queue, args.durable)), None)  # fmt: skip
    log: dict[str, Any] = next((q for q in info.get("queues", []) if q.get("name") == args.queue), {})
    if not isinstance(cursor, int):  # deleted since, by someone else
        await ctx.out.line(f"durable {args.durable} of {args.queue} moved to {args.to}, and is gone now")
        return EXIT_OK
    notes = []
    if cursor == log.get("next_offset"):
        notes.append("the end of the log")
    elif cursor == log.get("first_offset"):
        notes.append("the first message kept")
    if isinstance(args.to, int) and args.to != cursor:
        notes.append(f"asked for {args.to}")
    note = f" ({'; '.join(notes)})" if notes else ""
    await ctx.out.line(f"durable {args.durable} of {args.queue} moved to offset {cursor}{note}")
    return EXIT_OK
