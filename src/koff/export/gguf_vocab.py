"""A transformers tokenizer as GGUF tokenizer metadata (llama.cpp's `gpt2` byte-level BPE).

llama.cpp re-implements tokenization: a byte-level BPE vocabulary and merges, plus a named
pre-tokenizer (`tokenizer.ggml.pre`) that selects its splitting regexes. koff maps the HF
tokenizer's pre-tokenizer, by structure and exact regex, onto the llama.cpp name that splits the
same way, and refuses tokenizers it cannot map (a wrong pre-tokenizer silently changes tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from koff.core.errors import ArtifactError

# The Split regexes of the Llama-3 and Qwen2 tokenizer.json files; llama.cpp's `llama-bpe` and
# `qwen2` pre-tokenizers implement exactly these splits.
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
               "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
_IGNORES_MERGES = {"llama-bpe"}  # llama.cpp applies whole-word vocab hits before merges for these only

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


@dataclass
class GgufVocab:
    """Everything llama.cpp needs to tokenize and detokenize like the HF tokenizer."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _byte_level(step: dict, regex: bool) -> bool:
    return (step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == regex
            and not step.get("add_prefix_space", False))


def llama_cpp_pre(pre_tokenizer: dict | None) -> str | None:
    """The llama.cpp pre-tokenizer name that splits like this tokenizer.json `pre_tokenizer`."""
    if not pre_tokenizer:
        return None
    steps = pre_tokenizer["pretokenizers"] if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    if len(steps) == 1 and _byte_level(steps[0], regex=True):
        return "gpt-2"
    if len(steps) == 2 and _byte_level(steps[1], regex=True) and steps[0].get("type") == "Digits" \
            and steps[0].get("individual_digits"):
        return "smollm"
    if len(steps) == 2 and _byte_level(steps[1], regex=False) and steps[0].get("type") == "Split" \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
        return _SPLITS.get(str((steps[0].get("pattern") or {}).get("Regex")))
    return None


def _adds(tokenizer, token_id: int | None, where: int) -> bool:
    """Whether the tokenizer puts `token_id` at position `where` (0 or -1) of an encoded text."""
    if token_id is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[where] == token_id


def gguf_vocab(tokenizer, vocab_size: int, where: str = "tokenizer") -> GgufVocab:
    """Read a transformers fast tokenizer into GGUF tokenizer metadata, or raise ArtifactError
    naming what llama.cpp cannot represent. `vocab_size` is the model's embedding rows (the
    token list is padded with unused tokens up to it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ArtifactError(f"{where}: not a fast (tokenizers) tokenizer; llama.cpp export needs tokenizer.json")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ArtifactError(f"{where}: tokenizer model {model.get('type')!r} (byte_fallback="
                            f"{model.get('byte_fallback')}) is not a byte-level BPE; --format gguf exports "
                            "byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen2 families)")
    pre = llama_cpp_pre(spec.get("pre_tokenizer"))
    if pre is None:
        raise ArtifactError(f"{where}: pre_tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} has no llama.cpp "
                            "equivalent koff knows (GPT-2 ByteLevel, SmolLM digits + ByteLevel, Llama-3 or Qwen2 "
                            "split + ByteLevel)")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ArtifactError(f"{where}: tokenizer decoder {(spec.get('decoder') or {}).get('type')!r} is not ByteLevel")
    if bool(model.get("ignore_merges")) != (pre in _IGNORES_MERGES):
        raise ArtifactError(f"{where}: ignore_merges={model.get('ignore_merges')} differs from llama.cpp's "
                            f"{pre!r} pre-tokenizer")
    norm = spec.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise ArtifactError(f"{where}: normalizer {norm.get('type')!r} has no llama.cpp equivalent")

    by_id: dict[int, tuple[str, int]] = {i: (t, TOKEN_NORMAL) for t, i in model["vocab"].items()}
    if max(by_id) >= vocab_size:
        raise ArtifactError(f"{where}: vocabulary token id {max(by_id)} does not fit the model's {vocab_size} "
                            "embedding rows")
    for added in spec.get("added_tokens", []):
        # an added token past the embedding rows cannot be fed to the model at all (transformers
        # itself would fail on it), so it has no place in llama.cpp's token list either
        if added["id"] < vocab_size:
            by_id[added["id"]] = (added["content"], TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED)
    ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")}
    for name in ("bos", "eos"):
        if ids[name] is not None and ids[name] >= vocab_size:
            raise ArtifactError(f"{where}: {name}_token_id {ids[name]} does not fit the model's {vocab_size} "
                                "embedding rows")
    ids = {k: (v if v is not None and v < vocab_size else None) for k, v in ids.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", TOKEN_UNUSED))
        tokens.append(text)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    template = getattr(tokenizer, "chat_template", None)
    return GgufVocab(pre=pre, tokens=tokens, types=types, merges=merges, bos=ids["bos"], eos=ids["eos"],
                     unk=ids["unk"], pad=ids["pad"], add_bos=_adds(tokenizer, ids["bos"], 0),
                     add_eos=_adds(tokenizer, ids["eos"], -1),
                     chat_template=template if isinstance(template, str) else None)


def add_vocab(writer, vocab: GgufVocab) -> None:
    """Write the tokenizer keys of `vocab` with a gguf.GGUFWriter."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for value, add in ((vocab.bos, writer.add_bos_token_id), (vocab.eos, writer.add_eos_token_id),
                       (vocab.unk, writer.add_unk_token_id), (vocab.pad, writer.add_pad_token_id)):
        if value is not None:
            add(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
