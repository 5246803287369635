"""`koff export --format gguf`: the backbone as a llama.cpp GGUF, each memory's LoRA as an adapter.

    OUT/
      model.gguf                 the pruned backbone, arch `deci` (per-layer FFN widths in
                                 deci.feed_forward_length), the tokenizer included
      memories/NAME/lora.gguf    the memory's LoRA half as a llama.cpp LoRA adapter
      kept_neurons.safetensors   "layers.{i}": indices of the kept neurons
      koff_backbone.json         manifest (widths as stored, outtype, what each memory carries)

llama.cpp's plain `llama` arch sizes every FFN by layer 0; `deci` reads one width per layer
(`hparams.n_ff(i)`, docs/design.md §2) and otherwise computes a Llama block (optional q/k/v/o and FFN
biases, so Qwen2's q/k/v biases and FLAP's down_proj bias fit). Stored widths are padded with
exact-zero neurons where llama.cpp needs or prefers it: at least 1 (llama.cpp refuses a file with
the zero-size FFN tensors of a width-0 layer, measured, and deci's graph would drop such a layer's
attention output as well: it `continue`s before the residual add when n_ff is 0), a multiple of 32
for q8_0 (down_proj's rows are quantized in blocks of 32) and of 16 for f16/f32 (ggml's fast
batched matmul needs it; see `stored_widths`).
Written with the `gguf` package; no llama.cpp binary is involved.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from koff.core.atomic import atomic_output
from koff.core.compat.transformers import llama3_inverse_frequencies
from koff.core.errors import ArtifactError
from koff.export.gguf_vocab import add_vocab, gguf_vocab
from koff.export.llama_block import MODEL_TYPES, check_llama_block
from koff.export.manifest import write_manifest
from koff.export.memories import split_for_engine, write_lora_halves
from koff.export.prune import PrunedBackbone, pad_ffn_state, padded_widths, state_for_saving

ARCH = "deci"
OUTTYPES = ("f32", "f16", "q8_0")
SUPPORTED_MODEL_TYPES = MODEL_TYPES
Q8_BLOCK = 32
F_ALIGN = 16

# transformers module path inside a decoder layer -> gguf tensor (MODEL_TENSOR member name)
_LAYER_TENSORS = {
    "input_layernorm": "ATTN_NORM",
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
    "post_attention_layernorm": "FFN_NORM",
    "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
}
_GLOBAL_TENSORS = {"model.embed_tokens.weight": ("TOKEN_EMBD", "weight"),
                   "model.norm.weight": ("OUTPUT_NORM", "weight"),
                   "lm_head.weight": ("OUTPUT", "weight")}
_LAYER_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(.+)\.(weight|bias)$")


def _tensor_name(member: str, bid: int | None = None) -> str:
    import gguf

    name = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, member)]
    return name.format(bid=bid) if bid is not None else name


def check_architecture(config, where: str = "config.json") -> None:
    """Raise ArtifactError unless llama.cpp's `deci` computes exactly what this model computes."""
    check_llama_block(config, where, "llama.cpp", "gguf")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise ArtifactError(f"{where}: rope_type {rope.get('rope_type')!r}; --format gguf exports default and "
                            "llama3 RoPE")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ArtifactError(f"{where}: partial_rotary_factor {rope['partial_rotary_factor']}; `deci` rotates the "
                            "whole head")


