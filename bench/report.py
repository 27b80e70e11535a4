"""Run records: the common fields, the JSON-lines file and the Markdown table."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from .workers import loop_name

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "loop": loop_name(),
        "commit": git_commit(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def status_of(rec: dict[str, Any]) -> str:
    """FAILED when a message was lost (or a worker failed); WARN for dups/reordering."""
    check = rec.get("check") or {}
    if rec.get("errors") or check.get("lost") or check.get("unknown") or check.get("verify_error"):
        return "FAILED"
    if check.get("duplicated") or check.get("out_of_order"):
        return "WARN"
    return "ok"


def finish(
    rec: dict[str, Any], env: dict[str, Any], run_id: str, durability: str | None, *, round_no: int = 1, rounds: int = 1
) -> dict[str, Any]:
    """The full record of one run: the scenario's fields plus the common ones and its status.

    Args:
        rec: what the scenario emitted (its ``broker`` and ``durability`` are moved to the front).
        env: :func:`environment`.
        run_id: the id shared by every record of this ``python -m bench`` invocation.
        durability: the durability label when ``rec`` has none (``codec``: None).
        round_no: which round of ``--repeat`` this run belongs to (1-based).
        rounds: how many rounds were asked for (``--repeat``).

    Returns:
        A new dict; ``rec`` is consumed (``broker`` and ``durability`` popped).
    """
    out = {
        "ts": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run_id": run_id,
        "round": round_no,
        "rounds": rounds,
        "broker": rec.pop("broker", "tidings"),
        "durability": rec.pop("durability", durability),
        **rec,
        **env,
    }
    out["status"] = status_of(out)
    return out


def append_jsonl(out_dir: Path, records: list[dict[str, Any]]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{dt.date.today().isoformat()}.jsonl"
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=False) + "\n")
    return path


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


HEADER = ["scenario", "variant", "broker", "durability", "msgs", "msgs/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms",
          "broker CPU µs/msg", "broker RSS MB", "fsyncs/1k", "lost", "dup", "ooo", "status"]  # fmt: skip


# The publisher's own lateness (send time - scheduled time): the harness's share of the latency.
LABELS = {"schedule_send": "sched→send (harness)"}


def rows(rec: dict[str, Any]) -> list[list[str]]:
    lats = rec.get("latency") or {}
    check = rec.get("check") or {}
    rss = rec.get("broker_peak_rss_kb")
    base = [rec["scenario"], rec.get("variant", ""), rec.get("broker", "tidings"), rec.get("durability") or "—",
            _fmt(rec.get("messages")), _fmt(rec.get("msgs_per_s"))]  # fmt: skip
    tail = [_fmt(rec.get("broker_cpu_us_per_msg")), _fmt(rss / 1024 if rss else None, 1),
            _fmt(rec.get("fsyncs_per_1000")), _fmt(check.get("lost")), _fmt(check.get("duplicated")),
            _fmt(check.get("out_of_order")), rec.get("status", "")]  # fmt: skip
    if not lats:
        return [[*base, "—", "—", "—", "—", *tail]]
    out = []
    for i, (name, p) in enumerate(lats.items()):
        label = LABELS.get(name) or name.replace("publish_", "pub→").replace("_closed_loop", " (closed loop)")
        lat = [_fmt(p.get("p50_ms"), 3), _fmt(p.get("p99_ms"), 3), _fmt(p.get("p999_ms"), 3), _fmt(p.get("max_ms"), 3)]
        if i == 0:
            out.append([base[0], f"{base[1]} {label}".strip(), *base[2:], *lat, *tail])
        else:
            out.append(["", label, "", "", "", "", *lat, *[""] * len(tail)])
    return out


def markdown(records: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for rec in records:
        for r in rows(rec):
            lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)


def print_table(records: list[dict[str, Any]], env: dict[str, Any], command: str) -> None:
    print(markdown(records))
    print()
    print(f"`{command}` — Python {env['python']}, {env['loop']}, {env['cpus']} CPUs, commit {env['commit']}")
    noisy = [r for r in records if (r.get("other_cpu_share") or 0) > 0.25]
    if noisy:
        print()
        print(
            "Noisy runs (CPU used by other processes on the machine, in cores, during the run): "
            + ", ".join(f"{r['scenario']} {r.get('variant', '')} {r['other_cpu_share']:.2f}" for r in noisy)
        )
    failed = [r for r in records if r["status"] == "FAILED"]
    if failed:
        print()
        for r in failed:
            why = r.get("errors") or [f"lost {r.get('check', {}).get('lost')}"]
            print(f"FAILED: {r['scenario']} {r.get('variant', '')}: {'; '.join(map(str, why))}")
    sys.stdout.flush()
