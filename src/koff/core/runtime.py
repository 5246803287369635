"""Where and how a command runs: device, precision, and the processes of a data-parallel launch.

Every command takes `--device auto|cpu|cuda[:N]|mps` and `--dtype float32|bfloat16|float16`. The
dtype is that of the frozen base weights; gates, LoRA and KV memories always train and are stored
in float32 (their hooks cast activations as needed), so a bfloat16 run differs from a float32 one
only in the frozen matmuls. float32 stays the default on CPU (CPUs without bf16 units run it
slower than float32).

Several processes: `accelerate launch -m koff decompose ...` or `torchrun -m koff decompose ...`
start one process per device; `Runtime.from_env` reads their rank and world size, and the trainer
then lets accelerate set up the process group and data-parallel wrapper. Only the main process
(rank 0) writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from koff.core.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str | None = "auto") -> torch.device:
    """`auto` (CUDA if present, else MPS, else CPU), `cpu`, `cuda`, `cuda:N` or `mps`."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device: {spec!r} is not a device; expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device: {spec!r} is not supported; expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: this machine has no CUDA device (torch {torch.__version__}); "
                              "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {spec}: MPS is not available on this machine")
    return device


def resolve_dtype(spec: str | torch.dtype | None = "float32") -> torch.dtype:
    """float32, bfloat16 or float16 (also accepts a torch.dtype)."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise ConfigError(f"dtype {spec} is not supported; expected one of {sorted(DTYPES)}")
        return spec
    name = (spec or "float32").strip().lower()
    if name not in DTYPES:
        raise ConfigError(f"--dtype: {spec!r} is not supported; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


@dataclass(frozen=True)
class Runtime:
    """The device and base-weight precision of one command, and its place in a launch."""

    device: torch.device
    dtype: torch.dtype = torch.float32
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp: bool = False
    """Shard the frozen base's decoder layers over the processes (FSDP2 `fully_shard`); gates and
    memories stay whole on every process and their gradients are averaged."""

    @property
    def is_main(self) -> bool:
        """Only the main process writes metrics, checkpoints and the run."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str | None = "auto", dtype: str | torch.dtype | None = "float32",
                 fsdp: bool | None = None) -> Runtime:
        """The runtime of this process: WORLD_SIZE / RANK / LOCAL_RANK as set by accelerate launch
        or torchrun (a single process when unset). In a launch, `auto` gives each process its own
        GPU (cuda:LOCAL_RANK), or the CPU. `fsdp` defaults to what an accelerate FSDP config
        asks for (ACCELERATE_USE_FSDP)."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("RANK", "0") or 0)
        local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
        if world > 1 and (device or "auto") == "auto":
            dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        else:
            dev = resolve_device(device)
        if fsdp is None:
            fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        return cls(device=dev, dtype=resolve_dtype(dtype), rank=rank, world_size=world, local_rank=local,
                   fsdp=bool(fsdp) and world > 1)

    def describe(self) -> dict:
        return {"device": str(self.device), "dtype": dtype_name(self.dtype), "world_size": self.world_size,
                "fsdp": self.fsdp}


def barrier(runtime: Runtime) -> None:
    """Wait for every process of a launch (no-op in a single process)."""
    if runtime.distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
