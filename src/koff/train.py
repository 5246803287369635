"""The offloading loop, and `decompose`: base model -> sparse backbone + per-domain memories.

Each step is either
  a domain step:         a batch of domain d's text with memory d active, or
  a regularization step: (every `reg_every`-th step) a batch of general-domain text with a
                         randomly chosen memory active,
with the gates sampled (hard concrete) and the target sparsity enforced by the controller. The
target warms up from 0 to s*; in the last `consolidate_frac` of steps the mask is fixed to the
final top-k mask and only the memories train, so they finish under the mask they will serve with.
Base weights never change.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import DecomposeConfig, MemoryConfig, TrainConfig, dump_config
from .data import BlockStream, Domain, check_no_test_leak, pack, tokenize_files
from .gates import NeuronGates, sparsity_report
from .memory import KVMemory, lora_config
from .model import KoffModel, lm_loss
from .sparsity import Lagrangian, make_controller, target_at


@dataclass
class Streams:
    """Training data of one run: a block stream per domain plus the general stream."""

    domains: dict[str, BlockStream]
    general: BlockStream | None
    kv_init: dict[str, torch.Tensor]
    """Per domain, the leading train tokens its KV memory is initialised from."""


def build_streams(domains: list[Domain], general: list[Path], tokenizer, cfg: TrainConfig,
                  kv_tokens: int = 0) -> Streams:
    """Tokenise and pack every domain's train files (and the general files) deterministically."""
    streams, kv_init = {}, {}
    for i, d in enumerate(domains):
        tokens = tokenize_files(d.train, tokenizer, d.text_field)
        streams[d.name] = BlockStream(pack(tokens, cfg.seq_len), cfg.batch_size, seed=cfg.seed * 1000 + i)
        kv_init[d.name] = tokens[:kv_tokens]
    gen = None
    if general:
        tokens = tokenize_files(general, tokenizer)
        gen = BlockStream(pack(tokens, cfg.seq_len), cfg.batch_size, seed=cfg.seed * 1000 + 999)
    return Streams(streams, gen, kv_init)


def add_memories(km: KoffModel, names: list[str], kv_init: dict[str, torch.Tensor], cfg: MemoryConfig,
                 seed: int) -> None:
    """Create one fresh memory per name: LoRA (B = 0, so it starts as a no-op) and a KV memory
    initialised from the base model's own cache of the domain's first tokens."""
    torch.manual_seed(seed)  # LoRA A init draws from the global RNG: same memories in every run
    for name in names:
        lora = lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) if cfg.lora_rank else None
        kv = None
        if cfg.kv_tokens:
            ids = kv_init[name]
            if ids.numel() < cfg.kv_tokens:
                raise ValueError(f"domain {name!r} has fewer than {cfg.kv_tokens} train tokens for its KV memory")
            k, v = km.capture_kv(ids)
            kv = KVMemory(k, v, num_frozen=cfg.kv_frozen_tokens)
        km.add_memory(name, lora=lora, kv=kv)


