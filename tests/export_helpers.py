"""Shared by the export tests: tiny decomposed runs, a byte-level tokenizer, koff's reference logits."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import WORDS, corpus, tiny_config_dict, tiny_model

from koff.config.recipe import config_from_dict
from koff.storage.run_dir import attach_memory, build_model, load_run
from koff.training.pipeline import decompose


def byte_level_tokenizer(vocab: int = 320):
    """A GPT-2 style byte-level BPE (the family llama.cpp's `gpt2` tokenizer reads), trained
    in-process on the tiny corpus, with <pad>, <s>, </s> as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([d for lang in WORDS for d in corpus(lang, 50, 0)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def write_byte_level_model(folder: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny model folder whose tokenizer llama.cpp can represent."""
    tok = byte_level_tokenizer()
    model = tiny_model(arch, seed, vocab=len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_run(root: Path, model_folder: Path, data_files: dict, steps: int = 4, top: dict | None = None,
             **train) -> Path:
    """A tiny decomposed run (en + fr, LoRA r=4 + KV m=4 memories); `top` overrides top-level config
    fields (e.g. {"mask": "flap"}), `train` the train section."""
    d = tiny_config_dict(model_folder, data_files, root / "run", steps=steps, **train)
    d["reference"] = False
    d.update(top or {})
    decompose(config_from_dict(d), progress=False)
    return root / "run"


def import_llama_cpp():
    """llama_cpp, or skip the test when llama-cpp-python is not installed; CI sets
    KOFF_REQUIRE_LLAMA_CPP=1 so that there a missing package fails instead of skipping."""
    import importlib
    import os

    import pytest

    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        if os.environ.get("KOFF_REQUIRE_LLAMA_CPP") == "1":
            raise
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[llama]', which builds llama.cpp)")


def koff_lora_only(run_dir: Path, memory: str):
    """koff's masked backbone with only the LoRA half of `memory` (what an engine without a KV
    prefix serves)."""
    run = load_run(run_dir)
    km, tok = build_model(run, memories=[])
    attach_memory(km, run.memories[memory].without("kv"))
    return km, tok


def koff_logits(km, x: torch.Tensor, memory=None) -> torch.Tensor:
    with torch.no_grad():
        return km(x, memory=memory)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())
