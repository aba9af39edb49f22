"""family.json: validated, written atomically, and never serves a member whose files changed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from family.errors import FamilyError
from family.registry import FamilyRegistry, load_family, read_registry, registry_path, save_registry


@pytest.fixture
def family_copy(tiny_family_dir, tmp_path):
    dst = tmp_path / "fam"
    shutil.copytree(tiny_family_dir, dst)
    return dst


def test_schema_round_trips(tiny_family_dir):
    reg = read_registry(tiny_family_dir)
    again = FamilyRegistry.model_validate_json(reg.model_dump_json())
    assert again == reg
    assert reg.names() == ["tiny-p100", "tiny-p80", "tiny-p60"] and reg.parent == "tiny-p100"
    p80 = reg.member("tiny-p80")
    assert p80.ranks and p80.architecture == "LowRankLlamaForCausalLM" and p80.bytes["bfloat16"] * 2 == p80.bytes["float32"]
    assert all(len(f.sha256) == 64 for f in p80.files.values())
    assert p80.provenance["method"] == "plrd-whitened-svd"


def test_a_flipped_byte_is_caught_and_the_member_is_not_served(family_copy):
    weights = family_copy / "tiny-p80" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: only sha256 can tell
    assert load_family(family_copy, verify="fast").problems == {}
    full = load_family(family_copy, verify="full")
    assert list(full.problems) == ["tiny-p80"] and "checksum mismatch" in full.problems["tiny-p80"]
    assert "tiny-p80" not in [m.name for m in full.servable]

    os.utime(weights)  # a touched file is re-hashed even in fast mode
    assert "tiny-p80" in load_family(family_copy, verify="fast").problems


def test_a_missing_member_is_named(family_copy):
    shutil.rmtree(family_copy / "tiny-p60")
    fam = load_family(family_copy)
    assert list(fam.problems) == ["tiny-p60"] and "missing" in fam.problems["tiny-p60"]


@pytest.mark.parametrize("content, words", [("{not json", "not valid JSON"), ('{"schema_version": 99}', "schema_version 99"),
                                            ('{"schema_version": 1, "name": 3}', "invalid at")])
def test_a_bad_registry_file_is_a_clear_error(tmp_path, content, words):
    registry_path(tmp_path).write_text(content)
    with pytest.raises(FamilyError, match=words):
        read_registry(tmp_path)


WRITER = """
import sys, time
from pathlib import Path
from family.registry import read_registry, save_registry
root = Path(sys.argv[1])
reg = read_registry(root)
i = 0
print("ready", flush=True)
while True:
    i += 1
    reg.members[0].provenance["counter"] = i
    reg.members[0].provenance["padding"] = "x" * (i % 5000)
    save_registry(root, reg)
"""


def test_a_writer_killed_mid_write_leaves_a_valid_registry(family_copy):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(family_copy)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reg = read_registry(family_copy)  # parses and validates
    assert reg.members[0].provenance["counter"] > 1
    json.loads(registry_path(family_copy).read_text())


def test_save_is_atomic_even_if_the_rename_never_happens(family_copy, monkeypatch):
    before = registry_path(family_copy).read_text()
    reg = read_registry(family_copy)
    reg.name = "changed"

    def crash(*_a, **_k):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_registry(family_copy, reg)
    assert registry_path(family_copy).read_text() == before
    assert not [p for p in family_copy.iterdir() if p.name.endswith(".tmp")]
