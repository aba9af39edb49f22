"""fuzz: schemathesis against the gateway's OpenAPI schema (bounded examples and time), check
`not_a_server_error`, plus hand-written malformed requests that must get a 4xx in OpenAI's error
shape; the gateway must stay up and log no unhandled exception.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loadtests.harness import ProcessFleet, WorkerConf
from loadtests.reliability.common import finish, names

BAD_INPUTS = [
    ("not json", "POST", "/v1/chat/completions", b"{not json", {"content-type": "application/json"}),
    ("json array", "POST", "/v1/completions", b"[1, 2]", {"content-type": "application/json"}),
    ("empty body", "POST", "/v1/chat/completions", b"", {"content-type": "application/json"}),
    ("no messages", "POST", "/v1/chat/completions", b'{"model": "x"}', {"content-type": "application/json"}),
    ("negative max_tokens", "POST", "/v1/completions", b'{"model": "@F", "prompt": "hi", "max_tokens": -3}', {"content-type": "application/json"}),
    ("huge max_tokens", "POST", "/v1/completions", b'{"model": "@F", "prompt": "hi", "max_tokens": 100000000}', {"content-type": "application/json"}),
    ("unknown model", "POST", "/v1/completions", b'{"model": "gpt-17", "prompt": "hi"}', {"content-type": "application/json"}),
    ("bad budget type", "POST", "/v1/completions", b'{"model": "@F", "prompt": "hi", "budget": {"max_memory_gb": "lots"}}', {"content-type": "application/json"}),
    ("unknown budget field", "POST", "/v1/completions", b'{"model": "@F", "prompt": "hi", "budget": {"max_vram": 1}}', {"content-type": "application/json"}),
    ("impossible budget", "POST", "/v1/completions", b'{"model": "@F", "prompt": "hi", "budget": {"max_memory_gb": 0.000001}}', {"content-type": "application/json"}),
    ("bad budget header", "POST", "/v1/completions", b'{"model": "@F", "prompt": "hi"}', {"content-type": "application/json", "x-slo-ttft-ms": "soon"}),
    ("n=3", "POST", "/v1/completions", b'{"model": "@F", "prompt": "hi", "n": 3}', {"content-type": "application/json"}),
    ("wrong content in messages", "POST", "/v1/chat/completions", b'{"model": "@F", "messages": [{"role": "wizard", "content": 5}]}', {"content-type": "application/json"}),
    ("deep nesting", "POST", "/v1/completions", b'{"model": "@F", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", {"content-type": "application/json"}),
    ("big prompt", "POST", "/v1/completions", b'{"model": "@F", "prompt": "' + b"word " * 20000 + b'"}', {"content-type": "application/json"}),
    ("form body", "POST", "/v1/completions", b"model=x&prompt=y", {"content-type": "application/x-www-form-urlencoded"}),
    ("GET on POST route", "GET", "/v1/chat/completions", b"", {}),
    ("unknown route", "GET", "/v2/whatever", b"", {}),
]


def bad_inputs(url: str, family: str) -> list[dict]:
    out = []
    with httpx.Client(timeout=60) as c:
        for name, method, path, body, headers in BAD_INPUTS:
            body = body.replace(b"@F", family.encode())
            try:
                r = c.request(method, url + path, content=body, headers=headers)
                try:
                    err = r.json().get("error", {})
                    shaped = isinstance(err, dict) and {"message", "type"} <= set(err)
                except ValueError:
                    shaped = False
                out.append({"case": name, "status": r.status_code, "ok": 400 <= r.status_code < 500 and shaped,
                            "type": err.get("type") if shaped else None})
            except httpx.HTTPError as exc:
                out.append({"case": name, "status": 0, "ok": False, "error": str(exc)[:200]})
    return out


def fuzz(family_dir: Path, device_class: str, out: Path, *, fleet: ProcessFleet | None = None, gateway: str | None = None,
         max_examples: int = 15, max_time_s: int = 90, request_timeout_s: float = 60, seed: int = 0) -> dict:
    family_dir = Path(family_dir)
    fname, parent, others = names(family_dir)
    own = fleet is None and gateway is None
    if own:
        fleet = ProcessFleet(family_dir, [WorkerConf(parent), *[WorkerConf(m) for m in others]], device_class, out / "fuzz-logs",
                             health_interval=1.0).start()
    url = gateway or fleet.url
    try:
        out.mkdir(parents=True, exist_ok=True)
        st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis", path=str(Path(sys.executable).parent))
        cmd = [st or "st", "run", f"{url}/openapi.json", "--checks", "not_a_server_error", "--max-examples", str(max_examples),
               "--workers", "1", "--seed", str(seed), "--max-time", str(max_time_s), "--request-timeout", str(request_timeout_s),
               "--phases", "examples,coverage,fuzzing", "--suppress-health-check", "all", "--no-color",
               "--report", "junit", "--report-junit-path", str(out / "fuzz-junit.xml")]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max_time_s + 240, cwd=out)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, text = 124, f"schemathesis ran past its bound: {exc}"
        (out / "fuzz-schemathesis.log").write_text(text)
        manual = bad_inputs(url, fname)
        alive = httpx.get(f"{url}/health", timeout=10).status_code == 200
        ok_after = httpx.post(f"{url}/v1/completions", json={"model": fname, "prompt": "Hello", "max_tokens": 4}, timeout=120).status_code == 200
        log = (fleet.log_dir / "gateway.log").read_text(errors="replace") if fleet else ""
        checks = {
            "schemathesis_no_5xx": rc == 0,
            "malformed_requests_get_4xx_error_shape": all(m["ok"] for m in manual),
            "gateway_alive_after": alive and ok_after,
            "no_unhandled_exception_logged": "Traceback" not in log and "unhandled error" not in log,
        }
        tail = "\n".join(text.strip().splitlines()[-25:])
        return finish("fuzz", checks, schemathesis_exit=rc, schemathesis_s=round(time.perf_counter() - t0, 1),
                       schemathesis_tail=tail, bad_inputs=manual, command=" ".join(cmd))
    finally:
        if own:
            fleet.stop()
