import json

import pytest
import torch
from conftest import tiny_tokenizer

from koff.core.errors import DataError
from koff.data.text import (
    BlockStream,
    Domain,
    bundled_domain,
    check_no_test_leak,
    pack,
    read_documents,
    tokenize_documents,
)


def test_read_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    assert read_documents(tmp_path / "a.txt") == ["first doc", "second doc"]
    rows = [{"text": "plain"}, {"question": "2+2?", "answer": "4"},
            {"query": "Sky is", "choices": ["green", "blue"], "gold": 1}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_documents(tmp_path / "b.jsonl") == ["plain", "Question: 2+2?\nAnswer: 4", "Sky is blue"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert read_documents(tmp_path / "c.jsonl", text_field="body") == ["x"]


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "ok"}\n{broken\n', r"bad.jsonl:2: invalid JSON"),
    ("list.jsonl", '["a"]\n', r"list.jsonl:1: expected a JSON object per line, got list"),
    ("field.jsonl", '{"body": "x"}\n', r"field.jsonl:1: no text field 'text'.*fields present: \['body'\]"),
    ("empty.txt", "\n\n", r"empty.txt: no documents"),
])
def test_bad_files_name_file_line_and_field(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        read_documents(tmp_path / name)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_documents(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="bin.txt: not UTF-8"):
        read_documents(tmp_path / "bin.txt")


def test_test_text_never_trains(tmp_path):
    (tmp_path / "train.txt").write_text("some training text\n")
    (tmp_path / "test.txt").write_text("held out text\n")
    (tmp_path / "copy.txt").write_text("held out text\n")
    ok = Domain("a", train=[tmp_path / "train.txt"], test=[tmp_path / "test.txt"])
    check_no_test_leak([ok])
    leak = Domain("b", train=[tmp_path / "copy.txt"])
    with pytest.raises(DataError, match="same content as test file"):
        check_no_test_leak([ok, leak])
    with pytest.raises(DataError, match="general training file"):
        check_no_test_leak([ok], general=[tmp_path / "copy.txt"])


def test_tokenize_and_pack():
    tok = tiny_tokenizer()
    ids = tokenize_documents(["the cat sat", "le chat"], tok)
    assert (ids == tok.eos_token_id).sum() == 2 and ids[-1] == tok.eos_token_id
    blocks = pack(torch.arange(50), 8)
    assert blocks.shape == (6, 8) and blocks[1, 0] == 8
    assert pack(torch.arange(50), 8, max_tokens=20).shape == (2, 8)
    with pytest.raises(DataError, match="not enough for one block"):
        pack(torch.arange(5), 8)


def test_block_stream_is_deterministic_and_covers_each_epoch():
    blocks = torch.arange(70).view(10, 7)
    a, b = BlockStream(blocks, 3, seed=5), BlockStream(blocks, 3, seed=5)
    seq_a = [a.next() for _ in range(10)]
    seq_b = [b.next() for _ in range(10)]
    assert all(torch.equal(x, y) for x, y in zip(seq_a, seq_b))
    rows = torch.cat(seq_a)[:, 0].tolist()  # 30 rows = exactly 3 epochs
    for e in range(3):
        assert sorted(rows[e * 10:(e + 1) * 10]) == list(range(0, 70, 7))
    c = BlockStream(blocks, 3, seed=6)
    assert not all(torch.equal(x, c.next()) for x in seq_a[:3])


def test_bundled_domain_errors(tmp_path):
    with pytest.raises(DataError, match="no bundled text for domain 'xx'"):
        bundled_domain("xx", root=tmp_path)
