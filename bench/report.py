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

# Between the low and high of a runs cell ("3: 101k" DASH "145k").
DASH = "\N{EN DASH}"

# Worst last: a group of runs shows the worst status of any of them.
STATUS_RANK = {"ok": 0, "WARN": 1, "FAILED": 2}


def _label(name: str) -> str:
    return LABELS.get(name) or name.replace("publish_", "pub→").replace("_closed_loop", " (closed loop)")


# --- several runs of one case (--repeat) ------------------------------------


def latency_headline(rec: dict[str, Any]) -> bool:
    """Whether a run's headline figure is a latency (ms, lower is better) rather than msgs/s.

    Args:
        rec: a run record.

    Returns:
        True for the ``latency`` scenario, whose rate is fixed by ``--rate``.
    """
    return bool(rec.get("scenario") == "latency")


def headline(rec: dict[str, Any]) -> float | None:
    """The figure that ranks a run among its repeats and brokers.

    Args:
        rec: a run record.

    Returns:
        msgs/s; for ``latency``, the p99 in ms of its first latency entry
        (publish→deliver). None when the run has no such figure (it failed).
    """
    if latency_headline(rec):
        first: dict[str, Any] = next(iter((rec.get("latency") or {}).values()), {})
        value = first.get("p99_ms")
    else:
        value = rec.get("msgs_per_s")
    return float(value) if value is not None else None


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of some runs of one case, by :func:`headline`.

    Conservative: with an even count it is the *worse* of the two middle runs
    (the lower msgs/s, or the higher latency p99), so two rounds show the
    worse one. Runs without a headline figure are not candidates.

    Args:
        runs: the records of one scenario, variant and broker (at least one).

    Returns:
        One of ``runs`` (the first one if none has a headline figure).
    """
    scored = [(value, r) for r in runs if (value := headline(r)) is not None]
    if not scored:
        return runs[0]
    # Worst first; sorted() is stable, so ties keep the order of the rounds.
    scored.sort(key=lambda vr: vr[0], reverse=latency_headline(runs[0]))
    return scored[(len(scored) - 1) // 2][1]


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    median = median_run(runs)
    check = dict(median.get("check") or {})
    for key in ("lost", "duplicated", "out_of_order"):
        counts = [c[key] for r in runs if (c := r.get("check")) and c.get(key) is not None]
        if counts:
            check[key] = sum(counts)
    values = [v for r in runs if (v := headline(r)) is not None]
    return {
        **median,
        "status": max((r.get("status", "ok") for r in runs), key=lambda s: STATUS_RANK.get(s, 0)),
        "check": check,
        "runs": {"count": len(runs), "low": min(values, default=None), "high": max(values, default=None)},
    }


def median_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per scenario, variant and broker: its median run over the rounds.

    The median is :func:`median_run`'s. So that a bad round is never hidden by
    the median, the record's ``status`` is the worst of its runs (FAILED >
    WARN > ok) and its check's ``lost``, ``duplicated`` and ``out_of_order``
    are the sums over its runs. With one run per case, each record comes back
    as it was, plus ``runs``.

    Args:
        records: run records, in the order they ran.

    Returns:
        New dicts, in order of each case's first run, each a copy of its
        median run with those fields and ``runs``: ``{"count", "low",
        "high"}``, the number of runs and the range of their headline figure.
    """
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["scenario"], r.get("variant", ""), r.get("broker", "tidings")), []).append(r)
    return [_summary(runs) for runs in groups.values()]


