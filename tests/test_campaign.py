"""The reliability campaign, as a table: every way a new user or a hostile one can hand koff a bad
run, manifest, tensor, flag, config, data file, output or grid, and what koff must answer.

One small run (tiny in-process llama, en + fr, a reference, and a memory `de` added later) is
built once; each case copies it, applies its mutation (a hostile editor re-records the sha256 of
what they changed, so only koff's own checks can catch it), runs the command in-process through
`koff.cli.main`, and asserts: exit status 2, exactly one line on stderr starting "koff: error:",
naming the file / field / flag at fault, and not one file changed anywhere under the case's
folder. Cases marked `accepted` are inputs koff takes on purpose (the reason is in the table);
they must exit 0 and leave every file that existed unchanged. Two cases go through a real
`python -m koff` process, to show that no traceback reaches a terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config_dict, write_domain_files
from safetensors.torch import load_file, save_file

from koff.cli import main
from koff.config.recipe import config_from_dict
from koff.core.atomic import lock
from koff.core.files import sha256_file
from koff.data.text import Domain
from koff.training.pipeline import add_domain, decompose

HEX0 = "0" * 64


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (symlinks by their target path)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = sha256_file(p)
    return out


@dataclass
class World:
    root: Path
    run: Path
    data: dict
    model: Path
    other_model: Path
    shared: dict


@pytest.fixture(scope="module")
def world(tmp_path_factory, llama_folder, qwen_folder) -> World:
    root = tmp_path_factory.mktemp("campaign")
    data = write_domain_files(root / "data", langs=("en", "fr", "de"))
    run = root / "run"
    decompose(config_from_dict(tiny_config_dict(llama_folder, data, run, steps=4)), progress=False)
    add_domain(run, Domain("de", train=[data["de"]["train"]], test=[data["de"]["test"]]), steps=2, progress=False)
    shared = {"model": tree_hashes(llama_folder), "data": tree_hashes(root / "data"), "run": tree_hashes(run)}
    return World(root, run, data, llama_folder, qwen_folder, shared)


@dataclass
class Ctx:
    """One case's folder: a copy of the run and room for the files a case makes."""

    tmp: Path
    run: Path
    world: World
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def data(self) -> dict:
        return self.world.data

    @property
    def model(self) -> Path:
        return self.world.model

    def file(self, name: str, content: str | bytes) -> Path:
        p = self.tmp / "files" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
        return p

    def copy_of(self, src: Path, name: str) -> Path:
        return self.file(name, Path(src).read_bytes())

    def rehash(self, rel: str) -> None:
        """Record the new sha256 of `rel` where koff lists it (as a hostile editor would)."""
        parts = rel.split("/")
        base = self.run
        if parts[0] == "reference":
            base, parts = base / "reference", parts[1:]
        if parts[0] == "memories":
            manifest, key = base / "memories" / parts[1] / "memory.json", "/".join(parts[2:])
        else:
            manifest, key = base / "koff.json", "/".join(parts)
        m = json.loads(manifest.read_text())
        m["files"][key] = sha256_file(base / "/".join(parts))
        manifest.write_text(json.dumps(m))

    def config(self, change=None, **train) -> Path:
        """A decompose config for a quick tiny run into OUT (changed by `change`), as a YAML file."""
        d = tiny_config_dict(self.model, self.data, self.tmp / "out", steps=1, **train)
        d["reference"] = False
        if change is not None:
            d = change(d) or d
        return self.file("c.yaml", d if isinstance(d, str) else yaml.safe_dump(d))


def edit_json(rel: str, change: Callable[[dict], object]) -> Callable[[Ctx], None]:
    def mutate(c: Ctx) -> None:
        p = c.run / rel
        m = json.loads(p.read_text())
        change(m)
        p.write_text(json.dumps(m))
    return mutate


def edit_tensors(rel: str, change: Callable[[dict], object]) -> Callable[[Ctx], None]:
    def mutate(c: Ctx) -> None:
        p = c.run / rel
        t = load_file(str(p))
        change(t)
        save_file(t, str(p))
        c.rehash(rel)
    return mutate


def raw_bytes(rel: str, data: Callable[[bytes], bytes]) -> Callable[[Ctx], None]:
    def mutate(c: Ctx) -> None:
        p = c.run / rel
        p.write_bytes(data(p.read_bytes()))
        c.rehash(rel)
    return mutate


def lora_key(t: dict, which: str = "lora_A", module: str = "q_proj") -> str:
    return next(k for k in sorted(t) if f"{module}.{which}" in k)


def set_key(path: list, value):
    def change(m):
        for k in path[:-1]:
            m = m[k]
        m[path[-1]] = value
    return change


def drop_key(path: list):
    def change(m):
        for k in path[:-1]:
            m = m[k]
        m.pop(path[-1])
    return change


def gen(*extra: str) -> Callable[[Ctx], list[str]]:
    """The probe: `koff generate` loads the run, builds the model and attaches every memory."""
    return lambda c: ["generate", str(c.run), "--memory", "en", "the cat", "--max-new-tokens", "1", *extra]


def decompose_config(c: Ctx) -> list[str]:
    return ["decompose", "--config", str(c.tmp / "files" / "c.yaml")]


def symlink_out(rel: str) -> Callable[[Ctx], None]:
    """Replace `rel` by a symlink to an identical copy outside the run (its sha256 still matches)."""
    def mutate(c: Ctx) -> None:
        p = c.run / rel
        dst = c.tmp / "elsewhere" / p.name
        dst.parent.mkdir(exist_ok=True)
        shutil.move(p, dst)
        p.symlink_to(dst)
    return mutate


def cfg_case(change, **train):
    return lambda c: c.config(change, **train)


def hostile_train(content: str | bytes, name: str = "train.txt"):
    """Decompose with en's training file replaced by `content`."""
    def mutate(c: Ctx) -> None:
        f = c.file(name, content)

        def change(d):
            d["domains"]["en"]["train"] = [str(f)]
        c.config(change)
    return mutate


