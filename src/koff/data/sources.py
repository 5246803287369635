"""Hugging Face datasets as training sources: loading, the token cache, streaming, row hashes.

A source is a dataset the `datasets` library can open, with the field that holds its text:

    dataset:
      path: parquet              # a builder (parquet, json, arrow, csv, text), a hub id
                                 # (allenai/c4), or a local folder (a `save_to_disk` folder or a
                                 # folder of data files)
      data_files: [data/*.parquet]   # (builders) files or globs, relative to the config file's folder
      name: en                   # the dataset's configuration (hub datasets)
      split: train               # default train
      revision: main             # (hub) a branch, tag or commit
      text_field: text           # default: the domain's text_field, else "text"
      streaming: false           # true: read it as a stream, never whole (see below)
      shuffle_buffer: 1000       # (streaming) documents in the seeded shuffle buffer
      num_proc: 8                # (not streaming) tokenizer processes; no effect on the tokens

On the command line a source is `hf:PATH[:CONFIG][@SPLIT]` (`hf:allenai/c4:en@train`), or simply
a .parquet / .arrow file or a `save_to_disk` folder given where a data file goes; `--text-field`
names its field and `--streaming` streams every dataset source of the command.

**Not streaming.** The source is tokenized once, in `num_proc` processes (datasets' `map`), and the
tokens (each document followed by EOS, int32) are stored in a token cache entry: one raw
little-endian int32 file read back as a numpy memmap (never loaded whole, never pickled), the
64-bit row hashes of its documents (for the test-leak guard), and a JSON manifest. The entry is
keyed by the tokenizer's fingerprint (its serialized vocabulary and rules) and the source's
(its settings, plus the size and mtime of each local file, or the hub dataset's fingerprint), so a
second run, or a restart, memory-maps the tokens without calling the tokenizer. Entries live in
$KOFF_CACHE/tokens (default ~/.cache/koff/tokens) and are written under a temporary name and
renamed into place, so a crash never leaves a partial entry.

**Streaming.** The rows are read in order (never all held), through a shuffle buffer of
`shuffle_buffer` documents drawn by a seeded RNG, tokenized as they leave it and packed into
blocks. The stream's exact position (the dataset iterator's own state, the buffer's documents,
the RNG state, the tokens of a block begun) is part of the training checkpoint, so an
interrupted and resumed run reads exactly what an uninterrupted one reads. At its end a stream
starts over (the next epoch), with the buffer carrying on.

**Test leak.** Every document of every dataset source is hashed (sha256 of its stripped text,
first 8 bytes) and refused if it equals a document of any test source; a streamed source is
checked row by row as it is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from koff.core.errors import ConfigError, DataError
from koff.data.dataset_source import (  # noqa: F401 - re-exported: the source schema lives there
    BUILDER_SUFFIXES,
    EXTRA,
    FIELDS,
    DatasetSource,
    _datasets,
    source_from_string,
)
from koff.data.text import read_documents, tokenize_files

CACHE_FORMAT = "koff.token-cache"
CACHE_VERSION = 1


def row_hash(text: str) -> int:
    """64-bit hash of a document (its stripped text): what the test-leak guard compares."""
    # signed: Arrow and numpy hold it as an int64
    return int.from_bytes(hashlib.sha256(text.strip().encode("utf-8")).digest()[:8], "little", signed=True)


def test_hashes(test_files: Iterable[Path], text_field: str = "text") -> dict[int, str]:
    """Row hash -> test file, for every document of the given test files."""
    out: dict[int, str] = {}
    for f in test_files:
        if Path(f).is_file():
            for doc in read_documents(f, text_field):
                out.setdefault(row_hash(doc), str(f))
    return out


def check_rows(hashes: np.ndarray, tests: dict[int, str], what: str) -> None:
    """Refuse a source any of whose row hashes is that of a test document."""
    if not tests or hashes.size == 0:
        return
    probe = np.fromiter(tests.keys(), dtype=np.int64, count=len(tests))
    hit = np.flatnonzero(np.isin(hashes, probe))
    if hit.size:
        row = int(hit[0])
        raise DataError(f"{what}: row {row} (and {hit.size - 1} more) has the same text as a document of test file "
                        f"{tests[int(hashes[row])]}; test text must never be trained on")


# -- the token cache ---------------------------------------------------------------------------


def cache_root() -> Path:
    """$KOFF_CACHE/tokens, default ~/.cache/koff/tokens."""
    root = os.environ.get("KOFF_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "koff") / "tokens"


def tokenizer_fingerprint(tokenizer) -> str:
    """What identifies a tokenizer's output: its serialized model and rules, and its EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    blob = json.dumps({"class": type(tokenizer).__name__, "body": body, "eos": tokenizer.eos_token_id})
    return hashlib.sha256(blob.encode()).hexdigest()


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of documents, each followed by EOS (the same ids `koff.data.tokenize_documents`
    gives the same text)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    return [ids + [eos] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


@dataclass
class CachedTokens:
    """A source's tokens, memory-mapped from the cache."""

    tokens: torch.Tensor
    """1-D int32 (a view of the memmap)."""
    hashes: np.ndarray
    """int64 row hash per document."""
    folder: Path
    hit: bool
    """Read from an entry made earlier (no tokenizer call)."""


def _read_entry(folder: Path) -> CachedTokens | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
        return None
    n, docs = meta["tokens"], meta["documents"]
    tokens_path, hashes_path = folder / "tokens.int32", folder / "rows.int64"
    if tokens_path.stat().st_size != 4 * n or hashes_path.stat().st_size != 8 * docs:
        return None  # torn or foreign: made again
    # copy-on-write mapping: torch wants a writable array, and nothing is read before it is used
    arr = np.memmap(tokens_path, dtype="<i4", mode="c", shape=(n,)) if n else np.zeros(0, dtype="<i4")
    hashes = np.memmap(hashes_path, dtype="<i8", mode="r", shape=(docs,)) if docs else np.zeros(0, dtype="<i8")
    return CachedTokens(torch.from_numpy(arr), hashes, folder, hit=True)


def _tokenize_batch(batch: dict, tokenizer, field: str) -> dict:
    texts = batch[field]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise DataError(f"text field {field!r} holds a {type(texts[bad[0]]).__name__}, not text")
    return {"ids": encode(tokenizer, texts), "h": [row_hash(t) for t in texts]}


def cached_tokens(source: DatasetSource, tokenizer, progress: bool = False) -> CachedTokens:
    """The tokens of a (non-streaming) source: from the cache, or tokenized now (in parallel) and
    cached. Keyed by tokenizer + source fingerprint."""
    if source.streaming:
        raise ValueError("a streaming source is not cached")
    ds = source.load()
    key = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}/{source.fingerprint(ds)}/{CACHE_VERSION}".encode())
    folder = cache_root() / key.hexdigest()[:40]
    found = _read_entry(folder) if folder.is_dir() else None
    if found is not None:
        return found
    from koff.core.atomic import atomic_write_text, make_temp_dir, remove_tree, swap_in

    tmp = make_temp_dir(folder)
    try:
        num_proc = source.num_proc or (min(8, os.cpu_count() or 1) if len(ds) >= 20_000 else None)
        mapped = ds.map(_tokenize_batch, batched=True, batch_size=1000, num_proc=num_proc,
                        fn_kwargs={"tokenizer": tokenizer, "field": source.text_field},
                        remove_columns=ds.column_names, cache_file_name=str(tmp / "map.arrow"),
                        load_from_cache_file=False, desc=f"tokenizing {source.path}" if progress else None)
        total = docs = 0
        with open(tmp / "tokens.int32", "wb") as ft, open(tmp / "rows.int64", "wb") as fh:
            for chunk in mapped.with_format("arrow").iter(batch_size=10_000):
                ids = chunk.column("ids").combine_chunks()
                flat = np.asarray(ids.flatten().to_numpy(zero_copy_only=False), dtype="<i4")
                ft.write(flat.tobytes())
                h = np.asarray(chunk.column("h").to_numpy(zero_copy_only=False), dtype="<i8")
                fh.write(h.tobytes())
                total += flat.size
                docs += h.size
        del mapped
        for p in tmp.iterdir():  # datasets' intermediate Arrow files
            if p.name not in ("tokens.int32", "rows.int64"):
                remove_tree(p)
        atomic_write_text(tmp / "meta.json", json.dumps({
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "tokens": total, "documents": docs, "dtype": "int32",
            "source": source.to_dict(), "tokenizer": tokenizer_fingerprint(tokenizer)}, indent=1))
        if folder.exists():  # another process made it meanwhile: theirs is as good
            remove_tree(tmp)
        else:
            try:
                swap_in(tmp, folder)
            except OSError:
                remove_tree(tmp)
    finally:
        if tmp.exists():
            remove_tree(tmp)
    found = _read_entry(folder)
    if found is None:
        raise DataError(f"{source.describe()}: its token cache entry {folder} could not be read back")
    found.hit = False
    return found


