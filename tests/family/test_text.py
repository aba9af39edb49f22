"""Text sources: plain text, JSONL, and clear errors for bad ones."""

import pytest
import torch

from family.errors import FamilyError
from family.text import pack, read_source


def test_jsonl_with_a_named_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "first"}\n\n{"body": "second"}\n')
    assert read_source(f"{path}:body").text == "first\n\nsecond"


@pytest.mark.parametrize(
    "content, words", [('{"text": "ok"}\nnot json\n', "d.jsonl:2: not valid JSON"), ('{"other": 1}\n', "no field 'text'")]
)
def test_bad_jsonl_names_the_line(tmp_path, content, words):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(FamilyError, match=words):
        read_source(path)


def test_missing_and_empty_files_are_refused(tmp_path):
    with pytest.raises(FamilyError, match="not found"):
        read_source(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(FamilyError, match="empty"):
        read_source(tmp_path / "empty.txt")


def test_pack_is_repeatable_and_refuses_too_little_text():
    ids = torch.arange(1000)
    assert torch.equal(pack(ids, 10, 5, seed=1), pack(ids, 10, 5, seed=1))
    assert pack(ids, 10).shape == (100, 10)
    with pytest.raises(FamilyError, match="not enough text"):
        pack(ids[:5], 10)


def test_jsonl_field_can_be_given_as_an_argument(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "first", "text": "no"}\n{"body": "second", "text": "no"}\n')
    assert read_source(path, field="body").text == "first\n\nsecond"
    assert read_source(f"{path}:body", field="text").text == "first\n\nsecond"  # the spec wins


def test_a_token_budget_gives_enough_rows_and_cycles_short_text():
    ids = torch.arange(100)
    assert pack(ids, 10, num_tokens=35).shape == (4, 10)
    rows = pack(ids, 10, num_tokens=250)  # more than the text holds: rows repeat, budget honoured
    assert rows.shape == (25, 10) and torch.equal(rows[10], rows[0])


def test_a_hf_source_without_datasets_or_network_is_a_clear_error():
    with pytest.raises(FamilyError, match="datasets|cannot load dataset"):
        read_source("hf:no-such-owner/no-such-dataset-xyz")
