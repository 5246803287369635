"""`decompose` (base model -> a run directory: sparse backbone + per-domain memories) and
`add_domain` (a new memory on a run's frozen backbone): data streams, gate initialisation, memory
creation and the run's manifest around the offloading loop, which lives in `trainer.py`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from koff.config.recipe import DecomposeConfig, MemoryConfig, TrainConfig, dump_config, same_config
from koff.core import faults
from koff.core.atomic import (
    atomic_output,
    atomic_write_text,
    check_output,
    clean_leftovers,
    lock,
    make_temp_dir,
    notice,
    remove_tree,
    swap_in,
    temp_name,
)
from koff.core.errors import ArtifactError, ConfigError, DataError
from koff.core.names import check_memory_name
from koff.core.runtime import Runtime, barrier, resolve_dtype
from koff.data.text import BlockStream, Domain, check_no_test_leak, file_sha256, pack, tokenize_files
from koff.model.backbone_lora import BackboneLora
from koff.model.base_model import fingerprint, inspect_model, load_base
from koff.model.gates import NeuronGates, sparsity_report, topk_keep_mask
from koff.model.importance import activation_stats, flap_compensation, log_alpha_from_scores, neuron_scores
from koff.model.koff_model import KoffModel
from koff.model.memory import LoraSpec, target_modules
from koff.model.memory.parts import PART_KINDS
from koff.storage.manifests import DomainRecord
from koff.storage.run_dir import build_model, load_run, memory_record, write_memory, write_run
from koff.training import preemption
from koff.training.loop import GENERAL_MEMORY, Trainer


@dataclass
class Streams:
    """Training data of one run: a block stream per domain plus the general stream."""

    domains: dict[str, BlockStream]
    general: BlockStream | None
    leading: dict[str, torch.Tensor]
    """Per memory, the first tokens of its training text: what a fresh memory's parts start from
    (`MemoryPart.tokens_needed`; the KV part caches them)."""


def _packed(tokens: torch.Tensor, seq_len: int, what: str, files) -> torch.Tensor:
    try:
        return pack(tokens, seq_len)
    except DataError:
        raise DataError(f"{what}: its files ({', '.join(str(f) for f in files)}) hold {tokens.numel()} tokens, "
                        f"fewer than one training block of train.seq_len = {seq_len}") from None


def build_streams(domains: list[Domain], general: list, tokenizer, cfg: TrainConfig,
                  leading_tokens: int = 0, test_files: list[Path] | None = None) -> Streams:
    """Tokenise and pack every domain's train files (and the general files) deterministically,
    keeping the first `leading_tokens` of each for the memories to start from.
    Dataset sources (`koff.data.sources`; in `Domain.datasets`, and `general` entries that are a
    DatasetSource) come from the token cache, or stream; their rows are checked against every
    document of `test_files` (default: the domains' test files)."""
    from koff.data.sources import DatasetSource, StreamingBlockStream, source_tokens, test_hashes, validate_stream_sources

    gen_files = [g for g in general if not isinstance(g, DatasetSource)]
    gen_sets = [g for g in general if isinstance(g, DatasetSource)]
    uses_datasets = bool(gen_sets) or any(d.datasets for d in domains)
    tests = {}
    if uses_datasets:
        tests = test_hashes(test_files if test_files is not None else [p for d in domains for p in d.test])
    streams, leading = {}, {}

    def stream(files, sets, text_field, what, seed, lead_name):
        validate_stream_sources(files, sets, what)
        if sets and sets[0].streaming:
            s = StreamingBlockStream(sets[0], tokenizer, cfg.seq_len, cfg.batch_size, seed, tests, what)
            leading[lead_name] = s.head_tokens(leading_tokens)
            return s
        tokens = source_tokens(files, sets, tokenizer, text_field, tests, what)
        leading[lead_name] = tokens[:leading_tokens].long()
        return BlockStream(_packed(tokens, cfg.seq_len, what, [*files, *(x.describe() for x in sets)]),
                           cfg.batch_size, seed=seed)

    for i, d in enumerate(domains):
        if not d.datasets:  # koff's own files: exactly as before
            tokens = tokenize_files(d.train, tokenizer, d.text_field)
            streams[d.name] = BlockStream(_packed(tokens, cfg.seq_len, f"domain {d.name!r}", d.train), cfg.batch_size,
                                          seed=cfg.seed * 1000 + i)
            leading[d.name] = tokens[:leading_tokens]
        else:
            streams[d.name] = stream(d.train, d.datasets, d.text_field, f"domain {d.name!r}", cfg.seed * 1000 + i,
                                     d.name)
    gen = None
    if gen_sets:
        gen = stream(gen_files, gen_sets, "text", "the general data", cfg.seed * 1000 + 999, GENERAL_MEMORY)
    elif general:
        tokens = tokenize_files(general, tokenizer)
        gen = BlockStream(_packed(tokens, cfg.seq_len, "the general data", general), cfg.batch_size,
                          seed=cfg.seed * 1000 + 999)
        leading[GENERAL_MEMORY] = tokens[:leading_tokens]
    return Streams(streams, gen, leading)


def add_memories(km: KoffModel, names: list[str], leading: dict[str, torch.Tensor], cfg: MemoryConfig,
                 seed: int) -> None:
    """Create one fresh memory per name with every part `cfg` enables (LoRA: B = 0, so it starts
    as a no-op; KV: the base model's own cache of the memory's first tokens)."""
    check_leading_tokens(leading, names, cfg)
    torch.manual_seed(seed)  # LoRA A init draws from the global RNG: same memories in every run
    for name in names:
        km.create_memory(name, cfg, leading[name])


def leading_tokens(cfg: MemoryConfig) -> int:
    """Tokens of each memory's training text its parts start from."""
    return max([kind.tokens_needed(cfg) for kind in PART_KINDS.values() if kind.enabled(cfg)], default=0)


def check_leading_tokens(leading: dict[str, torch.Tensor], names: list[str], cfg: MemoryConfig) -> None:
    """Each memory's training text must hold what its parts start from (checked before minutes of
    calibration, not after)."""
    for name in names:
        for kind in PART_KINDS.values():
            if kind.enabled(cfg):
                kind.check_tokens(leading[name], cfg, name)


def check_finite(km: KoffModel, names: list[str], what: str) -> None:
    """Refuse to store a diverged model: every gate and memory tensor must be finite."""
    tensors = [(f"memory {n!r}", p) for n in names for p in km.memory_parameters(n)]
    if km.backbone_lora is not None:
        tensors += [("the backbone LoRA", p) for p in km.backbone_lora.parameters()]
    if km.gates is not None:
        tensors += [("the gates", a) for a in km.gates.log_alpha]
    for label, t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise ConfigError(f"{what}: training diverged, {label} holds NaN or Inf values; nothing was written "
                              "(lower the learning rates: train.lr_gates, lr_lora, lr_kv)")


def calibration_batches(streams: Streams, tokens_per_domain: int, seq_len: int) -> list[torch.Tensor]:
    """The first `tokens_per_domain` tokens (whole blocks) of each domain's packed train text."""
    out: list[torch.Tensor] = []
    for s in streams.domains.values():
        n = max(1, tokens_per_domain // seq_len)
        blocks = s.head(n)
        out.extend(blocks[i: i + 8] for i in range(0, blocks.shape[0], 8))
    return out


def offload(km: KoffModel, streams: Streams, cfg: TrainConfig, target_sparsity: float, metrics_path: Path | None,
            learn_gates: bool = True, memories: list[str] | None = None, desc: str = "offload",
            progress: bool = True, teacher: KoffModel | None = None, checkpoint: Path | None = None,
            runtime: Runtime | None = None, tracker=None) -> dict:
    """Run the offloading loop on `km` in place (see `trainer.Trainer`); returns its summary.

    `learn_gates=False` keeps the gates as they are (no gates, or a fixed mask) and trains only
    the memories. `memories` restricts which memories train (default: all of `km`). With a
    `teacher` (the dense model + memories of the same names) and `cfg.distill` > 0, the loss is
    (1 - w) * LM loss + w * KL(teacher || student) on every step. With `checkpoint` (a folder) and
    `cfg.checkpoint_every` > 0 the state is saved every that many steps, and a checkpoint found
    there at the start is resumed from exactly.
    """
    trainer = Trainer(km, streams, cfg, target_sparsity, learn_gates=learn_gates, memories=memories, teacher=teacher,
                      runtime=runtime, metrics_path=metrics_path, checkpoint=checkpoint, desc=desc, progress=progress,
                      tracker=tracker)
    return trainer.setup().train()


def _oneshot_gates(base, streams: Streams, kind: str, sparsity: float, cfg: TrainConfig) -> NeuronGates:
    """A fixed one-shot mask at `sparsity` from a neuron score (FLAP adds its bias compensation)."""

    stats = None
    if kind != "magnitude":
        stats = activation_stats(base, calibration_batches(streams, cfg.calibration_tokens, cfg.seq_len))
    scores = neuron_scores(kind, base, stats)
    keep = topk_keep_mask(scores, sparsity, scope=cfg.mask_scope)
    gates = NeuronGates.for_model(base, init=log_alpha_from_scores(scores, cfg.gate_init_center, cfg.gate_init_scale),
                                  log_alpha_range=(-cfg.log_alpha_limit, cfg.log_alpha_limit))
    gates.set_mask(keep)
    gates.requires_grad_(False)
    if kind == "flap" and stats is not None:  # (FLAP is not "magnitude": its stats were collected)
        gates.set_bias(flap_compensation(base, stats, keep))
    return gates


def _init_gates(base, streams: Streams, cfg: TrainConfig) -> NeuronGates:

    limits = (-cfg.log_alpha_limit, cfg.log_alpha_limit)
    if cfg.gate_init == "constant":
        return NeuronGates.for_model(base, init=cfg.gate_init_center, log_alpha_range=limits)
    stats = None
    if cfg.gate_init != "magnitude":
        stats = activation_stats(base, calibration_batches(streams, cfg.calibration_tokens, cfg.seq_len))
    scores = neuron_scores(cfg.gate_init, base, stats)
    return NeuronGates.for_model(base, init=log_alpha_from_scores(scores, cfg.gate_init_center, cfg.gate_init_scale),
                                 log_alpha_range=limits)


def memory_names(cfg: DecomposeConfig) -> list[str]:
    """The memories a run trains: one per domain, plus the general memory with reg_memory general."""
    names = [d.name for d in cfg.domains]
    if cfg.train.reg_memory == GENERAL_MEMORY and cfg.train.reg_every and (cfg.general or cfg.general_datasets):
        names.append(GENERAL_MEMORY)
    return names


@dataclass
class _Recipe:
    """What `train_run` sets up before training: the base model, its data and the model it trains."""

    base: Any
    tokenizer: Any
    source: str
    streams: Streams
    gates: NeuronGates | None
    """Exactly when the run prunes: learned (trained with the memories) or one-shot (fixed)."""
    km: KoffModel
    names: list[str]
    learned: bool


def _setup(cfg: DecomposeConfig, prune: bool, runtime: Runtime) -> _Recipe:
    """Data, base model, gates, memories and the backbone's LoRA, in the order that fixes every
    random initialisation."""
    base, tok, source = load_base(cfg.model, dtype=resolve_dtype(cfg.train.dtype), device=runtime.device)
    if cfg.memory.lora_rank:
        target_modules(base, cfg.memory.lora_targets)  # fail now, not after minutes of calibration
    streams = build_streams(cfg.domains, [*cfg.general, *cfg.general_datasets], tok, cfg.train, leading_tokens(cfg.memory))
    check_leading_tokens(streams.leading, memory_names(cfg) if not cfg.memory.empty else [], cfg.memory)
    learned = prune and cfg.mask == "learned"
    gates = None
    if learned:
        gates = _init_gates(base, streams, cfg.train)
    elif prune:
        gates = _oneshot_gates(base, streams, cfg.mask, cfg.target_sparsity, cfg.train)
    if gates is not None:
        gates.to(runtime.device)
    km = KoffModel(base, gates)
    names = memory_names(cfg)
    if not cfg.memory.empty:
        add_memories(km, names, streams.leading, cfg.memory, cfg.train.seed)
    if prune and cfg.train.backbone_lora_rank:
        torch.manual_seed(cfg.train.seed + 101)  # after the memories: their initialisation is unchanged
        km.set_backbone_lora(BackboneLora.fresh(base, LoraSpec(cfg.train.backbone_lora_rank, None,
                                                               tuple(cfg.memory.lora_targets))).to(runtime.device))
    return _Recipe(base, tok, source, streams, gates, km, names, learned)


def _save(out: Path, cfg: DecomposeConfig, r: _Recipe, summary: dict, prune: bool, runtime: Runtime) -> None:
    """Write the trained run into `out`: koff.json (last, so a folder without it is unfinished),
    the backbone's mask and gates, every memory, the config."""
    gates = r.gates
    keep = gates.mask if gates is not None else None
    geo = inspect_model(r.base)
    report = sparsity_report(r.base, keep, cfg.target_sparsity if prune else 0.0)
    manifest = {
        "base_model": {"source": r.source, "fingerprint": fingerprint(r.source), "architecture": geo.architecture,
                       "model_type": geo.model_type, "num_layers": geo.num_layers, "hidden_size": geo.hidden_size,
                       "intermediate_sizes": list(geo.intermediate_sizes), "num_kv_heads": geo.num_kv_heads,
                       "head_dim": geo.head_dim},
        "target_sparsity": cfg.target_sparsity if prune else 0.0,
        "pruned": prune,
        "sparsity": report,
        "domains": [d.name for d in cfg.domains],
        "default_memory": GENERAL_MEMORY if GENERAL_MEMORY in r.names and not cfg.memory.empty else None,
        "data": {d.name: DomainRecord.of(d).to_dict() for d in cfg.domains} | {"general": [str(p) for p in cfg.general]
                                                                               + [g.describe() for g in cfg.general_datasets]},
        "training": cfg.to_dict() | {"prune": prune},
        "runtime": runtime.describe(),
        "metrics": summary,
    }
    km = r.km
    check_finite(km, km.memory_names, f"{out}")
    records = [memory_record(km, n, {"domain": n if n != GENERAL_MEMORY else None, "trained_steps": cfg.train.steps})
               for n in km.memory_names]
    write_run(out, manifest, keep, list(gates.log_alpha) if gates is not None else None, records, dump_config(cfg),
              bias=gates.bias if gates is not None else None,
              backbone_lora=km.backbone_lora.state() if km.backbone_lora is not None else None)


def train_run(cfg: DecomposeConfig, out: Path | None, prune: bool = True, progress: bool = True,
              desc: str = "decompose", teacher: KoffModel | None = None, runtime: Runtime | None = None,
              tracker=None) -> KoffModel:
    """Train one run (pruned, or dense + memories) and write it into the existing, empty folder
    `out` (None, or a process other than the main one: write nothing); returns the trained model.
    `teacher` is used when `cfg.train.distill` > 0. A recipe in three steps: setup, train, save."""

    runtime = runtime or Runtime.from_env(dtype=cfg.train.dtype)
    writes = out is not None and runtime.is_main
    r = _setup(cfg, prune, runtime)
    metrics_path = out / "metrics.jsonl" if out is not None and writes else None
    checkpoint = out / "checkpoint" if cfg.train.checkpoint_every and out is not None else None
    if r.learned or not cfg.memory.empty:
        summary = offload(r.km, r.streams, cfg.train, cfg.target_sparsity if prune else 0.0, metrics_path,
                          learn_gates=r.learned, desc=desc, progress=progress, teacher=teacher, checkpoint=checkpoint,
                          runtime=runtime, tracker=tracker)
    else:  # a one-shot mask and no memories: nothing to train
        if metrics_path is not None:
            metrics_path.write_text("")
        summary = {"steps": 0, "seconds": 0.0, "final_loss": {}}
    if out is None or not writes:
        return r.km
    _save(out, cfg, r, summary, prune, runtime)
    faults.point("run.written")
    if checkpoint is not None:  # kept until koff.json is written, so a crash before resumes from it
        remove_tree(checkpoint)
    return r.km


def _inputs(cfg: DecomposeConfig) -> list[Path]:
    """What a decompose reads: the base model's folder (when local) and every data file."""
    paths = [Path(cfg.model)] if cfg.model and Path(cfg.model).exists() else []
    for d in cfg.domains:
        paths += [*d.train, *d.test, *d.valid]
    sets = [s for d in cfg.domains for s in d.datasets] + list(cfg.general_datasets)
    paths += [Path(f) for s in sets for f in s.data_files if "://" not in f]
    paths += [Path(s.path) for s in sets if Path(s.path).is_dir()]
    return paths + list(cfg.general)


def decompose(cfg: DecomposeConfig, overwrite: bool = False, progress: bool = True, resume: bool | str = False,
              runtime: Runtime | None = None, tracker=None) -> Path:
    """Decompose the base model into a backbone + memories and write the run to `cfg.output`.

    With `cfg.reference`, dense + memories is trained the same way (same data, steps, seeds,
    memory initialisation; no gates) into OUTPUT/reference, the upper bound `evaluate` compares
    against. The run appears at `cfg.output` only when everything has been written, in one atomic
    swap; `overwrite` replaces only an earlier run. With `cfg.train.checkpoint_every`, the run is
    built in OUTPUT.partial/ and `resume` continues it. `resume="auto"` continues a partial run
    when there is one and starts fresh otherwise (a finished run of the same configuration is left
    as it is), so a requeued job can repeat its command line; without checkpoint_every it builds in
    OUTPUT.partial/ all the same and checkpoints only when a stop signal comes (`koff.training.preemption`).
    In a multi-process launch every process trains its shard; only the main one writes. `tracker`
    (a `koff.training.tracking.Tracker`) gets every training record.
    """

    cfg.validate()
    runtime = runtime or Runtime.from_env(dtype=cfg.train.dtype)
    output = Path(cfg.output)
    if resume == "auto":
        if not cfg.train.checkpoint_every:  # the partial layout, with a checkpoint only when a stop signal comes
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_every=cfg.train.steps))
        if (output / "koff.json").is_file() and same_config(output / "config.yaml", cfg):
            if runtime.is_main:  # a requeued job whose run finished: nothing to do
                notice(f"{output} is already complete (same configuration); nothing to do")
            return output
    elif resume not in (True, False):
        raise ConfigError(f"resume must be True, False or 'auto', got {resume!r}")
    check_no_test_leak(cfg.domains, cfg.general)
    reference = cfg.reference and cfg.prune and not cfg.memory.empty
    if cfg.train.distill > 0 and cfg.train.distill_from == "reference" and not reference:
        raise ConfigError("train.distill from the reference needs the dense + memories reference (reference: true, "
                          "prune, memories); train.distill_from: dense distils from the dense model instead")
    partial = output.with_name(output.name + ".partial")
    if not runtime.is_main:  # train alongside the main process; it alone checks folders and writes
        _decompose_into(cfg, partial if cfg.train.checkpoint_every else None, reference, progress, runtime, tracker)
        barrier(runtime)
        return output
    inputs = _inputs(cfg)
    if not cfg.train.checkpoint_every:
        if resume:
            raise ArtifactError("--resume needs a run trained with train.checkpoint_every > 0")
        with atomic_output(output, kind="run", inputs=inputs, overwrite=overwrite) as tmp:
            _decompose_into(cfg, tmp, reference, progress, runtime, tracker)
        barrier(runtime)
        return output
    check_output(output, "run", inputs, overwrite)
    with lock(output):
        clean_leftovers(output)
        clean_leftovers(partial)
        _open_partial(partial, cfg, bool(resume))
        _decompose_into(cfg, partial, reference, progress, runtime, tracker)
        _publish(partial, output, overwrite)
    barrier(runtime)
    return output