def _short(v: float) -> str:
    """msgs/s in three figures: 3.10k, 40.9k, 120k, 1.23M."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            v, unit = v / scale, suffix
            break
    else:
        unit = ""
    return f"{v:.{2 if abs(v) < 10 else 1 if abs(v) < 100 else 0}f}{unit}"


def _runs_cell(rec: dict[str, Any]) -> str:
    runs = rec.get("runs") or {"count": 1, "low": headline(rec), "high": headline(rec)}
    low, high = runs["low"], runs["high"]
    if low is None:
        return str(runs["count"])
    if latency_headline(rec):
        return f"{runs['count']}: {low:.2f}{DASH}{high:.2f} ms"
    return f"{runs['count']}: {_short(low)}{DASH}{_short(high)}"


# --- the table --------------------------------------------------------------


def rows(rec: dict[str, Any], runs_column: bool = False) -> list[list[str]]:
    """The table rows of one record: one, or one per latency entry.

    Args:
        rec: a run record, or a :func:`median_runs` record.
        runs_column: add the ``runs`` cell after msgs/s (``--repeat`` above 1).

    Returns:
        Rows of cells, as many as the header has (with ``runs`` when asked).
    """
    lats = rec.get("latency") or {}
    check = rec.get("check") or {}
    rss = rec.get("broker_peak_rss_kb")
    base = [rec["scenario"], rec.get("variant", ""), rec.get("broker", "tidings"), rec.get("durability") or "—",
            _fmt(rec.get("messages")), _fmt(rec.get("msgs_per_s"))]  # fmt: skip
    if runs_column:
        base.append(_runs_cell(rec))
    tail = [_fmt(rec.get("broker_cpu_us_per_msg")), _fmt(rss / 1024 if rss else None, 1),
            _fmt(rec.get("fsyncs_per_1000")), _fmt(check.get("lost")), _fmt(check.get("duplicated")),
            _fmt(check.get("out_of_order")), rec.get("status", "")]  # fmt: skip
    if not lats:
        return [[*base, "—", "—", "—", "—", *tail]]
    out = []
    for i, (name, p) in enumerate(lats.items()):
        label = _label(name)
        lat = [_fmt(p.get("p50_ms"), 3), _fmt(p.get("p99_ms"), 3), _fmt(p.get("p999_ms"), 3), _fmt(p.get("max_ms"), 3)]
        if i == 0:
            out.append([base[0], f"{base[1]} {label}".strip(), *base[2:], *lat, *tail])
        else:
            out.append(["", label, *[""] * (len(base) - 2), *lat, *[""] * len(tail)])
    return out


def markdown(records: list[dict[str, Any]]) -> str:
    """The Markdown table: one row group per scenario, variant and broker.

    With several runs of a case (``--repeat``), its row group is the median
    run (:func:`median_runs`) and a ``runs`` column after msgs/s gives the
    number of runs and the min-max of the headline figure (msgs/s; for
    ``latency`` the p99 in ms). With one run per case the table has no
    ``runs`` column.

    Args:
        records: run records, in the order they ran.

    Returns:
        The table, without a trailing newline.
    """
    groups = median_runs(records)
    repeated = any(g["runs"]["count"] > 1 for g in groups)
    header = list(HEADER)
    if repeated:
        header.insert(header.index("msgs/s") + 1, "runs")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for rec in groups:
        for r in rows(rec, runs_column=repeated):
            lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)


# --- tidings against the best peer ------------------------------------------


def _versus_line(case: str, ours: dict[str, Any], peers: list[dict[str, Any]], who: str) -> str:
    lower_is_better = latency_headline(ours)
    scored = [(value, r) for r in peers if (value := headline(r)) is not None]
    value, best = (min if lower_is_better else max)(scored, key=lambda vr: vr[0])
    mine = headline(ours)
    assert mine is not None  # versus() keeps only runs with a headline figure
    if lower_is_better:
        first = next(iter(ours["latency"]))
        line = f"{case} p99 {_label(first)}: tidings {mine:.2f} ms vs {who} {best['broker']} {value:.2f} ms"
    else:
        ratio = f" ({mine / value:.2f}x)" if value else ""
        line = f"{case}: tidings {mine:,.0f}/s vs {who} {best['broker']} {value:,.0f}/s{ratio}"
    for r in (ours, best):
        if r.get("status", "ok") != "ok":
            line += f" [{r['broker']} {r['status']}]"
    return line


def versus(rows: list[dict[str, Any]]) -> list[str]:
    """Tidings against the best peer, one line per scenario and variant.

    Only cases that tidings and at least one peer ran (with a headline
    figure) get a line; ``codec`` is tidings-only and skipped. Throughput
    compares msgs/s (with tidings' multiple of the peer's); ``latency``
    compares the p99 of its first latency entry (publish→deliver; lower is
    better). ``publish window=1`` gets a second line against the best peer
    whose record says ``fsync_before_confirm`` (the like-for-like bar for
    tidings' ``--fsync always``; noted when tidings ran otherwise). A
    non-ok status of either side is appended in brackets.

    Args:
        rows: one record per scenario, variant and broker, as from
            :func:`median_runs` (with repeats, the median runs).

    Returns:
        The lines, in table order; empty when no peer ran.
    """
    cases: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["scenario"] != "codec" and headline(r) is not None:
            cases.setdefault((r["scenario"], r.get("variant", "")), []).append(r)
    out = []
    for (scenario, variant), group in cases.items():
        ours = next((r for r in group if r.get("broker") == "tidings"), None)
        peers = [r for r in group if r.get("broker") != "tidings"]
        if ours is None or not peers:
            continue
        case = f"{scenario} {variant}".strip()
        out.append(_versus_line(case, ours, peers, "best peer"))
        safe = [r for r in peers if r.get("fsync_before_confirm")]
        if scenario == "publish" and variant == "window=1" and safe:
            line = _versus_line(case, ours, safe, "best fsync-before-confirm peer")
            if not ours.get("fsync_before_confirm"):
                line += f" (tidings ran with {ours.get('durability')})"
            out.append(line)
    return out


def print_table(records: list[dict[str, Any]], env: dict[str, Any], command: str) -> None:
    """Print the Markdown table, the versus lines and any noisy or failed runs.

    Args:
        records: run records, in the order they ran (every round).
        env: :func:`environment`.
        command: the command line, for the caption.
    """
    groups = median_runs(records)
    print(markdown(records))
    print()
    most = max((g["runs"]["count"] for g in groups), default=1)
    print(f"`{command}` — Python {env['python']}, {env['loop']}, {env['cpus']} CPUs, commit {env['commit']}"
          + (f"; each row the median of {most} runs" if most > 1 else ""))  # fmt: skip
    lines = versus(groups)
    if lines:
        print()
        print("\n".join(lines))
    noisy = [(r, note) for r in records if (note := noise(r))]
    if noisy:
        print()
        print(
            "Noisy runs (other processes and the kernel, or the hypervisor (steal), used this much of a core "
            "during the run): " + "; ".join(f"{_which(r)}: {note}" for r, note in noisy)
        )
    failed = [r for r in records if r["status"] == "FAILED"]
    if failed:
        print()
        for r in failed:
            why = r.get("errors") or [f"lost {r.get('check', {}).get('lost')}"]
            print(f"FAILED: {_which(r)}: {'; '.join(map(str, why))}")
    sys.stdout.flush()


def noise(rec: dict[str, Any]) -> str | None:
    """What else took the CPU during a run, when enough to skew it: over a
    quarter of a core for other processes (and the kernel), or a tenth of
    one stolen by the hypervisor (the VM was not running at all)."""
    other, steal = rec.get("other_cpu_share") or 0, rec.get("steal_share") or 0
    parts = ([f"other {other:.0%}"] if other > 0.25 else []) + ([f"steal {steal:.0%}"] if steal > 0.1 else [])
    return ", ".join(parts) or None


def _which(rec: dict[str, Any]) -> str:
    """Scenario, variant, broker and (with --repeat) round of a run, for the notes under the table."""
    where = f"{rec['scenario']} {rec.get('variant', '')} {rec.get('broker', 'tidings')}"
    return where + (f" (round {rec['round']})" if rec.get("rounds", 1) > 1 else "")
