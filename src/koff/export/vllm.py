"""`koff export --format vllm`: the backbone as a nemotron-nas / DeciLM folder, memories as peft LoRA.

    OUT/
      model.safetensors, tokenizer files   Llama tensor names; FFN widths as in block_configs
      config.json                          model_type nemotron-nas, architectures DeciLMForCausalLM,
                                           block_configs[i].ffn.intermediate_size per layer
      configuration_decilm.py              the config class vLLM loads with --trust-remote-code
      modeling_decilm.py                   the same model for transformers (trust_remote_code)
      memories/NAME/adapter_config.json +  the memory's LoRA half (vLLM has no KV prefix)
                    adapter_model.safetensors
      koff_backbone.json, kept_neurons.safetensors

    vllm serve OUT --trust-remote-code --enable-lora --max-lora-rank R --lora-modules fr=OUT/memories/fr ...

vLLM's DeciLM takes a layer's FFN width from `ffn.intermediate_size` exactly when the block has no
`ffn_mult` (which it would round up to a multiple of 256), so no padding is needed except for a
layer with every neuron pruned, which gets one exact-zero neuron. Its MLP bias flag covers gate, up
and down together, so a FLAP down_proj bias comes with zero gate/up biases.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from koff.core.atomic import atomic_output
from koff.core.errors import ArtifactError
from koff.export.hf import remote_source, write_lora_adapter
from koff.export.llama_block import MODEL_TYPES, check_llama_block
from koff.export.manifest import write_manifest
from koff.export.memories import split_for_engine, write_lora_halves
from koff.export.prune import PrunedBackbone, pad_ffn_state, padded_widths, state_for_saving

SUPPORTED_MODEL_TYPES = MODEL_TYPES
REMOTE_FILES = ("configuration_decilm.py", "modeling_decilm.py")
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
_LLAMA_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
                 "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
                 "attention_bias", "attention_dropout", "mlp_bias", "head_dim")


def check_architecture(config, where: str = "config.json") -> None:
    """Raise ArtifactError unless vLLM's DeciLM (a Llama block) computes what this model computes."""
    check_llama_block(config, where, "DeciLM", "vllm")


def deci_config(pb: PrunedBackbone, widths: list[int]) -> dict:
    """config.json of the vllm export."""
    import importlib.util
    import sys
    import tempfile

    c = pb.model.config
    fields = {k: getattr(c, k) for k in _LLAMA_FIELDS if hasattr(c, k)}
    fields["intermediate_size"] = max(widths)
    if c.model_type == "qwen2":  # biases on q/k/v, none on o_proj
        fields["attention_bias"] = False
        fields["qkv_bias"] = True
    if pb.down_bias:
        fields["mlp_bias"] = True
    fields["block_configs"] = [
        {"attention": {"n_heads_in_group": c.num_attention_heads // c.num_key_value_heads, "no_op": False,
                       "replace_with_linear": False},
         "ffn": {"intermediate_size": w, "no_op": False, "replace_with_linear": False}} for w in widths]
    # build it with the very class vLLM will load, so a field it rejects fails here, not there
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "configuration_decilm.py"
        path.write_text(remote_source("configuration_decilm.py"))
        spec = importlib.util.spec_from_file_location("_koff_configuration_decilm", path)
        if spec is None or spec.loader is None:  # only for a path Python cannot import: never a .py file
            raise RuntimeError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
            cfg = module.DeciLMConfig(**fields).to_dict()
        finally:
            sys.modules.pop(spec.name, None)
    cfg.pop("transformers_version", None)
    cfg.update(architectures=["DeciLMForCausalLM"], auto_map=dict(AUTO_MAP), model_type="nemotron-nas",
               dtype="float32")
    return cfg


def vllm_state(pb: PrunedBackbone, widths: list[int]) -> dict[str, torch.Tensor]:
    """The backbone's tensors for DeciLM: FFNs padded to `widths`, zero gate/up biases where the
    MLP needs a bias flag for FLAP's down_proj bias."""
    state = pad_ffn_state(state_for_saving(pb.model), widths)
    if pb.down_bias:
        for key in [k for k in state if k.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight"))]:
            bias = key[: -len("weight")] + "bias"
            state.setdefault(bias, state[key].new_zeros(state[key].shape[0]))
    return state


def write_vllm(pb: PrunedBackbone, out: Path, overwrite: bool = False) -> Path:
    """Write the vllm export of a pruned backbone and the LoRA halves of its memories."""
    check_architecture(pb.model.config, f"{pb.source}/config.json")
    names, left_out = split_for_engine(pb.run.memories, "vllm", pb.run.path)
    widths = padded_widths(pb.widths, 1, minimum=1)
    with atomic_output(out, kind="backbone", inputs=pb.inputs, overwrite=overwrite) as tmp:
        save_file(vllm_state(pb, widths), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(deci_config(pb, widths), indent=2, sort_keys=True))
        if getattr(pb.model, "generation_config", None) is not None:
            pb.model.generation_config.save_pretrained(tmp)
        for name in REMOTE_FILES:
            (tmp / name).write_text(remote_source(name), encoding="utf-8")
        pb.tokenizer.save_pretrained(tmp)
        save_file({f"layers.{i}": k for i, k in enumerate(pb.kept)}, str(tmp / "kept_neurons.safetensors"),
                  metadata={"format": "pt"})
        memories = write_lora_halves(pb, tmp, names, widths,
                                     lambda d, rec, state: write_lora_adapter(d, rec, state, out), "vllm")
        ranks = sorted({m["lora_rank"] for m in memories.values()})
        write_manifest(tmp, out, pb, "vllm", ["model.safetensors", "config.json", "kept_neurons.safetensors",
                                              *REMOTE_FILES], memories, left_out, stored_widths=widths,
                       serve_command=serve_command(out, list(memories), max(ranks) if ranks else None))
    return Path(out)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's --max-lora-rank accepts (vllm.config.lora.MaxLoRARanks)."""


def serve_command(out: Path, memories: list[str], max_rank: int | None) -> str:
    """The `vllm serve` line for this export (untested here: vLLM needs a GPU)."""
    cmd = f"vllm serve {out} --trust-remote-code"
    if memories and max_rank is not None:
        rank = next((r for r in VLLM_LORA_RANKS if r >= max_rank), max_rank)
        mods = " ".join(f"{n}={Path(out) / 'memories' / n}" for n in memories)
        cmd += f" --enable-lora --max-lora-rank {rank} --max-loras {len(memories)} --lora-modules {mods}"
    return cmd


__all__ = ["write_vllm", "deci_config", "check_architecture", "serve_command", "ArtifactError"]