def _open_partial(partial: Path, cfg: DecomposeConfig, resume: bool) -> None:
    """Continue OUTPUT.partial (with `resume`, same configuration) or create it, with its marker
    in one rename, so that a partial folder always says what it is."""
    marker = partial / ".koff-partial.yaml"
    if partial.exists():
        if not marker.is_file():
            raise ArtifactError(f"{partial} is not a resumable partial run (it has no .koff-partial.yaml; an "
                                "interrupted --overwrite leaves the run it replaced there): delete it")
        if not resume:
            raise ArtifactError(f"{partial} holds an interrupted run: pass --resume to continue it, or delete it")
        if not same_config(marker, cfg):
            raise ArtifactError(f"{partial} was started with another configuration; delete it to start over")
        clean_leftovers(marker)
        return
    fresh = make_temp_dir(partial)
    atomic_write_text(fresh / ".koff-partial.yaml", dump_config(cfg))
    swap_in(fresh, partial)


def _publish(partial: Path, output: Path, overwrite: bool) -> None:
    """Swap the finished OUTPUT.partial in at OUTPUT (under the caller's lock), dropping its
    training state first and the run it replaced (with `overwrite`) after."""
    for folder in (partial, partial / "reference"):  # a finished run holds no training state
        remove_tree(folder / "checkpoint")
        clean_leftovers(folder / "checkpoint")
    faults.point("decompose.publish")
    check_output(output, "run", (), overwrite)
    old = swap_in(partial, output)
    if old == partial:  # the replaced run is now at OUTPUT.partial: move it out of --resume's way
        trash = temp_name(output, "old")
        os.rename(partial, trash)
        old = trash
    faults.point("decompose.published")
    if old is not None:
        remove_tree(old)
    (output / ".koff-partial.yaml").unlink(missing_ok=True)


