"""`koff export --format gguf`: llama.cpp (through llama-cpp-python, which builds the llama.cpp
it vendors) loads the backbone GGUF and its LoRA adapters and reproduces koff's masked backbone,
backbone + LoRA half, tokenization and greedy text.

F32_TOL: llama.cpp and torch both compute in float32, but sum in different orders (ggml's SIMD dot
products, its own rsqrt / exp / RoPE sin-cos), so logits differ by a few float32 roundings per
layer: 3.4e-6 measured here (|logit| <= 5). 1e-4 leaves a 30x margin and is still far below what
one wrong neuron, a missing bias or an un-permuted q/k head changes (>1e-2 here).
"""

import json

import numpy as np
import pytest
import torch
from conftest import write_model_folder
from export_helpers import import_llama_cpp, koff_lora_only, make_run, max_abs, write_byte_level_model

from koff.core.errors import ArtifactError
from koff.evaluation.generation import generate
from koff.export import export_run, read_backbone_manifest
from koff.export.memories import check_lora_for_engine
from koff.storage.run_dir import MemoryRecord, build_model, load_run

F32_TOL = 1e-4
TEXTS = ["le chat est sur le tapis et le chien court au parc",
         "The cat sat on a mat, and the dog ran to the park 42 times!",
         "el perro corre al parque con una pelota\n\n  roja"]


@pytest.fixture(scope="module")
def llama_cpp():
    return import_llama_cpp()


def _llm(llama_cpp, path, lora=None, n_ctx=128):
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=1, seed=0,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False,
                           lora_path=None if lora is None else str(lora))


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)]))


def _koff_logits(km, ids, memory=None):
    with torch.no_grad():
        return km(torch.tensor([ids]), memory=memory)[0]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tmp_path_factory, data_files):
    """A tiny run on a byte-level tokenizer, exported in f32, f16 and q8_0."""
    root = tmp_path_factory.mktemp(f"gguf-{request.param}")
    folder = write_byte_level_model(root / "model", request.param, seed=3)
    run = make_run(root, folder, data_files)
    outs = {}
    for outtype in ("f32", "f16", "q8_0"):
        outs[outtype] = export_run(run, root / f"out-{outtype}", format="gguf", outtype=outtype)
    return run, outs


def test_backbone_logits_match_koff_in_f32(exported, llama_cpp):
    run_dir, outs = exported
    km, tok = build_model(load_run(run_dir), memories=[])
    llm = _llm(llama_cpp, outs["f32"] / "model.gguf")
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        want = _koff_logits(km, ids)
        assert max_abs(_llama_logits(llm, ids), want) <= F32_TOL
    # the comparison can fail: the dense base model is far from the masked backbone
    km.gates.mode = "off"
    assert max_abs(_llama_logits(llm, ids), _koff_logits(km, ids)) > 100 * F32_TOL


def test_lora_adapter_matches_backbone_plus_lora_in_f32(exported, llama_cpp):
    run_dir, outs = exported
    km, tok = koff_lora_only(run_dir, "fr")
    llm = _llm(llama_cpp, outs["f32"] / "model.gguf", lora=outs["f32"] / "memories" / "fr" / "lora.gguf")
    ids = tok(TEXTS[0])["input_ids"]
    got = _llama_logits(llm, ids)
    assert max_abs(got, _koff_logits(km, ids, "fr")) <= F32_TOL
    assert max_abs(got, _koff_logits(km, ids)) > 100 * F32_TOL  # the adapter is applied


@pytest.mark.parametrize("memory", [None, "fr"])
def test_greedy_text_equal_for_20_tokens(exported, llama_cpp, memory):
    """koff's own greedy generation and llama.cpp's give the same 20 tokens, hence the same text
    (llama.cpp's bytes decoded as the HF byte-level decoder does, replacing partial UTF-8)."""
    run_dir, outs = exported
    km, tok = koff_lora_only(run_dir, "fr")
    lora = None if memory is None else outs["f32"] / "memories" / memory / "lora.gguf"
    llm = _llm(llama_cpp, outs["f32"] / "model.gguf", lora=lora)
    prompt = "le chat est sur"
    want = generate(km, tok, [prompt], memory, max_new_tokens=20)[0]
    prompt_ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
    assert prompt_ids == tok(prompt, add_special_tokens=False)["input_ids"]
    new = []
    for t in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if t == llm.token_eos() or len(new) == 20:
            break
        new.append(t)
    assert len(new) == 20, "no EOS expected within 20 tokens for this prompt"
    assert llm.detokenize(new).decode("utf-8", errors="replace") == want
    assert tok.decode(new) == want


