"""Hugging Face datasets as sources: local Parquet / Arrow / save_to_disk, the token cache (a second
run calls no tokenizer), parallel tokenization, streaming with exact resume, and the test-leak
guard on dataset rows. Datasets are built in-process; nothing comes from the hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")

from conftest import (  # noqa: E402
    assert_same_run,
    corpus,
    tiny_config_dict,
    tiny_tokenizer,
)

import koff.data.sources as sources  # noqa: E402
from koff.cli import make_parser  # noqa: E402
from koff.cli.decompose import build_config  # noqa: E402
from koff.config.recipe import ConfigError, config_from_dict  # noqa: E402
from koff.core import faults  # noqa: E402
from koff.data.sources import DatasetSource, StreamingBlockStream, cached_tokens  # noqa: E402
from koff.data.text import DataError, read_documents, tokenize_documents  # noqa: E402
from koff.training.pipeline import decompose  # noqa: E402
from koff.training.preemption import Preempted, handle_signals  # noqa: E402


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KOFF_CACHE", str(tmp_path / "koff-cache"))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _parquet(path: Path, docs: list[str], field: str = "text") -> Path:
    datasets.Dataset.from_dict({field: docs, "id": list(range(len(docs)))}).to_parquet(str(path))
    return path


def _count_encode(monkeypatch) -> list[int]:
    calls = []
    real = sources.encode

    def counting(tokenizer, texts):
        calls.append(len(texts))
        return real(tokenizer, texts)

    monkeypatch.setattr(sources, "encode", counting)
    return calls


def test_parquet_arrow_and_saved_folder_give_the_files_tokens(tok, tmp_path, monkeypatch):
    docs = corpus("en", 300, 1)
    want = tokenize_documents(docs, tok)
    ds = datasets.Dataset.from_dict({"body": docs})
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    srcs = [DatasetSource("parquet", data_files=(str(_parquet(tmp_path / "d.parquet", docs, "body")),), text_field="body"),
            DatasetSource("arrow", data_files=(str(arrow),), text_field="body"),
            DatasetSource(str(tmp_path / "saved"), text_field="body"),
            DatasetSource("parquet", data_files=(str(tmp_path / "d.parquet"),), text_field="body", num_proc=2)]
    for src in srcs:
        got = cached_tokens(src, tok)
        assert got.tokens.dtype == torch.int32 and torch.equal(got.tokens.long(), want), src
        assert (got.folder / "tokens.int32").stat().st_size == 4 * got.tokens.numel()
        assert not got.tokens.numpy().flags.owndata  # a view of the mapped file, not a copy
        assert got.hashes.shape == (len(docs),)
    calls = _count_encode(monkeypatch)
    again = cached_tokens(srcs[0], tok)  # a second run: memory-mapped, no tokenizer call
    assert again.hit and calls == [] and torch.equal(again.tokens.long(), want)
    (tmp_path / "d.parquet").touch()  # the file changed (mtime): tokenized again
    _parquet(tmp_path / "d.parquet", docs[:-1], "body")
    changed = cached_tokens(srcs[0], tok)
    assert not changed.hit and calls and torch.equal(changed.tokens.long(), tokenize_documents(docs[:-1], tok))


def _cfg_with_sources(llama_folder, data_files, out, en_train, general, **train) -> dict:
    d = tiny_config_dict(llama_folder, data_files, out, steps=8, reg_every=3, consolidate_frac=0.25, **train)
    d["domains"]["en"]["train"] = en_train
    d["general"] = general
    d["reference"] = False
    return d


def test_a_parquet_domain_trains_exactly_like_its_text_file(llama_folder, data_files, tmp_path, monkeypatch):
    """The same documents as Parquet (domain) and as a save_to_disk folder (general) give the
    bitwise run of the .txt/.jsonl files; the second decompose reads the cache only."""
    txt = tmp_path / "txt"
    decompose(config_from_dict(_cfg_with_sources(llama_folder, data_files, txt, [str(data_files["en"]["train"])],
                                                 [str(data_files["general"]["train"])])), progress=False)
    en = _parquet(tmp_path / "en.parquet", read_documents(data_files["en"]["train"]))
    gen_docs = read_documents(data_files["general"]["train"])
    datasets.Dataset.from_dict({"text": gen_docs}).save_to_disk(str(tmp_path / "general"))
    cfg = _cfg_with_sources(llama_folder, data_files, tmp_path / "ds", [str(en)],
                            [{"dataset": {"path": str(tmp_path / "general")}}])
    decompose(config_from_dict(cfg), progress=False)
    assert_same_run(txt, tmp_path / "ds")
    stored = json.loads((tmp_path / "ds" / "koff.json").read_text())
    assert stored["training"]["domains"]["en"]["train"] == [
        {"dataset": {"path": "parquet", "split": "train", "data_files": [str(en)], "text_field": "text"}}]
    calls = _count_encode(monkeypatch)
    decompose(config_from_dict({**cfg, "output": str(tmp_path / "ds2")}), progress=False)
    assert calls == [], "the second run tokenized again"
    assert_same_run(txt, tmp_path / "ds2")


def _stream(src, tok, seed=3):
    return StreamingBlockStream(src, tok, block=16, batch_size=3, seed=seed)


def test_streaming_resumes_exactly_across_epochs(tok, tmp_path):
    docs = corpus("fr", 40, 5)
    src = DatasetSource("parquet", data_files=(str(_parquet(tmp_path / "s.parquet", docs)),), streaming=True,
                        shuffle_buffer=7)
    whole = _stream(src, tok)
    want = [whole.next() for _ in range(40)]  # 40 docs of ~25 tokens, 48 tokens a batch: several epochs
    assert whole.epoch >= 2
    for cut in (0, 1, 9, 23):
        a = _stream(src, tok)
        got = [a.next() for _ in range(cut)]
        state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint keeps (JSON-able)
        b = _stream(src, tok)
        b.load_state_dict(state)
        got += [b.next() for _ in range(40 - cut)]
        assert all(torch.equal(x, y) for x, y in zip(got, want)), cut
    other = _stream(src, tok, seed=4)
    assert not all(torch.equal(x, y) for x, y in zip([other.next() for _ in range(5)], want[:5]))
    # the shuffle buffer shuffles, within its reach: the first batch is not the text's first tokens
    head = torch.tensor(sources.encode(tok, docs[:3])[0][:16])
    assert not torch.equal(want[0][0], head)


def test_streamed_run_interrupted_and_resumed_is_bitwise(llama_folder, data_files, tmp_path, monkeypatch):
    en = _parquet(tmp_path / "en.parquet", read_documents(data_files["en"]["train"]))
    gen = _parquet(tmp_path / "gen.parquet", read_documents(data_files["general"]["train"]))
    stream = lambda p: {"dataset": {"path": "parquet", "data_files": [str(p)], "streaming": True,
                                    "shuffle_buffer": 16}}

    def cfg(out):
        return config_from_dict(_cfg_with_sources(llama_folder, data_files, out, [stream(en)], [stream(gen)],
                                                  checkpoint_every=3))

    decompose(cfg(tmp_path / "whole"), progress=False)
    for step in (1, 4):
        faults._hits.clear()
        monkeypatch.setenv("KOFF_FAULT", f"train.step.{step}:term")
        out = tmp_path / f"cut{step}"
        with handle_signals(), pytest.raises(Preempted):
            decompose(cfg(out), progress=False, resume="auto")
        monkeypatch.delenv("KOFF_FAULT")
        from koff.storage.checkpoint import load_checkpoint

        loop = load_checkpoint(out.with_name(out.name + ".partial") / "checkpoint")["loop"]
        assert loop["step"] == step + 1 and set(loop["streams"]) == {"en", "__general__"}
        with handle_signals():
            decompose(cfg(out), progress=False, resume="auto")
        assert_same_run(tmp_path / "whole", out)


def test_dataset_rows_that_are_test_documents_are_refused(llama_folder, data_files, tmp_path):
    test_doc = read_documents(data_files["fr"]["test"])[5]
    en = _parquet(tmp_path / "en.parquet", read_documents(data_files["en"]["train"])[:50] + [test_doc + "  "])
    for streaming in (False, True):
        cfg = _cfg_with_sources(llama_folder, data_files, tmp_path / f"r{streaming}",
                                [{"dataset": {"path": "parquet", "data_files": [str(en)], "streaming": streaming,
                                              "shuffle_buffer": 100}}], [str(data_files["general"]["train"])])
        with pytest.raises(DataError, match=r"row 50 .*test file .*fr.*test.txt"):
            decompose(config_from_dict(cfg), progress=False)
    gen = _parquet(tmp_path / "g.parquet", [test_doc])
    cfg = _cfg_with_sources(llama_folder, data_files, tmp_path / "g", [str(data_files["en"]["train"])],
                            [{"dataset": {"path": "parquet", "data_files": [str(gen)]}}])
    with pytest.raises(DataError, match="general data.*test file"):
        decompose(config_from_dict(cfg), progress=False)


def test_schema_errors_name_the_field(data_files, tmp_path):
    pq = _parquet(tmp_path / "x.parquet", ["a b c"])
    base = {"domains": {"en": {"dataset": {"path": "parquet", "data_files": [str(pq)]}}}, "general": "none",
            "train": {"reg_every": 0}}
    assert config_from_dict(base).domains[0].datasets[0].data_files == (str(pq),)
    bad = [({"path": "parquet", "data_files": [str(pq)], "stream": True}, r"unknown field\(s\) \['stream'\]"),
           ({"path": "parquet"}, "needs data_files"),
           ({"path": "parquet", "data_files": [str(tmp_path / "none*.parquet")]}, "matches no file"),
           ({"path": "parquet", "data_files": [str(pq)], "streaming": "yes"}, "streaming: expected true or false"),
           ({"path": "parquet", "data_files": [str(pq)], "shuffle_buffer": 0}, "shuffle_buffer"),
           ({"name": "x"}, r"\.path")]
    for spec, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            config_from_dict({**base, "domains": {"en": {"dataset": spec}}})
    mixed = {**base, "domains": {"en": {"train": [str(data_files["en"]["train"])],
                                        "dataset": {"path": "parquet", "data_files": [str(pq)], "streaming": True}}}}
    with pytest.raises(ConfigError, match="streaming dataset source must be its only"):
        config_from_dict(mixed)
    with pytest.raises(DataError, match="no text field 'body'.*'id', 'text'"):
        DatasetSource("parquet", data_files=(str(pq),), text_field="body").load()


def test_command_line_sources(data_files, tmp_path, monkeypatch):
    pq = _parquet(tmp_path / "x.parquet", corpus("en", 20, 0))
    datasets.Dataset.from_dict({"text": corpus("fr", 20, 0)}).save_to_disk(str(tmp_path / "fr"))
    monkeypatch.chdir(tmp_path)
    args = make_parser().parse_args(["decompose", "--train", "en=x.parquet", "--train", "fr=hf:fr@train",
                                     "--general", "hf:fr", "--streaming", "--text-field", "text"])
    cfg = build_config(args)
    en, fr = cfg.domains
    assert en.datasets == [DatasetSource("parquet", data_files=(str(pq),), streaming=True)] and en.train == []
    assert fr.datasets[0].path == str(tmp_path / "fr") and fr.datasets[0].streaming
    assert cfg.general == [] and cfg.general_datasets[0].path == str(tmp_path / "fr")
    plain = build_config(make_parser().parse_args(["decompose", "--train", f"en={data_files['en']['train']}"]))
    assert plain.domains[0].datasets == [] and plain.domains[0].train == [data_files["en"]["train"]]
