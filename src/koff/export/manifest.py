"""koff_backbone.json: what an export folder holds, where it came from, and the sha256 of its files.

Every export format writes one; `read_backbone_manifest` checks it (fields, and that no listed file
changed since koff wrote it).
"""

from __future__ import annotations

import json
from pathlib import Path

from koff.core.errors import ArtifactError
from koff.core.files import inside, read_json, sha256_file
from koff.export.prune import PrunedBackbone
from koff.storage.manifests import BackboneManifest, ExportedMemory

MANIFEST = "koff_backbone.json"


def write_manifest(folder: Path, out: Path, pb: PrunedBackbone, export_format: str, files: list[str],
                   memories: dict[str, dict], left_out: dict[str, str], stored_widths: list[int] | None = None,
                   **extra) -> BackboneManifest:
    """Write koff_backbone.json into `folder` (the temporary directory that becomes `out`)."""
    run = pb.run.meta
    manifest = BackboneManifest(
        export_format=export_format, source_run=str(Path(pb.run.path).resolve()), base_model=run.base_model,
        intermediate_sizes=tuple(pb.widths),
        stored_intermediate_sizes=tuple(stored_widths if stored_widths is not None else pb.widths),
        down_proj_bias=pb.down_bias, target_sparsity=run.target_sparsity, sparsity=run.sparsity,
        parameters={"dense": pb.dense_parameters, "backbone": pb.parameters},
        memories={name: ExportedMemory.from_dict(m, f"{MANIFEST}: memories.{name}") for name, m in memories.items()},
        memories_left_out=dict(left_out), extra=dict(extra),
        files={f: sha256_file(folder / f) for f in files})
    (folder / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
    return manifest


def read_backbone_manifest(folder: Path) -> BackboneManifest:
    """Read and check koff_backbone.json of an exported backbone: every field, and that no listed
    file changed since koff wrote it."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST} (not a backbone written by `koff export`)")
    m = BackboneManifest.from_dict(read_json(path), str(path))
    for rel, digest in m.files.items():
        p = inside(Path(folder), rel, str(path))
        if not p.is_file():
            raise ArtifactError(f"{path}: lists {rel}, which is missing")
        if sha256_file(p) != digest:
            raise ArtifactError(f"{p}: contents changed since koff wrote it (sha256 differs from {path})")
    return m