def _decompose_into(cfg: DecomposeConfig, folder: Path | None, reference: bool, progress: bool,
                    runtime: Runtime, tracker=None) -> None:
    """Train the reference (first: it is the teacher when distilling), then the run, in `folder`.
    A reference already finished there (its koff.json written) is reused."""

    teacher = None
    distil_reference = cfg.train.distill > 0 and cfg.train.distill_from == "reference"
    if reference:
        ref = folder / "reference" if folder is not None else None
        if ref is not None and (ref / "koff.json").is_file():
            if distil_reference:
                teacher, _ = build_model(load_run(ref), runtime=runtime)
        else:
            if ref is not None and runtime.is_main:
                ref.mkdir(exist_ok=True)
            teacher = train_run(cfg, ref, prune=False, progress=progress, desc="reference: dense + memories",
                                runtime=runtime, tracker=tracker.scoped("reference") if tracker is not None else None)
        if teacher is not None:
            teacher.requires_grad_(False)
        if not distil_reference:
            teacher = None
    if folder is None or not (folder / "koff.json").is_file():
        train_run(cfg, folder, prune=cfg.prune, progress=progress, teacher=teacher, runtime=runtime, tracker=tracker,
                  desc=f"decompose s*={cfg.target_sparsity}" if cfg.prune else "dense + memories")