def test_tokenizer_is_included(exported, llama_cpp):
    run_dir, outs = exported
    _, tok = build_model(load_run(run_dir), memories=[])
    llm = llama_cpp.Llama(str(outs["f16"] / "model.gguf"), vocab_only=True, verbose=False)
    for text in TEXTS + ["<s>hello</s>", "çà et là — déjà vu"]:
        ids = tok(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, text
        assert llm.detokenize(ids, special=True).decode() == tok.decode(ids)
    assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id


def test_lower_outtypes_load_and_stay_close(exported, llama_cpp):
    """f16 and q8_0 are lossy: they must load and stay close to f32 (an un-permuted head or a
    misplaced neuron moves logits by their whole range); FFN widths are padded to 16 (f16) and to
    q8_0's blocks of 32."""
    run_dir, outs = exported
    km, tok = build_model(load_run(run_dir), memories=[])
    ids = tok(TEXTS[1])["input_ids"]
    want = _koff_logits(km, ids)
    scale = float(want.abs().max())
    for outtype, bound in (("f16", 0.02), ("q8_0", 0.1)):
        got = _llama_logits(_llm(llama_cpp, outs[outtype] / "model.gguf"), ids)
        assert max_abs(got, want) <= bound * scale, outtype
    m = read_backbone_manifest(outs["q8_0"])
    assert all(w % 32 == 0 and w >= k for w, k in zip(m["stored_intermediate_sizes"], m["intermediate_sizes"]))
    assert m["tensor_types"]["q8_0"] > 0
    m = read_backbone_manifest(outs["f16"])
    assert all(w % 16 == 0 and w >= k for w, k in zip(m["stored_intermediate_sizes"], m["intermediate_sizes"]))
    sizes = {o: (outs[o] / "model.gguf").stat().st_size for o in outs}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]


def test_manifest_records_what_memories_carry(exported):
    _, outs = exported
    m = json.loads((outs["f16"] / "koff_backbone.json").read_text())
    assert m["export_format"] == "gguf" and m["gguf_arch"] == "deci" and m["outtype"] == "f16"
    assert m["memories"]["fr"]["carries"] == ["lora"] and m["memories"]["fr"]["kv_dropped"] is True
    assert sorted(m["memories"]) == ["en", "fr", "general"] and m["memories_left_out"] == {}


def test_layer_with_every_neuron_pruned_gets_zero_neurons(tmp_path, data_files, llama_cpp):
    """llama.cpp will not load a layer of FFN width 0 (zero-size tensors), so such a layer is
    stored with exact-zero neurons (16 of them: f32 widths are padded to multiples of 16), which
    change nothing."""
    from koff.core.files import sha256_file
    from koff.storage.run_dir import save_mask

    folder = write_byte_level_model(tmp_path / "model")
    run_dir = make_run(tmp_path, folder, data_files, steps=2)
    run = load_run(run_dir)
    keep = [k.clone() for k in run.keep]
    keep[0][:] = False
    save_mask(run_dir / "backbone", keep, run.log_alpha)
    m = json.loads((run_dir / "koff.json").read_text())
    for f in ("backbone/mask.safetensors", "backbone/gates.safetensors"):
        m["files"][f] = sha256_file(run_dir / f)
    (run_dir / "koff.json").write_text(json.dumps(m))
    out = export_run(run_dir, tmp_path / "out", format="gguf", outtype="f32")
    assert read_backbone_manifest(out)["stored_intermediate_sizes"][0] == 16
    km, tok = build_model(load_run(run_dir), memories=[])
    ids = tok(TEXTS[0])["input_ids"]
    assert max_abs(_llama_logits(_llm(llama_cpp, out / "model.gguf"), ids), _koff_logits(km, ids)) <= F32_TOL


def test_flap_bias_is_carried(tmp_path, data_files, llama_cpp):
    folder = write_byte_level_model(tmp_path / "model")
    run_dir = make_run(tmp_path, folder, data_files, steps=2, top={"mask": "flap"}, mask_scope="layer")
    assert load_run(run_dir).bias is not None
    out = export_run(run_dir, tmp_path / "out", format="gguf", outtype="f32")
    km, tok = build_model(load_run(run_dir), memories=[])
    ids = tok(TEXTS[1])["input_ids"]
    assert max_abs(_llama_logits(_llm(llama_cpp, out / "model.gguf"), ids), _koff_logits(km, ids)) <= F32_TOL


def test_llama3_rope_scaling_is_carried(tmp_path, llama_cpp):
    """Llama-3 RoPE scaling becomes llama.cpp's rope_freqs tensor (checked on the dense model, at
    positions past original_max_position_embeddings where the scaling matters)."""
    from export_helpers import byte_level_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    from koff.export.gguf import write_gguf_model

    tok = byte_level_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    write_gguf_model(model, tok, tmp_path / "m.gguf", "f32")
    ids = tok(" ".join(TEXTS * 2))["input_ids"]
    assert len(ids) > 64
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0]
    assert max_abs(_llama_logits(_llm(llama_cpp, tmp_path / "m.gguf", n_ctx=512), ids), want) <= F32_TOL