def cell(**over) -> dict:
    d = {"id": "koff__seed0", "method": "koff", "group": "main", "seed": 0, "kind": "decompose", "setting": {},
         "deterministic": False, "config": {"train": {}}, "train": {"steps": 1, "seconds": 0.5, "tokens": 32},
         "kept_fraction_per_layer": [0.75, 0.75], "curves": {},
         "ppl": {"en": {"backbone": {"test": {"ppl": 12.0, "tokens": 60}}, "own": {"test": {"ppl": 9.0, "tokens": 60}}}},
         "tasks": {}, "sparsity": {"ffn": 0.25, "global": 0.1, "global_without_embeddings": 0.12}, "swap": None,
         "eval_settings": {"block": 16, "max_tokens": 64}, "base_model": "tiny", "grid": "g", "command": "koff compare g"}
    d.update(over)
    return d


def cells(*records, raw: str | None = None):
    def mutate(c: Ctx) -> None:
        folder = c.tmp / "results" / "cells"
        folder.mkdir(parents=True)
        for i, r in enumerate(records):
            (folder / f"c{i}.json").write_text(json.dumps(r))
        if raw is not None:
            (folder / "bad.json").write_text(raw)
    return mutate


def grid(change):
    def mutate(c: Ctx) -> None:
        base = tiny_config_dict(c.model, c.data, c.tmp / "unused", steps=1)
        base.pop("output")
        spec = {"name": "g", "results": str(c.tmp / "results"), "work": str(c.tmp / "work"), "base": base,
                "seeds": [0], "methods": {"koff": {}}, "eval": {"block": 16}}
        change(spec)
        c.file("grid.yaml", yaml.safe_dump(spec))
    return mutate


COMPARE = lambda c: ["compare", str(c.tmp / "files" / "grid.yaml"), "--dry-run"]
REPORT = lambda c: ["report", str(c.tmp / "results")]


def add(*extra: str, name: str = "xx"):
    """`koff add-domain` of a one-step memory (TRAIN stands for a valid training file)."""
    return lambda c: ["add-domain", str(c.run), "--name", name, "--steps", "1", "--no-reference",
                      *(str(c.data["de"]["train"]) if x == "TRAIN" else x for x in extra)]


def leak_train(src: Callable[[Ctx], Path], flag: str = "--train"):
    """add-domain training on a copy of a test file (content equal, another name)."""
    def argv(c: Ctx) -> list[str]:
        copy = c.tmp / "files" / "copy.txt"
        extra = [flag, str(copy)]
        if flag == "--general":
            extra = ["--train", str(c.data["de"]["train"]), "--general", str(copy)]
        return add(*extra)(c)
    return argv


def make_copy(src: Callable[[Ctx], Path]):
    return lambda c: c.copy_of(src(c), "copy.txt")


def hold_lock(c: Ctx) -> None:
    c.stack.enter_context(lock(c.run))


@dataclass
class Case:
    id: str
    category: str
    argv: Callable[[Ctx], list[str]]
    mutate: Callable[[Ctx], object] | None = None
    expect: tuple[str, ...] = ()
    """Substrings the one-line message must contain (the file, field or flag at fault)."""
    accepted: str | None = None
    """Why koff takes this input on purpose (then: exit 0, every existing file unchanged)."""


M, MEM_EN, MEM_DE = "koff.json", "memories/en/memory.json", "memories/de/memory.json"
MASK, GATES = "backbone/mask.safetensors", "backbone/gates.safetensors"
LORA, KV = "memories/en/adapter_model.safetensors", "memories/fr/kv.safetensors"

