"""One-shot pruning baselines: each scoring rule removes exactly the requested count, and exactly
the lowest-scoring neurons."""

import pytest
import torch
from conftest import tiny_config_dict, tiny_model

from koff.config.recipe import config_from_dict
from koff.export import export_run, load_backbone
from koff.model.gates import topk_keep_mask
from koff.model.importance import activation_stats, flap_scores, magnitude_scores, neuron_scores, wanda_sp_scores
from koff.storage.run_dir import build_model, load_run
from koff.training.pipeline import decompose


def _stats(model):
    gen = torch.Generator().manual_seed(0)
    return activation_stats(model, [torch.randint(3, 150, (4, 16), generator=gen) for _ in range(3)])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["magnitude", "wanda-sp", "flap"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_scores_prune_exact_count_of_lowest(arch, kind, scope):
    model = tiny_model(arch)
    stats = _stats(model)
    scores = neuron_scores(kind, model, stats)
    keep = topk_keep_mask(scores, 0.3, scope=scope)
    removed = sum(int((~k).sum()) for k in keep)
    if scope == "global":
        assert removed == round(0.3 * 96)
        flat, kept = torch.cat(scores), torch.cat(keep)
        assert float(flat[~kept].max()) <= float(flat[kept].min())
    else:
        for s, k in zip(scores, keep):
            assert int((~k).sum()) == round(0.3 * 48)
            assert float(s[~k].max()) <= float(s[k].min())


def test_score_definitions():
    model = tiny_model("llama")
    stats = _stats(model)
    mlp = model.model.layers[1].mlp
    j = 5
    mag = mlp.gate_proj.weight[j].abs().sum() + mlp.up_proj.weight[j].abs().sum() + mlp.down_proj.weight[:, j].abs().sum()
    assert float(magnitude_scores(model)[1][j]) == pytest.approx(float(mag), rel=1e-5)
    # recompute the down_proj inputs directly
    xs = []
    h = mlp.down_proj.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=torch.randint(3, 150, (4, 16), generator=gen))
    h.remove()
    x = torch.cat(xs).double()[:, j]
    w = mlp.down_proj.weight[:, j].double()
    assert float(wanda_sp_scores(model, stats)[1][j]) == pytest.approx(float(x.norm() * w.abs().sum()), rel=1e-6)
    assert float(flap_scores(model, stats)[1][j]) == pytest.approx(float(x.var() * w.pow(2).sum()), rel=1e-6)


@pytest.mark.parametrize("kind", ["magnitude", "wanda-sp", "flap"])
def test_oneshot_runs(kind, llama_folder, data_files, tmp_path):
    d = tiny_config_dict(llama_folder, data_files, tmp_path / "run", steps=3, mask_scope="layer")
    d["mask"] = kind
    d["reference"] = False
    decompose(config_from_dict(d), progress=False)
    run = load_run(tmp_path / "run")
    assert [int((~k).sum()) for k in run.keep] == [12, 12]
    assert (run.bias is not None) == (kind == "flap")
    # memories trained on the fixed mask (and the default memory the general steps train)
    assert sorted(run.memories) == ["en", "fr", "general"]
    # the exported backbone (with FLAP's bias folded in) equals the masked model
    export_run(tmp_path / "run", tmp_path / "out")
    small, _ = load_backbone(tmp_path / "out")
    km, _ = build_model(run)
    x = torch.randint(3, 60, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=x).logits, km(x), atol=1e-5, rtol=1e-5)


def test_oneshot_without_memories_trains_nothing(llama_folder, data_files, tmp_path):
    d = tiny_config_dict(llama_folder, data_files, tmp_path / "run")
    d.update(mask="wanda-sp", memory={"lora_rank": 0, "kv_tokens": 0})
    decompose(config_from_dict(d), progress=False)
    run = load_run(tmp_path / "run")
    assert run.manifest["metrics"]["steps"] == 0 and not run.memories
    assert not (tmp_path / "run" / "reference").exists()
