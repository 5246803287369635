"""The offloading loop as a recipe: `Trainer(...).setup()`, `.train()`, with a typed, saveable
loop state.

Each optimizer step is either
  a domain step:         a batch of domain d's text with memory d active, or
  a regularization step: (every `reg_every`-th step) a batch of general-domain text with the
                         memory `train.reg_memory` names active: a randomly chosen domain's
                         ("domain", the paper's), none ("none": the bare backbone), or a memory of
                         its own that only general batches train ("general"),
with the gates sampled (hard concrete) and the target sparsity enforced by the sparsity
controller. The target warms up from 0 to s*; in the last `consolidate_frac` of steps the mask is
fixed to the final top-k mask and only the memories train, so they finish under the mask they will
serve with. Base weights never change.

`train.batch_size` is the global batch of one optimizer step. It is split into `grad_accum`
micro-batches and, in a data-parallel launch, across processes; every process draws the same gate
noise and the same regularization memory, so P processes x N micro-batches compute the same update
as one process with the whole batch. The state that makes a run resumable is `Trainer.state_dict()`:
trainable tensors, optimizer, controller, the loop state (step, data positions, RNG states).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from koff.core import faults
from koff.core.errors import ArtifactError, ConfigError
from koff.core.runtime import Runtime, barrier
from koff.model.base_model import decoder_layers
from koff.model.controllers import make_controller, target_at
from koff.model.koff_model import KoffModel, lm_loss
from koff.storage.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from koff.training import preemption

DBL_SMOOTHING = 1e-4
"""Dynamic domain sampling mixes this much of the uniform distribution into the weights (as
Sheared-LLaMA does), so no domain's weight ever reaches 0."""

GENERAL_MEMORY = "general"
"""Name of the memory `train.reg_memory: general` trains on general batches only (the memory a
request that names no domain gets)."""


@dataclass
class LoopState:
    """Where the loop is: enough, with the tensors of `Trainer.state_dict`, to resume exactly."""

    step: int = 0
    """The next step to run."""
    domain_turn: int = 0
    """Domain steps run so far (domains take turns)."""
    steps_run: int = 0
    fixed: bool = False
    """The final mask has been fixed (consolidation started)."""
    seconds: float = 0.0
    last_loss: dict[str, list[float]] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    """Batches taken from each data stream (domain names, and "__general__")."""
    rng: list | None = None
    """State of the Python RNG that picks the regularization memory."""
    domain_weights: dict[str, float] = field(default_factory=dict)
    """Dynamic domain sampling: each domain's current sampling weight."""
    domain_losses: dict[str, list[float]] = field(default_factory=dict)
    """Dynamic domain sampling: [loss sum, steps] per domain since the last weight update."""
    domain_rng: list | None = None
    """Dynamic domain sampling: state of the Python RNG that draws each domain step's domain."""
    streams: dict[str, dict] = field(default_factory=dict)
    """Exact position of each streaming data source (`koff.data.sources.StreamingBlockStream.state_dict`)."""

    ADDED_LATER: ClassVar[tuple[str, ...]] = ("domain_weights", "domain_losses", "domain_rng", "streams")
    """Fields a checkpoint written before they existed lacks (their defaults are what it meant)."""

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> LoopState:
        known = {f.name for f in dataclasses.fields(cls)}
        if not set(state) <= known or not known - set(state) <= set(cls.ADDED_LATER):
            raise ValueError(f"loop state has fields {sorted(state)}, expected {sorted(known)}")
        return cls(**state)


