"""`koff export --format vllm`: the nemotron-nas / DeciLM folder vLLM serves. vLLM needs a GPU, so
here the same folder is loaded in transformers (its remote code) and compared with koff, and the
config is read the way vLLM's DeciLM reads it (vllm/model_executor/models/nemotron_nas.py,
vllm/config/model.py)."""

import json
import re

import pytest
import torch
from conftest import write_model_folder
from export_helpers import koff_logits, koff_lora_only, make_run, max_abs
from safetensors import safe_open

from koff.core.errors import ArtifactError
from koff.export import export_run, read_backbone_manifest
from koff.storage.run_dir import build_model, load_run

TOL = 1e-4
VLLM_DECI_TENSOR = re.compile(r"lm_head\.weight|model\.(embed_tokens|norm)\.weight|model\.layers\.\d+\."
                              r"(input_layernorm\.weight|post_attention_layernorm\.weight|"
                              r"self_attn\.[qkvo]_proj\.(weight|bias)|mlp\.(gate|up|down)_proj\.(weight|bias))")


def _load(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()


def _x():
    return torch.randint(3, 60, (2, 10), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tmp_path_factory, data_files):
    root = tmp_path_factory.mktemp(f"vllm-{request.param}")
    folder = write_model_folder(root / "model", request.param, seed=4)
    run = make_run(root, folder, data_files)
    return run, export_run(run, root / "out", format="vllm")


def test_same_folder_loads_in_transformers_and_matches_backbone(exported):
    run_dir, out = exported
    model = _load(out)
    assert type(model).__name__ == "DeciLMForCausalLM"
    km, _ = build_model(load_run(run_dir))
    x = _x()
    with torch.no_grad():
        got = model(input_ids=x).logits
    assert max_abs(got, koff_logits(km, x)) <= TOL
    km.gates.mode = "off"
    assert max_abs(got, koff_logits(km, x)) > 100 * TOL  # not the dense model


def test_lora_memory_matches_the_lora_half(exported):
    from peft import PeftModel

    run_dir, out = exported
    model = PeftModel.from_pretrained(_load(out), out / "memories" / "fr").eval()
    km, _ = koff_lora_only(run_dir, "fr")
    x = _x()
    with torch.no_grad():
        got = model(input_ids=x).logits
    assert max_abs(got, koff_logits(km, x, "fr")) <= TOL
    assert max_abs(got, koff_logits(km, x)) > 100 * TOL


def test_config_reads_the_way_vllm_reads_it(exported):
    """The attribute reads of vLLM's DeciLMDecoderLayer and ModelConfig, on the config it loads."""
    from transformers import AutoConfig

    run_dir, out = exported
    cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)
    run = load_run(run_dir)
    assert cfg.model_type == "nemotron-nas" and cfg.architectures == ["DeciLMForCausalLM"]
    widths = [int(k.sum()) for k in run.keep]
    for block, width in zip(cfg.block_configs, widths):
        assert not block.attention.no_op and not block.ffn.no_op
        assert not hasattr(block.ffn, "ffn_mult")  # else vLLM rounds the width up to a multiple of 256
        assert block.ffn.intermediate_size == width
        assert cfg.num_attention_heads // block.attention.n_heads_in_group == cfg.num_key_value_heads
    base = run.manifest["base_model"]["model_type"]
    if base == "qwen2":  # q/k/v biases without an o_proj bias
        assert cfg.qkv_bias is True and cfg.attention_bias is False
    else:
        assert not hasattr(cfg, "qkv_bias")
    json.dumps(cfg.to_dict())  # vLLM hashes the config
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(VLLM_DECI_TENSOR.fullmatch(n) for n in names), [n for n in names
                                                                       if not VLLM_DECI_TENSOR.fullmatch(n)]


def test_manifest_and_serve_command(exported):
    _, out = exported
    m = read_backbone_manifest(out)
    assert m["export_format"] == "vllm"
    assert m["memories"]["fr"]["carries"] == ["lora"] and m["memories"]["fr"]["kv_dropped"]
    cmd = m["serve_command"]
    assert cmd.startswith(f"vllm serve {out} --trust-remote-code --enable-lora --max-lora-rank 8 ")
    assert f"fr={out}/memories/fr" in cmd and f"en={out}/memories/en" in cmd


def test_flap_bias_comes_with_zero_gate_and_up_biases(tmp_path, llama_folder, data_files):
    run_dir = make_run(tmp_path, llama_folder, data_files, steps=2, top={"mask": "flap"}, mask_scope="layer")
    out = export_run(run_dir, tmp_path / "out", format="vllm")
    assert json.loads((out / "config.json").read_text())["mlp_bias"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert float(f.get_tensor("model.layers.0.mlp.gate_proj.bias").abs().max()) == 0.0
        assert float(f.get_tensor("model.layers.0.mlp.down_proj.bias").abs().max()) > 0.0
    km, _ = build_model(load_run(run_dir))
    x = _x()
    with torch.no_grad():
        assert max_abs(_load(out)(input_ids=x).logits, koff_logits(km, x)) <= TOL


def test_layer_with_every_neuron_pruned(tmp_path, llama_folder, data_files):
    from koff.core.files import sha256_file
    from koff.storage.run_dir import save_mask

    run_dir = make_run(tmp_path, llama_folder, data_files, steps=2)
    run = load_run(run_dir)
    keep = [k.clone() for k in run.keep]
    keep[1][:] = False
    save_mask(run_dir / "backbone", keep, run.log_alpha)
    m = json.loads((run_dir / "koff.json").read_text())
    for f in ("backbone/mask.safetensors", "backbone/gates.safetensors"):
        m["files"][f] = sha256_file(run_dir / f)
    (run_dir / "koff.json").write_text(json.dumps(m))
    out = export_run(run_dir, tmp_path / "out", format="vllm")
    assert read_backbone_manifest(out)["stored_intermediate_sizes"][1] == 1
    km, _ = build_model(load_run(run_dir))
    x = _x()
    from peft import PeftModel

    with torch.no_grad():
        assert max_abs(_load(out)(input_ids=x).logits, koff_logits(km, x)) <= TOL
        lora, _ = koff_lora_only(run_dir, "en")
        got = PeftModel.from_pretrained(_load(out), out / "memories" / "en")(input_ids=x).logits
        assert max_abs(got, koff_logits(lora, x, "en")) <= TOL


@pytest.mark.parametrize("arch", ["qwen3", "gemma", "gemma3"])
def test_refuses_architectures_without_a_mapping(arch, tmp_path, data_files):
    folder = write_model_folder(tmp_path / "model", arch)
    run_dir = make_run(tmp_path, folder, data_files, steps=2)
    with pytest.raises(ArtifactError, match=f"model_type '{arch}(_text)?' has no DeciLM mapping"):
        export_run(run_dir, tmp_path / "out", format="vllm")
    assert not (tmp_path / "out").exists()


def test_refuses_a_lora_target_vllm_lacks(tmp_path, llama_folder, data_files):
    from koff.export.memories import check_lora_for_engine
    from koff.model.memory import LoraState
    from koff.storage.run_dir import MemoryRecord

    rec = MemoryRecord("m", {"lora": LoraState({"r": 4, "lora_alpha": 8},
                                               {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 160)})})
    with pytest.raises(ArtifactError, match=r"LoRA targets \['embed_tokens'\] have no vLLM counterpart"):
        check_lora_for_engine(rec, "vllm", tmp_path)
