"""Export: a physically smaller backbone and its memories, for the engine you deploy with.

    koff export RUN OUT [--format hf|gguf|vllm] [--outtype f32|f16|q8_0]

- `hf` (default, `hf.py`): transformers folder + remote code, LoRA as peft LoRA, KV as peft CARTRIDGE
- `gguf` (`gguf.py`): llama.cpp backbone GGUF (arch `deci`, per-layer FFN widths) + one llama.cpp
  LoRA adapter GGUF per memory
- `vllm` (`vllm.py`): a nemotron-nas / DeciLM folder for `vllm serve --trust-remote-code` + peft
  LoRA adapters

Every format starts from the same pruned backbone (`prune.py`) and writes `koff_backbone.json`
(`manifest.py`). llama.cpp and vLLM have no KV prefix, so there a memory is its LoRA half
(`memories.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from koff.core.atomic import check_output
from koff.core.errors import ConfigError
from koff.core.runtime import resolve_dtype
from koff.export.gguf import OUTTYPES, write_gguf_export
from koff.export.hf import cartridge_files, load_backbone, write_hf
from koff.export.manifest import read_backbone_manifest
from koff.export.prune import PrunedBackbone, add_down_bias, prune_model, pruned_backbone
from koff.export.vllm import write_vllm
from koff.storage.manifests import BACKBONE_FORMAT, BACKBONE_FORMAT_VERSION, EXPORT_FORMATS

FORMATS: dict[str, Callable[..., Path]] = {
    "hf": lambda pb, out, overwrite, outtype: write_hf(pb, out, overwrite=overwrite),
    "gguf": lambda pb, out, overwrite, outtype: write_gguf_export(pb, out, outtype=outtype or "f16", overwrite=overwrite),
    "vllm": lambda pb, out, overwrite, outtype: write_vllm(pb, out, overwrite=overwrite),
}
"""The export formats, by name: each writes a pruned backbone (`PrunedBackbone`) and its memories to
`out`. A new format is a writer module and one entry here (and in `EXPORT_FORMATS`)."""
assert tuple(FORMATS) == EXPORT_FORMATS


def export_run(run_dir: Path, out: Path, model: str | None = None, overwrite: bool = False,
               format: str = "hf", outtype: str | None = None, dtype: str | None = None) -> Path:
    """Write the physically pruned backbone of a run and its memories to `out` in `format`.

    `outtype` (GGUF only) is the tensor type of the backbone's matrices (default f16); `dtype`
    (hf and vllm) that of the stored backbone weights (default float32; memories stay float32).
    """
    if dtype is not None and format == "gguf":
        raise ConfigError("--dtype applies to --format hf and vllm; a GGUF's tensor type is --outtype")
    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if outtype is not None and format != "gguf":
        raise ConfigError(f"--outtype applies to --format gguf only (got --format {format})")
    if outtype is not None and outtype not in OUTTYPES:
        raise ConfigError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    # refuse now, before minutes of loading: an existing output that is not an earlier export, or
    # one that is, contains or lies inside the run or the base model folder
    check_output(Path(out), kind="backbone", inputs=[run_dir, model], overwrite=overwrite)
    pb: PrunedBackbone = pruned_backbone(run_dir, model, dtype=resolve_dtype(dtype or "float32"))
    return FORMATS[format](pb, out, overwrite, outtype)


__all__ = ["export_run", "load_backbone", "read_backbone_manifest", "prune_model", "add_down_bias",
           "cartridge_files", "FORMATS", "BACKBONE_FORMAT", "BACKBONE_FORMAT_VERSION", "EXPORT_FORMATS", "OUTTYPES"]