class Trainer:
    """Trains the gates (unless fixed) and the memories of a KoffModel on a run's data streams."""

    def __init__(self, km: KoffModel, streams, cfg, target_sparsity: float, *, learn_gates: bool = True,
                 memories: list[str] | None = None, teacher: KoffModel | None = None,
                 runtime: Runtime | None = None, metrics_path: Path | None = None, checkpoint: Path | None = None,
                 desc: str = "offload", progress: bool = True, tracker=None):
        self.km, self.streams, self.cfg = km, streams, cfg
        self.target_sparsity = target_sparsity
        self.gates = km.gates if learn_gates else None
        self.names = memories if memories is not None else km.memory_names
        self.teacher = teacher
        self.runtime = runtime or Runtime(device=next(km.model.parameters()).device)
        self.metrics_path = metrics_path if self.runtime.is_main else None
        self.checkpoint = checkpoint
        self.desc, self.progress = desc, progress and self.runtime.is_main
        self.tracker = tracker if self.runtime.is_main else None
        """A `koff.training.tracking.Tracker` that gets every metrics record (main process only)."""
        self.loop = LoopState()
        self.backbone_params: list[nn.Parameter] = []
        """The backbone's shared LoRA tensors, when it has one (set by `setup`)."""

    # -- setup -----------------------------------------------------------------------------------
    def setup(self) -> Trainer:
        """Check the schedule, build optimizer and controller, place the model, resume if a
        checkpoint is there."""
        cfg, rt = self.cfg, self.runtime
        self.domain_names = list(self.streams.domains)
        for d in self.domain_names:
            if self.names and d not in self.names and d in self.km.memory_names:
                raise ConfigError(f"domain {d!r} has a memory that is not being trained")
        if cfg.reg_memory == GENERAL_MEMORY and cfg.reg_every and self.names and GENERAL_MEMORY not in self.names:
            raise ConfigError("train.reg_memory 'general' needs a memory named 'general' among those trained")
        if cfg.domain_sampling == "dynamic":
            missing = [d for d in self.domain_names if d not in (cfg.dbl_reference or {})]
            if missing:
                raise ConfigError(f"train.dbl_reference has no reference loss for domain(s) {missing}")
        parts = cfg.grad_accum * rt.world_size
        if cfg.batch_size % parts:
            raise ConfigError(f"train.batch_size {cfg.batch_size} (the global batch) must be divisible by "
                              f"grad_accum {cfg.grad_accum} x processes {rt.world_size} = {parts}")
        self.micro_batch = cfg.batch_size // parts

        self.km.to(rt.device)
        if self.teacher is not None:
            self.teacher.to(rt.device)
        if cfg.gradient_checkpointing:
            self.km.enable_gradient_checkpointing()
        self.controller = make_controller(cfg.controller, cfg).to_device(rt.device) if self.gates is not None else None
        self.model = self._wrap(self.km)
        groups = []
        if self.gates is not None:
            groups.append({"params": list(self.gates.parameters()), "lr": cfg.lr_gates, "name": "gates"})
        groups += self.km.param_groups(self.names, cfg)
        backbone = self.km.backbone_lora
        self.backbone_params = [p for p in backbone.parameters() if p.requires_grad] if backbone is not None else []
        if self.backbone_params:
            groups.append({"params": self.backbone_params, "lr": cfg.lr_lora, "name": "backbone_lora"})
        if not groups:
            raise ConfigError("nothing to train: no gates and no memories")
        self.trains_memories = any(g["name"] != "gates" for g in groups)
        self.optimizer = torch.optim.Adam(groups)

        self.rng = random.Random(cfg.seed)
        self.domain_rng = random.Random(cfg.seed * 7919 + 13)  # its own stream: round-robin runs are unchanged
        if cfg.domain_sampling == "dynamic":
            self.loop.domain_weights = {d: 1 / len(self.domain_names) for d in self.domain_names}
        self.noise = torch.Generator().manual_seed(cfg.seed + 17)  # CPU: the same stream on every device and rank
        self.consolidate_from = (cfg.steps - round(cfg.consolidate_frac * cfg.steps) if self.gates is not None
                                 else cfg.steps)
        if self.checkpoint is not None:

            if checkpoint_exists(self.checkpoint):

                state = load_checkpoint(self.checkpoint)
                try:
                    self.load_state_dict(state)
                except ArtifactError:
                    raise
                except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
                    raise ArtifactError(f"{self.checkpoint}: the checkpoint does not fit this training run ({e}); "
                                        "delete it to start the run over") from None
        return self

    def _wrap(self, km: KoffModel):
        """The model the loop calls: km itself, or its data-parallel wrapper in a launch.

        DDP (accelerate's wrapper): every process holds the whole model. FSDP: each frozen decoder
        layer is sharded over the processes (FSDP2 `fully_shard`, gathered for its forward and
        backward); gates and memories are small and stay whole everywhere, and their gradients are
        averaged across processes after each step (`_sync_gradients`).
        """
        self._reduce_grads = False
        if not self.runtime.distributed:
            return km
        from accelerate import PartialState

        PartialState(cpu=self.runtime.device.type == "cpu")  # the process group, from the launcher's env
        if self.runtime.fsdp:
            from torch.distributed.fsdp import fully_shard


            for layer in decoder_layers(km.model):
                fully_shard(layer)
            self._reduce_grads = True
            return km
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        # a step trains one memory (the others stay unused) and, once the mask is fixed, no gates
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)
        self.accelerator = Accelerator(cpu=self.runtime.device.type == "cpu", kwargs_handlers=[ddp])
        return self.accelerator.prepare_model(km)

    def _sync_gradients(self) -> None:
        """Average the gradients of the replicated trainable tensors over the processes (FSDP
        mode; DDP's wrapper does this itself). Every process trained the same tensors."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.runtime.world_size

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        loop = dataclasses.replace(self.loop, rng=list(self.rng.getstate()),
                                   domain_rng=list(self.domain_rng.getstate()), positions=self._positions(),
                                   streams={n: s.state_dict() for n, s in self._streams() if hasattr(s, "state_dict")})
        state: dict[str, Any] = {
            "trainable": {n: p for n, p in self.km.named_parameters() if p.requires_grad},
            "optimizer": self.optimizer.state_dict(),
            "controller": self.controller.state_dict() if self.controller is not None else None,
            "noise": self.noise.get_state(),
            "loop": loop.state_dict(),
        }
        gates = self.km.gates
        if gates is not None and gates.mode == "mask" and gates.mask is not None:
            state["mask"] = [m.to(torch.uint8) for m in gates.mask]
        return state

    def load_state_dict(self, state: dict) -> None:

        params = dict(self.km.named_parameters())
        with torch.no_grad():
            for name, t in state["trainable"].items():
                if name not in params or params[name].shape != t.shape:
                    raise ArtifactError(f"{self.checkpoint}: tensor {name!r} does not fit the model being trained "
                                        "(the checkpoint is from another configuration; delete it to start over)")
                params[name].copy_(t)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.controller is not None and state["controller"] is not None:
            self.controller.load_state_dict(state["controller"])
        if state.get("mask") is not None:
            if self.km.gates is None:
                raise ArtifactError(f"{self.checkpoint}: the checkpoint holds a fixed mask but the model has no gates")
            self.km.gates.set_mask([t.bool() for t in state["mask"]])
        self.noise.set_state(state["noise"])
        self.loop = LoopState.from_state_dict(state["loop"])
        if self.loop.rng is not None:
            r = self.loop.rng
            self.rng.setstate((r[0], tuple(r[1]), r[2]))
        if self.loop.domain_rng is not None:
            r = self.loop.domain_rng
            self.domain_rng.setstate((r[0], tuple(r[1]), r[2]))
        for name, taken in self.loop.positions.items():
            (self.streams.general if name == "__general__" else self.streams.domains[name]).taken = taken
        for name, position in self.loop.streams.items():
            (self.streams.general if name == "__general__" else self.streams.domains[name]).load_state_dict(position)

    def _streams(self):
        yield from self.streams.domains.items()
        if self.streams.general is not None:
            yield "__general__", self.streams.general

    def _positions(self) -> dict[str, int]:
        positions = {n: s.taken for n, s in self.streams.domains.items()}
        if self.streams.general is not None:
            positions["__general__"] = self.streams.general.taken
        return positions

    def save(self) -> None:
        """Write a checkpoint (main process only; the others wait for it)."""

        if self.checkpoint is None:
            raise ValueError(f"{self.desc}: this trainer has no checkpoint path to save to")
        if self.runtime.is_main:
            save_checkpoint(self.checkpoint, self.state_dict())
        barrier(self.runtime)

    def _stop(self, step: int, saved: bool) -> None:
        """A stop signal arrived: checkpoint the state after `step` (unless just done) and raise
        `Preempted` (the command line exits with `preemption.EXIT_PREEMPTED`)."""
        if self.checkpoint is None:
            raise preemption.Preempted(f"{self.desc}: stopped by a signal after step {step}; nothing was saved "
                                       "(train.checkpoint_every is 0: pass --checkpoint-every N or --resume auto "
                                       "to make a run resumable)", preemption.received(), saved=False)
        if not saved:
            self.loop.seconds = time.time() - self._t0
            self.save()
        raise preemption.Preempted(f"{self.desc}: stopped by a signal after step {step} of {self.cfg.steps}; "
                                   f"checkpoint written to {self.checkpoint}; run the same command with "
                                   "--resume auto to continue", preemption.received())

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run every remaining step; returns the summary recorded in the run's manifest."""
        cfg, loop = self.cfg, self.loop
        start = loop.step
        if self.metrics_path is not None:  # drop lines logged after the state being resumed from
            lines = self.metrics_path.read_text().splitlines(keepends=True) if self.metrics_path.is_file() else []
            self.metrics_path.write_text("".join(lines[:start]))
        metrics = open(self.metrics_path, "a", encoding="utf-8") if self.metrics_path else None
        self._t0 = time.time() - loop.seconds
        bar = tqdm(range(start, cfg.steps), desc=self.desc, disable=not self.progress, dynamic_ncols=True,
                   initial=start, total=cfg.steps)
        try:
            for step in bar:
                record = self.train_step(step)
                if record is None:
                    break  # mask-only: nothing left to train once the mask is fixed
                if metrics:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                bar.set_postfix(loss=f"{record['loss']:.3f}", t=f"{record['target'] or 0:.3f}",
                                s="-" if record["expected_sparsity"] is None else f"{record['expected_sparsity']:.3f}")
                if self.tracker is not None:
                    self.tracker.log(record, step)
                saved = False
                if (self.checkpoint is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
                        and step + 1 < cfg.steps):
                    loop.seconds = time.time() - self._t0
                    self.save()
                    saved = True
                faults.point(f"train.step.{step}")
                if preemption.stop_requested(self.runtime):  # collective: every rank stops at this step
                    self._stop(step, saved)
        finally:
            if metrics:
                metrics.close()
        if self.gates is not None and not loop.fixed:
            self.gates.set_mask(self.gates.final_mask(self.target_sparsity, scope=cfg.mask_scope))
        tail = max(1, cfg.steps // 10)
        return {"steps": cfg.steps, "steps_run": loop.steps_run, "seconds": round(time.time() - self._t0, 1),
                "final_loss": {k: sum(v[-tail:]) / len(v[-tail:]) for k, v in loop.last_loss.items()},
                "global_batch": cfg.batch_size, "micro_batch": self.micro_batch, "grad_accum": cfg.grad_accum,
                "world_size": self.runtime.world_size}

    def next_batch(self, step: int) -> tuple[torch.Tensor, str | None, str | None, bool]:
        """The global batch of `step`: (tokens, domain or None, memory or None, regularization?)."""
        cfg, loop = self.cfg, self.loop
        regularize = bool(cfg.reg_every) and (step + 1) % cfg.reg_every == 0 and self.streams.general is not None
        if regularize:
            batch, domain = self.streams.general.next(), None
            if cfg.reg_memory == "domain":
                memory = self.rng.choice(self.names) if self.names else None
            elif cfg.reg_memory == GENERAL_MEMORY:
                memory = GENERAL_MEMORY if GENERAL_MEMORY in self.names else None  # no memories: the bare backbone
            else:
                memory = None
            return batch, domain, memory, True
        if cfg.domain_sampling == "dynamic":
            weights = loop.domain_weights
            domain = self.domain_rng.choices(self.domain_names, weights=[weights[d] for d in self.domain_names])[0]
        else:
            domain = self.domain_names[loop.domain_turn % len(self.domain_names)]
        loop.domain_turn += 1
        return self.streams.domains[domain].next(), domain, (domain if domain in self.names else None), False

    def train_step(self, step: int) -> dict | None:
        """One optimizer step; returns its metrics record (None: the loop is over)."""
        cfg, loop, gates = self.cfg, self.loop, self.gates
        target = target_at(step, cfg.steps, self.target_sparsity, cfg.warmup_frac, cfg.target_schedule,
                           cfg.target_peak, cfg.regrow_frac)
        consolidating = gates is not None and step >= self.consolidate_from
        if gates is not None and consolidating and not loop.fixed:
            gates.set_mask(gates.final_mask(self.target_sparsity, scope=cfg.mask_scope))
            loop.fixed = True
            if not self.trains_memories:
                return None
        batch, domain, memory, regularize = self.next_batch(step)
        learning_gates = gates is not None and not consolidating
        if gates is not None and learning_gates:
            gates.resample(self.noise)
        trainable = learning_gates or (memory is not None and memory in self.names) or bool(self.backbone_params)
        loss = self._forward_backward(batch, memory, target if learning_gates else None, trainable,
                                      distill_dense=not regularize)
        if trainable:
            if self._reduce_grads:
                self._sync_gradients()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if gates is not None and self.controller is not None and learning_gates:
            self.controller.after_step(gates, target)
        if not math.isfinite(loss):
            raise ConfigError(f"training diverged at step {step} (loss {loss}): lower the learning rates "
                              "(train.lr_gates, lr_lora, lr_kv)")
        loop.steps_run += 1
        loop.step = step + 1
        key = domain or "general"
        loop.last_loss.setdefault(key, []).append(loss)
        if cfg.domain_sampling == "dynamic":
            self._update_domain_weights(domain, loss, step)
        warm = round(cfg.warmup_frac * cfg.steps)
        phase = ("consolidate" if consolidating else "warmup" if target < self.target_sparsity and step < warm
                 else "regrow" if target > self.target_sparsity else "main")
        record = {"step": step, "phase": phase, "kind": "general" if regularize else "domain", "domain": key,
                  "memory": memory, "loss": loss, "target": target if gates is not None else None,
                  "expected_sparsity": (gates.expected_sparsity().item() if gates is not None and learning_gates
                                        else (self.target_sparsity if consolidating else None)),
                  "global_batch": cfg.batch_size, "seconds": round(time.time() - self._t0, 3)}
        if self.controller is not None:
            record.update(self.controller.log())
        if cfg.domain_sampling == "dynamic":
            record["domain_weights"] = dict(loop.domain_weights)
        return record

    def _update_domain_weights(self, domain: str | None, loss: float, step: int) -> None:
        """Sheared-LLaMA's dynamic batch loading: accumulate each domain's loss; every `dbl_every`
        steps, log w_d += eta * max(mean loss_d - reference_d, 0), renormalise, and mix in a little
        of the uniform distribution. A domain not drawn since the last update keeps its excess at 0."""
        cfg, loop = self.cfg, self.loop
        if domain is not None:
            acc = loop.domain_losses.setdefault(domain, [0.0, 0])
            acc[0] += loss
            acc[1] += 1
        if (step + 1) % cfg.dbl_every:
            return
        logits = {}
        for d in self.domain_names:
            total, n = loop.domain_losses.get(d, (0.0, 0))
            excess = max(total / n - cfg.dbl_reference[d], 0.0) if n else 0.0
            logits[d] = math.log(loop.domain_weights[d]) + cfg.dbl_eta * excess
        top = max(logits.values())
        z = sum(math.exp(v - top) for v in logits.values())
        k = len(self.domain_names)
        loop.domain_weights = {d: (1 - DBL_SMOOTHING) * math.exp(v - top) / z + DBL_SMOOTHING / k
                               for d, v in logits.items()}
        loop.domain_losses = {}

    def _forward_backward(self, batch: torch.Tensor, memory: str | None, target: float | None,
                          trainable: bool, distill_dense: bool = False) -> float:
        """Loss of the global batch (this process' micro-batches, accumulated), gradients in place.
        `target` is set on steps that learn the gates (the controller's penalty joins the loss).
        With `train.distill` > 0 the loss is mixed with the KL to the teacher: the reference model
        (same memory) on every step, or, with `distill_from: dense`, the frozen dense base model (no
        memory) on the steps `distill_dense` marks (domain steps)."""
        cfg, rt = self.cfg, self.runtime
        accum = cfg.grad_accum
        shards = batch.view(accum, rt.world_size, self.micro_batch, batch.shape[-1])[:, rt.rank]
        losses: list[torch.Tensor] = []
        for j in range(accum):
            x = shards[j].to(rt.device)
            if j and target is not None and trainable and self.gates is not None:
                self.gates.refresh()  # same z, fresh graph (the last backward freed the previous one)
            sync = contextlib.nullcontext()
            if rt.distributed and not self._reduce_grads and j < accum - 1:
                sync = self.model.no_sync()
            with sync, (contextlib.nullcontext() if trainable else torch.no_grad()):
                logits = self.model(x, memory=memory)
                loss = lm_loss(logits, x)
                total = loss
                teacher_logits = None
                if cfg.distill > 0 and cfg.distill_from == "dense" and distill_dense and self.gates is not None:
                    with torch.no_grad():  # the same frozen weights with gates and memories off
                        teacher_logits = self.km(x, memory=None, use_gates=False)
                elif cfg.distill > 0 and cfg.distill_from == "reference" and self.teacher is not None:
                    with torch.no_grad():
                        teacher_logits = self.teacher(x, memory=memory)
                if teacher_logits is not None:
                    target_logp = torch.log_softmax(teacher_logits.float(), dim=-1)
                    kl = torch.nn.functional.kl_div(torch.log_softmax(logits.float(), dim=-1), target_logp,
                                                    log_target=True, reduction="none").sum(-1).mean()
                    total = (1 - cfg.distill) * loss + cfg.distill * kl
                if target is not None and self.controller is not None and self.gates is not None:
                    total = total + self.controller.penalty(self.gates.expected_sparsity(), target)
                if accum > 1:
                    total = total / accum
                if trainable:
                    total.backward()
            losses.append(loss.detach())
        total_loss = sum(losses[1:], losses[0])  # in step order, as the micro-batches ran
        if accum > 1:
            total_loss = total_loss / accum
        if rt.distributed:
            torch.distributed.all_reduce(total_loss)
            total_loss = total_loss / rt.world_size
        return total_loss.item()