def interleave_rotary(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows (weights, biases, LoRA B) from transformers' half-split RoPE layout, which
    pairs dimension i with i + d/2, to llama.cpp's normal layout, which pairs 2i with 2i + 1."""
    d = t.shape[0] // n_heads
    return t.reshape(n_heads, 2, d // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _rope_freq_factors(config) -> torch.Tensor | None:
    """llama.cpp's rope_freqs for Llama-3 RoPE scaling: the default inverse frequencies divided
    by transformers' scaled ones (llama.cpp divides each frequency by its factor)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "llama3":
        return None
    scaled = llama3_inverse_frequencies(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    default = 1.0 / (float(rope["rope_theta"]) ** base)
    return (default / scaled.float()).float()


def _store(writer, name: str, t: torch.Tensor, outtype: str) -> str:
    """Add one tensor in the outtype's dtype (1-D tensors stay f32, as llama.cpp keeps them);
    returns the dtype written."""
    import gguf

    a = t.detach().to(torch.float32).contiguous().numpy()
    if a.ndim == 1 or outtype == "f32":
        writer.add_tensor(name, a)
        return "f32"
    if outtype == "q8_0" and a.shape[-1] % Q8_BLOCK == 0:
        writer.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        return "q8_0"
    writer.add_tensor(name, a.astype(np.float16))
    return "f16"


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def stored_widths(widths: list[int], outtype: str) -> list[int]:
    """FFN widths as written: a multiple of 32 for q8_0 (its quantization blocks), of 16 for f16
    and f32: ggml's fast batched matmul (llamafile tinyBLAS) needs the inner dimension, down_proj's
    width, to be a multiple of the SIMD width (8 floats on AVX2, 16 on AVX-512) and otherwise falls
    back to a path that made the pruned f16 backbone 25% slower than the dense one at prompt
    processing (benchmarks/engines.py)."""
    align = Q8_BLOCK if outtype == "q8_0" else F_ALIGN
    return padded_widths(widths, align, minimum=align)


# long: a linear list of GGUF keys and tensors in the order llama.cpp's loader reads them
def write_gguf_model(model: torch.nn.Module, tokenizer, path: Path, outtype: str = "f16",
                     widths: list[int] | None = None, name: str = "koff backbone",
                     where: str = "tokenizer") -> dict[str, int]:
    """Write a (pruned or dense) gated-MLP causal LM as a llama.cpp `deci` GGUF at `path`.

    `widths` are the FFN widths to store (>= each layer's own; extra neurons are zeros); `where`
    names the tokenizer in error messages. Returns how many tensors were written in each dtype.
    """
    import gguf

    if outtype not in OUTTYPES:
        raise ArtifactError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    lm: Any = model  # a transformers model: its config and layers, not nn.Module's __getattr__ types
    config = lm.config
    check_architecture(config)
    state = state_for_saving(model)
    own = [layer.mlp.gate_proj.out_features for layer in lm.model.layers]
    widths = widths if widths is not None else stored_widths(own, outtype)
    state = pad_ffn_state(state, widths)
    vocab_rows = state["model.embed_tokens.weight"].shape[0]
    vocab = gguf_vocab(tokenizer, vocab_rows, where)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(list(widths))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_rows)
    add_vocab(writer, vocab)

    written: dict[str, int] = {}
    factors = _rope_freq_factors(config)
    if factors is not None:
        written["f32"] = written.get("f32", 0) + 1
        writer.add_tensor(_tensor_name("ROPE_FREQS") + ".weight", factors.numpy())
    for key, t in state.items():
        if key in _GLOBAL_TENSORS:
            member, suffix = _GLOBAL_TENSORS[key]
            gname = f"{_tensor_name(member)}.{suffix}"
        else:
            m = _LAYER_KEY.fullmatch(key)
            if m is None or m.group(2) not in _LAYER_TENSORS:
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                raise ArtifactError(f"tensor {key!r} has no llama.cpp `deci` counterpart (model_type "
                                    f"{config.model_type!r}); use --format hf")
            bid, module, suffix = int(m.group(1)), m.group(2), m.group(3)
            if module == "self_attn.q_proj":
                t = interleave_rotary(t, heads)
            elif module == "self_attn.k_proj":
                t = interleave_rotary(t, kv_heads)
            gname = f"{_tensor_name(_LAYER_TENSORS[module], bid)}.{suffix}"
        kind = _store(writer, gname, t, outtype)
        written[kind] = written.get(kind, 0) + 1
    _finish(writer)
    return written


_LORA_KEY = re.compile(r".*layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.lora_([AB])\.weight$")


def write_gguf_lora(state: dict[str, torch.Tensor], lora_config: dict, config, path: Path, outtype: str = "f16",
                    where: str = "adapter") -> None:
    """Write a peft LoRA state dict (already sliced/padded to the stored backbone) as a llama.cpp
    LoRA adapter GGUF. peft's A [r, in] and B [out, r] are exactly llama.cpp's lora_a / lora_b
    (ggml lists dimensions in reverse); llama.cpp scales by alpha / r like peft, so rsLoRA's
    alpha / sqrt(r) is written as alpha' = alpha * sqrt(r)."""
    import gguf

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    alpha = float(lora_config["lora_alpha"])
    if lora_config.get("use_rslora"):
        alpha *= float(lora_config["r"]) ** 0.5
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    # LoRA B has r columns (r is rarely a multiple of 32), so adapters stay f16 even for q8_0
    dtype = "f32" if outtype == "f32" else "f16"
    for key, t in state.items():
        m = _LORA_KEY.fullmatch(key)
        if m is None:
            raise ArtifactError(f"{where}: LoRA tensor {key!r} has no llama.cpp `deci` counterpart")
        bid, module, half = int(m.group(1)), m.group(2), m.group(3)
        if half == "B" and module == "self_attn.q_proj":
            t = interleave_rotary(t, heads)
        elif half == "B" and module == "self_attn.k_proj":
            t = interleave_rotary(t, kv_heads)
        name = f"{_tensor_name(_LAYER_TENSORS[module], bid)}.weight.lora_{half.lower()}"
        _store(writer, name, t.reshape(t.shape[0], -1), dtype)
    _finish(writer)


def write_gguf_export(pb: PrunedBackbone, out: Path, outtype: str = "f16", overwrite: bool = False) -> Path:
    """Write the gguf export of a pruned backbone: model.gguf + one LoRA adapter GGUF per memory."""
    where = f"{pb.source}/config.json"
    check_architecture(pb.model.config, where)
    names, left_out = split_for_engine(pb.run.memories, "gguf", pb.run.path)
    widths = stored_widths(pb.widths, outtype)
    with atomic_output(out, kind="backbone", inputs=pb.inputs, overwrite=overwrite) as tmp:
        counts = write_gguf_model(pb.model, pb.tokenizer, tmp / "model.gguf", outtype, widths,
                                  where=f"{pb.source}/tokenizer.json")
        save_file({f"layers.{i}": k for i, k in enumerate(pb.kept)}, str(tmp / "kept_neurons.safetensors"),
                  metadata={"format": "pt"})
        def write(d, rec, state):
            write_gguf_lora(state, rec.parts["lora"].config, pb.model.config, d / "lora.gguf", outtype,
                            where=str(pb.run.path / "memories" / d.name))
            return ["lora.gguf"]

        memories = write_lora_halves(pb, tmp, names, widths, write, "gguf")
        write_manifest(tmp, out, pb, "gguf", ["model.gguf", "kept_neurons.safetensors"], memories, left_out,
                       stored_widths=widths, outtype=outtype, gguf_arch=ARCH, tensor_types=counts)
    return Path(out)
