import json

import pytest
import torch
from conftest import tiny_config_dict
from safetensors.torch import save_file

from koff.config.recipe import config_from_dict
from koff.core.errors import ArtifactError
from koff.export import export_run, load_backbone
from koff.model.memory import KVMemory
from koff.storage.run_dir import build_model, load_run
from koff.training.pipeline import decompose


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tmp_path_factory, llama_folder, qwen_folder, data_files):
    folder = {"llama": llama_folder, "qwen2": qwen_folder}[request.param]
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    cfg = config_from_dict(tiny_config_dict(folder, data_files, root / "run", steps=4))
    cfg.reference = False
    decompose(cfg, progress=False)
    export_run(root / "run", root / "out")
    return root / "run", root / "out"


def _x():
    return torch.randint(3, 60, (2, 10))


def test_exported_backbone_equals_masked_model(exported):
    run_dir, out = exported
    km, _ = build_model(load_run(run_dir))
    small, _ = load_backbone(out)
    x = _x()
    with torch.no_grad():
        want = km(x)
        got = small(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    widths = [layer.mlp.gate_proj.out_features for layer in small.model.layers]
    run = load_run(run_dir)
    assert widths == [int(k.sum()) for k in run.keep]
    assert json.loads((out / "koff_backbone.json").read_text())["intermediate_sizes"] == widths
    # physically smaller
    params = json.loads((out / "koff_backbone.json").read_text())["parameters"]
    assert sum(p.numel() for p in small.parameters()) == params["backbone"]
    removed = sum(int((~k).sum()) for k in run.keep) * 3 * 32
    assert params["dense"] - params["backbone"] == removed > 0


def test_plain_peft_loads_the_sliced_lora(exported):
    """peft.PeftModel.from_pretrained on the exported backbone + koff's KV prefix = koff's masked
    model with that memory."""
    from peft import PeftModel

    from koff.core.compat.transformers import cache_kwarg
    from koff.model.memory import prefix_cache

    run_dir, out = exported
    km, _ = build_model(load_run(run_dir))
    small, _ = load_backbone(out)
    peft_model = PeftModel.from_pretrained(small, out / "memories" / "fr")
    x = _x()
    stored = load_run(run_dir).memories["fr"].parts["kv"]
    kv = KVMemory(stored.keys, stored.values)
    cache, _, lens = prefix_cache([kv, kv], small.config)
    pos = torch.arange(x.shape[1])[None] + lens[:, None]
    with torch.no_grad():
        got = peft_model(input_ids=x, position_ids=pos, use_cache=True, **{cache_kwarg(small): cache}).logits
        want = km(x, memory="fr")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")  # peft 0.21's CARTRIDGE passes the old name
def test_kv_half_as_peft_cartridge(exported):
    """The KV half loads with plain peft (CARTRIDGE) and equals koff's KV memory on the backbone."""
    from peft import PeftModel

    run_dir, out = exported
    run = load_run(run_dir)
    km, _ = build_model(run, memories=[])
    rec = run.memories["en"]
    kv = rec.parts["kv"]
    km.add_memory("en", kv=KVMemory(kv.keys, kv.values, kv.num_frozen))
    small, _ = load_backbone(out)
    cart = PeftModel.from_pretrained(small, out / "memories" / "en" / "kv")
    x = _x()
    with torch.no_grad():
        got = cart(input_ids=x).logits
        want = km(x, memory="en")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_layer_with_every_neuron_pruned(tmp_path, llama_folder, data_files):
    cfg = config_from_dict(tiny_config_dict(llama_folder, data_files, tmp_path / "run", steps=2))
    cfg.reference = False
    decompose(cfg, progress=False)
    # rewrite the mask: layer 0 loses every neuron
    from koff.core.files import sha256_file
    from koff.storage.run_dir import save_mask

    run = load_run(tmp_path / "run")
    keep = [k.clone() for k in run.keep]
    keep[0][:] = False
    save_mask(tmp_path / "run" / "backbone", keep, run.log_alpha)
    m = json.loads((tmp_path / "run" / "koff.json").read_text())
    for f in ("backbone/mask.safetensors", "backbone/gates.safetensors"):
        m["files"][f] = sha256_file(tmp_path / "run" / f)
    (tmp_path / "run" / "koff.json").write_text(json.dumps(m))
    export_run(tmp_path / "run", tmp_path / "out")
    small, _ = load_backbone(tmp_path / "out")
    assert small.model.layers[0].mlp.gate_proj.out_features == 0
    km, _ = build_model(load_run(tmp_path / "run"))
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=x).logits, km(x), atol=1e-5, rtol=1e-5)


def test_load_backbone_errors(exported, tmp_path):
    with pytest.raises(ArtifactError, match="no koff_backbone.json"):
        load_backbone(tmp_path)
    import shutil

    _, out = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    save_file({"x": torch.zeros(1)}, str(bad / "kept_neurons.safetensors"))
    with pytest.raises(ArtifactError, match="kept_neurons.safetensors: contents changed"):
        load_backbone(bad)


def test_export_refuses_existing_output(exported):
    run_dir, out = exported
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ArtifactError, match="already exists"):
        export_run(run_dir, out)
    assert (out / "model.safetensors").read_bytes() == before
