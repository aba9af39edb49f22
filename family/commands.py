"""`family register|verify|eval|profile|show|plot`: what is measured about members, and the registry."""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
from pathlib import Path

from typing import Optional

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
    member: list[str] = typer.Option(None, help="members to evaluate (default: all servable)"),
    data: str = typer.Option(str(defaults.EVAL_TEXT), help="held-out plain text: file, file.jsonl[:field] or hf:name"),
    windows: int = typer.Option(defaults.EVAL_WINDOWS, min=1, help="first N windows of the text"),
    seq_len: int = typer.Option(defaults.EVAL_SEQ_LEN, min=8, help="tokens per window"),
    batch_size: int = typer.Option(4, min=1),
    chat_prompts: Path = typer.Option(defaults.EVAL_PROMPTS, help="held-out chat prompts (JSONL with a 'prompt' field)"),
    answer_tokens: int = typer.Option(defaults.EVAL_ANSWER_TOKENS, min=1, help="greedy tokens per chat answer"),
    min_chat_agreement: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="set the family's fitness floor: members below it are unfit (never routed to)"),
    lm_eval_tasks: str = typer.Option("", help="comma-separated lm-eval tasks (boolq,winogrande,...) where lm-eval is installed"),
    skip_measured: bool = typer.Option(False, help="skip members already measured on the same data and windows (resume)"),
    dtype: str = typer.Option("float32", help="run the members at float32, bfloat16 or float16 (the dtype a worker serves them at; "
                                             "the parent they are compared with always runs at float32)"),
) -> None:
    """Faithfulness to the parent, stored in the registry: on held-out chat prompts, chat agreement
    (teacher-forced top-1 on the parent's greedy answers), KL and degenerate answers; on held-out
    plain text, perplexity, top-1 agreement and KL.

    The parent answers each chat prompt once (greedy, float32); each member is then scored against
    those answers and its own greedy answers are checked (saved in FAMILY/eval/answers-MEMBER.json,
    answers-MEMBER-DTYPE.json below float32). At `--dtype bfloat16` every member runs at bfloat16, the
    parent included (rounding makes it differ from itself at float32), and the records say so: the
    router reads each member's figures at the dtype its worker serves it at. The registry is saved
    after each member, so an interrupted run loses nothing already measured.
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from family import chat_eval
    from family.accuracy import evaluate, perplexity_in_parent_tokens, windows as windows_of
    from family.data import read_prompts
    from family.degeneracy import degenerate_reason
    from family.errors import FamilyError
    from family.registry import AccuracyRecord, FitnessPolicy, check_dtype, load_family
    from family.storage import atomic_write_text, sha256_file
    from family.text import read_source, tokenize

    check_dtype(dtype)
    fam = load_family(family_dir)
    names = _selected(fam, member)
    parent_name = fam.registry.parent
    if parent_name in fam.problems:
        raise FamilyError(f"the parent {parent_name!r} is not usable: {fam.problems[parent_name]}")
    if min_chat_agreement is not None:
        fam.set_fitness(FitnessPolicy(**{**fam.registry.fitness.model_dump(), "min_chat_agreement": min_chat_agreement}))
    source = read_source(data)
    data_sha256 = source.sha256 or hashlib.sha256(source.text.encode("utf-8")).hexdigest()
    prompts = [p.prompt for p in read_prompts(chat_prompts)]
    prompts_sha256 = sha256_file(chat_prompts)
    tok = AutoTokenizer.from_pretrained(fam.member_dir(parent_name))
    ids = tokenize(tok, source.text)
    rows = windows_of(ids, seq_len, windows)
    tokens = rows.numel() - len(rows)  # predicted positions
    if len(rows) < windows:
        typer.echo(f"note: {data} holds only {len(rows)} windows of {seq_len} tokens", err=True)
    cmd = _command()

    def measured(n: str) -> bool:
        rec = fam.registry.member(n)
        here = [r for r in rec.accuracy if r.dtype == dtype]
        return (any(r.metric == "perplexity" and r.data_sha256 == data_sha256 and r.tokens == tokens for r in here)
                and any(r.metric == "chat_agreement" and r.data_sha256 == prompts_sha256 for r in here))

    todo = [n for n in names if not (skip_measured and measured(n))]
    for n in sorted(set(names) - set(todo)):
        typer.echo(f"{n}: already measured on {source.spec} and {chat_prompts}, skipped")
    load = lambda n, dt=dtype: AutoModelForCausalLM.from_pretrained(fam.member_dir(n), dtype=getattr(torch, dt)).eval()  # noqa: E731
    parent = load(parent_name, "float32") if todo else None
    ref = chat_eval.reference(parent, tok, prompts, max_new_tokens=answer_tokens) if todo else None
    parent_degenerate = [degenerate_reason(tok.decode(a, skip_special_tokens=True)) is not None for a in ref.answers] if todo else []
    out_dir = Path(family_dir) / "eval"
    # The parent first (one forward pass per window), then each member against it.
    for n in sorted(todo, key=lambda n: n != parent_name):
        model = parent if n == parent_name and dtype == "float32" else load(n)
        own = tok if model is parent else AutoTokenizer.from_pretrained(fam.member_dir(n))
        if model.config.vocab_size < parent.config.vocab_size:  # a trimmed vocabulary (plrd/vocab.py): in its own tokens
            s = perplexity_in_parent_tokens(model, own, tok, rows)
        else:
            s = evaluate({n: model}, parent, ids, seq_len=seq_len, max_windows=windows, batch_size=batch_size)[n]
        c = chat_eval.score_member(model, parent, tok, own, ref, name=n)
        text = dict(data=source.spec, data_sha256=data_sha256, tokens=s.tokens, command=cmd, dtype=dtype)
        chat = dict(data=str(chat_prompts), data_sha256=prompts_sha256, command=cmd, dtype=dtype)
        # Saved after each member (an interrupted eval loses nothing already measured), merged under a
        # lock with whatever another eval or profile of this family saved meanwhile.
        fam.record(n, accuracy=[
            AccuracyRecord(metric="chat_agreement", value=c.agreement, reference=parent_name, tokens=c.tokens, **chat),
            AccuracyRecord(metric="chat_kl", value=c.kl, reference=parent_name, tokens=c.tokens, **chat),
            AccuracyRecord(metric="degenerate_answers", value=c.degenerate_share, tokens=len(prompts), **chat),
            AccuracyRecord(metric="degenerate_beyond_parent", tokens=len(prompts), **chat,
                           value=sum(r is not None and not p for r, p in zip(c.reasons, parent_degenerate)) / len(prompts)),
            AccuracyRecord(metric="perplexity", value=s.perplexity, **text),
            *([AccuracyRecord(metric="top1_agreement", value=s.top1_agreement, reference=parent_name, **text),
               AccuracyRecord(metric="mean_kl", value=s.mean_kl, reference=parent_name, **text)] if s.top1_agreement is not None else []),
        ])
        answers = [{"prompt": p, "answer": a, "degenerate": r} for p, a, r in zip(prompts, c.answers, c.reasons)]
        suffix = "" if dtype == "float32" else f"-{dtype}"
        atomic_write_text(out_dir / f"answers-{n}{suffix}.json",
                          json.dumps({"member": n, "dtype": dtype, "command": cmd, "answers": answers}, indent=2) + "\n")
        typer.echo(f"{n}{'' if dtype == 'float32' else ' at ' + dtype}: chat agreement {c.agreement:.3f}, chat KL {c.kl:.3f}, degenerate {c.degenerate_share:.0%} "
                   f"of {len(prompts)} answers; perplexity {s.perplexity:.2f} ({s.tokens} tokens); "
                   f"first answer: {c.answers[0][:80]!r}")
        if model is not parent:
            del model
    for n, why in load_family(family_dir).unfit_at(dtype).items():
        typer.echo(f"{n}: unfit for routed traffic: {why}", err=True)
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
        records = []
        for task, res in out["results"].items():
            acc = res.get("acc,none", res.get("acc"))
            if acc is not None:
                records.append(AccuracyRecord(metric=f"lm_eval:{task}", value=acc, data=task, command=cmd))
        fam.record(n, accuracy=records)
        typer.echo(f"{n}: " + ", ".join(f"{r.metric} {r.value:.3f}" for r in records))


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
    member: list[str] = typer.Option(None, help="members to profile (default: all servable)"),
    concurrency: str = typer.Option("1,4,8", help="concurrent requests"),
    prompt_tokens: str = typer.Option("32,256", help="prompt lengths (tokens)"),
    output_tokens: str = typer.Option("32", help="output lengths (tokens)"),
    rounds: int = typer.Option(2, min=1, help="bursts per request shape"),
    dtype: str = typer.Option("float32", help="the workers' serving dtype (float32, bfloat16 or float16; the router reads each member's "
                                             "accuracy at it: run `family eval --dtype` at the same dtype)"),
    endpoint: str = typer.Option("chat", help="chat (/v1/chat/completions) or completions (/v1/completions)"),
    ready_timeout: float = typer.Option(900.0, help="seconds to wait for the worker's /health"),
    threads: int = typer.Option(0, help="torch engine: worker CPU threads (0 = as `family serve` runs its one "
                                        "shared worker: one per core)"),
    kv_batch: int = typer.Option(defaults.SERVING_BATCH, min=1, help="memory: KV cache rows (the worker's batch)"),
    kv_context: int = typer.Option(defaults.KV_CONTEXT, min=1, help="memory: KV cache tokens per row (the worker's context)"),
    runtime_shared_by: int = typer.Option(0, min=0, help="memory: members sharing one runtime on a host "
                                                        "(0 = every servable member, as one engine process serves them)"),
    bandwidth: bool = typer.Option(True, help="measure this machine's memory bandwidth (a read of the parent's weights) "
                                              "and matmul rate, and record them for the device class"),
) -> None:
    """Measure TTFT, time per output token, throughput and serving memory through the serving engine.

    The members are served by `family worker --engine E` in a subprocess as `family serve` runs them
    (torch: one worker for all, measured interleaved, so that every member sees the same drift of a
    shared machine; vLLM: one worker per member, in turn), measured over HTTP, and stopped; memory is
    measured in parts in a fresh process (runtime, weights at the serving dtype, KV cache per token;
    family/memory.py). Each worker's members' profiles (samples, memory, fitted latency model) are
    saved when it is done, replacing any prediction for this device class. First, the device
    class's memory bandwidth is measured (family/bandwidth.py) and recorded in the registry.
    """
    from transformers import AutoTokenizer

    from family.bandwidth import measure_device, roofline_tok_s
    from family.errors import FamilyError
    from family.memory import measure_memory
    from family.profile import Shape, WorkerProcess, profile_members, worker_groups, worker_log_name
    from family.registry import check_dtype, load_family
    from family.text import read_source, tokenize

    if engine not in ("torch", "vllm"):
        raise FamilyError(f"--engine must be torch or vllm, got {engine!r}")
    if endpoint not in ("chat", "completions"):
        raise FamilyError(f"--endpoint must be chat or completions, got {endpoint!r}")
    check_dtype(dtype)  # a profile is recorded at one known dtype (routing reads accuracy there)
    shapes = [Shape(p, o, c) for c in _ints(concurrency, "--concurrency") for p in _ints(prompt_tokens, "--prompt-tokens")
              for o in _ints(output_tokens, "--output-tokens")]
    if len(shapes) < 2:
        raise FamilyError("profile at least two request shapes (e.g. --prompt-tokens 32,256): a latency model needs them")
    fam = load_family(family_dir)
    names = _selected(fam, member)
    if threads < 0:
        raise FamilyError(f"--threads must be 0 (as served) or positive, got {threads}")
    # `family serve` runs one torch worker for every member with all the cores; a member alone in it gets them all.
    n_threads = (threads or os.cpu_count() or 1) if engine == "torch" else None
    text = read_source(defaults.EVAL_TEXT).text[:400_000]
    log_dir = Path(family_dir) / "logs"
    log_dir.mkdir(exist_ok=True)
    device = None
    if bandwidth:
        parent_rec = fam.registry.member(fam.registry.parent)
        device = measure_device(device_class, parent_rec.weight_bytes(dtype), dtype=dtype, threads=n_threads, command=_command())
        fam.record_device(device)
        typer.echo(f"{device_class}: memory bandwidth {device.bandwidth_bytes_s / 1e9:.1f} GB/s (best of {device.repeats} reads "
                   f"of {device.buffer_bytes / 1e9:.2f} GB, {device.threads} threads), matmul {device.matmul_flops / 1e9:.0f} GFLOP/s "
                   f"{dtype}; the parent's roofline {roofline_tok_s(device.bandwidth_bytes_s, parent_rec.weight_bytes(dtype)):.1f} tok/s")
    shared_by = runtime_shared_by or len(fam.servable)
    typer.echo(f"measuring serving memory of {len(names)} member(s) in a fresh process (runtime, weights, KV per token)")
    kv_dtype = defaults.TORCH_KV_DTYPE if engine == "torch" else None  # vLLM caches at the model's dtype
    probe = measure_memory([fam.member_dir(n) for n in names], dtype, n_threads, kv_dtype=kv_dtype)
    for group in worker_groups(names, engine):  # as `family serve` starts them
        members = []
        for n in group:
            tok = AutoTokenizer.from_pretrained(fam.member_dir(n))
            members.append((n, tok, tokenize(tok, text).tolist()))
        log = log_dir / worker_log_name(group, engine)
        typer.echo(f"{', '.join(group)}: starting `family worker --engine {engine}`" + (f" --threads {n_threads}" if n_threads else "")
                   + f" (log: {log})")
        with WorkerProcess([fam.member_dir(n) for n in group], group, engine, dtype=dtype, log=log, ready_timeout=ready_timeout,
                           threads=n_threads) as worker:
            measured = profile_members(worker.url, members, shapes, rounds=rounds, endpoint=endpoint)
            peak = worker.peak_rss  # the whole worker's, every member of it loaded
            serving = {n: worker.serving(n) for n in group}
        for n in group:
            _record_profile(fam, n, measured[n], probe.members[str(fam.member_dir(n))], probe, peak, serving[n], device,
                            device_class=device_class, engine=engine, dtype=dtype, threads=n_threads, kv_batch=kv_batch,
                            kv_context=kv_context, shared_by=shared_by)


def _record_profile(fam, n: str, samples, mine, probe, peak: int, serving, device, *, device_class: str, engine: str, dtype: str,
                    threads: int | None, kv_batch: int, kv_context: int, shared_by: int) -> None:
    """Fit and record one member's profile, merged under the registry's lock, and say what it measured."""
    from family import latency
    from family.bandwidth import roofline_tok_s
    from family.registry import LatencyProfile, MemoryBreakdown

    memory = MemoryBreakdown(dtype=dtype, kv_dtype=probe.kv_dtype if probe.kv_dtype != dtype else None,
                             weights_bytes=mine.weights_bytes, kv_bytes_per_token=mine.kv_bytes_per_token,
                             kv_batch=kv_batch, kv_context=kv_context, runtime_bytes=probe.runtime_bytes,
                             runtime_shared_by=shared_by, worker_peak_rss_bytes=peak)
    coef = latency.fit(samples)
    prof = LatencyProfile(device_class=device_class, engine=engine, dtype=dtype, threads=threads, serving=serving, samples=samples,
                          peak_memory_bytes=peak, memory=memory, latency_model=coef, fit_error=latency.fit_error(coef, samples),
                          command=_command())
    fam.record(n, latency=prof)  # merged under a lock: an interrupted profile keeps the workers already done
    one = [s for s in samples if s.concurrency == 1] or samples
    ttft_ms = 1e3 * min(s.ttft_s for s in one)
    tok_s = len(one) / sum(s.tpot_s for s in one)
    err = prof.fit_error
    roof = f" ({tok_s / roofline_tok_s(device.bandwidth_bytes_s, memory.weights_bytes):.0%} of its roofline)" if device else ""
    typer.echo(f"{n}: TTFT {ttft_ms:.0f} ms (shortest prompt), {tok_s:.1f} tok/s at c={one[0].concurrency}{roof}; "
               f"memory: weights {memory.weights_bytes / 1e9:.3f} GB + KV {memory.kv_cache_bytes / 1e9:.3f} GB "
               f"({kv_batch}x{kv_context} tokens) = {memory.member_bytes / 1e9:.3f} GB, runtime {probe.runtime_bytes / 1e9:.2f} GB "
               f"shared by {shared_by}, worker peak RSS {peak / 1e9:.2f} GB; latency model error on these samples: "
               f"TTFT {err['ttft']:.0%}, TPOT {err['tpot']:.0%}, e2e {err['e2e']:.0%}")


def _relative_ppl(member, parent) -> float | None:
    """The member's newest held-out perplexity over the parent's on the same text (same data_sha256)."""
    mine = member.latest("perplexity")
    if parent is None or mine is None or mine.data_sha256 is None:
        return None
    same = [r for r in parent.accuracy if r.metric == "perplexity" and r.data_sha256 == mine.data_sha256]
    return mine.value / same[-1].value if same and same[-1].value else None


def _degenerate(member, dtype: str = "float32") -> str:
    """The share of degenerate chat answers, and in brackets the share where the parent's answer is not degenerate."""
    raw, beyond = member.metric("degenerate_answers", dtype), member.metric("degenerate_beyond_parent", dtype)
    if raw is None:
        return "-"
    return f"{raw:.0%}" + (f" ({beyond:.0%})" if beyond is not None and not (member.is_parent and dtype == "float32") else "")


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)