def _known_tests(run, where: str) -> list[tuple[str, str, str]]:
    """(domain, file, sha256) of every test file a run's manifests record, its own domains' and
    those of memories added later: what a new memory must not train on."""
    records = [(rec, where) for rec in run.meta.data.values()]
    records += [(m.meta.data, f"{run.path / 'memories' / n / 'memory.json'}") for n, m in run.memories.items()
                if m.meta is not None and m.meta.data is not None]
    out = []
    for rec, src in records:
        if rec.test_sha256 is not None:
            out += [(rec.name, p, h) for p, h in zip(rec.test, rec.test_sha256)]
            continue
        for p in rec.test:  # recorded before koff kept test hashes: the files must still be there
            if not Path(p).is_file():
                raise DataError(f"test file {p} of domain {rec.name!r} (recorded in {src}) is missing, so koff cannot "
                                "check that the new training data does not contain it; restore it first")

            out.append((rec.name, p, file_sha256(p)))
    return out


def _absolute(domain: Domain) -> Domain:
    def absolute(paths: list[Path]) -> list[Path]:
        return [Path(os.path.abspath(p)) for p in paths]

    return dataclasses.replace(domain, train=absolute(domain.train), test=absolute(domain.test),
                               valid=absolute(domain.valid))


# long: one transaction (lock, partial folders, train, swap in, clean up) whose crash safety is in its order
def add_domain(run_dir: Path, domain: Domain, steps: int | None = None, general: list[Path] | None = None,
               reference: bool = True, overwrite: bool = False, progress: bool = True, model: str | None = None,
               runtime: Runtime | None = None, resume: bool | str = False, tracker=None) -> Path:
    """Train one new memory on a run's frozen backbone (mask fixed) and add it to the run.

    Uses the run's memory and training configuration (`steps` overrides the step count). Its
    general steps train the new memory (`reg_memory: domain`): the run's other memories stay
    frozen. No existing file of the run changes: the memory lands in RUN/memories/NAME with its own
    manifest and metrics. With `reference`, and when the run has a dense + memories reference, the
    same memory is trained on the dense model too, so `evaluate` can show its upper bound.

    Both memories are trained and written under temporary names first, then swapped in, the
    reference's first: the run's own memory, last, is what makes the memory part of the run. The
    run is locked meanwhile; `model` is the base model's folder if it moved.

    Training happens in FOLDER/memories/.NAME.partial/: a stop signal (`koff.training.preemption`) or the
    run's `train.checkpoint_every` leaves a checkpoint there, and `resume` (True or "auto")
    continues it exactly; without `resume` an interrupted add-domain's checkpoint is refused.
    """
    run_dir = Path(run_dir)
    check_memory_name(domain.name, "--name")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"--steps must be a whole number >= 1, got {steps!r}")
    domain = _absolute(domain)
    if not domain.train and not domain.datasets:
        raise ConfigError(f"--train: the new domain {domain.name!r} has no training files")
    with lock(run_dir):
        run = load_run(run_dir)
        name = domain.name
        ref = run.reference if reference else None
        ref_dir = run_dir / "reference"
        _clear_name(run, run_dir, ref_dir, name, overwrite, keep_orphan=ref is not None)
        mem_cfg = run.meta.training.memory
        train_cfg, general = _added_training(run, run_dir, steps, general)
        runtime = runtime or Runtime.from_env(dtype=train_cfg.dtype)
        check_no_test_leak([domain], general, _known_tests(run, str(run_dir / "koff.json")))

        targets = [(run, run_dir)] + ([(ref, ref_dir)] if ref is not None else [])
        # each memory trains in FOLDER/memories/.NAME.partial/ (metrics, a checkpoint when one is due
        # or a stop signal comes, and the finished memory in memory/), so an add-domain stopped by a
        # scheduler continues with --resume; the run's memory folders change only in the swaps below
        marker = {"domain": DomainRecord.of(domain, hashes=False).to_dict(), "train": dataclasses.asdict(train_cfg),
                  "general": [str(p) for p in general], "reference": ref is not None}
        partials = [folder / "memories" / f".{name}.partial" for _, folder in targets]
        for part in partials:
            _open_add_partial(part, marker, resume)
        staged = [(part / "memory", folder / "memories" / name) for (_, folder), part in zip(targets, partials)]
        try:
            for (target, _), part in zip(targets, partials):
                if not (part / "memory" / "memory.json").is_file():  # else: trained before an interruption
                    _train_added(target, part, name, domain, general, train_cfg, mem_cfg, model, runtime, progress,
                                 tracker, desc=f"add-domain {name}" + (" (reference)" if target is ref else ""))
            barrier(runtime)
        except preemption.Preempted:
            raise  # its checkpoint stays for --resume
        except BaseException:  # a failure or Ctrl-C leaves nothing behind, as before
            for part in partials:
                remove_tree(part)
            raise
        if not runtime.is_main:
            return run_dir / "memories" / name
        faults.point("add_domain.staged")
        for done, final in reversed(staged):  # the reference's first; the run's own memory commits the add
            check_output(final, "memory", overwrite=True)
            old = swap_in(done, final)
            if old is not None:
                remove_tree(old)
            faults.point("add_domain.swapped")
        for part in partials:
            remove_tree(part)
    return run_dir / "memories" / name


