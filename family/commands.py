"""`family register|verify|eval|profile|show|plot`: what is measured about members, and the registry."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from family import defaults

FamilyOpt = typer.Option(defaults.DEFAULT_FAMILY_DIR, "--family", help="family folder (holds family.json)")


def _command() -> str:
    return shlex.join(["family", *sys.argv[1:]])


def _selected(fam, members: list[str] | None):
    from family.errors import FamilyError

    names = members or [m.name for m in fam.servable]
    for n in names:
        fam.registry.member(n)  # unknown names raise with the list of members
        if n in fam.problems:
            raise FamilyError(f"member {n!r} is not usable: {fam.problems[n]}")
    return names


def register_cmd(
    family_dir: Path = FamilyOpt,
    parent: Path = typer.Option(..., help="the parent's model folder"),
    name: str = typer.Option(defaults.FAMILY_NAME, help="family name"),
) -> None:
    """Create or update family.json from the member folders on disk."""
    from family.registry import sync_family

    reg = sync_family(family_dir, parent_dir=parent, family_name=name)
    typer.echo(f"registered {len(reg.members)} members in {family_dir / defaults.REGISTRY_FILE}")


def verify(family_dir: Path = FamilyOpt, full: bool = typer.Option(False, help="hash every weight file (sha256)")) -> None:
    """Check every member's weight files against the registry; non-zero exit if any fails."""
    from family.errors import FamilyError
    from family.registry import load_family

    fam = load_family(family_dir, verify="full" if full else "fast")
    for m in fam.registry.members:
        typer.echo(f"{m.name}: {fam.problems.get(m.name, 'ok')}")
    if fam.problems:
        raise FamilyError(f"{len(fam.problems)} member(s) failed verification: {', '.join(fam.problems)}")


