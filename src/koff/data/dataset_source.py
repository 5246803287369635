"""The schema of a dataset source (`DatasetSource`: a dataset the Hugging Face `datasets` library
can open, and the field holding its text) and its command-line form; loading, the token cache and
streaming are in `koff.data.sources`, which re-exports these names."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from koff.core.errors import ConfigError, DataError

EXTRA = "koff[datasets]"
BUILDER_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
"""Data files that, given where a data file goes, are opened as datasets (.jsonl and .txt keep
koff's own reader)."""
FIELDS = ("path", "name", "split", "data_files", "data_dir", "revision", "text_field", "streaming",
          "shuffle_buffer", "num_proc")


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(f"dataset sources need the Hugging Face datasets library ({e}): "
                          f"pip install '{EXTRA}'") from None
    return datasets


@dataclass(frozen=True)
class DatasetSource:
    """One dataset source (see the module docstring for each field)."""

    path: str
    name: str | None = None
    split: str = "train"
    data_files: tuple[str, ...] = ()
    data_dir: str | None = None
    revision: str | None = None
    text_field: str = "text"
    streaming: bool = False
    shuffle_buffer: int = 1000
    num_proc: int | None = None

    # -- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw, where: str, text_field: str = "text", base: Path | None = None) -> DatasetSource:
        """Parse a `dataset:` mapping (or an `hf:` string); local paths become absolute (relative
        ones against `base`, default the working directory)."""
        if isinstance(raw, str):
            src = source_from_string(raw, text_field, False, base)
            if src is None:
                raise ConfigError(f"{where}: expected a dataset (hf:PATH[:CONFIG][@SPLIT], a .parquet/.arrow file or "
                                  f"a save_to_disk folder) or a mapping with 'path', got {raw!r}")
            return src
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping with the dataset's 'path', got {raw!r}")
        unknown = sorted(str(k) for k in set(raw) - set(FIELDS))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {list(FIELDS)}")
        if not isinstance(raw.get("path"), str) or not raw["path"]:
            raise ConfigError(f"{where}.path: expected a builder name, hub id or local folder, got {raw.get('path')!r}")
        for key in ("name", "data_dir", "revision"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                raise ConfigError(f"{where}.{key}: expected a string, got {raw[key]!r}")
        for key in ("split", "text_field"):
            if key in raw and (not isinstance(raw[key], str) or not raw[key]):
                raise ConfigError(f"{where}.{key}: expected a non-empty string, got {raw[key]!r}")
        if not isinstance(raw.get("streaming", False), bool):
            raise ConfigError(f"{where}.streaming: expected true or false, got {raw['streaming']!r}")
        for key, low in (("shuffle_buffer", 1), ("num_proc", 1)):
            v = raw.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
                raise ConfigError(f"{where}.{key}: expected a whole number >= {low}, got {v!r}")
        files = raw.get("data_files") or []
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
            raise ConfigError(f"{where}.data_files: expected a file, a glob or a list of them, got {files!r}")
        base = Path(base) if base is not None else Path.cwd()
        path = raw["path"]
        local = _local(path, base)
        if local is not None:
            path = str(local)
        resolved = []
        for f in files:
            if "://" in f:
                resolved.append(f)
                continue
            p = Path(f).expanduser()
            p = p if p.is_absolute() else base / p
            matches = sorted(Path(os.path.abspath(m)) for m in _glob(p))
            if not matches:
                raise ConfigError(f"{where}.data_files: {f} matches no file")
            resolved += [str(m) for m in matches]
        src = cls(path=path, name=raw.get("name"), split=raw.get("split", "train"), data_files=tuple(resolved),
                  data_dir=raw.get("data_dir"), revision=raw.get("revision"),
                  text_field=raw.get("text_field", text_field), streaming=raw.get("streaming", False),
                  shuffle_buffer=raw.get("shuffle_buffer", 1000), num_proc=raw.get("num_proc"))
        if src.is_builder and not src.data_files:
            raise ConfigError(f"{where}: the {path!r} builder needs data_files")
        return src

    def to_dict(self) -> dict:
        """The mapping a config stores (defaults left out; `num_proc`, which changes no token, too)."""
        d: dict[str, Any] = {"path": self.path}
        if self.name is not None:
            d["name"] = self.name
        d["split"] = self.split
        for key in ("data_files", "data_dir", "revision"):
            v = getattr(self, key)
            if v:
                d[key] = list(v) if key == "data_files" else v
        d["text_field"] = self.text_field
        if self.streaming:
            d["streaming"] = True
            d["shuffle_buffer"] = self.shuffle_buffer
        return d

    def describe(self) -> str:
        """One line naming the source (errors, manifests)."""
        what = self.path
        if self.data_files:
            what += "[" + ", ".join(self.data_files[:3]) + (", ..." if len(self.data_files) > 3 else "") + "]"
        return (f"dataset {what}" + (f":{self.name}" if self.name else "") + f"@{self.split}"
                + (" (streaming)" if self.streaming else "") + f" field {self.text_field!r}")

    @property
    def is_builder(self) -> bool:
        return self.path in ("parquet", "json", "arrow", "csv", "text")

    @property
    def is_saved(self) -> bool:
        """A `save_to_disk` folder (a Dataset or a DatasetDict)."""
        p = Path(self.path)
        return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())

    # -- reading ---------------------------------------------------------------------------------
    def load(self, streaming: bool | None = None):
        """The split as a `datasets.Dataset` (memory-mapped Arrow) or, streaming, an IterableDataset."""
        ds_lib = _datasets()
        streaming = self.streaming if streaming is None else streaming
        try:
            if self.is_saved:
                ds = ds_lib.load_from_disk(self.path)
                if isinstance(ds, ds_lib.DatasetDict):
                    if self.split not in ds:
                        raise DataError(f"{self.describe()}: no split {self.split!r}; it has {sorted(ds)}")
                    ds = ds[self.split]
                if streaming:
                    ds = ds.to_iterable_dataset(num_shards=1)
            else:
                ds = ds_lib.load_dataset(self.path, self.name, split=self.split,
                                         data_files=list(self.data_files) or None, data_dir=self.data_dir,
                                         revision=self.revision, streaming=streaming)
        except DataError:
            raise
        except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
            raise DataError(f"{self.describe()}: cannot be opened ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
                            ) from None
        columns = ds.column_names if ds.column_names is not None else list((ds.features or {}).keys())
        if columns and self.text_field not in columns:
            raise DataError(f"{self.describe()}: no text field {self.text_field!r}; its fields: {sorted(columns)} "
                            "(set text_field / --text-field)")
        return ds

    def fingerprint(self, ds=None) -> str:
        """What identifies the source's content: its settings, the size and mtime of each local
        file it reads, and (a hub or otherwise non-local source) the dataset's own fingerprint."""
        files = []
        for f in self.data_files:
            if "://" not in f:
                files.append(f)
        if Path(self.path).is_dir():
            files += [str(p) for p in sorted(Path(self.path).rglob("*")) if p.is_file()]
        stats = []
        for f in files:
            st = os.stat(f)
            stats.append([f, st.st_size, st.st_mtime_ns])
        ident = {k: v for k, v in self.to_dict().items() if k not in ("streaming", "shuffle_buffer")}
        extra = None
        if not stats and ds is not None:  # a hub dataset: datasets' fingerprint pins its revision's files
            extra = getattr(ds, "_fingerprint", None)
        blob = json.dumps({"source": ident, "files": stats, "datasets_fingerprint": extra}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _glob(p: Path) -> list[str]:
    import glob

    return glob.glob(str(p), recursive=True) if any(c in str(p) for c in "*?[") else ([str(p)] if p.is_file() else [])


def _local(path: str, base: Path) -> Path | None:
    """The local folder a dataset `path` names (None: a builder name or a hub id)."""
    if path in ("parquet", "json", "arrow", "csv", "text"):
        return None
    p = Path(path).expanduser()
    p = p if p.is_absolute() else base / p
    if p.exists():
        return Path(os.path.abspath(p))
    if path.startswith((".", "/", "~")):
        raise ConfigError(f"dataset path {path}: no such folder")
    return None


def source_from_string(value: str, text_field: str = "text", streaming: bool = False,
                       base: Path | None = None) -> DatasetSource | None:
    """A dataset source written as a string: `hf:PATH[:CONFIG][@SPLIT]`, a .parquet / .arrow
    file, or a `save_to_disk` folder; None for anything else (a plain data file)."""
    base = Path(base) if base is not None else Path.cwd()
    if value.startswith("hf:"):
        spec = value[3:]
        spec, _, split = spec.partition("@")
        path, _, name = spec.partition(":")
        if not path:
            raise ConfigError(f"{value!r}: expected hf:PATH[:CONFIG][@SPLIT], e.g. hf:allenai/c4:en@train")
        local = _local(path, base)
        return DatasetSource(path=str(local) if local else path, name=name or None, split=split or "train",
                             text_field=text_field, streaming=streaming)
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    builder = BUILDER_SUFFIXES.get(p.suffix.lower())
    if builder is not None:
        if not p.is_file():
            raise ConfigError(f"{value}: no such file")
        return DatasetSource(path=builder, data_files=(str(Path(os.path.abspath(p))),), text_field=text_field,
                             streaming=streaming)
    src = DatasetSource(path=str(Path(os.path.abspath(p))), text_field=text_field, streaming=streaming)
    if p.is_dir() and src.is_saved:
        return src
    return None


# -- hashes and the test-leak guard ------------------------------------------------------------