CASES = [
    # -- the run's manifest, koff.json ----------------------------------------------------------
    Case("files-emptied", "run manifest", gen(), edit_json(M, set_key(["files"], {})), (M, "files", "does not list")),
    Case("files-shortened", "run manifest", gen(), edit_json(M, drop_key(["files", GATES])), (M, GATES)),
    Case("files-outside", "run manifest", gen(), edit_json(M, set_key(["files", "../../../../etc/hostname"], HEX0)),
         (M, "etc/hostname", "not part of this format")),
    Case("files-absolute", "run manifest", gen(), edit_json(M, set_key(["files", "/etc/hostname"], HEX0)),
         (M, "/etc/hostname")),
    Case("files-wrong-hash", "run manifest", gen(), edit_json(M, set_key(["files", MASK], HEX0)),
         ("mask.safetensors", "contents changed")),
    Case("files-hash-not-hex", "run manifest", gen(), edit_json(M, set_key(["files", "config.yaml"], "abc")),
         (M, "config.yaml", "sha256")),
    Case("format", "run manifest", gen(), edit_json(M, set_key(["format"], "koff.other")), (M, "format")),
    Case("format-version-newer", "run manifest", gen(), edit_json(M, set_key(["format_version"], 99)), (M, "newer koff")),
    Case("format-version-string", "run manifest", gen(), edit_json(M, set_key(["format_version"], "1")),
         (M, "format_version")),
    Case("format-version-zero", "run manifest", gen(), edit_json(M, set_key(["format_version"], 0)), (M, "format_version")),
    Case("koff-version-missing", "run manifest", gen(), edit_json(M, drop_key(["koff_version"])), (M, "koff_version")),
    Case("base-model-missing", "run manifest", gen(), edit_json(M, drop_key(["base_model"])), (M, "base_model")),
    Case("fingerprint-malformed", "run manifest", gen(), edit_json(M, set_key(["base_model", "fingerprint"], "abc")),
         (M, "fingerprint")),
    Case("fingerprint-other", "run manifest", gen(),
         edit_json(M, set_key(["base_model", "fingerprint"], "sha256:" + HEX0)), (M, "sha256:" + HEX0, "--model")),
    Case("hidden-size", "run manifest", gen(), edit_json(M, set_key(["base_model", "hidden_size"], 64)),
         (M, "base_model.hidden_size is 64", "has 32")),
    Case("num-layers", "run manifest", gen(), edit_json(M, set_key(["base_model", "num_layers"], 3)),
         (M, "intermediate_sizes", "num_layers")),
    Case("intermediate-sizes", "run manifest", gen(), edit_json(M, set_key(["base_model", "intermediate_sizes"], [40, 48])),
         ("mask.safetensors", "layers.0.keep", "[40]")),
    Case("num-kv-heads", "run manifest", gen(), edit_json(M, set_key(["base_model", "num_kv_heads"], 3)),
         ("kv.safetensors", "num_kv_heads 3", M)),
    Case("head-dim", "run manifest", gen(), edit_json(M, set_key(["base_model", "head_dim"], 4)),
         ("kv.safetensors", "head_dim 4")),
    Case("target-sparsity-high", "run manifest", gen(), edit_json(M, set_key(["target_sparsity"], 1.5)),
         (M, "target_sparsity")),
    Case("target-sparsity-string", "run manifest", gen(), edit_json(M, set_key(["target_sparsity"], "0.2")),
         (M, "target_sparsity")),
    Case("target-sparsity-nan", "run manifest", gen(), edit_json(M, set_key(["target_sparsity"], float("nan"))),
         (M, "target_sparsity", "finite")),
    Case("target-sparsity-negative", "run manifest", gen(), edit_json(M, set_key(["target_sparsity"], -0.1)),
         (M, "target_sparsity")),
    Case("pruned-string", "run manifest", gen(), edit_json(M, set_key(["pruned"], "yes")), (M, "pruned")),
    Case("pruned-false", "run manifest", gen(), edit_json(M, set_key(["pruned"], False)), (M, "pruned")),
    Case("domains-string", "run manifest", gen(), edit_json(M, set_key(["domains"], "en")), (M, "domains")),
    Case("domains-unknown", "run manifest", gen(), edit_json(M, set_key(["domains"], ["en", "fr", "xx"])),
         ("['xx']", "no memories")),
    Case("domains-bad-name", "run manifest", gen(), edit_json(M, set_key(["domains"], ["en", "../x"])),
         (M, "domains", "'../x'")),
    Case("domains-twice", "run manifest", gen(), edit_json(M, set_key(["domains"], ["en", "en"])), (M, "twice")),
    Case("training-empty", "run manifest", gen(), edit_json(M, set_key(["training"], {})), (M, "training", "memory")),
    Case("training-memory-missing", "run manifest", gen(), edit_json(M, drop_key(["training", "memory"])),
         (M, "training", "'memory'")),
    Case("training-steps-string", "run manifest", gen(), edit_json(M, set_key(["training", "train", "steps"], "abc")),
         (M, "training.train.steps")),
    Case("training-lr-nan", "run manifest", gen(),
         edit_json(M, set_key(["training", "train", "lr_lora"], float("nan"))), (M, "training.train.lr_lora", "finite")),
    Case("training-unknown-field", "run manifest", gen(), edit_json(M, set_key(["training", "train", "stpes"], 4)),
         (M, "training.train", "stpes")),
    Case("training-lora-rank", "run manifest", gen(), edit_json(M, set_key(["training", "memory", "lora_rank"], 8)),
         ("memory.json", "lora_rank")),
    Case("training-mask-flap", "run manifest", gen(), edit_json(M, set_key(["training", "mask"], "flap")),
         (M, "bias.safetensors")),
    Case("sparsity-missing", "run manifest", gen(), edit_json(M, drop_key(["sparsity"])), (M, "sparsity")),
    Case("sparsity-out-of-range", "run manifest", gen(), edit_json(M, set_key(["sparsity", "ffn"], 2.0)),
         (M, "sparsity", "ffn")),
    Case("metrics-missing", "run manifest", gen(), edit_json(M, drop_key(["metrics"])), (M, "metrics")),
    Case("default-memory-missing", "run manifest", gen(), edit_json(M, set_key(["default_memory"], "zz")),
         (M, "default_memory", "zz")),
    Case("data-not-object", "run manifest", gen(), edit_json(M, set_key(["data", "en"], 5)), (M, "data.en")),
    Case("data-test-hashes", "run manifest", gen(), edit_json(M, set_key(["data", "en", "test_sha256"], [])),
         (M, "test_sha256")),
    Case("not-json", "run manifest", gen(), lambda c: (c.run / M).write_text("{not json"), (M, "not valid JSON")),
    Case("json-list", "run manifest", gen(), lambda c: (c.run / M).write_text("[1, 2]"), (M, "JSON object")),
    Case("missing", "run manifest", gen(), lambda c: (c.run / M).unlink(), (M, "missing")),
    Case("not-utf8", "run manifest", gen(), lambda c: (c.run / M).write_bytes(b"\xff\xfe\x00{"), (M, "not valid JSON")),
    Case("nested-deep", "run manifest", gen(), lambda c: (c.run / M).write_text("[" * 100_000), (M, "not valid JSON")),
    Case("a-folder", "run manifest", gen(), lambda c: ((c.run / M).unlink(), (c.run / M).mkdir()), (M, "folder")),
    Case("symlinked", "run manifest", gen(), symlink_out(M), (M, "symlink")),
    Case("unknown-field", "run manifest", gen(), edit_json(M, set_key(["notes"], "hand-written remark")),
         accepted="fields koff does not read cannot change what it loads; they are kept as written"),

    # -- a memory's manifest, memory.json -------------------------------------------------------
    Case("files-emptied", "memory manifest", gen(), edit_json(MEM_EN, set_key(["files"], {})), (MEM_EN, "does not list")),
    Case("files-shortened", "memory manifest", gen(), edit_json(MEM_EN, drop_key(["files", "kv.safetensors"])),
         (MEM_EN, "kv.safetensors")),
    Case("files-outside", "memory manifest", gen(), edit_json(MEM_EN, set_key(["files", "../../koff.json"], HEX0)),
         (MEM_EN, "../../koff.json")),
    Case("file-symlinked", "memory manifest", gen(), symlink_out("memories/en/kv.safetensors"),
         ("memories/en/kv.safetensors", "symlink")),
    Case("folder-symlinked", "memory manifest", gen(), symlink_out("memories/en"), ("memories/en", "symlink")),
    Case("name-mismatch", "memory manifest", gen(), edit_json(MEM_EN, set_key(["name"], "fr")), (MEM_EN, "'fr'", "'en'")),
    Case("name-invalid", "memory manifest", gen(), edit_json(MEM_EN, set_key(["name"], "../x")), (MEM_EN, "'../x'")),
    Case("format", "memory manifest", gen(), edit_json(MEM_EN, set_key(["format"], "koff.run")), (MEM_EN, "format")),
    Case("lora-rank", "memory manifest", gen(), edit_json(MEM_EN, set_key(["lora", "rank"], 2)),
         ("adapter_config.json", "r=2")),
    Case("lora-removed", "memory manifest", gen(), edit_json(MEM_EN, set_key(["lora"], None)),
         (MEM_EN, "adapter_config.json")),
    Case("kv-tokens", "memory manifest", gen(), edit_json(MEM_EN, set_key(["kv", "tokens"], 5)),
         (MEM_EN, "[layers, kv_heads, 5, head_dim]")),
    Case("kv-frozen", "memory manifest", gen(), edit_json(MEM_EN, set_key(["kv", "num_frozen_tokens"], 9)),
         (MEM_EN, "num_frozen_tokens")),
    Case("kv-shape", "memory manifest", gen(), edit_json(MEM_EN, set_key(["kv", "shape"], [2, 2, 4, 9])),
         ("kv.safetensors", "kv.shape")),
    Case("missing", "memory manifest", gen(), lambda c: (c.run / MEM_EN).unlink(), (MEM_EN, "missing")),
    Case("no-parts", "memory manifest", gen(), edit_json(MEM_EN, lambda m: m.update(lora=None, kv=None)),
         (MEM_EN, "no part")),
    Case("folder-bad-name", "memory manifest", gen(),
         lambda c: shutil.copytree(c.run / "memories/en", c.run / "memories/my memory"), ("my memory",)),
    Case("added-after-removed", "memory manifest", gen(), edit_json(MEM_DE, drop_key(["added_after"])),
         (MEM_DE, "metrics.jsonl")),
    Case("adapter-alpha", "memory manifest", gen(), lambda c: (edit_json("memories/en/adapter_config.json",
         set_key(["lora_alpha"], 99))(c), c.rehash("memories/en/adapter_config.json")), ("adapter_config.json", "lora_alpha")),
    Case("adapter-dora", "memory manifest", gen(), lambda c: (edit_json("memories/en/adapter_config.json",
         set_key(["use_dora"], True))(c), c.rehash("memories/en/adapter_config.json")), ("adapter_config.json", "use_dora")),
    Case("adapter-targets", "memory manifest", gen(), lambda c: (edit_json("memories/en/adapter_config.json",
         set_key(["target_modules"], ["q_proj"]))(c), c.rehash("memories/en/adapter_config.json")),
         ("adapter_config.json", "target_modules")),

    # -- tensors (the editor re-records their sha256) -------------------------------------------
    Case("mask-float", "tensors", gen(), edit_tensors(MASK, lambda t: t.update({k: v.float() for k, v in t.items()})),
         ("mask.safetensors", "uint8")),
    Case("mask-value", "tensors", gen(), edit_tensors(MASK, lambda t: t["layers.0.keep"].__setitem__(0, 2)),
         ("mask.safetensors", "0/1")),
    Case("mask-shape", "tensors", gen(), edit_tensors(MASK, lambda t: t.update({"layers.1.keep": t["layers.1.keep"][:40]})),
         ("mask.safetensors", "layers.1.keep", "[48]")),
    Case("mask-missing-layer", "tensors", gen(), edit_tensors(MASK, lambda t: t.pop("layers.1.keep")),
         ("mask.safetensors", "layers.1.keep")),
    Case("mask-extra", "tensors", gen(), edit_tensors(MASK, lambda t: t.update({"payload": torch.zeros(3, dtype=torch.uint8)})),
         ("mask.safetensors", "payload")),
    Case("gates-nan", "tensors", gen(), edit_tensors(GATES, lambda t: t["layers.0.log_alpha"].__setitem__(3, float("nan"))),
         ("gates.safetensors", "NaN")),
    Case("gates-inf", "tensors", gen(), edit_tensors(GATES, lambda t: t["layers.1.log_alpha"].__setitem__(0, float("inf"))),
         ("gates.safetensors", "Inf")),
    Case("gates-float64", "tensors", gen(), edit_tensors(GATES, lambda t: t.update({k: v.double() for k, v in t.items()})),
         ("gates.safetensors", "float64")),
    Case("gates-shape", "tensors", gen(), edit_tensors(GATES, lambda t: t.update({"layers.0.log_alpha": torch.zeros(5)})),
         ("gates.safetensors", "layers.0.log_alpha")),
    Case("lora-int64", "tensors", gen(), edit_tensors(LORA, lambda t: t.update({k: v.long() for k, v in t.items()})),
         ("adapter_model.safetensors", "int64")),
    Case("lora-nan", "tensors", gen(), edit_tensors(LORA, lambda t: t[lora_key(t)].__setitem__((0, 0), float("nan"))),
         ("adapter_model.safetensors", "NaN")),
    Case("lora-module-missing", "tensors", gen(), edit_tensors(LORA, lambda t: [t.pop(k) for k in
         (lora_key(t, "lora_A", "down_proj"), lora_key(t, "lora_B", "down_proj"))]), ("memories/en", "no tensors for")),
    Case("lora-half-module", "tensors", gen(), edit_tensors(LORA, lambda t: t.pop(lora_key(t, "lora_B"))),
         ("adapter_model.safetensors", "only one of its LoRA A / B")),
    Case("lora-extra-key", "tensors", gen(), edit_tensors(LORA, lambda t: t.update({"payload": torch.zeros(2)})),
         ("adapter_model.safetensors", "payload")),
    Case("lora-shape", "tensors", gen(), edit_tensors(LORA, lambda t: t.update({lora_key(t): torch.zeros(4, 31)})),
         ("memories/en", "[4, 31]", "[4, 32]")),
    Case("lora-rank", "tensors", gen(), edit_tensors(LORA, lambda t: t.update({lora_key(t): torch.zeros(3, 32)})),
         ("adapter_model.safetensors", "rank 4")),
    Case("kv-int64", "tensors", gen(), edit_tensors(KV, lambda t: t.update({k: v.long() for k, v in t.items()})),
         ("kv.safetensors", "int64")),
    Case("kv-nan", "tensors", gen(), edit_tensors(KV, lambda t: t["values"].__setitem__((0, 0, 1, 0), float("nan"))),
         ("kv.safetensors", "NaN")),
    Case("kv-values-missing", "tensors", gen(), edit_tensors(KV, lambda t: t.pop("values")), ("kv.safetensors", "'values'")),
    Case("kv-extra", "tensors", gen(), edit_tensors(KV, lambda t: t.update({"payload": torch.zeros(1)})),
         ("kv.safetensors", "payload")),
    Case("kv-head-dim", "tensors", gen(), edit_tensors(KV, lambda t: t.update({k: v[..., :5].contiguous()
                                                                              for k, v in t.items()})),
         ("kv.safetensors", "[2, 2, 4, 5]")),
    Case("truncated", "tensors", gen(), raw_bytes(KV, lambda b: b[:20]), ("kv.safetensors", "not a readable safetensors")),
    Case("random-bytes", "tensors", gen(), raw_bytes(MASK, lambda b: os.urandom(len(b))),
         ("mask.safetensors", "not a readable safetensors")),
    Case("huge-header", "tensors", gen(), raw_bytes(GATES, lambda b: (2 ** 60).to_bytes(8, "little") + b[8:]),
         ("gates.safetensors", "not a readable safetensors")),
    Case("empty-file", "tensors", gen(), raw_bytes(LORA, lambda b: b""), ("adapter_model.safetensors", "not a readable")),

    # -- the base model -------------------------------------------------------------------------
    Case("other-model", "base model", lambda c: gen("--model", str(c.world.other_model))(c), None,
         ("fingerprint sha256:", "--model", M)),
    Case("model-missing", "base model", lambda c: gen("--model", str(c.tmp / "nope"))(c), None, ("nope", "does not exist")),
    Case("model-no-config", "base model", lambda c: gen("--model", str(c.tmp / "files"))(c),
         lambda c: c.file("weights.txt", "x"), ("files", "config.json")),
    Case("recorded-source-gone", "base model", gen(), edit_json(M, set_key(["base_model", "source"], "/nonexistent/model")),
         (M, "/nonexistent/model", "--model")),
    Case("model-moved", "base model", lambda c: gen("--model", str(c.tmp / "moved"))(c),
         lambda c: (shutil.copytree(c.model, c.tmp / "moved"),
                    edit_json(M, set_key(["base_model", "source"], "/nonexistent/model"))(c)),
         accepted="the base model moved: --model names its new folder, and its fingerprint still matches"),

    # -- command-line flags ---------------------------------------------------------------------
    Case("memory-unknown", "flags", lambda c: ["generate", str(c.run), "--memory", "xx", "hi"], None, ("--memory", "'xx'")),
    Case("prompt-empty", "flags", lambda c: ["generate", str(c.run), ""], None, ("PROMPT",)),
    Case("max-new-tokens-zero", "flags", gen("--max-new-tokens", "0"), None, ("--max-new-tokens",)),
    Case("max-new-tokens-huge", "flags", gen("--max-new-tokens", "100000000"), None, ("--max-new-tokens", "4096")),
    Case("temperature-negative", "flags", gen("--temperature", "-1"), None, ("--temperature",)),
    Case("temperature-nan", "flags", gen("--temperature", "nan"), None, ("--temperature", "finite")),
    Case("max-tokens-negative", "flags", lambda c: ["evaluate", str(c.run), "--max-tokens", "-5"], None, ("--max-tokens",)),
    Case("eval-batch-zero", "flags", lambda c: ["evaluate", str(c.run), "--eval-batch-size", "0"], None,
         ("--eval-batch-size",)),
    Case("block-one", "flags", lambda c: ["evaluate", str(c.run), "--block", "1"], None, ("--block",)),
    Case("block-too-long", "flags", lambda c: ["evaluate", str(c.run), "--block", "100000"], None,
         ("--block 100000", "test.txt")),
    *[Case(f"name-{label}", "flags", add("--train", "x.txt", name=bad), None, ("--name", repr(bad)))
      for label, bad in (("dotdot", "../x"), ("slash", "a/b"), ("empty", ""), ("space", "my memory"),
                         ("non-ascii", "café"), ("reserved", "none"), ("dot", "."))],
    Case("steps-zero", "flags", lambda c: add("--train", str(c.data["de"]["train"]))(c)[:4] + ["--steps", "0"], None,
         ("--steps",)),
    Case("steps-negative", "flags", lambda c: ["add-domain", str(c.run), "--name", "xx", "--steps", "-1"], None,
         ("--steps",)),
    Case("train-missing", "flags", lambda c: add("--train", str(c.tmp / "missing.txt"))(c), None, ("missing.txt",)),
    Case("train-folder", "flags", lambda c: add("--train", str(c.tmp))(c), None, ("is a folder",)),
    Case("name-exists", "flags", lambda c: add("--train", str(c.data["de"]["train"]), name="en")(c), None,
         ("'en'", "--overwrite")),
    Case("test-without-train", "flags", lambda c: add("--test", str(c.data["de"]["test"]))(c), None, ("--test", "--train")),
    Case("train-too-short", "flags", lambda c: add("--train", str(c.tmp / "files" / "short.txt"))(c),
         lambda c: c.file("short.txt", "le chat\n"), ("short.txt", "seq_len")),
    Case("analyze-dense", "flags", lambda c: ["analyze", str(c.run / "reference")], None, ("reference", "no backbone mask")),
    Case("analyze-rate", "flags", lambda c: ["analyze", str(c.run), "--specific-rate", "2"], None, ("--specific-rate",)),
    Case("run-missing", "flags", lambda c: ["generate", str(c.tmp / "nope"), "hi"], None, ("nope", "does not exist")),
    Case("run-is-file", "flags", lambda c: ["generate", str(c.run / "config.yaml"), "hi"], None,
         ("config.yaml", "not a run directory")),
    Case("test-data-gone", "flags", lambda c: ["evaluate", str(c.run), "--block", "16", "--max-tokens", "32"],
         edit_json(M, set_key(["data", "en", "test"], ["/nonexistent/test.txt"])), ("/nonexistent/test.txt",)),
    Case("unknown-flag", "flags", lambda c: ["generate", str(c.run), "hi", "--memroy", "en"], None, ("--memroy",)),
    Case("chat-without-template", "flags", gen("--chat"), None, ("--chat", "chat template")),
    Case("device-unknown", "flags", gen("--device", "tpu"), None, ("--device", "'tpu'")),
    Case("plan-config", "flags", lambda c: ["plan", "--model", str(c.model), "--config", str(c.tmp / "files" / "p.yaml")],
         lambda c: c.file("p.yaml", "train: {batch_size: abc}\n"), ("p.yaml", "train.batch_size")),
    Case("name-a", "flags", add("--train", "TRAIN", name="a"), None, (),
         accepted="'a' is a valid memory name (the old substring test refused it, and 'l', 'o', 'lo', 'ora')"),

    # -- the test-leak guard --------------------------------------------------------------------
    Case("leak-original-test", "test leak", leak_train(lambda c: c.data["en"]["test"]),
         make_copy(lambda c: c.data["en"]["test"]), ("copy.txt", "same content as test file", "'en'")),
    Case("leak-added-memory-test", "test leak", leak_train(lambda c: c.data["de"]["test"]),
         make_copy(lambda c: c.data["de"]["test"]), ("copy.txt", "same content as test file", "'de'")),
    Case("leak-into-general", "test leak", leak_train(lambda c: c.data["fr"]["test"], "--general"),
         make_copy(lambda c: c.data["fr"]["test"]), ("general training file", "copy.txt")),
    Case("leak-own-test", "test leak", lambda c: add("--train", str(c.data["de"]["train"]), "--test",
                                                     str(c.data["de"]["train"]))(c), None, ("same content as test file",)),
    Case("leak-test-file-gone", "test leak", leak_train(lambda c: c.data["en"]["test"]),
         lambda c: (c.copy_of(c.data["en"]["test"], "copy.txt"),
                    edit_json(M, set_key(["data", "en", "test"], ["/nonexistent/test.txt"]))(c)),
         ("copy.txt", "/nonexistent/test.txt")),
    Case("leak-decompose", "test leak", decompose_config,
         cfg_case(lambda d: d["domains"]["en"].update(test=d["domains"]["en"]["train"])), ("same content as test file",)),

    # -- decompose config files -----------------------------------------------------------------
    Case("yaml-invalid", "config", decompose_config, lambda c: c.file("c.yaml", "domains: [en\n"), ("c.yaml", "YAML")),
    Case("yaml-list", "config", decompose_config, lambda c: c.file("c.yaml", "- en\n"), ("c.yaml", "mapping")),
    Case("unknown-field", "config", decompose_config, cfg_case(lambda d: d.update(stesp=3)), ("c.yaml", "stesp")),
    Case("steps-string", "config", decompose_config, cfg_case(lambda d: d["train"].update(steps="abc")),
         ("c.yaml", "train.steps")),
    Case("reference-string", "config", decompose_config, cfg_case(lambda d: d.update(reference="false")),
         ("c.yaml", "reference")),
    Case("prune-string", "config", decompose_config, cfg_case(lambda d: d.update(prune="no")), ("c.yaml", "prune")),
    Case("sparsity-string", "config", decompose_config, cfg_case(lambda d: d.update(target_sparsity="0.2")),
         ("c.yaml", "target_sparsity")),
    Case("lr-nan", "config", decompose_config, cfg_case(lambda d: d["train"].update(lr_lora=float("nan"))),
         ("c.yaml", "train.lr_lora", "finite")),
    Case("lr-negative", "config", decompose_config, cfg_case(lambda d: d["train"].update(lr_kv=-1.0)),
         ("c.yaml", "train.lr_kv")),
    Case("lora-targets", "config", decompose_config, cfg_case(lambda d: d["memory"].update(lora_targets=["nope"])),
         ("lora_targets", "nope")),
    Case("kv-tokens-too-many", "config", decompose_config, cfg_case(lambda d: d["memory"].update(kv_tokens=100000)),
         ("kv_tokens", "100000")),
    Case("domain-bad-name", "config", decompose_config,
         cfg_case(lambda d: d["domains"].update({"my memory": d["domains"].pop("fr")})), ("c.yaml", "'my memory'")),
    Case("domains-empty", "config", decompose_config, cfg_case(lambda d: d.update(domains={})), ("c.yaml", "domains")),
    Case("train-file-missing", "config", decompose_config,
         cfg_case(lambda d: d["domains"]["en"].update(train=["/nonexistent.txt"])), ("domains.en.train", "/nonexistent.txt")),
    Case("train-file-folder", "config", decompose_config,
         lambda c: c.config(lambda d: d["domains"]["en"].update(train=[str(c.tmp)])), ("domains.en.train", "is a folder")),
    Case("seq-len-too-long", "config", decompose_config, cfg_case(lambda d: d["train"].update(seq_len=100000)),
         ("train.seq_len", "train.txt")),
    Case("test-subsets", "config", decompose_config,
         cfg_case(lambda d: d["domains"]["en"].update(test_subsets={"flores": "all"})), ("test_subsets",)),
    Case("train-not-mapping", "config", decompose_config, cfg_case(lambda d: d.update(train=5)), ("c.yaml", "train")),
    Case("lora-alpha-negative", "config", decompose_config, cfg_case(lambda d: d["memory"].update(lora_alpha=-1)),
         ("memory.lora_alpha",)),
    Case("mask-unknown", "config", decompose_config, cfg_case(lambda d: d.update(mask="bogus")), ("mask", "bogus")),
    Case("dtype-list", "config", decompose_config, cfg_case(lambda d: d["train"].update(dtype=[1])), ("train.dtype",)),
    Case("controller-unknown", "config", decompose_config, cfg_case(lambda d: d["train"].update(controller="nope")),
         ("train.controller", "nope")),
    Case("general-number", "config", decompose_config, cfg_case(lambda d: d.update(general=5)), ("general",)),
    Case("config-missing", "config", lambda c: ["decompose", "--config", str(c.tmp / "none.yaml")], None,
         ("none.yaml", "does not exist")),

    # -- hostile data files ---------------------------------------------------------------------
    Case("binary", "data files", decompose_config, hostile_train(b"\xff\xfe\x00\x81" * 64), ("train.txt", "UTF-8")),
    Case("empty", "data files", decompose_config, hostile_train(""), ("train.txt", "no documents")),
    Case("whitespace", "data files", decompose_config, hostile_train(" \n\t\n  \n"), ("train.txt", "no documents")),
    Case("jsonl-not-object", "data files", decompose_config, hostile_train('{"text": "a"}\n[1, 2]\n', "t.jsonl"),
         ("t.jsonl:2", "JSON object")),
    Case("jsonl-invalid", "data files", decompose_config, hostile_train('{"text": "a"}\n{oops\n', "t.jsonl"),
         ("t.jsonl:2", "invalid JSON")),
    Case("jsonl-no-text", "data files", decompose_config, hostile_train('{"body": "a"}\n', "t.jsonl"),
         ("t.jsonl:1", "text")),
    Case("crlf", "data files", decompose_config,
         lambda c: hostile_train("\r\n".join(open(c.data["en"]["train"]).read().splitlines()))(c),
         accepted="Windows line endings: each line is still one document"),
    Case("nul-bytes", "data files", decompose_config,
         lambda c: hostile_train(open(c.data["en"]["train"]).read().replace(" ", " \x00 ", 50))(c),
         accepted="a NUL character is valid UTF-8 text; the tokenizer treats it as a character"),

    # -- outputs: overwrite, inputs, locks, leftovers -------------------------------------------
    Case("export-onto-run", "outputs", lambda c: ["export", str(c.run), str(c.run), "--overwrite"], None,
         ("run", "is the input")),
    Case("export-onto-folder", "outputs", lambda c: ["export", str(c.run), str(c.tmp / "files"), "--overwrite"],
         lambda c: c.file("mine.txt", "precious"), ("files", "not a folder koff wrote")),
    Case("export-unwritable", "outputs", lambda c: ["export", str(c.run), str(c.tmp / "files" / "f.txt" / "out")],
         lambda c: c.file("f.txt", "x"), ("f.txt", "cannot create")),
    Case("export-exists", "outputs", lambda c: ["export", str(c.run), str(c.tmp / "files")],
         lambda c: c.file("mine.txt", "x"), ("files", "already exists")),
    Case("decompose-onto-folder", "outputs", lambda c: decompose_config(c) + ["-o", str(c.tmp / "mine"), "--overwrite"],
         lambda c: (c.config(), (c.tmp / "mine").mkdir(), (c.tmp / "mine" / "a.txt").write_text("x")),
         ("mine", "not a folder koff wrote")),
    Case("decompose-onto-memory", "outputs",
         lambda c: decompose_config(c) + ["-o", str(c.run / "memories" / "en"), "--overwrite"], cfg_case(None),
         ("memories/en", "a koff memory, not a koff run")),
    Case("decompose-into-model", "outputs", lambda c: decompose_config(c) + ["-o", str(c.model / "sub")],
         cfg_case(None), ("lies inside the input",)),
    Case("decompose-exists", "outputs", lambda c: decompose_config(c) + ["-o", str(c.run)], cfg_case(None),
         ("already exists", "--overwrite")),
    Case("decompose-onto-data", "outputs",
         lambda c: decompose_config(c) + ["-o", str(c.data["en"]["train"]), "--overwrite"], cfg_case(None),
         ("is the input",)),
    Case("decompose-onto-run-holding-data", "outputs", lambda c: decompose_config(c) + ["-o", str(c.run), "--overwrite"],
         lambda c: (c.copy_of(c.data["en"]["train"], "t.txt"), shutil.move(c.tmp / "files" / "t.txt", c.run / "t.txt"),
                    c.config(lambda d: d["domains"]["en"].update(train=[str(c.run / "t.txt")]))),
         ("contains the input", "t.txt")),
    Case("partial-without-marker", "outputs",
         lambda c: decompose_config(c) + ["-o", str(c.tmp / "r"), "--checkpoint-every", "1", "--resume"],
         lambda c: (c.config(), (c.tmp / "r.partial").mkdir()), ("r.partial", ".koff-partial.yaml", "delete it")),
    Case("locked-run", "outputs", lambda c: add("--train", str(c.data["de"]["train"]))(c), hold_lock,
         ("run", "being written by", ".run.lock")),
    Case("eval-folder-foreign", "outputs", lambda c: ["evaluate", str(c.run), "--block", "16", "--max-tokens", "32"],
         lambda c: ((c.run / "eval").mkdir(), (c.run / "eval" / "mine.txt").write_text("x")),
         accepted="eval/ collects tables (one per --tag): a file there that koff did not write is kept as it is"),
    Case("eval-is-a-file", "outputs", lambda c: ["evaluate", str(c.run), "--block", "16", "--max-tokens", "32"],
         lambda c: (c.run / "eval").write_text("x"), ("eval", "a file, not a folder")),
    Case("evaluate-locked-run", "outputs", lambda c: ["evaluate", str(c.run), "--block", "16", "--max-tokens", "32"],
         hold_lock, ("being written by",)),
    Case("demo-onto-folder", "outputs", lambda c: ["demo", "-o", str(c.tmp / "mine")], None, ("mine", "not a folder koff wrote")),

    # -- grid configs and report cells ----------------------------------------------------------
    Case("seeds-string", "grid/report", COMPARE, grid(lambda s: s.update(seeds="abc")), ("grid.yaml", "seeds")),
    Case("seeds-mixed", "grid/report", COMPARE, grid(lambda s: s.update(seeds=[0, "x"])), ("grid.yaml", "seeds")),
    Case("methods-list", "grid/report", COMPARE, grid(lambda s: s.update(methods=["koff"])), ("grid.yaml", "methods")),
    Case("method-override-list", "grid/report", COMPARE, grid(lambda s: s["methods"].update(koff=[1])),
         ("grid.yaml", "methods.koff")),
    Case("sweep-no-settings", "grid/report", COMPARE, grid(lambda s: s.update(sweeps={"s": {"methods": ["koff"]}})),
         ("grid.yaml", "sweeps.s")),
    Case("sweep-unknown-method", "grid/report", COMPARE,
         grid(lambda s: s.update(sweeps={"s": {"methods": ["nope"], "settings": [{}]}})), ("grid.yaml", "nope")),
    Case("eval-block-zero", "grid/report", COMPARE, grid(lambda s: s["eval"].update(block=0)), ("grid.yaml", "eval.block")),
    Case("eval-tasks-negative", "grid/report", COMPARE, grid(lambda s: s["eval"].update(tasks={"arc_challenge": -1})),
         ("grid.yaml", "eval.tasks")),
    Case("base-train-number", "grid/report", COMPARE, grid(lambda s: s["base"].update(train=5)),
         ("grid.yaml", "train")),
    Case("cell-invalid-json", "grid/report", REPORT, cells(cell(), raw="{oops"), ("bad.json", "not valid JSON")),
    Case("cell-missing-ppl", "grid/report", REPORT, cells({k: v for k, v in cell().items() if k != "ppl"}),
         ("c0.json", "ppl")),
    Case("cell-ppl-type", "grid/report", REPORT, cells(cell(ppl={"en": 5})), ("c0.json", "ppl.en")),
    Case("cell-seed-string", "grid/report", REPORT, cells(cell(seed="0")), ("c0.json", "seed")),
    Case("cell-list", "grid/report", REPORT, cells(raw="[]"), ("bad.json", "JSON object")),
    Case("cells-missing", "grid/report", REPORT, None, ("results", "cells")),
    Case("cells-empty", "grid/report", REPORT, lambda c: (c.tmp / "results" / "cells").mkdir(parents=True),
         ("cells", "no cell results")),
    Case("cell-minimal", "grid/report", REPORT, cells(cell()),
         accepted="a cell with only the fields the report reads makes a report (optional fields may be absent)"),
]


