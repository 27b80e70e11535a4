"""``tidings``: the command-line companion of the broker (the netcat-style tool).

This first cut has ``status`` and ``ping``; see ``tidings --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from protocol import ConnectionLost, RequestTimeout, ServerError, TidingsError

from .client import DEFAULT_URL, Client

EXIT_OK, EXIT_USAGE, EXIT_CONNECT, EXIT_REFUSED = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``tidings``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("TIDINGS_URL", DEFAULT_URL),
        help="broker URL (default: $TIDINGS_URL or %(default)s)",
    )
    common.add_argument("--name", default="tidings-cli", help="client name shown in status")
    common.add_argument(
        "--token", default=os.environ.get("TIDINGS_TOKEN"), help="credentials (default: $TIDINGS_TOKEN)"
    )
    p = argparse.ArgumentParser(prog="tidings", description="Talk to a tidings broker.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    st = sub.add_parser("status", parents=[common], help="show connections, queues and durables")
    st.add_argument("--json", action="store_true", help="print the raw STATUS reply as JSON")
    sub.add_parser("ping", parents=[common], help="round-trip time and server version")
    return p  # fmt: skip


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def render_status(info: dict[str, Any]) -> str:
    """Format a STATUS reply as aligned tables."""
    s = info["server"]
    out = [
        f"tidings {s['version']}  up {s['uptime']:.0f}s  {s['conn_count']} connections  fsync={s.get('fsync', '?')}",
        "",
    ]
    conns = [
        [c["id"], c["name"], c["address"],
         ", ".join(f"{x['queue']}[{','.join(x['events']) or '*'}]{'/' + x['durable'] if x['durable'] else ''}"
                   for x in c["subscriptions"]) or "-"]
        for c in info["connections"]
    ]  # fmt: skip
    out += ["CONNECTIONS", _table(conns, ["ID", "NAME", "ADDRESS", "SUBSCRIPTIONS (queue[events]/durable)"]), ""]
    queues = [[q["name"], q["first_offset"], q["next_offset"], q["messages"], q["bytes"]] for q in info["queues"]]
    out += ["QUEUES", _table(queues, ["QUEUE", "FIRST", "NEXT", "MESSAGES", "BYTES"]), ""]
    durs = [[d["queue"], d["name"], ",".join(d["events"]) or "*", d["ack_floor"], d["lag"], d["in_flight"], d["consumers"]]
            for d in info["durables"]]  # fmt: skip
    out += ["DURABLES", _table(durs, ["QUEUE", "DURABLE", "EVENTS", "CURSOR", "LAG", "IN FLIGHT", "CONSUMERS"])]
    return "\n".join(out)


async def _run(args: argparse.Namespace) -> int:
    async with Client(args.url, name=args.name, token=args.token) as c:
        if args.command == "status":
            info = await c.status()
            print(json.dumps(info, indent=2, default=str) if args.json else render_status(info))
        elif args.command == "ping":
            rtt = await c.ping()
            print(f"pong from {c.host}:{c.port} (tidings {c.server_version}) in {rtt * 1000:.2f} ms")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tidings``."""
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except (ConnectionLost, RequestTimeout, OSError) as exc:
        print(f"tidings: cannot reach the broker: {exc}", file=sys.stderr)
        return EXIT_CONNECT
    except ServerError as exc:
        print(f"tidings: refused by the broker: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except TidingsError as exc:
        print(f"tidings: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
