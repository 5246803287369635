"""koff_backbone.json: what an export folder holds, where it came from, and the sha256 of its files.

Every export format writes one; `read_backbone_manifest` checks it (fields, and that no listed file
changed since koff wrote it).
"""

from __future__ import annotations

import json
from pathlib import Path

from koff.core.errors import ArtifactError
from koff.core.files import sha256_file
from koff.core.version import __version__
from koff.export.prune import PrunedBackbone

BACKBONE_FORMAT = "koff.backbone"
BACKBONE_FORMAT_VERSION = 2
"""2 added `export_format`, `stored_intermediate_sizes`, `memories_left_out` and each memory's `carries`."""
MANIFEST = "koff_backbone.json"
EXPORT_FORMATS = ("hf", "gguf", "vllm")


def write_manifest(folder: Path, out: Path, pb: PrunedBackbone, export_format: str, files: list[str],
                   memories: dict[str, dict], left_out: dict[str, str], stored_widths: list[int] | None = None,
                   **extra) -> dict:
    """Write koff_backbone.json into `folder` (the temporary directory that becomes `out`)."""
    manifest = {
        "format": BACKBONE_FORMAT, "format_version": BACKBONE_FORMAT_VERSION, "koff_version": __version__,
        "export_format": export_format,
        "source_run": str(Path(pb.run.path).resolve()),
        "base_model": dict(pb.run.manifest["base_model"]),
        "intermediate_sizes": pb.widths,
        "stored_intermediate_sizes": stored_widths if stored_widths is not None else pb.widths,
        "down_proj_bias": pb.down_bias,
        "target_sparsity": pb.run.target_sparsity,
        "sparsity": pb.run.manifest["sparsity"],
        "parameters": {"dense": pb.dense_parameters, "backbone": pb.parameters},
        "memories": memories,
        "memories_left_out": left_out,
        **extra,
        "files": {f: sha256_file(folder / f) for f in files},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_backbone_manifest(folder: Path) -> dict:
    """Read and check koff_backbone.json of an exported backbone."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST} (not a backbone written by `koff export`)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if m.get("format") != BACKBONE_FORMAT:
        raise ArtifactError(f"{path}: field 'format' must be {BACKBONE_FORMAT!r}, got {m.get('format')!r}")
    if not isinstance(m.get("format_version"), int) or m["format_version"] > BACKBONE_FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported format_version {m.get('format_version')!r}")
    m.setdefault("export_format", "hf")  # version 1 wrote only the hf layout
    if m["export_format"] not in EXPORT_FORMATS:
        raise ArtifactError(f"{path}: field 'export_format' must be one of {list(EXPORT_FORMATS)}, "
                            f"got {m['export_format']!r}")
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
