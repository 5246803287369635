"""Domains and their text: reading files, tokenising, packing into fixed-length blocks, and
deterministic batch streams.

A domain is a name plus train (and optionally valid/test) files. Files are plain text (one
document per line) or JSONL (one document per line, in a `text` field, or in one of the
general-data schemas below). Test text never reaches training: a file listed as test for any
domain cannot be a training file (checked by content hash).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from koff.core.errors import DataError
from koff.core.files import sha256_file

BUNDLED_LANGUAGES = ("en", "fr", "es", "de", "it", "pt")
GENERAL_TRAIN_FILES = ("gsm8k_train.jsonl", "arc_easy.jsonl", "english_news.txt")
FLORES_LINES = 281
"""Every bundled `text/<lang>/test.txt` opens with the FLORES-200 devtest: 281 lines (one per
source article), the same content in every language (shared/data/MANIFEST.md, build report)."""




def data_root() -> Path:
    """The shared data folder: `$KOFF_DATA`, else `../shared/data` from the working directory,
    else `../shared/data` beside this source checkout."""
    env = os.environ.get("KOFF_DATA")
    if env:  # absolute, so the paths a run records work from any working directory
        return Path(os.path.abspath(Path(env).expanduser()))
    for cand in (Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[4] / "shared" / "data"):
        if cand.is_dir():
            return Path(os.path.abspath(cand))
    return Path(os.path.abspath(Path.cwd().parent / "shared" / "data"))


@dataclass
class Domain:
    """A named domain and its files (test/valid may be empty)."""

    name: str
    train: list[Path]
    test: list[Path] = field(default_factory=list)
    valid: list[Path] = field(default_factory=list)
    text_field: str = "text"
    test_subsets: dict[str, int] = field(default_factory=dict)
    """Named leading parts of the test text: subset name -> number of leading test lines."""
    datasets: list = field(default_factory=list)
    """Training sources that are datasets (`koff.data.sources.DatasetSource`), read after `train`'s files."""

    def to_dict(self) -> dict:
        """The domain as it is stored in a config: name, files (as strings), dataset sources and text field."""
        train = [str(p) for p in self.train] + [{"dataset": s.to_dict()} for s in self.datasets]
        return {"name": self.name, "train": train, "test": [str(p) for p in self.test],
                "valid": [str(p) for p in self.valid], "text_field": self.text_field,
                "test_subsets": dict(self.test_subsets)}

    @classmethod
    def from_dict(cls, d: dict) -> Domain:
        from koff.data.dataset_source import DatasetSource

        field_ = d.get("text_field", "text")
        train = [p for p in d["train"] if not isinstance(p, dict)]
        sets = [DatasetSource.from_dict(p["dataset"], f"domain {d['name']}", field_) for p in d["train"]
                if isinstance(p, dict)]
        return cls(name=d["name"], train=[Path(p) for p in train], test=[Path(p) for p in d.get("test", [])],
                   valid=[Path(p) for p in d.get("valid", [])], text_field=field_,
                   test_subsets=dict(d.get("test_subsets", {})), datasets=sets)


def bundled_domain(lang: str, root: Path | None = None) -> Domain:
    """One of the shared corpus' languages (train/valid/test under `text/<lang>/`)."""
    root = Path(root or data_root())
    folder = root / "text" / lang
    if not folder.is_dir():
        raise DataError(f"no bundled text for domain {lang!r}: {folder} does not exist "
                        f"(bundled: {', '.join(BUNDLED_LANGUAGES)}; set KOFF_DATA to the shared data folder)")
    return Domain(name=lang, train=[folder / "train.txt"], test=[folder / "test.txt"], valid=[folder / "valid.txt"],
                  test_subsets={"flores": FLORES_LINES})


def general_files(root: Path | None = None) -> list[Path]:
    """The bundled general-domain training files (regularization steps)."""
    root = Path(root or data_root())
    files = [root / "general" / f for f in GENERAL_TRAIN_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"general data missing: {', '.join(missing)} (set KOFF_DATA to the shared data folder)")
    return files


def _document_from_json(obj: dict, text_field: str, where: str) -> str:
    if text_field in obj and isinstance(obj[text_field], str):
        return obj[text_field]
    if isinstance(obj.get("question"), str) and isinstance(obj.get("answer"), str):  # GSM8K
        return f"Question: {obj['question']}\nAnswer: {obj['answer']}"
    if isinstance(obj.get("query"), str) and isinstance(obj.get("choices"), list) and isinstance(obj.get("gold"), int):
        choices, gold = obj["choices"], obj["gold"]
        if 0 <= gold < len(choices):  # ARC / OpenBookQA / PIQA style: question + right answer
            return f"{obj['query']} {choices[gold]}"
    raise DataError(f"{where}: no text field {text_field!r} (and not a question/answer or query/choices/gold "
                    f"record); fields present: {sorted(obj)}")


