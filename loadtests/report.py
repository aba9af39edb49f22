"""Turn request outcomes into the goodput/SLO report: JSON summary, PNG, markdown table."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from loadtests.budgets import CLASS_NAMES, Outcome


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation, None for no values."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return round(v[lo] + (v[hi] - v[lo]) * (k - lo), 2)


def _percentiles(values: list[float]) -> dict:
    return {"p50": pct(values, 50), "p90": pct(values, 90), "p99": pct(values, 99), "n": sum(v is not None for v in values)}


def summarize_group(outs: list[Outcome], elapsed_s: float) -> dict:
    n = len(outs)
    ok = [o for o in outs if o.status == 200 and not o.error_type]
    missed = Counter(m for o in outs for m in o.missed)
    return {
        "requests": n,
        "succeeded": len(ok),
        "met_budget": sum(o.met for o in outs),
        "goodput": round(sum(o.met for o in outs) / n, 4) if n else None,
        "goodput_rps": round(sum(o.met for o in outs) / elapsed_s, 3) if elapsed_s else None,
        "throughput_rps": round(len(ok) / elapsed_s, 3) if elapsed_s else None,
        "throughput_tok_s": round(sum(o.tokens for o in ok) / elapsed_s, 1) if elapsed_s else None,
        "rejected_budget_error": sum(o.error_type == "budget_error" for o in outs),
        "overloaded_429": sum(o.status == 429 for o in outs),
        # not served and neither rejected by budget nor turned away with 429: 5xx, other 4xx, broken streams, timeouts
        "failed": sum(not (o.status == 200 and not o.error_type) and o.error_type != "budget_error" and o.status != 429 for o in outs),
        "server_5xx": sum(o.status >= 500 for o in outs),
        "missed": dict(missed),
        "ttft_ms": _percentiles([o.ttft_ms for o in ok if o.stream]),
        "tpot_ms": _percentiles([o.tpot_ms for o in ok if o.tpot_ms is not None]),
        "e2e_ms": _percentiles([o.e2e_ms for o in ok]),
        # How far the gateway's latency prediction (x-family-predicted-latency-ms) was from what happened.
        "e2e_over_predicted": _percentiles([o.e2e_ms / o.predicted_latency_ms for o in ok if o.predicted_latency_ms and o.e2e_ms is not None]),
        "served_by": dict(Counter(o.member or "-" for o in ok)),
        "streamed": sum(o.stream for o in outs),
    }


def summarize(outs: list[Outcome], elapsed_s: float, meta: dict | None = None) -> dict:
    by_class = {c: summarize_group([o for o in outs if o.cls == c], elapsed_s) for c in CLASS_NAMES if any(o.cls == c for o in outs)}
    return {**(meta or {}), "elapsed_s": round(elapsed_s, 1), "overall": summarize_group(outs, elapsed_s), "by_class": by_class}


def write_outcomes(outs: list[Outcome], path: Path) -> None:
    with open(path, "w") as f:
        for o in outs:
            f.write(json.dumps(asdict(o)) + "\n")


def _fmt(v, spec=".0f") -> str:
    return "-" if v is None else format(v, spec)


def markdown_table(policies: dict[str, dict]) -> str:
    """One row per policy: goodput overall and per class, throughput, latency percentiles, members."""
    classes = [c for c in CLASS_NAMES if any(c in s["by_class"] for s in policies.values())]
    mix = any("goodput_mix" in s["overall"] for s in policies.values())
    head = ["policy", "requests", "goodput", *(["goodput at class mix"] if mix else []), *[f"goodput {c}" for c in classes], "req/s", "tok/s", "TTFT p50/p90 ms",
            "e2e p50/p90 ms", "e2e / predicted p50/p90", "rejected", "429", "failed", "served by"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in policies.items():
        o = s["overall"]
        row = [name, str(o["requests"]), _fmt(o["goodput"] and 100 * o["goodput"], ".1f") + "%"]
        if mix:
            row.append(_fmt(o.get("goodput_mix") and 100 * o["goodput_mix"], ".1f") + "%")
        row += [_fmt(s["by_class"].get(c, {}).get("goodput") and 100 * s["by_class"][c]["goodput"], ".1f") + "%" for c in classes]
        row += [_fmt(o["throughput_rps"], ".2f"), _fmt(o["throughput_tok_s"], ".0f"),
                f"{_fmt(o['ttft_ms']['p50'])}/{_fmt(o['ttft_ms']['p90'])}", f"{_fmt(o['e2e_ms']['p50'])}/{_fmt(o['e2e_ms']['p90'])}",
                f"{_fmt(o['e2e_over_predicted']['p50'], '.2f')}/{_fmt(o['e2e_over_predicted']['p90'], '.2f')}" if "e2e_over_predicted" in o else "-",
                str(o["rejected_budget_error"]), str(o["overloaded_429"]), str(o["failed"]),
                ", ".join(f"{k}:{v}" for k, v in sorted(o["served_by"].items()))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(policies: dict[str, dict], png: Path, title: str = "") -> None:
    """Goodput per class, latency percentiles per class, and who served the requests, per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(policies)
    classes = [c for c in CLASS_NAMES if any(c in s["by_class"] for s in policies.values())]
    fig, axes = plt.subplots(1, 4, figsize=(22, 5))
    width = 0.8 / max(1, len(names))

    ax = axes[0]
    for i, n in enumerate(names):
        o = policies[n]["overall"]
        vals = [100 * (policies[n]["by_class"].get(c, {}).get("goodput") or 0) for c in classes] + [100 * (o.get("goodput_mix", o["goodput"]) or 0)]
        ax.bar([x + i * width for x in range(len(classes) + 1)], vals, width, label=n)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(classes) + 1)], [*classes, "all (class mix)" if any("goodput_mix" in policies[n]["overall"] for n in names) else "all"], rotation=20)
    ax.set_ylabel("% of requests that met their budget")
    ax.set_ylim(0, 105)
    ax.axhline(95, color="grey", ls=":", lw=1)
    ax.set_title("goodput")
    ax.legend()

    for ax, metric, label in ((axes[1], "ttft_ms", "TTFT (streamed) ms"), (axes[2], "e2e_ms", "end-to-end ms")):
        for i, n in enumerate(names):
            p50 = [policies[n]["by_class"].get(c, {}).get(metric, {}).get("p50") or 0 for c in classes]
            p90 = [policies[n]["by_class"].get(c, {}).get(metric, {}).get("p90") or 0 for c in classes]
            xs = [x + i * width for x in range(len(classes))]
            ax.bar(xs, p90, width, alpha=0.35, color=f"C{i}")
            ax.bar(xs, p50, width, label=f"{n} p50 (p90 light)", color=f"C{i}")
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(classes))], classes, rotation=20)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.set_title(label)
        ax.legend(fontsize=7)

    ax = axes[3]
    members = sorted({m for s in policies.values() for m in s["overall"]["served_by"]})
    bottom = [0.0] * len(names)
    for j, m in enumerate(members):
        vals = [policies[n]["overall"]["served_by"].get(m, 0) for n in names]
        ax.bar(names, vals, bottom=bottom, label=m, color=f"C{j + 3}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("requests served")
    ax.set_title("served by (x-family-member)")
    ax.legend(fontsize=7)

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
