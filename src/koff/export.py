"""Export: a physically smaller backbone and its memories in standard formats.

    OUT/
      model.safetensors, config.json, tokenizer files   the pruned backbone: each layer keeps only
                                                         its kept FFN neurons (gate/up rows, down
                                                         columns), so layers have their own widths
      koff_backbone.json                                 koff's manifest: per-layer widths, source
                                                         run, base fingerprint, sparsity
      kept_neurons.safetensors                           "layers.{i}": int64 indices of kept neurons
      memories/NAME/adapter_config.json +                the LoRA half as a peft LoRA adapter for
                    adapter_model.safetensors            the exported backbone (sliced to match)
      memories/NAME/kv/adapter_config.json +             the KV half as a peft CARTRIDGE adapter
                       adapter_model.safetensors
      memories/NAME/kv.safetensors                       the KV half as koff stores it

config.json is the base model's own: transformers' Llama-family modeling code still reads one
global `intermediate_size` (DESIGN.md §9), so `load_backbone` builds the base architecture and
swaps in smaller linear layers; the per-layer widths live in koff_backbone.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .artifact import ArtifactError, MemoryRecord, atomic_directory, check_base, load_run
from .base import fingerprint, gated_mlps, load_base, parameter_counts, sha256_file

BACKBONE_FORMAT = "koff.backbone"
BACKBONE_FORMAT_VERSION = 1
FFN_ROWS = ("gate_proj", "up_proj")  # neuron j is row j of these ...
FFN_COLS = ("down_proj",)  # ... and column j of this


def _sliced_linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = old.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None:
            new.bias.copy_(old.bias.detach()[rows] if rows is not None else old.bias.detach())
    new.requires_grad_(False)
    return new


def prune_model(model: nn.Module, keep: list[torch.Tensor]) -> list[torch.Tensor]:
    """Delete pruned FFN neurons from `model` in place; returns the kept indices per layer."""
    kept = []
    for mlp, k in zip(gated_mlps(model), keep):
        idx = k.bool().nonzero().squeeze(1)
        for name in FFN_ROWS:
            setattr(mlp, name, _sliced_linear(getattr(mlp, name), rows=idx))
        mlp.down_proj = _sliced_linear(mlp.down_proj, cols=idx)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = int(idx.numel())
        kept.append(idx)
    return kept


def add_down_bias(model: nn.Module, bias: list[torch.Tensor]) -> None:
    """Fold a per-layer output bias (FLAP compensation) into each down_proj."""
    for mlp, b in zip(gated_mlps(model), bias):
        old = mlp.down_proj
        new = nn.Linear(old.in_features, old.out_features, bias=True, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.copy_(b.to(old.weight.dtype) + (old.bias if old.bias is not None else 0))
        new.requires_grad_(False)
        mlp.down_proj = new


def _resize_to(model: nn.Module, widths: list[int], down_bias: bool = False) -> None:
    """Swap each layer's FFN linears for empty ones of the given width (weights loaded later)."""
    for mlp, w in zip(gated_mlps(model), widths):
        for name in FFN_ROWS:
            old = getattr(mlp, name)
            setattr(mlp, name, nn.Linear(old.in_features, w, bias=old.bias is not None, dtype=old.weight.dtype))
        old = mlp.down_proj
        mlp.down_proj = nn.Linear(w, old.out_features, bias=down_bias or old.bias is not None, dtype=old.weight.dtype)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = w