# -- what llama.cpp cannot represent is refused at export time ------------------------------------
@pytest.mark.parametrize("arch", ["qwen3", "gemma", "gemma3"])
def test_refuses_architectures_without_a_mapping(arch, tmp_path, data_files):
    folder = write_byte_level_model(tmp_path / "model", arch)
    run_dir = make_run(tmp_path, folder, data_files, steps=2)
    with pytest.raises(ArtifactError, match=f"model_type '{arch}(_text)?' has no llama.cpp mapping"):
        export_run(run_dir, tmp_path / "out", format="gguf")
    assert not (tmp_path / "out").exists()


def test_refuses_a_tokenizer_llama_cpp_cannot_split_like(tmp_path, llama_folder, data_files):
    """conftest's tiny tokenizer splits on whitespace (not byte-level): llama.cpp would tokenize
    differently, so the export stops instead of writing a wrong tokenizer."""
    run_dir = make_run(tmp_path, llama_folder, data_files, steps=2)
    with pytest.raises(ArtifactError, match="not a byte-level BPE|pre_tokenizer"):
        export_run(run_dir, tmp_path / "out", format="gguf")
    assert not (tmp_path / "out").exists()


def test_refuses_lora_targets_and_features_llama_cpp_lacks(tmp_path):
    from koff.model.memory import LoraState

    rec = MemoryRecord("m", {"lora": LoraState({"r": 4, "lora_alpha": 8, "bias": "none"},
                                               {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32),
                                                "base_model.model.lm_head.lora_B.weight": torch.zeros(160, 4)})})
    with pytest.raises(ArtifactError, match=r"LoRA targets \['lm_head'\] have no llama.cpp counterpart"):
        check_lora_for_engine(rec, "gguf", tmp_path)
    ok = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}
    for field, value, message in (("use_dora", True, "use_dora"), ("bias", "all", "'bias' is 'all'"),
                                  ("alpha_pattern", {"q_proj": 4}, "alpha_pattern")):
        bad = MemoryRecord("m", {"lora": LoraState({"r": 4, "lora_alpha": 8, field: value}, ok)})
        with pytest.raises(ArtifactError, match=message):
            check_lora_for_engine(bad, "gguf", tmp_path)


def test_kv_only_memory_is_left_out_and_said_so(tmp_path, data_files):
    folder = write_byte_level_model(tmp_path / "model")
    run_dir = make_run(tmp_path, folder, data_files, steps=2, top={"memory": {"lora_rank": 0, "kv_tokens": 4}})
    out = export_run(run_dir, tmp_path / "out", format="gguf")
    m = read_backbone_manifest(out)
    assert m["memories"] == {} and set(m["memories_left_out"]) == {"en", "fr", "general"}
    assert "no per-request KV prefix" in m["memories_left_out"]["fr"]


def test_outtype_needs_gguf(tmp_path, llama_folder, data_files):
    from koff.core.errors import ConfigError

    run_dir = make_run(tmp_path, llama_folder, data_files, steps=2)
    with pytest.raises(ConfigError, match="--outtype applies to --format gguf only"):
        export_run(run_dir, tmp_path / "out", format="hf", outtype="q8_0")
    with pytest.raises(ConfigError, match="--outtype must be one of"):
        export_run(run_dir, tmp_path / "out", format="gguf", outtype="q4_0")


def test_dense_model_exports_too(tmp_path):
    """The benchmark's dense reference goes through the same writer (every layer at full width)."""
    from transformers import AutoModelForCausalLM

    from koff.export.gguf import write_gguf_model

    folder = write_byte_level_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    from transformers import AutoTokenizer

    write_gguf_model(model, AutoTokenizer.from_pretrained(folder), tmp_path / "dense.gguf", "f16")
    import gguf

    r = gguf.GGUFReader(str(tmp_path / "dense.gguf"))
    assert list(r.fields["deci.feed_forward_length"].contents()) == [48, 48]


def test_write_model_folder_default_tokenizer_is_not_byte_level(tmp_path):
    """Guard for the test above: conftest's tokenizer really is the non-byte-level kind."""
    from transformers import AutoTokenizer

    folder = write_model_folder(tmp_path / "m")
    spec = json.loads(AutoTokenizer.from_pretrained(folder).backend_tokenizer.to_str())
    assert spec["pre_tokenizer"]["type"] != "ByteLevel"
