"""Writes tests/data/legacy-0.1/: a tiny base model, a run decomposed from it, that run's hf
export, and the logits they give, all by the koff of 2026-12-06 (before the package was split
into layers). tests/test_legacy.py checks that today's koff still loads them and gives the same
logits. Run once from the repository root: `python tests/data/make_legacy_fixture.py` (kept for
the record; re-running it would write a fixture of the koff running it, not of the old one)."""

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import tiny_config_dict, write_domain_files, write_model_folder

from koff import build_model, decompose, export_run, load_backbone, load_run
from koff.config import config_from_dict

OUT = Path(__file__).parent / "legacy-0.1"


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    tmp = Path("/tmp/koff-legacy-fixture")
    shutil.rmtree(tmp, ignore_errors=True)
    model = write_model_folder(OUT / "model", "llama", seed=3)
    data = write_domain_files(tmp / "data", langs=("en", "fr"))
    d = tiny_config_dict(model, data, OUT / "run", langs=("en", "fr"), steps=6)
    d["reference"] = False
    decompose(config_from_dict(d), progress=False)
    export_run(OUT / "run", OUT / "export")
    x = torch.randint(3, 60, (2, 10), generator=torch.Generator().manual_seed(7))
    km, _ = build_model(load_run(OUT / "run"))
    small, _ = load_backbone(OUT / "export")
    with torch.no_grad():
        logits = {"input_ids": x, "run_en": km(x, memory="en"), "run_general": km(x, memory="general"),
                  "run_backbone": km(x, memory=None), "export_backbone": small(input_ids=x).logits}
    save_file({k: v.contiguous() for k, v in logits.items()}, str(OUT / "logits.safetensors"))


if __name__ == "__main__":
    main()
