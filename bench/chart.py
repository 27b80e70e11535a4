"""A PNG chart of one run: throughput per scenario and broker, and latency percentiles.

With ``--repeat``, each bar is the median run of its scenario and broker
(:func:`bench.report.median_runs`, as in the table). Needs matplotlib (the
``bench`` extra); without it, :func:`write` says so and returns None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import median_runs


def write(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Draw the chart of some run records.

    Args:
        records: run records, every round (each bar is a case's median run).
        path: the PNG to write (its folder is created).

    Returns:
        ``path``, or None without matplotlib or without a record to draw.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in median_runs(records) if r.get("msgs_per_s") and r.get("scenario") != "codec"]
    if not rows:
        return None
    brokers = list(dict.fromkeys(r["broker"] for r in rows))
    groups = list(dict.fromkeys(f"{r['scenario']}\n{r.get('variant', '')}" for r in rows))
    value = {(f"{r['scenario']}\n{r.get('variant', '')}", r["broker"]): r["msgs_per_s"] for r in rows}
    lat_rows = [r for r in rows if r["scenario"] == "latency"]

    fig, axes = plt.subplots(1, 2 if lat_rows else 1, figsize=(15 if lat_rows else 10, 5.5), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1.4] if lat_rows else [1]})  # fmt: skip
    ax = axes[0][0]
    width = 0.8 / len(brokers)
    for i, b in enumerate(brokers):
        xs = [g + (i - (len(brokers) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [value.get((grp, b), 0) for grp in groups], width, label=b)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("messages / s (log)")
    ax.set_title("throughput")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if lat_rows:
        ax2 = axes[0][1]
        names = ["p50_ms", "p99_ms", "p999_ms"]
        width = 0.8 / len(lat_rows)
        for i, r in enumerate(lat_rows):
            p = r["latency"].get("publish_deliver") or {}
            xs = [k + (i - (len(lat_rows) - 1) / 2) * width for k in range(len(names))]
            ax2.bar(xs, [p.get(n) or 0 for n in names], width, label=r["broker"])
        ax2.set_xticks(range(len(names)), ["p50", "p99", "p99.9"])
        ax2.set_yscale("log")
        ax2.set_ylabel("ms (log)")
        ax2.set_title(f"publish→deliver, {lat_rows[0].get('variant', '')}")
        ax2.legend(fontsize=8)
        ax2.grid(axis="y", alpha=0.3)
    first = rows[0]
    most = max(r["runs"]["count"] for r in rows)
    fig.suptitle(f"tidings bench — Python {first.get('python')}, {first.get('loop')}, {first.get('cpus')} CPUs, "
                 f"commit {first.get('commit')}" + (f"; median of {most} runs" if most > 1 else ""),
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