def _run_case(case: Case, world: World, tmp_path: Path, capsys, monkeypatch) -> tuple[int, str]:
    run = tmp_path / "run"
    shutil.copytree(world.run, run, symlinks=True)
    ctx = Ctx(tmp_path, run, world)
    if case.id == "demo-onto-folder":  # the demo's bundled data, faked: it must refuse before using it
        fake = tmp_path / "fake-data"
        for lang in ("en", "fr", "es"):
            (fake / "text" / lang).mkdir(parents=True)
            for split in ("train", "valid", "test"):
                (fake / "text" / lang / f"{split}.txt").write_text(f"{lang} {split} text\n")
        (fake / "general").mkdir()
        for f in ("gsm8k_train.jsonl", "arc_easy.jsonl", "english_news.txt"):
            (fake / "general" / f).write_text(f'{{"text": "{f}"}}\n')
        monkeypatch.setenv("KOFF_DATA", str(fake))
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("precious")
    with ctx.stack:
        if case.mutate is not None:
            case.mutate(ctx)
        argv = case.argv(ctx)
        before = tree_hashes(tmp_path)
        capsys.readouterr()
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
        err = capsys.readouterr().err
        after = tree_hashes(tmp_path)
    if case.accepted:
        changed = {k for k in before if before[k] != after.get(k)}
        assert rc == 0, f"accepted case failed: {err}"
        assert not changed, f"changed: {sorted(changed)}"
    else:
        assert after == before, f"files changed: {sorted(set(after) ^ set(before)) or 'contents'}"
    return rc, err


