"""The LoRA part of a memory: low-rank deltas on the base model's linear projections.

On disk a memory's LoRA is a standard peft LoRA adapter (`adapter_config.json` +
`adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`), loadable with
`peft.PeftModel.from_pretrained` on the dense base model. In a KoffModel, though, koff computes the
delta itself: one forward hook per target linear adds `B @ A @ x * scaling` for the memory each
row names in the current call (`parts.current_call`). peft's own routing switches the active
adapter on shared layers (or registers per-call hooks on them), which two concurrent requests
would race on, and its mixed-batch path loops over adapters; here a call with mixed rows stacks
the A and B of the memories it uses along the rank axis (each row selects its own slice), so it
costs two matmuls per layer, building it copies each used memory once (not once per row), and no
shared state changes.

A fresh adapter draws its random A exactly as peft's `LoraLayer.update_layer` does (the same
generator calls in the same module order), so runs are unchanged by the switch away from peft
(tests/model/test_memory.py checks the two initialisations are equal).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from koff.core.compat.peft import fresh_lora_a
from koff.core.errors import ArtifactError, ConfigError
from koff.core.fields import require
from koff.core.files import load_tensors, read_json
from koff.model.memory.parts import Call, MemoryPart, PartState, current_call, register_part

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FFN_ROWS = ("gate_proj", "up_proj")  # FFN neuron j is row j of their output (LoRA B) ...
FFN_COLS = ("down_proj",)  # ... and column j of this one's input (LoRA A)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False}
"""peft LoRA options koff does not implement, with the only value it accepts."""


@dataclass
class LoraSpec:
    """What a fresh LoRA holds: rank, scaling numerator and the projections it adapts."""

    rank: int
    alpha: float | None = None
    """Scaling numerator (default 2 * rank); the delta is scaled by alpha / rank."""
    targets: tuple[str, ...] = LORA_TARGETS

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else 2 * self.rank) / self.rank

    def peft_config_object(self):
        """This LoRA as a peft LoraConfig (task CAUSAL_LM, no dropout, no bias)."""
        from peft import LoraConfig

        # peft annotates lora_alpha as int, but uses it only in scaling = alpha / r: a float works
        return LoraConfig(r=self.rank, lora_alpha=self.alpha if self.alpha is not None else 2 * self.rank,  # type: ignore[arg-type]
                          target_modules=list(self.targets), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")

    def peft_config(self) -> dict:
        """The adapter_config.json peft writes for this LoRA."""
        d = self.peft_config_object().to_dict()
        return json.loads(json.dumps(d, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def lora_config(rank: int, alpha: float | None = None, targets: Sequence[str] = LORA_TARGETS) -> LoraSpec:
    """A LoRA spec for one memory (alpha defaults to 2 * rank)."""
    return LoraSpec(rank=rank, alpha=alpha, targets=tuple(targets))


def target_modules(base: nn.Module, targets: Sequence[str]) -> list[str]:
    """Paths of the linear layers of `base` a LoRA with these target names adapts, in the order
    peft visits them (`named_modules`). Raises ConfigError for a target that matches nothing."""
    paths, hit = [], set()
    for path, module in base.named_modules():
        last = path.rsplit(".", 1)[-1]
        if last in targets and isinstance(module, nn.Linear):
            paths.append(path)
            hit.add(last)
    missing = [t for t in targets if t not in hit]
    if missing:
        have = sorted({p.rsplit(".", 1)[-1] for p, m in base.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"memory.lora_targets: {missing} match no linear layer of {type(base).__name__}; "
                          f"its linear layers are named {have}")
    return paths


@dataclass(frozen=True)
class LoraSection:
    """The `lora` section of memory.json."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: dict, where: str) -> LoraSection:

        rank = require(d, "rank", int, where)
        if rank < 1:
            raise ArtifactError(f"{where}: field 'rank' must be >= 1, got {rank}")
        alpha = require(d, "alpha", (int, float), where)
        if alpha <= 0:
            raise ArtifactError(f"{where}: field 'alpha' must be > 0, got {alpha}")
        targets = require(d, "targets", list, where)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ArtifactError(f"{where}: field 'targets' must be a non-empty list of module names, got {targets!r}")
        return cls(rank=rank, alpha=alpha, targets=tuple(sorted(targets)))

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


