"""corrupt-member: copy the family, flip one byte of one member's weights; `family verify` must fail
naming it, `family serve` must refuse it by name at load, and the other members keep serving.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from family.registry import load_family
from loadtests.harness import EmbeddedGateway
from loadtests.reliability.common import finish, names

def _copy_family(src: Path, dst: Path, victim_path: str) -> None:
    """family.json and the victim member copied; the other members (and an outside parent) linked."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copy2(src / "family.json", dst / "family.json")
    for sub in src.iterdir():
        if not sub.is_dir() or sub.name == "logs":
            continue
        if sub.name == victim_path:
            shutil.copytree(sub, dst / sub.name)
        else:
            os.symlink(sub.resolve(), dst / sub.name)


def flip_byte(path: Path, offset: int | None = None, keep_mtime: bool = False) -> int:
    st = path.stat()
    offset = st.st_size // 2 if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return offset


def corrupt_member(family_dir: Path, device_class: str, out: Path, *, victim: str | None = None, ready_timeout: float = 600) -> dict:
    family_dir = Path(family_dir).resolve()
    fname, parent, others = names(family_dir)
    fam = load_family(family_dir, verify="none")
    victim = victim or others[0]
    rec = fam.registry.member(victim)
    if Path(rec.path).is_absolute() or "/" in rec.path:
        raise SystemExit(f"corrupt-member needs a member stored directly inside the family folder; {victim} is at {rec.path}")
    copy = Path(out).resolve() / "corrupt-family"
    _copy_family(family_dir, copy, rec.path)
    weight = copy / rec.path / sorted(rec.files)[0]
    offset = flip_byte(weight)
    py = sys.executable
    verify = subprocess.run([py, "-m", "family.cli", "verify", "--family", str(copy)], capture_output=True, text=True, timeout=600)
    log = Path(out).resolve() / "corrupt-member-gateway.log"
    log.unlink(missing_ok=True)
    served, pinned_victim, models = {}, None, []
    with EmbeddedGateway(copy, log, device_class=device_class, ready_timeout=ready_timeout) as gw:
        with httpx.Client(timeout=180) as c:
            models = [m["id"] for m in c.get(f"{gw.url}/v1/models").json()["data"]]
            problems = c.get(f"{gw.url}/v1/family").json().get("problems", {})
            r = c.post(f"{gw.url}/v1/completions", json={"model": victim, "prompt": "Hello", "max_tokens": 4})
            pinned_victim = {"status": r.status_code, "error": r.json().get("error")}
            for m in [fname, *[n for n in [parent, *others] if n != victim]]:
                r = c.post(f"{gw.url}/v1/completions", json={"model": m, "prompt": "Hello", "max_tokens": 4})
                served[m] = {"status": r.status_code, "member": r.headers.get("x-family-member")}
    text = log.read_text(errors="replace")
    # The same flip with the file's mtime kept (bit rot, a copy with -p): does the fast check see it?
    copy2 = Path(out).resolve() / "corrupt-family-mtime"
    _copy_family(family_dir, copy2, rec.path)
    flip_byte(copy2 / rec.path / sorted(rec.files)[0], keep_mtime=True)
    fast = load_family(copy2, verify="fast").problems.get(victim)
    full = load_family(copy2, verify="full").problems.get(victim)
    shutil.rmtree(copy2, ignore_errors=True)
    checks = {
        "verify_fails_naming_member": verify.returncode != 0 and victim in (verify.stdout + verify.stderr),
        "serve_refuses_member_by_name_in_log": f"refusing member {victim}" in text,
        "member_not_listed": victim not in models,
        "member_in_problems": victim in problems,
        "pinned_request_names_member": pinned_victim["status"] >= 400 and victim in json.dumps(pinned_victim["error"]),
        "other_members_serve": all(v["status"] == 200 for v in served.values()),
    }
    result = finish("corrupt-member", checks, victim=victim, file=str(weight), offset=offset, verify_output=(verify.stdout + verify.stderr)[-800:],
                     refusal_lines=[ln for ln in text.splitlines() if "refusing" in ln], models=models, pinned_victim=pinned_victim, served=served,
                     mtime_preserved_flip={"fast_verify_detects": fast is not None, "full_verify_detects": full is not None})
    shutil.rmtree(copy, ignore_errors=True)
    return result