def eval_cmd(
    family_dir: Path = FamilyOpt,
    member: list[str] = typer.Option(None, help="members to evaluate (default: all)"),
    data: str = typer.Option(str(defaults.EVAL_TEXT), help="held-out text: file, file.jsonl[:field] or hf:name"),
    windows: int = typer.Option(defaults.EVAL_WINDOWS, min=1),
    seq_len: int = typer.Option(defaults.EVAL_SEQ_LEN, min=8),
    batch_size: int = typer.Option(4, min=1),
    lm_eval_tasks: str = typer.Option("", help="comma-separated lm-eval tasks (boolq,winogrande,...) where lm-eval is installed"),
) -> None:
    """Held-out perplexity, top-1 agreement and KL against the parent; stored in the registry."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from family.accuracy import evaluate
    from family.registry import AccuracyRecord, load_family
    from plrd.data import read_source, tokenize

    fam = load_family(family_dir)
    names = _selected(fam, member)
    parent_name = fam.registry.parent
    source = read_source(data)
    tok = AutoTokenizer.from_pretrained(fam.member_dir(parent_name))
    ids = tokenize(tok, source.text)
    load = lambda n: AutoModelForCausalLM.from_pretrained(fam.member_dir(n), dtype=torch.float32).eval()  # noqa: E731
    parent = load(parent_name)
    models = {n: (parent if n == parent_name else load(n)) for n in names}
    scores = evaluate(models, parent, ids, seq_len=seq_len, max_windows=windows, batch_size=batch_size)
    cmd = _command()
    for n, s in scores.items():
        rec = fam.registry.member(n)
        common = dict(data=source.spec, data_sha256=source.sha256, tokens=s.tokens, command=cmd)
        rec.accuracy.append(AccuracyRecord(metric="perplexity", value=s.perplexity, **common))
        rec.accuracy.append(AccuracyRecord(metric="top1_agreement", value=s.top1_agreement, reference=parent_name, **common))
        rec.accuracy.append(AccuracyRecord(metric="mean_kl", value=s.mean_kl, reference=parent_name, **common))
        typer.echo(f"{n}: perplexity {s.perplexity:.2f}, top-1 agreement {s.top1_agreement:.3f}, KL {s.mean_kl:.4f}")
    fam.save()
    if lm_eval_tasks:
        _lm_eval(fam, names, lm_eval_tasks, cmd)


def _lm_eval(fam, names: list[str], tasks: str, cmd: str) -> None:
    """Zero-shot tasks through lm-eval, where it and its data are reachable; otherwise say why not."""
    from family.registry import AccuracyRecord

    try:
        import lm_eval
    except ImportError:
        typer.echo("lm-eval tasks skipped: the lm-eval package is not installed (pip install 'llm-family[eval]')", err=True)
        return
    for n in names:
        try:
            out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={fam.member_dir(n)}", tasks=tasks.split(","))
        except Exception as exc:  # no network for the task data, unknown task, ...
            typer.echo(f"lm-eval tasks skipped for {n}: {str(exc).splitlines()[0]}", err=True)
            return
        for task, res in out["results"].items():
            acc = res.get("acc,none", res.get("acc"))
            if acc is not None:
                fam.registry.member(n).accuracy.append(AccuracyRecord(metric=f"lm_eval:{task}", value=acc, data=task, command=cmd))
        fam.save()


def _ints(text: str, flag: str) -> list[int]:
    from family.errors import FamilyError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FamilyError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise FamilyError(f"{flag} takes positive integers, got {text!r}")
    return values


def profile(
    family_dir: Path = FamilyOpt,
    device_class: str = typer.Option(..., help="name of this hardware class, e.g. cpu-2core or h100"),
    engine: str = typer.Option("torch", help="torch or vllm: the engine that will serve the member"),
    member: list[str] = typer.Option(None, help="members to profile (default: all)"),
    concurrency: str = typer.Option("1,4,8", help="concurrent requests"),
    prompt_tokens: str = typer.Option("32,256", help="prompt lengths (tokens)"),
    output_tokens: str = typer.Option("32", help="output lengths (tokens)"),
    rounds: int = typer.Option(2, min=1, help="bursts per request shape"),
    dtype: str = typer.Option("float32"),
) -> None:
    """Measure TTFT, time per output token, throughput and peak memory through the serving engine."""
    from transformers import AutoTokenizer

    from family import latency
    from family.errors import FamilyError
    from family.profile import Shape, WorkerProcess, profile_worker
    from family.registry import LatencyProfile, load_family
    from plrd.data import read_source, tokenize

    if engine not in ("torch", "vllm"):
        raise FamilyError(f"--engine must be torch or vllm, got {engine!r}")
    shapes = [Shape(p, o, c) for c in _ints(concurrency, "--concurrency") for p in _ints(prompt_tokens, "--prompt-tokens")
              for o in _ints(output_tokens, "--output-tokens")]
    fam = load_family(family_dir)
    names = _selected(fam, member)
    text_ids = tokenize(AutoTokenizer.from_pretrained(fam.member_dir(fam.registry.parent)), read_source(defaults.EVAL_TEXT).text[:400_000]).tolist()
    log_dir = Path(family_dir) / "logs"
    log_dir.mkdir(exist_ok=True)
    for n in names:
        tok = AutoTokenizer.from_pretrained(fam.member_dir(n))
        with WorkerProcess(fam.member_dir(n), n, engine, dtype=dtype, log=log_dir / f"worker-{n}-{engine}.log") as worker:
            samples = profile_worker(worker.url, n, tok, text_ids, shapes, rounds=rounds)
            peak = worker.peak_rss
        prof = LatencyProfile(device_class=device_class, engine=engine, dtype=dtype, samples=samples, peak_memory_bytes=peak,
                              latency_model=latency.fit(samples), command=_command())
        fam.registry.member(n).latency[device_class] = prof
        fam.save()  # after each member: an interrupted profile loses nothing already measured
        one = [s for s in samples if s.concurrency == 1] or samples
        ttft_ms = 1e3 * min(s.ttft_s for s in one)
        tok_s = len(one) / sum(s.tpot_s for s in one)
        typer.echo(f"{n}: TTFT {ttft_ms:.0f} ms (shortest prompt), {tok_s:.1f} tok/s at c={one[0].concurrency}, peak {peak / 1e9:.2f} GB")


def show(family_dir: Path = FamilyOpt) -> None:
    """The family as a table: size, accuracy, and latency per device class."""
    from rich.console import Console
    from rich.table import Table

    from family.registry import load_family

    fam = load_family(family_dir)
    classes = sorted({dc for m in fam.registry.members for dc in m.latency})
    table = Table(title=f"family {fam.registry.name} ({Path(family_dir) / defaults.REGISTRY_FILE})")
    for col in ("member", "params (M)", "GB fp32", "GB bf16", "ppl", "agree", "KL"):
        table.add_column(col, justify="right" if col != "member" else "left")
    for dc in classes:
        table.add_column(f"TTFT ms {dc}", justify="right")
        table.add_column(f"tok/s {dc}", justify="right")
    table.add_column("status")

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for m in fam.registry.members:
        row = [m.name, f"{m.parameters / 1e6:.1f}", f"{m.bytes['float32'] / 1e9:.3f}", f"{m.bytes['bfloat16'] / 1e9:.3f}",
               fmt(m.metric("perplexity"), ".2f"), fmt(m.quality, ".3f"), fmt(m.metric("mean_kl"), ".4f")]
        for dc in classes:
            prof = m.latency.get(dc)
            one = [s for s in (prof.samples if prof else []) if s.concurrency == 1]
            row += [fmt(1e3 * min(s.ttft_s for s in one) if one else None, ".0f"),
                    fmt(len(one) / sum(s.tpot_s for s in one) if one else None, ".1f")]
        row.append(fam.problems.get(m.name, "ok"))
        table.add_row(*row)
    Console(width=200).print(table)


def plot(
    family_dir: Path = FamilyOpt,
    out: Path = typer.Option(None, help="PNG path (default: FAMILY/family.png)"),
    device_class: str = typer.Option(None, help="device class for the latency panel (default: all)"),
) -> None:
    """Write a PNG of the family's Pareto front: accuracy vs size and vs latency, parent marked."""
    from family.plot import plot_family
    from family.registry import read_registry

    path = plot_family(read_registry(family_dir), out or Path(family_dir) / "family.png", device_class)
    typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("register")(register_cmd)
    app.command("verify")(verify)
    app.command("eval")(eval_cmd)
    app.command("profile")(profile)
    app.command("show")(show)
    app.command("plot")(plot)