def slice_lora_state(state: dict[str, torch.Tensor], kept: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut a LoRA state dict to the pruned backbone: a LoRA on gate/up_proj loses row j of B, one
    on down_proj loses column j of A, for every deleted neuron j."""
    out = {}
    for key, t in state.items():
        parts = key.split(".")
        layer = None
        if "layers" in parts:
            i = parts.index("layers")
            if i + 1 < len(parts) and parts[i + 1].isdigit():
                layer = int(parts[i + 1])
        module = next((p for p in parts if p in FFN_ROWS + FFN_COLS), None)
        if layer is not None and module is not None:
            idx = kept[layer]
            if module in FFN_ROWS and ".lora_B." in key:
                t = t[idx]
            elif module in FFN_COLS and ".lora_A." in key:
                t = t[:, idx]
        out[key] = t.contiguous()
    return out


def cartridge_files(rec: MemoryRecord, model_config) -> tuple[dict, dict[str, torch.Tensor]]:
    """A KV memory as a peft CARTRIDGE adapter: (adapter_config, {"prompt_embeddings": ...}).

    peft stores the prefix as [m, layers * 2 * kv_heads * head_dim], keys and values of each
    layer interleaved, exactly the cache koff prefixes (keys after rotary embedding).
    """
    from peft import CartridgeConfig

    keys, values = rec.kv_keys, rec.kv_values  # [L, H, m, d]
    layers, heads, m, d = keys.shape
    packed = torch.stack([keys, values], dim=1)  # [L, 2, H, m, d]
    packed = packed.permute(3, 0, 1, 2, 4).reshape(m, layers * 2 * heads * d)
    cfg = CartridgeConfig(num_virtual_tokens=m, num_frozen_tokens=rec.kv_frozen, task_type="CAUSAL_LM",
                          num_layers=layers, token_dim=heads * d, num_attention_heads=heads,
                          num_transformer_submodules=1)
    return cfg.to_dict(), {"prompt_embeddings": packed.contiguous()}


def _json_ready(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def export_run(run_dir: Path, out: Path, model: str | None = None, overwrite: bool = False) -> Path:
    """Write the physically pruned backbone of a run and all its memories to `out`."""
    run = load_run(run_dir)
    if run.keep is None:
        raise ArtifactError(f"{run_dir}: the run has no backbone mask (it is a dense + memories run)")
    base, tok, source = load_base(model or run.manifest["base_model"]["source"])
    fp = fingerprint(source)
    check_base(run, source, fp)
    dense_counts = parameter_counts(base)
    kept = prune_model(base, run.keep)
    if run.bias is not None:
        add_down_bias(base, run.bias)
    counts = parameter_counts(base)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        state = {k: v.contiguous() for k, v in base.state_dict().items()}
        if getattr(base.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: stored once, as transformers does
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        base.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_file({f"layers.{i}": k for i, k in enumerate(kept)}, str(tmp / "kept_neurons.safetensors"),
                  metadata={"format": "pt"})
        memories = {}
        for name, rec in run.memories.items():
            d = tmp / "memories" / name
            d.mkdir(parents=True)
            files = []
            if rec.lora_state is not None:
                cfg = dict(rec.lora_config)
                cfg["base_model_name_or_path"] = str(Path(out).resolve())
                (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
                save_file(slice_lora_state(rec.lora_state, kept), str(d / "adapter_model.safetensors"),
                          metadata={"format": "pt"})
                files += ["adapter_config.json", "adapter_model.safetensors"]
            if rec.kv_keys is not None:
                save_file({"keys": rec.kv_keys.contiguous(), "values": rec.kv_values.contiguous()},
                          str(d / "kv.safetensors"), metadata={"format": "pt"})
                cfg, tensors = cartridge_files(rec, base.config)
                cfg["base_model_name_or_path"] = str(Path(out).resolve())
                (d / "kv").mkdir()
                (d / "kv" / "adapter_config.json").write_text(json.dumps(_json_ready(cfg), indent=2, sort_keys=True))
                save_file(tensors, str(d / "kv" / "adapter_model.safetensors"), metadata={"format": "pt"})
                files += ["kv.safetensors", "kv/adapter_config.json", "kv/adapter_model.safetensors"]
            memories[name] = {"files": {f: sha256_file(d / f) for f in files},
                              "lora_rank": None if rec.lora_config is None else rec.lora_config["r"],
                              "kv_tokens": rec.kv_tokens, "kv_frozen_tokens": rec.kv_frozen}
        manifest = {
            "format": BACKBONE_FORMAT, "format_version": BACKBONE_FORMAT_VERSION, "koff_version": __version__,
            "source_run": str(Path(run_dir).resolve()),
            "base_model": dict(run.manifest["base_model"]),
            "intermediate_sizes": [int(k.numel()) for k in kept],
            "down_proj_bias": run.bias is not None,
            "target_sparsity": run.target_sparsity,
            "sparsity": run.manifest["sparsity"],
            "parameters": {"dense": dense_counts["total"], "backbone": counts["total"]},
            "memories": memories,
            "files": {f: sha256_file(tmp / f) for f in ("model.safetensors", "config.json", "kept_neurons.safetensors")},
        }
        (tmp / "koff_backbone.json").write_text(json.dumps(manifest, indent=2))
    return Path(out)


def read_backbone_manifest(folder: Path) -> dict:
    """Read and check koff_backbone.json of an exported backbone."""
    path = Path(folder) / "koff_backbone.json"
    if not path.is_file():
        raise ArtifactError(f"{folder}: no koff_backbone.json (not a backbone written by `koff export`)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if m.get("format") != BACKBONE_FORMAT:
        raise ArtifactError(f"{path}: field 'format' must be {BACKBONE_FORMAT!r}, got {m.get('format')!r}")
    if not isinstance(m.get("format_version"), int) or m["format_version"] > BACKBONE_FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported format_version {m.get('format_version')!r}")
    widths = m.get("intermediate_sizes")
    if not isinstance(widths, list) or not all(isinstance(w, int) and w >= 0 for w in widths):
        raise ArtifactError(f"{path}: 'intermediate_sizes' must be a list of non-negative integers")
    for rel, digest in m.get("files", {}).items():
        p = Path(folder) / rel
        if not p.is_file():
            raise ArtifactError(f"{path}: lists {rel}, which is missing")
        if sha256_file(p) != digest:
            raise ArtifactError(f"{p}: contents changed since koff wrote it (sha256 differs from {path})")
    return m


def load_backbone(folder: Path, dtype: torch.dtype = torch.float32):
    """Rebuild an exported backbone: the base architecture from config.json with each layer's
    FFN resized to its exported width, weights from model.safetensors. Returns (model, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    m = read_backbone_manifest(folder)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    widths = m["intermediate_sizes"]
    if len(widths) != len(gated_mlps(model)):
        raise ArtifactError(f"{folder / 'koff_backbone.json'}: {len(widths)} layer widths for a model of "
                            f"{len(gated_mlps(model))} layers")
    _resize_to(model, widths, down_bias=bool(m.get("down_proj_bias", False)))
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