# -- streaming ---------------------------------------------------------------------------------


class StreamingBlockStream:
    """An endless, resumable stream of [batch_size, block] batches from a streaming source.

    Rows are read in order into a shuffle buffer; the document that leaves it is drawn by a seeded
    RNG, tokenized, and appended to the tokens of the block being filled. `state_dict()` (at a
    batch boundary) is everything needed to continue exactly: `load_state_dict` on a fresh stream
    of the same source and seed reads what this one would have read next.
    """

    def __init__(self, source: DatasetSource, tokenizer, block: int, batch_size: int, seed: int,
                 tests: dict[int, str] | None = None, what: str = "a streamed source"):
        self.source, self.tokenizer, self.block, self.batch_size = source, tokenizer, block, batch_size
        self.tests = tests or {}
        self.what = what
        self.taken = 0
        self.epoch = 0
        self.rng = random.Random(seed)
        self.buffer: list[str] = []
        self.pending: list[int] = []
        self._ds: Any = None  # a datasets.IterableDataset, once opened
        self._it: Iterator[dict] | None = None
        self._rows_read = 0

    # position ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        r = self.rng.getstate()
        return {"taken": self.taken, "epoch": self.epoch, "rows_read": self._rows_read,
                "source": self._ds.state_dict() if self._ds is not None else None,
                "buffer": list(self.buffer), "pending": list(self.pending), "rng": [r[0], list(r[1]), r[2]]}

    def load_state_dict(self, state: dict) -> None:
        self.taken, self.epoch, self._rows_read = state["taken"], state["epoch"], state["rows_read"]
        self.buffer, self.pending = list(state["buffer"]), list(state["pending"])
        r = state["rng"]
        self.rng.setstate((r[0], tuple(r[1]), r[2]))
        self._open(state["source"])

    def _open(self, source_state: dict | None = None) -> Iterator[dict]:
        ds: Any = self.source.load(streaming=True)
        if source_state is not None:
            ds.load_state_dict(source_state)
        self._ds, self._it = ds, iter(ds)
        return self._it

    # reading ------------------------------------------------------------------------------------
    def _row(self) -> str | None:
        """The next row's text (None: the source is exhausted for this epoch)."""
        it = self._it if self._it is not None else self._open()
        try:
            row = next(it)
        except StopIteration:
            return None
        text = row.get(self.source.text_field)
        if not isinstance(text, str):
            raise DataError(f"{self.what}: row {self._rows_read} has no text in field {self.source.text_field!r} "
                            f"(fields: {sorted(row)})")
        h = row_hash(text)
        if h in self.tests:
            raise DataError(f"{self.what}: row {self._rows_read} (epoch {self.epoch}) has the same text as a document "
                            f"of test file {self.tests[h]}; test text must never be trained on")
        self._rows_read += 1
        return text

    def _fill(self) -> None:
        while len(self.buffer) < self.source.shuffle_buffer:
            text = self._row()
            if text is None:
                if not self.buffer and self._rows_read == 0:
                    raise DataError(f"{self.what}: the stream has no rows")
                if self.buffer:
                    return  # drain what is left before the next epoch
                self.epoch += 1
                self._rows_read = 0
                self._open()
                continue
            self.buffer.append(text)

    def _document(self) -> str:
        self._fill()
        j = self.rng.randrange(len(self.buffer))
        self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
        return self.buffer.pop()

    def _next_block(self) -> list[int]:
        while len(self.pending) < self.block:
            self.pending.extend(encode(self.tokenizer, [self._document()])[0])
        out, self.pending = self.pending[: self.block], self.pending[self.block:]
        return out

    def next(self) -> torch.Tensor:
        """The next batch [batch_size, block] (int64)."""
        batch = torch.tensor([self._next_block() for _ in range(self.batch_size)], dtype=torch.long)
        self.taken += 1
        return batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next()

    def head_tokens(self, n: int) -> torch.Tensor:
        """The first `n` tokens of the source in its own order (a separate reader: the stream's
        position is untouched); what a KV memory and calibration start from."""
        out: list[int] = []
        for row in self.source.load(streaming=True):
            out.extend(encode(self.tokenizer, [row[self.source.text_field]])[0])
            if len(out) >= n:
                break
        return torch.tensor(out[:n], dtype=torch.long)

    def head(self, n: int) -> torch.Tensor:
        """The first `n` whole blocks of the source in its own order (calibration)."""
        tokens = self.head_tokens(n * self.block)
        k = tokens.numel() // self.block
        if k == 0:
            raise DataError(f"{self.what}: fewer tokens than one block of {self.block}")
        return tokens[: k * self.block].view(k, self.block)