@dataclass
class LoraState(PartState):
    """A stored LoRA: the peft adapter config and its tensors (peft key names)."""

    kind: ClassVar[str] = "lora"
    FILES: ClassVar[tuple[str, ...]] = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
    """The files a memory's LoRA part consists of."""
    config: dict
    tensors: dict[str, torch.Tensor]

    @staticmethod
    def parse_section(d: dict, where: str) -> LoraSection:
        return LoraSection.from_dict(d, where)

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def scaling(self) -> float:
        return float(self.config["lora_alpha"]) / self.rank

    def peft_config_object(self):
        """The stored config as a peft LoraConfig."""
        from peft import LoraConfig

        cfg = {k: v for k, v in self.config.items() if k not in ("base_model_name_or_path", "revision")}
        return LoraConfig(**{k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__})

    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module path -> (A [r, in], B [out, r])."""
        out: dict[str, list] = {}
        for key, t in self.tensors.items():
            for which, i in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
                if key.endswith(which):
                    path = key[: -len(which)].removeprefix(PEFT_PREFIX)
                    out.setdefault(path, [None, None])[i] = t
                    break
            else:
                raise ArtifactError(f"tensor {key!r} is not a LoRA A/B weight (expected …lora_A.weight / …lora_B.weight)")
        for path, (a, b) in out.items():
            if a is None or b is None:
                raise ArtifactError(f"module {path!r} has only one of its LoRA A / B tensors")
        return {p: (a, b) for p, (a, b) in out.items()}

    def save(self, folder: Path, base_source: str | None = None) -> LoraSection:
        from safetensors.torch import save_file

        cfg = dict(self.config)
        cfg["base_model_name_or_path"] = base_source
        (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.tensors.items()},
                  str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        return LoraSection(rank=self.rank, alpha=self.config["lora_alpha"],
                           targets=tuple(sorted(self.config["target_modules"])))

    @classmethod
    def load(cls, folder: Path, section: LoraSection, where: str, geometry=None,
             against: str = "the base model") -> LoraState:

        rank = section.rank
        path = folder / ADAPTER_CONFIG
        cfg = read_json(path)
        if cfg.get("peft_type") != "LORA" or cfg.get("r") != rank or isinstance(cfg.get("r"), bool):
            raise ArtifactError(f"{path}: expected peft_type 'LORA' with r={rank} ({where}: lora.rank), "
                                f"got peft_type={cfg.get('peft_type')!r}, r={cfg.get('r')!r}")
        for key, want in _UNSUPPORTED.items():
            if cfg.get(key, want) not in (want, None):
                raise ArtifactError(f"{path}: field {key!r} is {cfg[key]!r}; koff supports plain LoRA only ({key}: {want!r})")
        alpha = cfg.get("lora_alpha")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
            raise ArtifactError(f"{path}: field 'lora_alpha' must be a number > 0, got {alpha!r}")
        if alpha != section.alpha:
            raise ArtifactError(f"{path}: field 'lora_alpha' is {alpha}, but {where} records lora.alpha {section.alpha}")
        targets = cfg.get("target_modules")
        if not isinstance(targets, list) or sorted(map(str, targets)) != list(section.targets):
            raise ArtifactError(f"{path}: field 'target_modules' is {targets!r}, but {where} records lora.targets "
                                f"{list(section.targets)}")
        tensors = load_tensors(folder / ADAPTER_WEIGHTS, dtype=torch.float32)
        state = cls(cfg, tensors)
        try:
            mods = state.modules()
        except ArtifactError as e:
            raise ArtifactError(f"{folder / ADAPTER_WEIGHTS}: {e}") from None
        if not mods:
            raise ArtifactError(f"{folder / ADAPTER_WEIGHTS}: holds no LoRA tensors")
        for p, (a, b) in mods.items():
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
                raise ArtifactError(f"{folder / ADAPTER_WEIGHTS}: module {p!r} has A {list(a.shape)} and B "
                                    f"{list(b.shape)}, which do not have rank {rank}")
            if p.rsplit(".", 1)[-1] not in section.targets:
                raise ArtifactError(f"{folder / ADAPTER_WEIGHTS}: module {p!r} is not one of the targets "
                                    f"{list(section.targets)} ({where}: lora.targets)")
        return state

    @classmethod
    def section_from_files(cls, folder: Path, entry: dict, where: str) -> LoraSection:

        cfg = read_json(folder / ADAPTER_CONFIG)
        targets = cfg.get("target_modules")
        return LoraSection.from_dict({"rank": cfg.get("r"), "alpha": cfg.get("lora_alpha"),
                                      "targets": sorted(targets) if isinstance(targets, list) else targets}, where)

    @classmethod
    def check_run_shape(cls, section: LoraSection, memory_cfg, where: str) -> None:
        if section.rank != memory_cfg.lora_rank:
            raise ArtifactError(f"{where}: lora is {section.rank} but the run's training.memory.lora_rank is "
                                f"{memory_cfg.lora_rank}: every memory of a run has the run's shape")
        if list(section.targets) != sorted(memory_cfg.lora_targets):
            raise ArtifactError(f"{where}: lora.targets {list(section.targets)} differ from the run's "
                                f"training.memory.lora_targets {sorted(memory_cfg.lora_targets)}")

    def describe(self) -> dict:
        return {"lora_rank": self.rank}

    def fit_ffn(self, keep, to_sliced: bool) -> LoraState:
        """Cut to the kept FFN neurons (`to_sliced`): row j of B on gate/up_proj and column j of A
        on down_proj go with neuron j; or zero-filled back to the dense widths (a pruned neuron
        never reaches the output either way). Attention projections are untouched."""
        out = {}
        for key, t in self.tensors.items():
            layer = _LAYER.search(key)
            module = next((p for p in key.split(".") if p in FFN_ROWS + FFN_COLS), None)
            if layer is None or module is None or int(layer.group(1)) >= len(keep):
                out[key] = t
                continue
            k = keep[int(layer.group(1))]
            idx = k.nonzero().squeeze(1)
            axis = (0 if (module in FFN_ROWS and ".lora_B." in key) else 1 if (module in FFN_COLS and ".lora_A." in key)
                    else None)
            if axis is not None:
                have, want = t.shape[axis], (k.numel() if to_sliced else idx.numel())
                if have != want:
                    raise ArtifactError(f"LoRA tensor {key!r} has {have} neurons on axis {axis}, expected {want}")
                if to_sliced:
                    t = t.index_select(axis, idx)
                else:
                    shape = list(t.shape)
                    shape[axis] = k.numel()
                    t = t.new_zeros(shape).index_copy_(axis, idx, t)
            out[key] = t.contiguous()
        return LoraState(dict(self.config), out)

    def check(self, base: nn.Module, where: Path) -> None:
        """Every target linear layer of `base` has its A and B, of the shapes that layer needs."""
        try:
            want = target_modules(base, list(self.config["target_modules"]))
        except ConfigError as e:
            raise ArtifactError(f"{where}: {e}") from None
        mods = self.modules()
        missing = sorted(set(want) - set(mods))
        if missing:
            raise ArtifactError(f"{where}: the LoRA has no tensors for {len(missing)} of the base model's target "
                                f"layers (e.g. {missing[0]!r}); the adapter file is incomplete")
        for path, (a, b) in mods.items():
            try:
                module = base.get_submodule(path)
            except AttributeError:
                raise ArtifactError(f"{where}: LoRA tensors name module {path!r}, which the base model lacks") from None
            if not isinstance(module, nn.Linear):
                raise ArtifactError(f"{where}: LoRA module {path!r} is a {type(module).__name__}, not a linear layer")
            if list(a.shape) != [self.rank, module.in_features] or list(b.shape) != [module.out_features, self.rank]:
                raise ArtifactError(f"{where}: LoRA on {path!r} has A {list(a.shape)} and B {list(b.shape)}, expected "
                                    f"[{self.rank}, {module.in_features}] and [{module.out_features}, {self.rank}]")


class LoraAdapter(nn.Module):
    """One memory's LoRA inside a KoffModel: A and B per adapted module, in float32."""

    def __init__(self, paths: list[str], a: list[torch.Tensor], b: list[torch.Tensor], scaling: float, config: dict):
        super().__init__()
        self.paths = list(paths)
        self.lora_A = nn.ParameterList([nn.Parameter(t.detach().float().clone()) for t in a])
        self.lora_B = nn.ParameterList([nn.Parameter(t.detach().float().clone()) for t in b])
        self.scaling = scaling
        self.config = config
        self.index = {p: i for i, p in enumerate(self.paths)}