def read_jsonl(path: Path, text: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a JSONL file; errors name file and line."""
    if text is None:
        text = Path(path).read_text(encoding="utf-8")
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object per line, got {type(obj).__name__}")
        yield i, obj


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    """Documents of a .txt (one per non-empty line) or .jsonl file (one JSON object per line)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {path} is a folder, not a file (give the .txt or .jsonl files in it)")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    docs = []
    if path.suffix == ".jsonl":
        docs = [_document_from_json(obj, text_field, f"{path}:{i}") for i, obj in read_jsonl(path, text)]
    else:
        docs = [line for line in text.splitlines() if line.strip()]
    if not docs:
        raise DataError(f"{path}: no documents (empty file)")
    return docs


def file_sha256(path: Path) -> str:
    """Hex sha256 of a data file's bytes; errors name the file."""

    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {path} is a folder, not a file")
    try:
        return sha256_file(path)
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except OSError as e:
        raise DataError(f"data file {path} cannot be read ({e.strerror or e})") from None


def check_no_test_leak(domains: Sequence[Domain], general: Sequence[Path] = (),
                       known_tests: Sequence[tuple[str, str, str]] = ()) -> None:
    """Refuse any training file whose content equals a test file of any domain.

    `known_tests` adds test files recorded elsewhere (in a run's manifests, by sha256, so the check
    holds even where those files are gone): (domain, file, sha256) triples.
    """
    test: dict[str, tuple[str, str | Path]] = {digest: (name, path) for name, path, digest in known_tests}
    test.update({file_sha256(p): (d.name, p) for d in domains for p in d.test})
    for d in domains:
        for p in d.train:
            h = file_sha256(p)
            if h in test:
                raise DataError(f"domain {d.name!r}: training file {p} has the same content as test file "
                                f"{test[h][1]} of domain {test[h][0]!r}; test text must never be trained on")
    for p in general:
        h = file_sha256(p)
        if h in test:
            raise DataError(f"general training file {p} has the same content as test file {test[h][1]} "
                            f"of domain {test[h][0]!r}; test text must never be trained on")


def tokenize_documents(docs: Sequence[str], tokenizer) -> torch.Tensor:
    """All documents as one 1-D token stream, each document followed by the EOS token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    ids = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for seq in ids:
        out.extend(seq)
        out.append(eos)
    return torch.tensor(out, dtype=torch.long)


def tokenize_files(paths: Sequence[Path], tokenizer, text_field: str = "text", max_lines: int | None = None) -> torch.Tensor:
    docs: list[str] = []
    for p in paths:
        d = read_documents(p, text_field)
        docs.extend(d[:max_lines] if max_lines is not None else d)
    return tokenize_documents(docs, tokenizer)


def pack(tokens: torch.Tensor, block: int, max_tokens: int | None = None) -> torch.Tensor:
    """Cut a token stream into non-overlapping [N, block] rows (the remainder is dropped).
    `max_tokens` keeps only the first ⌊max_tokens / block⌋ blocks."""
    if block < 2:
        raise DataError(f"block length must be at least 2, got {block}")
    n = tokens.numel() // block
    if max_tokens is not None:
        n = min(n, max_tokens // block)
    if n == 0:
        raise DataError(f"only {tokens.numel()} tokens: not enough for one block of {block}")
    return tokens[: n * block].view(n, block)


class BlockStream:
    """An endless, deterministic stream of batches of packed blocks.

    Each epoch visits every block once in an order drawn from (seed, epoch), so a stream is
    reproducible from its seed and the number of batches already taken.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int):
        if blocks.shape[0] < 1:
            raise DataError("a block stream needs at least one block")
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.taken = 0
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(self.blocks.shape[0], generator=g), **{
                e: o for e, o in self._orders.items() if e == epoch - 1}}
        return self._orders[epoch]

    def next(self) -> torch.Tensor:
        """The next batch [batch_size, block]."""
        n = self.blocks.shape[0]
        start = self.taken * self.batch_size
        idx = [self._order(i // n)[i % n] for i in range(start, start + self.batch_size)]
        self.taken += 1
        batch = self.blocks[torch.stack(idx)]
        return batch if batch.dtype == torch.long else batch.long()  # memory-mapped dataset tokens are int32

    def head(self, n: int) -> torch.Tensor:
        """The first `n` blocks in the text's own order (calibration statistics)."""
        head = self.blocks[:n]
        return head if head.dtype == torch.long else head.long()

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next()
