"""The family's Pareto front as a PNG: accuracy against size, and against latency."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from family.registry import FamilyRegistry  # noqa: E402


def plot_family(registry: FamilyRegistry, out: Path, device_class: str | None = None) -> Path:
    """Perplexity vs parameters (left) and vs time per output token on `device_class` (right)."""
    measured = [m for m in registry.members if m.metric("perplexity") is not None]
    fig, (ax_size, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in measured:
        style = dict(marker="*", s=220, color="tab:red") if m.is_parent else dict(marker="o", s=60, color="tab:blue")
        ppl = m.metric("perplexity")
        ax_size.scatter(m.parameters / 1e6, ppl, **style)
        ax_size.annotate(m.name, (m.parameters / 1e6, ppl), textcoords="offset points", xytext=(5, 5), fontsize=8)
        classes = [device_class] if device_class else list(m.latency)
        for dc in classes:
            prof = m.latency.get(dc)
            singles = [s for s in (prof.samples if prof else []) if s.concurrency == 1]
            if singles:
                tpot_ms = 1e3 * sum(s.tpot_s for s in singles) / len(singles)
                ax_lat.scatter(tpot_ms, ppl, **style)
                ax_lat.annotate(f"{m.name} ({dc})", (tpot_ms, ppl), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax_size.set(xlabel="parameters (millions)", ylabel="held-out perplexity (lower is better)", title="accuracy vs size")
    ax_lat.set(xlabel="time per output token at concurrency 1 (ms)", title="accuracy vs latency")
    for ax in (ax_size, ax_lat):
        ax.grid(alpha=0.3)
        ax.set_yscale("log")
    fig.suptitle(f"family {registry.name} (★ parent)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
