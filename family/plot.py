"""The family's Pareto front as a PNG: accuracy against size, and against latency.

Left: accuracy vs parameters. Right: accuracy vs time per output token at concurrency 1 on each
profiled device class. Accuracy is what the router uses, chat agreement with the parent (higher is
better), when measured, else held-out perplexity (log scale, lower is better). The parent is a red
star, an unfit member (never routed to) a grey cross; the Pareto front (no other member both
smaller/faster and more accurate) is drawn as a step line.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from family.registry import FamilyRegistry, MemberRecord  # noqa: E402


def pareto_front(points: list[tuple[float, float]], lower_is_better: bool) -> list[tuple[float, float]]:
    """The non-dominated (cost, score) points, by increasing cost: each is more accurate than every cheaper one."""
    front, best = [], None
    for cost, score in sorted(points, key=lambda p: (p[0], p[1] if lower_is_better else -p[1])):
        if best is None or (score < best if lower_is_better else score > best):
            front.append((cost, score))
            best = score
    return front


def _tpot_ms(m: MemberRecord, device_class: str) -> float | None:
    prof = m.latency.get(device_class)
    singles = [s for s in (prof.samples if prof else []) if s.concurrency == 1]
    return 1e3 * sum(s.tpot_s for s in singles) / len(singles) if singles else None


def plot_family(registry: FamilyRegistry, out: Path, device_class: str | None = None) -> Path:
    """Write the PNG to `out` and return its path."""
    use_ppl = not any(m.quality is not None for m in registry.members if not m.is_parent)
    score_of = (lambda m: m.metric("perplexity")) if use_ppl else (lambda m: m.quality)
    label = "held-out perplexity (lower is better)" if use_ppl else "chat agreement with parent (higher is better)"
    measured = [m for m in registry.members if score_of(m) is not None]
    classes = [device_class] if device_class else sorted({dc for m in registry.members for dc in m.latency})
    fig, (ax_size, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.6))

    def scatter(ax, x, y, m, text):
        unfit = m.unfit_reason(registry.fitness) is not None
        style = (dict(marker="*", s=240, color="tab:red", zorder=3) if m.is_parent else
                 dict(marker="x", s=60, color="tab:gray", zorder=3) if unfit else dict(marker="o", s=60, color="tab:blue", zorder=3))
        ax.scatter(x, y, **style)
        ax.annotate(text + (" (unfit)" if unfit else ""), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)

    def front(ax, points, color):
        pts = pareto_front(points, lower_is_better=use_ppl)
        if len(pts) > 1:
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color=color, alpha=0.5, linestyle="--", label="Pareto front")

    for m in measured:
        scatter(ax_size, m.parameters / 1e6, score_of(m), m, m.name)
    front(ax_size, [(m.parameters / 1e6, score_of(m)) for m in measured], "tab:blue")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, dc in enumerate(classes):
        pts = []
        for m in measured:
            tpot = _tpot_ms(m, dc)
            if tpot is not None:
                scatter(ax_lat, tpot, score_of(m), m, f"{m.name} ({dc})" if len(classes) > 1 else m.name)
                pts.append((tpot, score_of(m)))
        front(ax_lat, pts, colors[i % len(colors)])
    if not measured:
        ax_size.text(0.5, 0.5, "no accuracy measured yet (run family eval)", ha="center", transform=ax_size.transAxes)
    if not any(_tpot_ms(m, dc) is not None for m in measured for dc in classes):
        ax_lat.text(0.5, 0.5, "no latency profiled yet (run family profile)", ha="center", transform=ax_lat.transAxes)
    ax_size.set(xlabel="parameters (millions)", ylabel=label, title="accuracy vs size")
    where = f" on {classes[0]}" if len(classes) == 1 else ""
    ax_lat.set(xlabel=f"time per output token at concurrency 1{where} (ms)", ylabel=label, title="accuracy vs latency")
    for ax in (ax_size, ax_lat):
        ax.grid(alpha=0.3)
        if use_ppl and measured:
            ax.set_yscale("log")
    fig.suptitle(f"family {registry.name} (★ parent)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
