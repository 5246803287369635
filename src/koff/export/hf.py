"""`koff export --format hf`: a transformers folder with remote code, plus peft memories.

    OUT/
      model.safetensors, config.json, tokenizer files   the pruned backbone: each layer keeps only
                                                         its kept FFN neurons (gate/up rows, down
                                                         columns), so layers have their own widths
      configuration_koff.py, modeling_koff.py            the base family's classes with per-layer
                                                         FFN widths, named by config.json's auto_map
      koff_backbone.json                                 koff's manifest: per-layer widths, source
                                                         run, base fingerprint, sparsity, hashes
      kept_neurons.safetensors                           "layers.{i}": int64 indices of kept neurons
      memories/NAME/adapter_config.json +                the LoRA half as a peft LoRA adapter for
                    adapter_model.safetensors            the exported backbone (sliced to match)
      memories/NAME/kv/adapter_config.json +             the KV half as a peft CARTRIDGE adapter
                       adapter_model.safetensors
      memories/NAME/kv.safetensors                       the KV half as koff stores it

`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` loads it with plain
transformers. config.json keeps the base's `model_type` (so its tokenizer and config load without
remote code) and adds `koff_intermediate_sizes`, not `per_layer_config`, which transformers' own
modeling still refuses (docs/design.md §1, §2). `load_backbone` rebuilds the same model without running
the folder's code.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from koff.core.atomic import atomic_output
from koff.core.compat.transformers import config_class
from koff.core.errors import ArtifactError
from koff.core.files import sha256_file
from koff.export.manifest import read_backbone_manifest, write_manifest
from koff.export.memories import dropped_parts
from koff.export.prune import PrunedBackbone, resize_ffn, state_for_saving
from koff.model.base_model import gated_mlps
from koff.model.memory.kv import KVState
from koff.storage.run_dir import MemoryRecord

REMOTE_FILES = ("configuration_koff.py", "modeling_koff.py")
BASE_LINE = 'BASE_MODEL_TYPE = "llama"  # set by koff export: the base model\'s model_type'
AUTO_MAP = {"AutoConfig": "configuration_koff.KoffConfig", "AutoModelForCausalLM": "modeling_koff.KoffForCausalLM"}


def remote_source(name: str, base_model_type: str | None = None) -> str:
    """The text of a remote-code file shipped in koff, with the base family filled in."""
    text = resources.files("koff.export.remote").joinpath(name).read_text(encoding="utf-8")
    if base_model_type is not None and BASE_LINE in text:
        text = text.replace(BASE_LINE, BASE_LINE.replace('"llama"', json.dumps(base_model_type)))
    return text


def cartridge_files(kv: KVState, model_config) -> tuple[dict, dict[str, torch.Tensor]]:
    """A KV memory as a peft CARTRIDGE adapter: (adapter_config, {"prompt_embeddings": ...}).

    peft stores the prefix as [m, layers * 2 * kv_heads * head_dim], keys and values of each
    layer interleaved, exactly the cache koff prefixes (keys after rotary embedding).
    """
    from peft import CartridgeConfig

    keys, values = kv.keys, kv.values  # [L, H, m, d]
    layers, heads, m, d = keys.shape
    packed = torch.stack([keys, values], dim=1)  # [L, 2, H, m, d]
    packed = packed.permute(3, 0, 1, 2, 4).reshape(m, layers * 2 * heads * d)
    cfg = CartridgeConfig(num_virtual_tokens=m, num_frozen_tokens=kv.num_frozen, task_type="CAUSAL_LM",
                          num_layers=layers, token_dim=heads * d, num_attention_heads=heads,
                          num_transformer_submodules=1)
    return cfg.to_dict(), {"prompt_embeddings": packed.contiguous()}


def _json_ready(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def write_lora_adapter(d: Path, rec: MemoryRecord, state: dict[str, torch.Tensor], base_path: Path) -> list[str]:
    """A peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors) in `d`."""
    cfg = dict(rec.parts["lora"].config)
    cfg["base_model_name_or_path"] = str(Path(base_path).resolve())
    (d / "adapter_config.json").write_text(json.dumps(_json_ready(cfg), indent=2, sort_keys=True))
    save_file(state, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return ["adapter_config.json", "adapter_model.safetensors"]


def _write_kv(d: Path, kv: KVState, pb: PrunedBackbone, out: Path) -> list[str]:
    """The KV part twice: kv.safetensors (koff's own format, what `koff serve` loads) and kv/ as a
    peft CARTRIDGE adapter."""
    save_file({"keys": kv.keys.contiguous(), "values": kv.values.contiguous()}, str(d / "kv.safetensors"),
              metadata={"format": "pt"})
    cfg, tensors = cartridge_files(kv, pb.model.config)
    cfg["base_model_name_or_path"] = str(Path(out).resolve())
    (d / "kv").mkdir()
    (d / "kv" / "adapter_config.json").write_text(json.dumps(_json_ready(cfg), indent=2, sort_keys=True))
    save_file(tensors, str(d / "kv" / "adapter_model.safetensors"), metadata={"format": "pt"})
    return ["kv.safetensors", "kv/adapter_config.json", "kv/adapter_model.safetensors"]


def _write_memory(d: Path, rec: MemoryRecord, pb: PrunedBackbone, out: Path) -> dict:
    """One memory's folder of the export (each part it carries; `CARRIES["hf"]`) and its manifest entry."""
    d.mkdir(parents=True)
    files, carries = [], []
    lora, kv = rec.parts.get("lora"), rec.parts.get("kv")
    if lora is not None:
        files += write_lora_adapter(d, rec, lora.fit_ffn(pb.run.keep, to_sliced=True).tensors, out)
        carries.append("lora")
    if kv is not None:
        files += _write_kv(d, kv, pb, out)
        carries.append("kv")
    return {"files": {f: sha256_file(d / f) for f in files}, "carries": carries,
            "lora_rank": None if lora is None else lora.rank, "kv_tokens": 0 if kv is None else kv.tokens,
            "kv_frozen_tokens": 0 if kv is None else kv.num_frozen, "dropped": dropped_parts(rec, "hf")}


def hf_config_dict(pb: PrunedBackbone) -> dict:
    """config.json of the exported backbone: the base's, plus auto_map and the per-layer widths."""
    cfg = pb.model.config.to_dict()
    cfg.pop("auto_map", None)
    cfg.update(architectures=["KoffForCausalLM"], auto_map=dict(AUTO_MAP), koff_intermediate_sizes=pb.widths,
               koff_down_proj_bias=pb.down_bias)
    cfg["dtype"] = "float32"
    return cfg


def write_hf(pb: PrunedBackbone, out: Path, overwrite: bool = False) -> Path:
    """Write the hf export of a pruned backbone and all its memories to `out`."""
    model_type = pb.model.config.model_type
    with atomic_output(out, kind="backbone", inputs=pb.inputs, overwrite=overwrite) as tmp:
        save_file(state_for_saving(pb.model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(pb), indent=2, sort_keys=True))
        if getattr(pb.model, "generation_config", None) is not None:
            pb.model.generation_config.save_pretrained(tmp)
        for name in REMOTE_FILES:
            (tmp / name).write_text(remote_source(name, model_type), encoding="utf-8")
        pb.tokenizer.save_pretrained(tmp)
        save_file({f"layers.{i}": k for i, k in enumerate(pb.kept)}, str(tmp / "kept_neurons.safetensors"),
                  metadata={"format": "pt"})
        memories = {name: _write_memory(tmp / "memories" / name, rec, pb, out)
                    for name, rec in pb.run.memories.items()}
        write_manifest(tmp, out, pb, "hf", ["model.safetensors", "config.json", "kept_neurons.safetensors",
                                            *REMOTE_FILES], memories, {})
    return Path(out)


def _base_config(folder: Path, manifest):
    """The base family's config from config.json, without the folder's remote code."""
    from transformers import AutoConfig

    raw = json.loads((folder / "config.json").read_text())
    if "auto_map" not in raw:  # format_version 1: config.json is the base model's own
        return AutoConfig.from_pretrained(folder)
    model_type = raw.get("model_type")
    cls = config_class(model_type) if isinstance(model_type, str) else None
    if cls is None:
        raise ArtifactError(f"{folder / 'config.json'}: model_type {model_type!r} is not a transformers family")
    for key in ("auto_map", "architectures", "koff_intermediate_sizes", "koff_down_proj_bias", "model_type",
                "transformers_version"):
        raw.pop(key, None)
    return cls.from_dict(raw)


def load_backbone(folder: Path, dtype: torch.dtype = torch.float32):
    """Rebuild an hf export without its remote code: the base architecture with each layer's FFN
    resized to its exported width, weights from model.safetensors. Returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    m = read_backbone_manifest(folder)
    if m["export_format"] != "hf":
        raise ArtifactError(f"{folder}: a {m['export_format']} export; load_backbone reads --format hf folders "
                            "(see the docs' page 'Export to an engine' for how each engine loads its format)")
    config = _base_config(folder, m)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    widths = m["intermediate_sizes"]
    if len(widths) != len(gated_mlps(model)):
        raise ArtifactError(f"{folder / 'koff_backbone.json'}: {len(widths)} layer widths for a model of "
                            f"{len(gated_mlps(model))} layers")
    resize_ffn(model, widths, down_bias=bool(m.get("down_proj_bias", False)))
    try:
        state = load_file(str(folder / "model.safetensors"))
    except Exception as e:
        raise ArtifactError(f"{folder / 'model.safetensors'}: not a readable safetensors file ({e})") from None
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactError(f"{folder / 'model.safetensors'}: missing tensors {missing[:3]}, unexpected {unexpected[:3]}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise ArtifactError(f"{folder / 'model.safetensors'}: tensor {k!r} has shape {list(state[k].shape)}, "
                                f"expected {list(shape)}")
    model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(folder)
    return model, tok