@dataclass
class _Mixed:
    """The rows of one call use different memories on one module. The memories used are
    concatenated along the rank axis, so the whole batch costs two matmuls and no per-row copy of
    any adapter: building this is O(memories used), not O(rows), which matters when a server
    rebuilds a call every time its batch changes."""

    a: torch.Tensor
    """[R, in]: the A of every memory used on this module, stacked (R = the sum of their ranks)."""
    b: torch.Tensor
    """[out, R]: their B, side by side."""
    select: torch.Tensor
    """[B, R]: the scaling of the row's own memory over that memory's rank slice, 0 elsewhere (and
    for rows without a LoRA on this module)."""


@register_part
class LoraPart(MemoryPart[LoraState]):
    """The LoRA adapters of every memory of a KoffModel, and the hooks that apply them."""

    kind: ClassVar[str] = "lora"
    state_class: ClassVar[type[PartState]] = LoraState

    def __init__(self, base: nn.Module):
        super().__init__(base)
        # a ModuleDict (the adapters' tensors are the part's), typed by what it holds
        self.adapters = cast("MutableMapping[str, LoraAdapter]", nn.ModuleDict())
        self._hooked: dict[str, object] = {}

    # -- memories --------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.adapters)

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.lora_rank > 0

    def add(self, name: str, value: LoraSpec) -> None:
        """A fresh adapter from a LoraSpec (B = 0)."""
        self.create(name, value, None)

    def create(self, name: str, cfg, init=None) -> None:
        spec = cfg if isinstance(cfg, LoraSpec) else LoraSpec(cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets))
        paths = target_modules(self._base, spec.targets)
        a_list, b_list = [], []
        for path in paths:
            lin = self._base.get_submodule(path)
            a_list.append(fresh_lora_a(spec.rank, lin.in_features, lin.out_features))
            b_list.append(torch.zeros(lin.out_features, spec.rank))
        self._add(name, LoraAdapter(paths, a_list, b_list, spec.scaling, spec.peft_config()))

    def install(self, name: str, state: LoraState) -> None:
        state.check(self._base, Path(name))
        mods = state.modules()
        paths = list(mods)
        self._add(name, LoraAdapter(paths, [mods[p][0] for p in paths], [mods[p][1] for p in paths],
                                    state.scaling, dict(state.config)))

    def _add(self, name: str, adapter: LoraAdapter) -> None:
        device = next(self._base.parameters()).device
        self.adapters[name] = adapter.to(device)
        for path in adapter.paths:
            if path not in self._hooked:
                module = self._base.get_submodule(path)
                # prepend: the delta joins the linear's own output before any later hook (e.g. the
                # gates' FLAP bias) adds to it
                self._hooked[path] = module.register_forward_hook(self._hook(path), prepend=True)

    def snapshot(self, name: str) -> LoraState:
        ad = self.adapters[name]
        tensors = {}
        for path, a, b in zip(ad.paths, ad.lora_A, ad.lora_B):
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.detach().cpu().contiguous()
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.detach().cpu().contiguous()
        return LoraState(dict(ad.config), tensors)

    def remove(self, name: str) -> None:
        del self.adapters[name]

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        return list(self.adapters[name].parameters()) if name in self.adapters else []

    def lr(self, train_cfg) -> float:
        return train_cfg.lr_lora

    # -- routing ---------------------------------------------------------------------------------
    def prepare(self, call: Call) -> None:
        rows = [n if n in self.adapters else None for n in call.rows]
        used = sorted({n for n in rows if n is not None}, key=rows.index)
        if not used:
            return
        if len(used) == 1 and all(n == used[0] for n in rows):
            ad = self.adapters[used[0]]
            call.state[self.kind] = {p: (ad.lora_A[i], ad.lora_B[i], ad.scaling) for i, p in enumerate(ad.paths)}
            return
        state = {}
        selectors: dict[tuple, torch.Tensor] = {}  # one per distinct set of memories on a module
        for path in {p for n in used for p in self.adapters[n].paths}:
            have = [(n, self.adapters[n]) for n in used if path in self.adapters[n].index]
            a = torch.cat([ad.lora_A[ad.index[path]] for _, ad in have])
            b = torch.cat([ad.lora_B[ad.index[path]] for _, ad in have], dim=1)
            key = tuple(n for n, _ in have)
            if key not in selectors:
                select = a.new_zeros(len(rows), a.shape[0])
                start, span = 0, {}
                for n, ad in have:
                    rank = ad.lora_A[ad.index[path]].shape[0]
                    span[n] = (start, start + rank)
                    start += rank
                for i, row in enumerate(rows):
                    if row is not None and row in span:
                        select[i, span[row][0]: span[row][1]] = self.adapters[row].scaling
                selectors[key] = select
            state[path] = _Mixed(a, b, selectors[key])
        call.state[self.kind] = state

    def _hook(self, path: str):
        def add_delta(module, args, output):
            call = current_call()
            entry = None if call is None else call.state.get(self.kind, {}).get(path)
            if entry is None:
                return None
            if isinstance(entry, _Mixed):
                x = args[0].to(entry.a.dtype)
                select = entry.select.view(entry.select.shape[0], *([1] * (x.dim() - 2)), entry.select.shape[1])
                delta = F.linear(F.linear(x, entry.a) * select, entry.b)
            else:
                a, b, scaling = entry
                delta = F.linear(F.linear(args[0].to(a.dtype), a), b) * scaling
            return output + delta.to(output.dtype)

        return add_delta
