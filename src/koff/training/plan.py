"""`koff plan`: what a decomposition of a model will hold and need, before any weight is loaded.

Parameters come from the model built on PyTorch's meta device (shapes without storage). Peak
memory per process is the sum of
  weights      the frozen base in the chosen dtype (with FSDP: this process's shard plus two whole
               decoder layers, the one running and the one prefetched),
  trainable    gates + every memory in float32: parameter, gradient and Adam's two moments,
  activations  the tensors autograd saves for the backward pass of one micro-batch, counted by
               tracing one real training forward (gates sampled, LoRA + KV memory active) on the
               meta device, with and without koff's gradient checkpointing,
  workspace    the float32 logits and their gradient while the loss is backpropagated,
  runtime      the process itself (Python, torch, transformers: about 0.35 GB with a CPU-only torch,
               0.74 GB with a CUDA build of torch; on a GPU the CUDA context, about 0.5 GB of device
               memory, comes on top and is not included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from koff.config.recipe import MemoryConfig
from koff.core.compat.torch import storage_owner
from koff.core.errors import ConfigError
from koff.core.runtime import resolve_device, resolve_dtype
from koff.model.base_model import DEFAULT_MODEL, decoder_layers, inspect_model, load_base, parameter_counts, resolve_model
from koff.model.controllers import Projection
from koff.model.gates import NeuronGates
from koff.model.koff_model import KoffModel, lm_loss
from koff.model.shapes import SHAPES, shape_config

CPU_RUNTIME_BYTES = 350 * 2**20
"""Resident memory of a Python process that has imported torch and transformers, with a CPU-only
torch build (measured on the project's CPU machines: 330-370 MB)."""
CUDA_BUILD_RUNTIME_BYTES = 740 * 2**20
"""The same with a CUDA build of torch (what `pip install torch` gives on Linux), even on a machine
without a GPU: its CUDA libraries are loaded and resident (measured: 0.72 GiB against 0.37 GiB for
the +cpu build of torch 2.13). Counting 350 MB there made the plan 27 % low on a fresh install."""


def runtime_bytes() -> int:
    """The process's own resident memory for this torch build (see the two constants above)."""
    return CUDA_BUILD_RUNTIME_BYTES if torch.version.cuda else CPU_RUNTIME_BYTES


@dataclass
class Plan:
    model: str
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_sizes: list[int]
    vocab_size: int
    parameters: dict[str, int]
    per_memory: dict[str, int]
    memories: int
    trainable: dict[str, int]
    micro_batch: int
    seq_len: int
    prefix_tokens: int
    world_size: int
    fsdp: bool
    estimates: dict[str, dict[str, int]] = field(default_factory=dict)
    """"<dtype>" or "<dtype>+checkpointing" -> component -> bytes (and "total")."""

    def to_dict(self) -> dict:
        return asdict(self)


def model_config(spec):
    """A transformers config for `spec`: a shape name (koff.shapes), a local model folder, the
    bundled default, a hub id (needs a network), or a config object itself."""
    from transformers import AutoConfig, PretrainedConfig


    if isinstance(spec, PretrainedConfig):
        return spec, getattr(spec, "name_or_path", "") or spec.model_type
    name = (spec or DEFAULT_MODEL).lower()
    if name in SHAPES:
        return shape_config(name), name
    if name == DEFAULT_MODEL:
        return shape_config("smollm2-135m"), DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {spec}: not a transformers model folder (no config.json)")
        return AutoConfig.from_pretrained(path), str(path)
    try:
        return AutoConfig.from_pretrained(spec), spec
    except OSError as e:
        raise ConfigError(f"--model {spec}: not a known shape ({', '.join(sorted(SHAPES))}), a local folder, or a "
                          f"reachable hub id ({e})") from None


def _meta_model(config, memory, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM


    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
        km = KoffModel(base, NeuronGates.for_model(base))
        km.create_memory("m", memory, torch.zeros(max(memory.kv_tokens, 1), dtype=torch.long))
    return km


def saved_activation_bytes(km, micro_batch: int, seq_len: int, checkpointing: bool) -> tuple[int, int]:
    """(bytes autograd keeps for the backward pass of one training forward, the largest single
    saved tensor) for a meta-device KoffModel with memory "m"."""

    if checkpointing:
        km.enable_gradient_checkpointing()
    seen: dict[int, int] = {}
    stored = {id(t) for t in km.parameters()} | {id(t) for t in km.buffers()}  # counted as weights already

    def pack(t):
        base = storage_owner(t)
        if id(base) not in stored:
            seen[id(base)] = base.numel() * base.element_size()
        return t

    x = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    km.gates.resample()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lm_loss(km(x, memory="m" if km.memory_names else None), x)
    finally:
        km.disable_gradient_checkpointing()
    return sum(seen.values()), max(seen.values(), default=0)


def make_plan(model: str | None = None, memory=None, batch_size: int = 4, seq_len: int = 128, grad_accum: int = 1,
              memories: int = 3, world_size: int = 1, fsdp: bool = False, target_sparsity: float = 0.2,
              dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> Plan:
    """Parameters and estimated peak memory per process (see module docstring)."""

    memory = memory or MemoryConfig()
    parts = grad_accum * world_size
    if batch_size % parts:
        raise ConfigError(f"batch size {batch_size} is not divisible by grad_accum {grad_accum} x processes {world_size}")
    micro = batch_size // parts
    config, name = model_config(model)
    plan: Plan | None = None
    for dtype_name in dtypes:
        dtype = resolve_dtype(dtype_name)
        km = _meta_model(config, memory, dtype)
        if plan is None:
            geo = inspect_model(km.model)
            counts = parameter_counts(km.model)
            per_part = {kind: sum(p.numel() for p in part.parameters_of("m")) for kind, part in km.parts.items()}
            per_memory = sum(per_part.values())
            gates = sum(p.numel() for p in km.gates.parameters())
            plan = Plan(model=name, architecture=geo.architecture, num_layers=geo.num_layers,
                        hidden_size=geo.hidden_size, intermediate_sizes=list(geo.intermediate_sizes),
                        vocab_size=config.get_text_config().vocab_size,
                        parameters={**counts, "removed_at_target": round(target_sparsity * counts["ffn"])},
                        per_memory={**per_part, "total": per_memory}, memories=memories,
                        trainable={"gates": gates, "memories": memories * per_memory,
                                   "total": gates + memories * per_memory},
                        micro_batch=micro, seq_len=seq_len, prefix_tokens=memory.kv_tokens, world_size=world_size,
                        fsdp=fsdp)
        size = torch.empty((), dtype=dtype).element_size()
        weights = plan.parameters["total"] * size
        if fsdp:  # each process holds its shard, plus the layer being run and the one prefetched, whole

            layer = max(sum(p.numel() for p in lay.parameters()) for lay in decoder_layers(km.model))
            weights = -(-weights // world_size) + 2 * layer * size
        trainable = plan.trainable["total"] * 16  # float32 value, gradient, Adam's m and v
        workspace = 2 * micro * seq_len * plan.vocab_size * 4
        full, _ = saved_activation_bytes(km, micro, seq_len, False)
        kept, _ = saved_activation_bytes(km, micro, seq_len, True)
        for ckpt in (False, True):
            # with checkpointing, one layer's activations exist again while it is recomputed
            saved = kept + (full - kept) // plan.num_layers if ckpt else full
            est = {"weights": weights, "trainable": trainable, "activations": saved, "workspace": workspace,
                   "runtime": runtime_bytes()}
            est["total"] = sum(est.values())
            plan.estimates[dtype_name + ("+checkpointing" if ckpt else "")] = est
    if plan is None:
        raise ConfigError("a plan needs at least one dtype")
    return plan


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB"


def format_plan(plan: Plan) -> str:
    """The plan as the text `koff plan` prints."""
    p, m = plan.parameters, plan.per_memory
    widths = sorted(set(plan.intermediate_sizes))
    lines = [
        f"model {plan.model}: {plan.architecture}, {plan.num_layers} layers, hidden {plan.hidden_size}, "
        f"FFN {'/'.join(map(str, widths))}, vocab {plan.vocab_size:,}",
        "parameters",
        f"  total                {p['total']:>15,}",
        f"  embeddings           {p['embeddings']:>15,}",
        f"  prunable (FFN)       {p['ffn']:>15,}   s* = {p['removed_at_target'] / max(p['ffn'], 1):.2f} removes "
        f"{p['removed_at_target']:,} ({p['removed_at_target'] / p['total']:.1%} of all)",
        f"  per memory           {m['total']:>15,}   LoRA {m['lora']:,} + KV {m['kv']:,}",
        f"  trainable            {plan.trainable['total']:>15,}   gates {plan.trainable['gates']:,} + "
        f"{plan.memories} memories {plan.trainable['memories']:,}",
        f"estimated peak memory per process: micro-batch {plan.micro_batch} x {plan.seq_len} tokens "
        f"(+ {plan.prefix_tokens} prefix), {plan.world_size} process(es){', FSDP-sharded weights' if plan.fsdp else ''}",
        f"  {'':24}{'weights':>10}{'trainable':>11}{'activations':>13}{'workspace':>11}{'runtime':>9}{'total':>11}",
    ]
    for key, est in plan.estimates.items():
        lines.append(f"  {key:24}" + "".join(f"{_gb(est[c]):>{w}}" for c, w in
                                             (("weights", 10), ("trainable", 11), ("activations", 13),
                                              ("workspace", 11), ("runtime", 9), ("total", 11))))
    lines.append("  (GB = 2^30 bytes; on a GPU add the CUDA context, about 0.5 GB)")
    return "\n".join(lines)


def _peak_rss() -> int:
    """This process's peak resident memory in bytes. Linux's VmHWM belongs to the process image
    itself; getrusage's ru_maxrss would also count the RSS of the parent it was forked from."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure_child(model: str | None, memory, micro_batch: int, seq_len: int, dtype: str, checkpointing: bool,
                   steps: int, device: str, queue) -> None:

    dev = resolve_device(device)
    base, _, _ = load_base(model, dtype=resolve_dtype(dtype), device=dev)
    gates = NeuronGates.for_model(base).to(dev)
    km = KoffModel(base, gates)
    x = torch.randint(0, base.config.vocab_size, (micro_batch, seq_len), device=dev)
    km.create_memory("m", memory, x[0].cpu())
    if checkpointing:
        km.enable_gradient_checkpointing()
    groups: list[dict[str, Any]] = [{"params": list(gates.parameters()), "lr": 0.1},
                                    {"params": km.memory_parameters("m")}]
    opt = torch.optim.Adam(groups)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(steps):
        gates.resample()
        lm_loss(km(x, memory="m"), x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        Projection().after_step(gates, 0.2)
    queue.put({"peak_rss": _peak_rss(),
               "peak_cuda": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None})


def measure_peak(model: str | None = None, memory=None, micro_batch: int = 4, seq_len: int = 128,
                 dtype: str = "float32", checkpointing: bool = False, steps: int = 3, device: str = "cpu",
                 fixed_malloc: bool = True) -> dict:
    """Run a few real training steps (gates + one memory) in a fresh process and return its peak
    resident memory (and peak CUDA allocation on a GPU), in bytes. `fixed_malloc` pins glibc's
    mmap threshold in that process, so that its RSS follows live memory (see below)."""
    import multiprocessing as mp
    import os


    # the bundled model is converted from GGUF on first use; done in the child, that conversion
    # (about 1.8 GB) would be its peak and not the training steps' (a cold cache, e.g. a new HOME)
    model = resolve_model(model)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure_child, args=(model, memory or MemoryConfig(), micro_batch, seq_len, dtype,
                                                    checkpointing, steps, device, queue))
    # glibc keeps freed blocks below its (growing) mmap threshold in the heap, so a process's peak
    # RSS would include that retention; a fixed threshold returns them, and RSS tracks live memory
    before = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if fixed_malloc:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        proc.start()
    finally:
        if before is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = before
    try:
        out = queue.get(timeout=1800)
    finally:
        proc.join(timeout=60)
    return out