def _c1_figures(prof, prompt_tokens: int = 32) -> tuple[float | None, float | None]:
    """(TTFT ms, tok/s) at concurrency 1: from a measured profile's samples (shortest prompt; 1/TPOT),
    from a predicted profile's latency law (a `prompt_tokens` prompt)."""
    from family.latency import predict

    if prof is None:
        return None, None
    one = [s for s in prof.samples if s.concurrency == 1]
    if one:
        return 1e3 * min(s.ttft_s for s in one), len(one) / sum(s.tpot_s for s in one)
    if prof.latency_model:
        pred = predict(prof.latency_model, prompt_tokens, 2, 1)
        return 1e3 * pred.ttft_s, 1.0 / pred.tpot_s if pred.tpot_s > 0 else None
    return None, None


def show(
    family_dir: Path = FamilyOpt,
    full: bool = typer.Option(False, help="verify with sha256 (default: size + mtime)"),
    device_class: list[str] = typer.Option(None, help="also show these device classes (e.g. h100 from a fleet file): "
                                                      "figures predicted from the device's bandwidth where never profiled"),
) -> None:
    """The family as tables: size, chat and held-out accuracy, latency and memory per device class (measured,
    or predicted from the device's bandwidth: marked ~), whether routed traffic may reach each member
    (unfit members answer only when named), each member's serving memory in parts, and each device
    class's bandwidth with the parent's decode speed as a fraction of its roofline."""
    from rich.console import Console
    from rich.table import Table

    from family.bandwidth import roofline_tok_s
    from family.devices import device_record
    from family.registry import load_family

    fam = load_family(family_dir, verify="full" if full else "fast")
    policy, unfit, devices = fam.registry.fitness, fam.unfit, fam.registry.devices
    parent = next((m for m in fam.registry.members if m.name == fam.registry.parent), None)
    classes = sorted({dc for m in fam.registry.members for dc in m.latency} | set(devices) | set(device_class or []))
    table = Table(title=f"family {fam.registry.name} ({Path(family_dir) / defaults.REGISTRY_FILE})",
                  caption="chat agree: top-1 agreement with the parent's greedy answers on held-out chat prompts (what min_accuracy "
                          "filters on; chat agree bf16: the same, the member run at bfloat16, what a bfloat16 worker is routed on); chat KL: KL(parent‖member) on those answers, nats/token; degenerate: share of held-out chat "
                          "answers that are degenerate (in brackets: where the parent's answer is not); vocab: tokens the member can say (trimmed members are scored in their own tokens); "
                          "ppl: held-out text perplexity, per parent token; ppl/parent: over the parent's on the same text; "
                          f"unfit (never routed to): degenerate where the parent is not > {policy.max_degenerate:.0%} or chat agree < {policy.min_chat_agreement:g}; "
                          "TTFT: shortest prompt at concurrency 1; tok/s: 1/TPOT at concurrency 1; mem GB: the member's own need, "
                          "weights + KV cache (what max_memory_gb compares; the runtime is shared, see below); "
                          "~ = predicted from the device's bandwidth and the member's bytes, never measured")
    # Below float32 (`family eval --dtype bfloat16`): what the router reads for a worker serving at that dtype.
    low = sorted({r.dtype for m in fam.registry.members for r in m.accuracy if r.dtype != "float32"})
    for col in ("member", "params (M)", "vocab", "GB fp32", "GB bf16", "chat agree", "chat KL", "degenerate", "ppl", "ppl/parent",
                *(f"{c} {_short(dt)}" for dt in low for c in ("chat agree", "degenerate"))):
        table.add_column(col, justify="right" if col != "member" else "left", no_wrap=col == "member")
    for dc in classes:
        table.add_column(f"TTFT ms {dc}", justify="right")
        table.add_column(f"tok/s {dc}", justify="right")
        table.add_column(f"mem GB {dc}", justify="right")
    table.add_column("status")

    def fmt(v, spec, mark=""):
        return "-" if v is None else mark + format(v, spec)

    for m in fam.registry.members:
        row = [m.name, f"{m.parameters / 1e6:.1f}", fmt(m.vocab_size, "d"), f"{m.bytes['float32'] / 1e9:.3f}", f"{m.bytes['bfloat16'] / 1e9:.3f}",
               fmt(m.quality, ".3f"), fmt(m.metric("chat_kl"), ".4f"), _degenerate(m),
               fmt(m.metric("perplexity"), ".2f"), fmt(_relative_ppl(m, parent), ".2f")]
        for dt in low:
            row += [fmt(m.quality_at(dt), ".3f"), _degenerate(m, dt)]
        for dc in classes:
            prof = m.profile(dc, devices)
            mark = "~" if prof is not None and prof.basis == "predicted" else ""
            ttft, tok_s = _c1_figures(prof)
            mem = prof.memory if prof is not None else None
            row += [fmt(ttft, ".0f", mark), fmt(tok_s, ".1f", mark),
                    fmt(mem.member_bytes / 1e9 if mem else None, ".3f", "~" if mem and mem.basis == "predicted" else "")]
        if m.name in fam.problems:
            row.append(f"problem: {fam.problems[m.name]}")
        else:
            status = [f"unfit: {unfit[m.name]}" if m.name in unfit else "ok"]
            for dt in low:  # where the verdict at a lower dtype differs from float32's
                why = m.unfit_reason(policy, dt)
                if bool(why) != (m.name in unfit):
                    status.append(f"{_short(dt)}: unfit: {why}" if why else f"{_short(dt)}: ok")
            row.append("; ".join(status))
        table.add_row(*row)
    console = Console(width=200)
    console.print(table)

    memory = Table(title="serving memory per device class (GB)",
                   caption="need = weights at the serving dtype + KV cache at the worker's batch x context (what max_memory_gb "
                           "compares); runtime: the engine process without a model, paid once per host and divided among the members "
                           "it serves; serving = need + runtime share; worker RSS: the whole worker process while profiled, every member it serves loaded (reference); "
                           "need/parent vs params/parent: the target is need/parent <= 1.1 x params/parent; ~ = predicted")
    for col in ("member", "device class", "dtype", "weights", "KV cache", "batch x ctx", "need", "runtime (shared by)",
                "serving", "worker RSS", "params/parent", "need/parent"):
        memory.add_column(col, justify="left" if col in ("member", "device class") else "right")
    for dc in classes:
        parent_mem = parent.profile(dc, devices).memory if parent is not None and parent.profile(dc, devices) else None
        for m in fam.registry.members:
            prof = m.profile(dc, devices)
            mem = prof.memory if prof is not None else None
            if mem is None:
                continue
            mark = "~" if mem.basis == "predicted" else ""
            runtime = f"{mem.runtime_bytes / 1e9:.2f} (/{mem.runtime_shared_by})" if mem.runtime_bytes else "-"
            ratio = fmt(mem.member_bytes / parent_mem.member_bytes if parent_mem else None, ".3f", mark)
            memory.add_row(m.name, dc, mem.dtype + (f" (KV {mem.kv_dtype})" if mem.kv_dtype else ""), f"{mark}{mem.weights_bytes / 1e9:.3f}", f"{mark}{mem.kv_cache_bytes / 1e9:.3f}",
                           f"{mem.kv_batch}x{mem.kv_context}", f"{mark}{mem.member_bytes / 1e9:.3f}", runtime,
                           f"{mark}{mem.serving_bytes / 1e9:.3f}", fmt(mem.worker_peak_rss_bytes / 1e9 if mem.worker_peak_rss_bytes else None, ".2f"),
                           f"{m.parameters / parent.parameters:.3f}" if parent else "-", ratio)
    if memory.row_count:
        console.print(memory)

    bw = Table(title="device classes: the bandwidth limit",
               caption="roofline = bandwidth / the parent's weight bytes at the device's dtype (batch 1: every weight read once per token); "
                       "parent tok/s: measured at concurrency 1 (1/TPOT); published: the maker's datasheet figure")
    for col in ("device class", "basis", "bandwidth GB/s", "matmul GFLOP/s", "dtype", "parent roofline tok/s", "parent tok/s", "of roofline", "source"):
        bw.add_column(col, justify="left" if col in ("device class", "basis", "source") else "right")
    for dc in classes:
        dev = device_record(dc, devices)
        if dev is None:
            continue
        roof = roofline_tok_s(dev.bandwidth_bytes_s, parent.weight_bytes(dev.dtype)) if parent else None
        measured = parent.latency.get(dc) if parent else None
        _, tok_s = _c1_figures(measured) if measured else (None, None)
        bw.add_row(dc, dev.basis, f"{dev.bandwidth_bytes_s / 1e9:.1f}", fmt(dev.matmul_flops / 1e9 if dev.matmul_flops else None, ".0f"),
                   dev.dtype, fmt(roof, ".1f"), fmt(tok_s, ".1f"), fmt(tok_s / roof if tok_s and roof else None, ".2f"), dev.source[:60])
    if bw.row_count:
        console.print(bw)


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