def _clear_name(run, run_dir: Path, ref_dir: Path, name: str, overwrite: bool, keep_orphan: bool) -> None:
    """Make room for memory `name`: refuse an existing one (unless `overwrite`), and drop a
    reference memory an interrupted add-domain left without the run's (unless it is retrained)."""
    for folder in (run_dir, ref_dir):
        clean_leftovers(folder / "memories" / name)
    if name in run.memories and not overwrite:
        raise ConfigError(f"{run_dir}: a memory named {name!r} exists already (pass --overwrite to replace it)")
    orphan = ref_dir / "memories" / name
    if name not in run.memories and orphan.is_dir():
        notice(f"{orphan} was left by an interrupted add-domain (the run has no memory {name!r}); "
               + ("replacing it" if keep_orphan else "removing it"))
        if not keep_orphan:
            remove_tree(orphan)


def _added_training(run, run_dir: Path, steps: int | None, general: list[Path] | None) -> tuple[TrainConfig, list[Path]]:
    """The training config of a memory added to `run` (the run's own; its general steps train the
    new memory) and its general data (the run's, unless given; absolute paths)."""
    meta = run.meta
    if meta.training.memory.empty:
        raise ConfigError(f"{run_dir}: the run was trained without memories; there is nothing to add")
    train_cfg = dataclasses.replace(meta.training.train, reg_memory="domain")
    if steps is not None:
        train_cfg = dataclasses.replace(train_cfg, steps=steps)
    if general is None:
        general = [Path(p) for p in meta.general]
        for p in general:
            if not p.is_file():
                raise DataError(f"the run's general data {p} (recorded in {run_dir / 'koff.json'}) is missing; "
                                "pass --general FILES, or --general none")
    general = [Path(os.path.abspath(p)) for p in general]
    if not general:
        train_cfg = dataclasses.replace(train_cfg, reg_every=0)
    return train_cfg, general