def calibration_batches(streams: Streams, tokens_per_domain: int, seq_len: int) -> list[torch.Tensor]:
    """The first `tokens_per_domain` tokens (whole blocks) of each domain's packed train text."""
    out = []
    for s in streams.domains.values():
        n = max(1, tokens_per_domain // seq_len)
        blocks = s.blocks[:n]
        out.extend(blocks[i: i + 8] for i in range(0, blocks.shape[0], 8))
    return out


def offload(km: KoffModel, streams: Streams, cfg: TrainConfig, target_sparsity: float, metrics_path: Path | None,
            learn_gates: bool = True, memories: list[str] | None = None, desc: str = "offload",
            progress: bool = True, teacher: KoffModel | None = None, checkpoint: Path | None = None) -> dict:
    """Run the offloading loop on `km` in place; returns a summary.

    `learn_gates=False` keeps the gates as they are (no gates, or a fixed mask) and trains only
    the memories. `memories` restricts which memories train (default: all of `km`). With a
    `teacher` (the dense model + memories of the same names) and `cfg.distill` > 0, the loss is
    (1 - w) * LM loss + w * KL(teacher || student) on every step. With `checkpoint` (a folder) and
    `cfg.checkpoint_every` > 0 the state is saved every that many steps, and a checkpoint found
    there at the start is resumed from exactly.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    gates = km.gates if learn_gates else None
    names = memories if memories is not None else km.memory_names
    domain_names = list(streams.domains)
    for d in domain_names:
        if names and d not in names and d in km.memory_names:
            raise ValueError(f"domain {d!r} has a memory that is not being trained")
    controller = make_controller(cfg.controller, cfg.rho) if gates is not None else None

    groups = []
    if gates is not None:
        groups.append({"params": list(gates.parameters()), "lr": cfg.lr_gates, "name": "gates"})
    lora = [p for n in names for p in km.lora_parameters(n)]
    kv = [p for n in names if n in km.kv for p in km.kv[n].parameters()]
    if lora:
        groups.append({"params": lora, "lr": cfg.lr_lora, "name": "lora"})
    if kv:
        groups.append({"params": kv, "lr": cfg.lr_kv, "name": "kv"})
    if not groups:
        raise ValueError("nothing to train: no gates and no memories")
    optimizer = torch.optim.Adam(groups)
    lam_opt = None
    if isinstance(controller, Lagrangian):
        lam_opt = torch.optim.Adam(controller.parameters(), lr=cfg.lr_lambda, maximize=True)
    km, optimizer = accelerator.prepare(km, optimizer)
    device = accelerator.device
    model = accelerator.unwrap_model(km)

    rng = random.Random(cfg.seed)
    noise = torch.Generator().manual_seed(cfg.seed + 17)
    consolidate_from = cfg.steps - round(cfg.consolidate_frac * cfg.steps) if gates is not None else cfg.steps
    domain_turn = 0
    last_loss: dict[str, list[float]] = {}
    fixed = False
    steps_run = start = 0
    elapsed = 0.0
    if checkpoint is not None and (checkpoint.is_dir() or checkpoint.with_name(checkpoint.name + ".old").is_dir()):
        from .checkpoint import load_checkpoint, restore

        loop = restore(model, optimizer, lam_opt, controller, noise, *load_checkpoint(checkpoint))
        start, domain_turn, steps_run, fixed = loop["step"], loop["domain_turn"], loop["steps_run"], loop["fixed"]
        last_loss, elapsed = loop["last_loss"], loop["seconds"]
        rng.setstate((loop["rng"][0], tuple(loop["rng"][1]), loop["rng"][2]))
        for name, taken in loop["streams"].items():
            (streams.general if name == "__general__" else streams.domains[name]).taken = taken
    if metrics_path is not None:  # drop lines logged after the state being resumed from
        lines = metrics_path.read_text().splitlines(keepends=True) if metrics_path.is_file() else []
        metrics_path.write_text("".join(lines[:start]))
    metrics = open(metrics_path, "a", encoding="utf-8") if metrics_path else None
    t0 = time.time() - elapsed
    bar = tqdm(range(start, cfg.steps), desc=desc, disable=not progress, dynamic_ncols=True, initial=start,
               total=cfg.steps)
    try:
        for step in bar:
            target = target_at(step, cfg.steps, target_sparsity, cfg.warmup_frac)
            consolidating = gates is not None and step >= consolidate_from
            if consolidating and not fixed:
                gates.set_mask(gates.final_mask(target_sparsity, scope=cfg.mask_scope))
                fixed = True
                if not lora and not kv:
                    break  # mask-only: nothing left to train once the mask is fixed
            regularize = bool(cfg.reg_every) and (step + 1) % cfg.reg_every == 0 and streams.general is not None
            if regularize:
                batch, domain = streams.general.next(), None
                memory = rng.choice(names) if names else None
            else:
                domain = domain_names[domain_turn % len(domain_names)]
                domain_turn += 1
                batch = streams.domains[domain].next()
                memory = domain if domain in names else None
            batch = batch.to(device)
            if gates is not None and not consolidating:
                gates.resample(noise)
            logits = model(batch, memory=memory)
            loss = lm_loss(logits, batch)
            total = loss
            if teacher is not None and cfg.distill > 0:
                with torch.no_grad():
                    target_logp = torch.log_softmax(teacher(batch, memory=memory).float(), dim=-1)
                kl = torch.nn.functional.kl_div(torch.log_softmax(logits.float(), dim=-1), target_logp,
                                                log_target=True, reduction="none").sum(-1).mean()
                total = (1 - cfg.distill) * loss + cfg.distill * kl
            if gates is not None and not consolidating:
                total = total + controller.penalty(gates.expected_sparsity(), target)
            accelerator.backward(total)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if lam_opt is not None and not consolidating:
                lam_opt.step()
                lam_opt.zero_grad(set_to_none=True)
            if gates is not None and not consolidating:
                controller.after_step(gates, target)
            steps_run += 1
            key = domain or "general"
            loss = loss.item()
            last_loss.setdefault(key, []).append(loss)
            record = {"step": step, "phase": "consolidate" if consolidating else ("warmup" if target < target_sparsity else "main"),
                      "kind": "general" if regularize else "domain", "domain": key, "memory": memory,
                      "loss": loss, "target": target if gates is not None else None,
                      "expected_sparsity": (gates.expected_sparsity().item() if gates is not None and not consolidating
                                            else (target_sparsity if consolidating else None)),
                      "seconds": round(time.time() - t0, 3)}
            if controller is not None:
                record.update(controller.state())
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            bar.set_postfix(loss=f"{loss:.3f}", s=("-" if record["expected_sparsity"] is None
                                                          else f"{record['expected_sparsity']:.3f}"), t=f"{target:.3f}")
            if checkpoint is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 \
                    and step + 1 < cfg.steps:
                from .checkpoint import save_checkpoint

                positions = {n: st.taken for n, st in streams.domains.items()}
                if streams.general is not None:
                    positions["__general__"] = streams.general.taken
                save_checkpoint(checkpoint, model, optimizer, lam_opt, controller, noise, {
                    "step": step + 1, "domain_turn": domain_turn, "steps_run": steps_run, "fixed": fixed,
                    "last_loss": last_loss, "seconds": time.time() - t0, "rng": list(rng.getstate()),
                    "streams": positions})
    finally:
        if metrics:
            metrics.close()
    if gates is not None and not fixed:
        gates.set_mask(gates.final_mask(target_sparsity, scope=cfg.mask_scope))
    tail = max(1, cfg.steps // 10)
    return {"steps": cfg.steps, "steps_run": steps_run, "seconds": round(time.time() - t0, 1),
            "final_loss": {k: sum(v[-tail:]) / len(v[-tail:]) for k, v in last_loss.items()}}


def _oneshot_gates(base, streams: Streams, kind: str, sparsity: float, cfg: TrainConfig) -> NeuronGates:
    """A fixed one-shot mask at `sparsity` from a neuron score (FLAP adds its bias compensation)."""
    from .gates import topk_keep_mask
    from .scores import activation_stats, flap_compensation, log_alpha_from_scores, neuron_scores

    stats = None
    if kind != "magnitude":
        stats = activation_stats(base, calibration_batches(streams, cfg.calibration_tokens, cfg.seq_len))
    scores = neuron_scores(kind, base, stats)
    keep = topk_keep_mask(scores, sparsity, scope=cfg.mask_scope)
    gates = NeuronGates.for_model(base, init=log_alpha_from_scores(scores, cfg.gate_init_center, cfg.gate_init_scale),
                                  log_alpha_range=(-cfg.log_alpha_limit, cfg.log_alpha_limit))
    gates.set_mask(keep)
    gates.requires_grad_(False)
    if kind == "flap":
        gates.set_bias(flap_compensation(base, stats, keep))
    return gates


def _init_gates(base, streams: Streams, cfg: TrainConfig) -> NeuronGates:
    from .scores import activation_stats, log_alpha_from_scores, neuron_scores

    limits = (-cfg.log_alpha_limit, cfg.log_alpha_limit)
    if cfg.gate_init == "constant":
        return NeuronGates.for_model(base, init=cfg.gate_init_center, log_alpha_range=limits)
    stats = None
    if cfg.gate_init != "magnitude":
        stats = activation_stats(base, calibration_batches(streams, cfg.calibration_tokens, cfg.seq_len))
    scores = neuron_scores(cfg.gate_init, base, stats)
    return NeuronGates.for_model(base, init=log_alpha_from_scores(scores, cfg.gate_init_center, cfg.gate_init_scale),
                                 log_alpha_range=limits)


def train_run(cfg: DecomposeConfig, out: Path, prune: bool = True, progress: bool = True,
              desc: str = "decompose", teacher: KoffModel | None = None) -> KoffModel:
    """Train one run (pruned, or dense + memories) and write it into the existing, empty folder
    `out`; returns the trained model. `teacher` is used when `cfg.train.distill` > 0."""
    from .artifact import memory_record, write_run
    from .base import fingerprint, inspect_model, load_base

    base, tok, source = load_base(cfg.model)
    streams = build_streams(cfg.domains, cfg.general, tok, cfg.train, cfg.memory.kv_tokens)
    learned = prune and cfg.mask == "learned"
    gates = None
    if learned:
        gates = _init_gates(base, streams, cfg.train)
    elif prune:
        gates = _oneshot_gates(base, streams, cfg.mask, cfg.target_sparsity, cfg.train)
    km = KoffModel(base, gates)
    names = [d.name for d in cfg.domains]
    if not cfg.memory.empty:
        add_memories(km, names, streams.kv_init, cfg.memory, cfg.train.seed)
    metrics_path = out / "metrics.jsonl"
    checkpoint = out / "checkpoint" if cfg.train.checkpoint_every else None
    if learned or not cfg.memory.empty:
        summary = offload(km, streams, cfg.train, cfg.target_sparsity if prune else 0.0, metrics_path,
                          learn_gates=learned, desc=desc, progress=progress, teacher=teacher, checkpoint=checkpoint)
        if checkpoint is not None:
            shutil.rmtree(checkpoint, ignore_errors=True)
    else:  # a one-shot mask and no memories: nothing to train
        metrics_path.write_text("")
        summary = {"steps": 0, "seconds": 0.0, "final_loss": {}}
    keep = gates.mask if prune else None
    geo = inspect_model(base)
    report = sparsity_report(base, keep, cfg.target_sparsity if prune else 0.0)
    manifest = {
        "base_model": {"source": source, "fingerprint": fingerprint(source), "architecture": geo.architecture,
                       "model_type": geo.model_type, "num_layers": geo.num_layers, "hidden_size": geo.hidden_size,
                       "intermediate_sizes": list(geo.intermediate_sizes), "num_kv_heads": geo.num_kv_heads,
                       "head_dim": geo.head_dim},
        "target_sparsity": cfg.target_sparsity if prune else 0.0,
        "pruned": prune,
        "sparsity": report,
        "domains": names,
        "data": {d.name: d.to_dict() for d in cfg.domains} | {"general": [str(p) for p in cfg.general]},
        "training": cfg.to_dict() | {"prune": prune},
        "metrics": summary,
    }
    records = [memory_record(km, n, {"domain": n, "trained_steps": cfg.train.steps}) for n in km.memory_names]
    write_run(out, manifest, keep, list(gates.log_alpha) if prune else None, records, dump_config(cfg),
              bias=gates.bias if prune else None)
    return km


def decompose(cfg: DecomposeConfig, overwrite: bool = False, progress: bool = True, resume: bool = False) -> Path:
    """Decompose the base model into a backbone + memories and write the run to `cfg.output`.

    With `cfg.reference`, dense + memories is trained the same way (same data, steps, seeds,
    memory initialisation; no gates) into OUTPUT/reference, the upper bound `evaluate` compares
    against. The run appears at `cfg.output` only when everything has been written. With
    `cfg.train.checkpoint_every`, the run is built in OUTPUT.partial/ and `resume` continues it.
    """
    from .artifact import ArtifactError, atomic_directory

    cfg.validate()
    check_no_test_leak(cfg.domains, cfg.general)
    reference = cfg.reference and cfg.prune and not cfg.memory.empty
    if cfg.train.distill > 0 and not reference:
        raise ValueError("train.distill needs the dense + memories reference (reference: true, prune, memories)")
    output = Path(cfg.output)
    if not cfg.train.checkpoint_every:
        if resume:
            raise ArtifactError("--resume needs a run trained with train.checkpoint_every > 0")
        with atomic_directory(output, overwrite=overwrite) as tmp:
            _decompose_into(cfg, tmp, reference, progress)
        return output
    if output.exists() and not overwrite:
        raise ArtifactError(f"{output} already exists (choose another output or pass --overwrite)")
    partial = output.with_name(output.name + ".partial")
    if partial.exists():
        if not resume:
            raise ArtifactError(f"{partial} holds an interrupted run: pass --resume to continue it, or delete it")
        if (partial / ".koff-partial.yaml").read_text() != dump_config(cfg):
            raise ArtifactError(f"{partial} was started with another configuration; delete it to start over")
    else:
        partial.mkdir(parents=True)
        (partial / ".koff-partial.yaml").write_text(dump_config(cfg))
    _decompose_into(cfg, partial, reference, progress)
    (partial / ".koff-partial.yaml").unlink()
    with atomic_directory(output, overwrite=overwrite) as tmp:
        os.rmdir(tmp)
        os.replace(partial, tmp)
    return output


def _decompose_into(cfg: DecomposeConfig, folder: Path, reference: bool, progress: bool) -> None:
    """Train the reference (first: it is the teacher when distilling), then the run, in `folder`.
    A reference already finished there (its koff.json written) is reused."""
    from .artifact import build_model, load_run

    teacher = None
    if reference:
        ref = folder / "reference"
        if (ref / "koff.json").is_file():
            if cfg.train.distill > 0:
                teacher, _ = build_model(load_run(ref))
        else:
            ref.mkdir(exist_ok=True)
            teacher = train_run(cfg, ref, prune=False, progress=progress, desc="reference: dense + memories")
        if teacher is not None:
            teacher.requires_grad_(False)
        if cfg.train.distill <= 0:
            teacher = None
    if not (folder / "koff.json").is_file():
        train_run(cfg, folder, prune=cfg.prune, progress=progress, teacher=teacher,
                  desc=f"decompose s*={cfg.target_sparsity}" if cfg.prune else "dense + memories")


def add_domain(run_dir: Path, domain: Domain, steps: int | None = None, general: list[Path] | None = None,
               reference: bool = True, overwrite: bool = False, progress: bool = True) -> Path:
    """Train one new memory on a run's frozen backbone (mask fixed) and add it to the run.

    Uses the run's memory and training configuration (`steps` overrides the step count). No
    existing file of the run changes: the memory lands in RUN/memories/NAME with its own manifest
    and metrics. With `reference`, and when the run has a dense + memories reference, the same
    memory is trained on the dense model too, so `evaluate` can show its upper bound.
    """
    import dataclasses
    import tempfile

    from .artifact import add_memory as store_memory
    from .artifact import build_model, load_run, memory_record
    from .config import ConfigError

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    if domain.name in run.memories and not overwrite:
        raise ConfigError(f"{run_dir}: a memory named {domain.name!r} exists already (pass --overwrite to replace it)")
    training = run.manifest["training"]
    mem_cfg = MemoryConfig(**training["memory"])
    if mem_cfg.empty:
        raise ConfigError(f"{run_dir}: the run was trained without memories; there is nothing to add")
    train_cfg = TrainConfig(**training["train"])
    if steps is not None:
        train_cfg = dataclasses.replace(train_cfg, steps=steps)
    if general is None:
        general = [Path(p) for p in training.get("general", [])]
    if not general:
        train_cfg = dataclasses.replace(train_cfg, reg_every=0)
    known = [Domain.from_dict(d) for name, d in run.manifest.get("data", {}).items() if name != "general"]
    check_no_test_leak(known + [domain], general)

    targets = [(run, run_dir)]
    ref = run.reference if reference else None
    if ref is not None:
        targets.append((ref, run_dir / "reference"))
    for target, folder in targets:
        km, tok = build_model(target, memories=[])
        streams = build_streams([domain], general, tok, train_cfg, mem_cfg.kv_tokens)
        add_memories(km, [domain.name], streams.kv_init, mem_cfg, train_cfg.seed)
        with tempfile.TemporaryDirectory() as tmp:
            metrics = Path(tmp) / "metrics.jsonl"
            summary = offload(km, streams, train_cfg, target.target_sparsity, metrics, learn_gates=False,
                              memories=[domain.name], progress=progress,
                              desc=f"add-domain {domain.name}" + (" (reference)" if target is ref else ""))
            rec = memory_record(km, domain.name, {"domain": domain.name, "data": domain.to_dict(), "added_after": True,
                                                  "trained_steps": train_cfg.steps, "metrics": summary,
                                                  "general": [str(p) for p in general]})
            store_memory(folder, rec, target.manifest["base_model"]["source"], overwrite=overwrite,
                         extra={"metrics.jsonl": metrics.read_bytes()})
    return run_dir / "memories" / domain.name