# -- a stream's sources ------------------------------------------------------------------------


def source_tokens(files: Sequence[Path], datasets: Sequence[DatasetSource], tokenizer, text_field: str,
                  tests: dict[int, str], what: str) -> torch.Tensor:
    """The token stream of files and (non-streaming) dataset sources, in that order: a file-only
    stream exactly as `koff.data.tokenize_files` gives it, one dataset source as its memmap, several
    concatenated (int64). Each dataset's rows are checked against the test documents."""
    parts = [tokenize_files(files, tokenizer, text_field)] if files else []
    for src in datasets:
        got = cached_tokens(src, tokenizer)
        check_rows(np.asarray(got.hashes), tests, f"{what}: {src.describe()}")
        parts.append(got.tokens)
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p.long() for p in parts])


def validate_stream_sources(files: Sequence, datasets: Sequence[DatasetSource], what: str) -> None:
    """A streaming source is the only source of its stream (it is never held whole, so it cannot
    be concatenated with others)."""
    streamed = [s for s in datasets if s.streaming]
    if streamed and (len(datasets) > 1 or files):
        raise ConfigError(f"{what}: a streaming dataset source must be its only training source "
                          f"(got {len(files)} file(s) and {len(datasets)} dataset source(s))")


def as_dict_list(sources: Sequence[DatasetSource]) -> list[dict]:
    return [{"dataset": s.to_dict()} for s in sources]


def replace(source: DatasetSource, **changes) -> DatasetSource:
    return dataclasses.replace(source, **changes)


__all__ = ["DatasetSource", "CachedTokens", "StreamingBlockStream", "cached_tokens", "cache_root", "check_rows",
           "encode", "row_hash", "source_from_string", "source_tokens", "test_hashes", "tokenizer_fingerprint",
           "validate_stream_sources", "EXTRA"]