@pytest.mark.parametrize("case", CASES, ids=[f"{c.category.replace(' ', '-')}:{c.id}" for c in CASES])
def test_campaign(case, world, tmp_path, capsys, monkeypatch):
    rc, err = _run_case(case, world, tmp_path, capsys, monkeypatch)
    if case.accepted:
        return
    lines = err.strip().splitlines()
    assert rc == 2, f"exit status {rc}: {err}"
    assert len(lines) == 1 and lines[0].startswith("koff: error: "), f"expected one error line, got: {err!r}"
    for text in case.expect:
        assert text in lines[0], f"{text!r} not named in: {lines[0]}"


def test_campaign_table():
    """The table's size and spread (the counts in the README come from here)."""
    ids = [(c.category, c.id) for c in CASES]
    assert len(set(ids)) == len(ids)
    by_category = Counter(c.category for c in CASES)
    errors = [c for c in CASES if not c.accepted]
    assert len(CASES) >= 80 and len(errors) >= 80
    assert all(c.expect for c in errors), [c.id for c in errors if not c.expect]
    assert set(by_category) == {"run manifest", "memory manifest", "tensors", "base model", "flags", "test leak",
                                "config", "data files", "outputs", "grid/report"}


def test_shared_inputs_unchanged(world):
    """No case wrote into the shared model, data or the run every case was copied from."""
    assert tree_hashes(world.model) == world.shared["model"]
    assert tree_hashes(world.root / "data") == world.shared["data"]
    assert tree_hashes(world.run) == world.shared["run"]


@pytest.mark.parametrize("argv, mutate, expect", [
    (lambda c: gen()(c), edit_json(M, set_key(["files"], {})), "does not list"),
    (lambda c: ["add-domain", str(c.run), "--name", "my memory"], None, "invalid memory name"),
])
def test_no_traceback_reaches_the_terminal(argv, mutate, expect, world, tmp_path):
    """A real `python -m koff` process: exit 2 and one line, however koff is called."""
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    ctx = Ctx(tmp_path, run, world)
    if mutate is not None:
        mutate(ctx)
    before = tree_hashes(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-m", "koff", *argv(ctx)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert expect in done.stderr
    assert tree_hashes(tmp_path) == before