def _train_added(target, part: Path, name: str, domain: Domain, general: list[Path], train_cfg: TrainConfig,
                 mem_cfg: MemoryConfig, model, runtime: Runtime, progress: bool, tracker, desc: str) -> None:
    """Train one new memory on `target`'s frozen backbone in the add-domain folder `part`
    (resuming its checkpoint), and stage it complete as PART/memory."""
    km, tok = build_model(target, model=model, memories=[], runtime=runtime)
    streams = build_streams([domain], general, tok, train_cfg, leading_tokens(mem_cfg))
    add_memories(km, [name], streams.leading, mem_cfg, train_cfg.seed)
    metrics = part / "metrics.jsonl"
    summary = offload(km, streams, train_cfg, target.target_sparsity, metrics, learn_gates=False, memories=[name],
                      progress=progress, runtime=runtime, checkpoint=part / "checkpoint", tracker=tracker, desc=desc)
    check_finite(km, [name], f"add-domain {name}")
    if not runtime.is_main:
        return
    rec = memory_record(km, name, {"domain": name, "data": DomainRecord.of(domain).to_dict(), "added_after": True,
                                   "trained_steps": train_cfg.steps, "metrics": summary,
                                   "general": [str(p) for p in general]})
    done = part / "memory"
    tmp = make_temp_dir(done)
    try:
        write_memory(tmp, rec, target.meta.base_model.source, extra={"metrics.jsonl": metrics.read_bytes()})
        swap_in(tmp, done)
    finally:
        remove_tree(tmp)


def _open_add_partial(part: Path, marker: dict, resume: bool | str) -> None:
    """Prepare an add-domain's training folder `part`: new (with its marker), or the folder of an
    interrupted add-domain of the same memory and settings, continued when `resume` says so."""
    import json

    clean_leftovers(part / "checkpoint")
    clean_leftovers(part / "memory")
    path = part / "add-domain.json"
    if part.is_dir():
        try:
            same = json.loads(path.read_text()) == marker
        except (OSError, ValueError):
            same = False
        checkpoint = (part / "checkpoint" / "state.json").is_file()
        progress = checkpoint or (part / "memory" / "memory.json").is_file()
        if checkpoint and not same:
            raise ArtifactError(f"{part} holds an interrupted add-domain with other settings; delete it to start over")
        if checkpoint and not resume:
            raise ArtifactError(f"{part} holds an interrupted add-domain: pass --resume to continue it, or delete it")
        if same and progress and resume:
            return
        remove_tree(part)  # a killed add-domain's, with no checkpoint: it starts over, as add-domain always has
        notice(f"removed {part}, left by an interrupted koff command")
    part.mkdir(parents=True)
    atomic_write_text(path, json.dumps(marker, indent=1, sort_keys=True))
