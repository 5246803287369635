"""Tiny randomly initialised models of several architectures, built in-process, plus a tiny
tokenizer and text corpus, so that every code path runs in seconds without any download."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

ARCHS = ("llama", "qwen2", "mistral", "qwen3", "gemma", "gemma3")
"""Tiny models of these families are built for the tests (see `tiny_config`)."""

WORDS = {
    "en": ["the", "cat", "sat", "on", "a", "mat", "and", "the", "dog", "ran", "to", "the", "park", "with", "a", "red", "ball",
           "every", "day"],
    "fr": ["le", "chat", "est", "sur", "le", "tapis", "et", "le", "chien", "court", "au", "parc", "avec", "une", "balle", "rouge"],
    "es": ["el", "gato", "se", "sienta", "en", "la", "alfombra", "y", "el", "perro", "corre", "al", "parque", "con", "una", "pelota"],
    "de": ["die", "katze", "sitzt", "auf", "der", "matte", "und", "der", "hund", "rennt", "in", "den", "park", "mit", "einem", "ball"],
}


def tiny_config(arch: str, vocab: int = 160):
    """A 2-layer model config of the given family (hidden 32, FFN width 48, GQA 4/2 heads)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8)
    if arch == "gemma":
        return tf.GemmaConfig(**common, head_dim=8)
    if arch == "gemma3":  # sliding-window and global layers alternate
        return tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=16, layer_types=["sliding_attention",
                                                                                         "full_attention"])
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, vocab: int = 160):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab))
    # random init gives near-zero logits; widen weights so masks and memories visibly matter
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.eval().requires_grad_(False)
    return model


def corpus(lang: str, n_docs: int, seed: int) -> list[str]:
    rng = random.Random(f"{lang}-{seed}")
    words = WORDS[lang]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(12, 30))) for _ in range(n_docs)]


def tiny_tokenizer(vocab: int = 160):
    """A BPE tokenizer trained in-process on the tiny corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    texts = [d for lang in WORDS for d in corpus(lang, 50, 0)]
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def write_model_folder(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    tok = tiny_tokenizer()
    model = tiny_model(arch, seed, vocab=len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_domain_files(root: Path, langs=("en", "fr", "es")) -> dict[str, dict[str, Path]]:
    """train/test text per language under root/<lang>/."""
    out = {}
    for lang in langs:
        d = root / lang
        d.mkdir(parents=True, exist_ok=True)
        (d / "train.txt").write_text("\n".join(corpus(lang, 120, 1)) + "\n")
        (d / "test.txt").write_text("\n".join(corpus(lang, 30, 2)) + "\n")
        out[lang] = {"train": d / "train.txt", "test": d / "test.txt"}
    gen = root / "general.jsonl"
    import json

    gen.write_text("\n".join(json.dumps({"question": q, "answer": a})
                             for q, a in zip(corpus("en", 60, 3), corpus("en", 60, 4))) + "\n")
    out["general"] = {"train": gen}
    return out


@pytest.fixture(params=["llama", "qwen2"])
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory) -> Path:
    return write_model_folder(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def qwen_folder(tmp_path_factory) -> Path:
    return write_model_folder(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=1)


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> dict[str, dict[str, Path]]:
    return write_domain_files(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_deprecated_cache_name():
    """transformers logs (once) when a forward or output is used with the old `past_key_values`
    name; koff must use `cache` (koff.compat), so any such message fails the test."""
    import logging

    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            if "past_key_values" in record.getMessage():
                seen.append(record.getMessage())

    handler = Catch()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not seen, f"transformers warned: {seen[0]}"


def tiny_config_dict(model_folder: Path, data: dict, out: Path, langs=("en", "fr"), **train) -> dict:
    """A decompose config (as YAML would give it) for a tiny model: a few quick steps."""
    return {
        "model": str(model_folder),
        "domains": {lang: {"train": [str(data[lang]["train"])], "test": [str(data[lang]["test"])]} for lang in langs},
        "general": [str(data["general"]["train"])],
        "target_sparsity": 0.25,
        "output": str(out),
        "memory": {"lora_rank": 4, "kv_tokens": 4},
        "train": {"steps": 8, "batch_size": 2, "seq_len": 16, "reg_every": 4, "calibration_tokens": 64,
                  "warmup_frac": 0.25, "consolidate_frac": 0.25, **train},
    }


@pytest.fixture
def grid(llama_folder, data_files, tmp_path, monkeypatch):
    """A tiny grid config (dense, a one-shot mask, two trained methods, a sweep) and its folder."""
    root = tmp_path / "data"
    (root / "general").mkdir(parents=True)
    (root / "general" / "arc_challenge.jsonl").write_text("\n".join(json.dumps(
        {"query": "Question: the cat sat on", "choices": ["the mat", "le chat"], "gold": i % 2}) for i in range(4)) + "\n")
    monkeypatch.setenv("KOFF_DATA", str(root))
    base = tiny_config_dict(llama_folder, data_files, tmp_path / "unused", steps=3)
    base.pop("output")
    spec = {
        "name": "tiny", "results": str(tmp_path / "results"), "work": str(tmp_path / "work"), "base": base,
        "seeds": [0, 1],
        "eval": {"block": 16, "max_tokens": 64, "tasks": {"arc_challenge": 4}, "swap_for": ["koff"]},
        "methods": {
            "dense": {"kind": "dense"},
            "wanda-sp": {"mask": "wanda-sp", "memory": {"lora_rank": 0, "kv_tokens": 0}, "deterministic": True},
            "wanda-sp+lora": {"mask": "wanda-sp", "memory": {"kv_tokens": 0}},
            "koff": {},
        },
        "sweeps": {"sparsity": {"methods": ["koff", "wanda-sp"], "settings": [{"target_sparsity": 0.5}]}},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path, tmp_path


RUN_FILES = ("backbone/gates.safetensors", "backbone/mask.safetensors", "memories/en/adapter_model.safetensors",
             "memories/en/kv.safetensors", "memories/fr/kv.safetensors")


def uninterrupted_cell(grid_path: Path, cell: str) -> dict:
    """Run one cell of the `grid` fixture's grid alone, into results and work folders of its own,
    and return its record: what an interrupted run of the same cell must reproduce."""
    from koff.cli import main

    root = grid_path.parent
    alone = root / "alone.yaml"
    alone.write_text(yaml.safe_dump({**yaml.safe_load(grid_path.read_text()), "results": str(root / "alone"),
                                     "work": str(root / "alone-work")}))
    assert main(["compare", str(alone), "--cell", cell]) == 0
    return json.loads((root / "alone" / "cells" / f"{cell}.json").read_text())


def _metrics(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in path.read_text().splitlines()]


def assert_same_run(a: Path, b: Path, reference: bool = False) -> None:
    """Two runs are the same run: byte-identical tensors, the same metrics but for wall time."""
    files = RUN_FILES + (tuple(f"reference/{f}" for f in RUN_FILES if not f.startswith("backbone")) if reference else ())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert _metrics(a / "metrics.jsonl") == _metrics(b / "metrics.jsonl")
