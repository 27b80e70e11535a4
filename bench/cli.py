"""``python -m bench``: the command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from . import codec, report, scenarios
from .runner import Progress

SCENARIOS = ["codec", "publish", "latency", "catchup", "fanout", "fetch"]

EPILOG = """\
scenarios (default: all, in this order):
  codec    encode/decode PUBLISH and DELIVER frames in-process (no sockets)
  publish  confirmed publishes, --window unconfirmed in flight, then window 1 (count/10)
  latency  open-loop publisher at --rate msg/s to one durable subscriber;
           publish->deliver and publish->confirm from the scheduled send time
  catchup  --count stored messages; a durable subscriber comes back and acks all
  fanout   one publisher, --subscribers durable subscribers each receiving all
  fetch    pull consumers (FETCH batches of --batch, acking each) drain --count

Each run starts a fresh broker (python -m broker --port 0, temporary data dir);
load generators run in separate processes. Results: one JSON line per run in
DIR/<date>.jsonl and a Markdown table on stdout. Every consumer checks
(producer, seq) of each message: a run that loses one is FAILED (exit 1).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark tidings (and peers when installed).",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("scenarios", nargs="*", metavar="scenario", help=f"any of: {', '.join(SCENARIOS)}")
    p.add_argument("--quick", action="store_true", help="small counts: every scenario in well under a minute")
    p.add_argument(
        "--count", type=int, help="messages per run (default 100000; --quick 5000; latency: rate x duration)"
    )
    p.add_argument("--payload", type=int, default=100, metavar="BYTES", help="payload size (default: %(default)s)")
    p.add_argument("--publishers", type=int, default=1, metavar="N", help="publisher processes (default: %(default)s)")
    p.add_argument("--subscribers", type=int, default=4, metavar="K", help="fan-out subscribers (default: %(default)s)")
    p.add_argument(
        "--fetchers", type=int, default=1, metavar="N", help="competing pull consumers (default: %(default)s)"
    )
    p.add_argument(
        "--window", type=int, default=1000, metavar="W", help="unconfirmed publishes in flight (default: %(default)s)"
    )
    p.add_argument("--prefetch", type=int, default=1000, help="subscriber prefetch (default: %(default)s)")
    p.add_argument("--batch", type=int, default=500, help="FETCH batch size (default: %(default)s)")
    p.add_argument(
        "--fsync",
        choices=["always", "interval", "never"],
        default="always",
        help="broker --fsync (default: %(default)s)",
    )
    p.add_argument("--rate", type=float, default=5000.0, metavar="R", help="latency: msgs/s (default: %(default)s)")
    p.add_argument("--duration", type=float, help="latency: seconds at --rate (default 10; --quick 1)")
    p.add_argument(
        "--tick",
        type=float,
        default=1.0,
        metavar="MS",
        help="latency: send what fell due once per MS ms, on the tick (default: %(default)s); 0: each message "
        "at its own time, evenly spaced",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=report.RESULTS_DIR,
        metavar="DIR",
        help="where the .jsonl goes (default: bench/results)",
    )
    p.add_argument("--json", action="store_true", help="print the JSON lines on stdout instead of the table")
    p.add_argument("--profile", type=Path, metavar="DIR", help="run the broker under cProfile, .prof files in DIR")
    p.add_argument("--tls", action="store_true",
                   help="tidings serves TLS (certificates from a throwaway CA made with openssl); peers as usual")  # fmt: skip
    p.add_argument("--peers", action="store_true", help="also run the installed peers (see bench/peers)")
    p.add_argument(
        "--peer",
        action="append",
        metavar="NAME",
        help="run only this peer (repeatable; implies --peers): redis-always, redis-everysec, nats, rabbitmq",
    )
    p.add_argument("--no-tidings", action="store_true", help="with --peers: run only the peers")
    p.add_argument("--chart", action="store_true", help="also write a PNG chart next to the .jsonl (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run the whole job list N times, in rounds (default: %(default)s); the table then shows each "
        "scenario's median run per broker and the min-max over its runs",
    )
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = args.scenarios or SCENARIOS
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    for name in ("publishers", "subscribers", "fetchers", "window", "prefetch", "batch", "payload", "repeat"):
        if getattr(args, name) < 1:
            print(f"--{name} must be at least 1", file=sys.stderr)
            return 2
    if args.payload < 20:
        print("--payload must be at least 20 bytes (producer id, sequence number, timestamp)", file=sys.stderr)
        return 2
    if args.tick < 0:
        print("--tick must be 0 (no ticks) or more", file=sys.stderr)
        return 2
    opts = scenarios.Options(
        count=args.count, payload=args.payload, publishers=args.publishers, subscribers=args.subscribers,
        fetchers=args.fetchers, window=args.window, prefetch=args.prefetch, batch=args.batch, fsync=args.fsync,
        rate=args.rate, tick_ms=args.tick, duration=args.duration or (1.0 if args.quick else 10.0), quick=args.quick,
        profile_dir=args.profile, tls=args.tls,
    )  # fmt: skip
    env = report.environment()
    load = env["load_1m"]
    if load is not None and load > 0.5 and not args.no_progress:
        print(f"warning: load average {load:.2f} before starting: results will be noisy", file=sys.stderr)
    run_id = uuid.uuid4().hex[:12]
    progress = Progress(not args.no_progress)
    records: list[dict[str, Any]] = []
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    t0 = time.monotonic()

    round_no = 1  # the round being run; emit reads it when called

    def emit(rec: dict[str, Any], durability: str | None = None) -> None:
        rec = report.finish(rec, env, run_id, durability, round_no=round_no, rounds=args.repeat)
        why = report.noise(rec)
        if why:
            progress.done(f"warning: the machine was busy with more than this run ({why} of a core)")
        rec["command"] = command.strip()
        records.append(rec)
        report.append_jsonl(args.out, [rec])
        check = rec.get("check") or {}
        progress.done(
            f"{rec.get('msgs_per_s') or 0:,.0f} msgs/s  lost={check.get('lost')} dup={check.get('duplicated')} "
            f"ooo={check.get('out_of_order')}  {rec['status']}"
        )
        if args.json:
            print(json.dumps(rec), flush=True)

    targets: list[Any] = [] if args.no_tidings else [scenarios.Target(opts)]
    if args.peers or args.peer:
        from . import peers

        bad = [n for n in args.peer or [] if n not in peers.PEERS]
        if bad:
            print(f"unknown peer(s): {', '.join(bad)}; choose from {', '.join(peers.PEERS)}", file=sys.stderr)
            return 2

        for line in peers.describe():
            print(line, file=sys.stderr)
        targets += peers.targets(opts, args.peer)
    # Interleaved: each scenario runs on every broker before the next scenario,
    # and with --repeat the whole list runs again in the next round, so drift
    # on the machine hits all brokers alike.
    jobs = [(t, name) for name in chosen for t in targets if name != "codec" or t.kind == "tidings"]
    schedule = [(k, i, t, name) for k in range(1, args.repeat + 1) for i, (t, name) in enumerate(jobs, 1)]
    for round_no, i, target, name in schedule:
        where = f"{i}/{len(jobs)}" if args.repeat == 1 else f"round {round_no}/{args.repeat} {i}/{len(jobs)}"
        progress.prefix = f"[{where}] {target.kind}"
        try:
            if name == "codec":
                count = scenarios.default_count(opts, "codec")
                progress.start("codec")
                for rec in codec.run(count, opts.payload):
                    emit(rec, None)
            else:
                getattr(scenarios, name)(target, progress, emit)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            break
        except Exception as exc:
            progress.done(f"ERROR: {type(exc).__name__}: {exc}")
            emit({"scenario": name, "broker": target.kind, "durability": target.durability,
                  "fsync_before_confirm": target.fsync_before_confirm, "variant": "",
                  "errors": [f"{type(exc).__name__}: {exc}"]})  # fmt: skip
    if not args.json:
        print()
        report.print_table(records, env, command.strip())
    if args.chart:
        from . import chart

        png = chart.write(records, args.out / f"{time.strftime('%Y-%m-%d')}-{run_id}.png")
        print(f"chart: {png}" if png else "chart: skipped (pip install matplotlib)", file=sys.stderr)
    if not args.no_progress:
        print(f"{len(records)} runs in {time.monotonic() - t0:.1f}s; results appended to {args.out}", file=sys.stderr)
    return 1 if any(r["status"] == "FAILED" for r in records) else 0
