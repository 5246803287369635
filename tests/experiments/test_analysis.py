import math

import pytest
import torch
from conftest import tiny_model

from koff.experiments.analysis import LapeSettings, activation_probability, enrichment, lape
from koff.model.base_model import gated_mlps

A = range(10, 60)   # tokens of synthetic language A
B = range(60, 110)  # tokens of synthetic language B


def planted_model(arch):
    """Neurons 0-3 of every layer fire only on language A, 4-7 only on B, 8-39 on ~half of all
    tokens, the rest on ~90% of all tokens. Attention is silenced so each MLP sees the embedding."""
    torch.manual_seed(0)
    model = tiny_model(arch, vocab=128)
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.zero_()
        emb[:, 3:] = 0.01 * torch.randn(emb.shape[0], hidden - 3, generator=gen)
        emb[list(A), 0] = 1.0
        emb[list(B), 0] = -1.0
        emb[:, 1] = torch.where(torch.rand(emb.shape[0], generator=gen) < 0.5, 1.0, -1.0)
        emb[:, 2] = torch.where(torch.rand(emb.shape[0], generator=gen) < 0.9, 1.0, -1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
        for mlp in gated_mlps(model):
            mlp.down_proj.weight.zero_()  # every layer's MLP input stays the embedding
            g = mlp.gate_proj.weight
            g.zero_()
            g[0:4, 0] = 5.0
            g[4:8, 0] = -5.0
            g[8:40, 1] = 5.0
            g[40:, 2] = 5.0
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lape_recovers_planted_language_neurons(arch):
    model = planted_model(arch)
    gen = torch.Generator().manual_seed(2)
    text = {lang: torch.tensor(list(r))[torch.randint(0, 50, (8, 32), generator=gen)] for lang, r in (("A", A), ("B", B))}
    probs = torch.stack([activation_probability(model, [text[l][:4], text[l][4:]]) for l in ("A", "B")], -1)
    assert probs.shape == (2, 48, 2)
    result = lape(probs, ["A", "B"], LapeSettings(specific_rate=16 / 96, activation_quantile=0.9, general_rate=8 / 96))
    for layer in range(2):
        assert result.specific[layer, :, 0].nonzero().squeeze(1).tolist() == [0, 1, 2, 3]
        assert result.specific[layer, :, 1].nonzero().squeeze(1).tolist() == [4, 5, 6, 7]
        assert not result.general[layer, :40].any()  # general neurons come from the always-on group
    assert int(result.general.sum()) == 8


def test_enrichment_matches_hand_computation():
    pruned = torch.tensor([1] * 30 + [0] * 70 + [1] * 10 + [0] * 90, dtype=torch.bool)
    selected = torch.tensor([1] * 100 + [0] * 100, dtype=torch.bool)
    e = enrichment(pruned, selected)
    a, b, c, d = 30, 70, 10, 90
    assert e["table"] == {"selected_pruned": a, "selected_kept": b, "other_pruned": c, "other_kept": d}
    assert e["odds_ratio"] == pytest.approx(a * d / (b * c))
    half = 1.959963984540054 * math.sqrt(1 / a + 1 / b + 1 / c + 1 / d)
    assert e["ci95"][0] == pytest.approx(math.exp(math.log(a * d / (b * c)) - half))
    assert e["ci95"][1] == pytest.approx(math.exp(math.log(a * d / (b * c)) + half))
    # Fisher's exact test by hand: hypergeometric tail probabilities (two-sided, as scipy sums them)
    from math import comb

    n, k, draws = 200, 40, 100

    def pmf(x):
        return comb(k, x) * comb(n - k, draws - x) / comb(n, draws)

    p_obs = pmf(a)
    hand = sum(pmf(x) for x in range(0, k + 1) if pmf(x) <= p_obs * (1 + 1e-7))
    assert e["fisher_p"] == pytest.approx(hand, rel=1e-6)
    assert e["pruned_share_selected"] == 0.3 and e["pruned_share_other"] == 0.1


def test_enrichment_with_an_empty_cell_uses_haldane():
    pruned = torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool)
    selected = torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool)
    e = enrichment(pruned, selected)
    assert e["haldane_corrected"] and e["odds_ratio"] == pytest.approx((2.5 * 4.5) / (0.5 * 0.5))


def test_enrichment_without_selected_neurons_has_no_odds_ratio():
    # A layer with no language-specific neuron: the 0.5 correction alone would make up a ratio.
    e = enrichment(torch.tensor([1, 0, 0, 0], dtype=torch.bool), torch.zeros(4, dtype=torch.bool))
    assert e["odds_ratio"] is None and e["ci95"] is None and e["fisher_p"] != e["fisher_p"]
    assert e["table"]["other_pruned"] == 1 and e["pruned_share_selected"] is None
    # ... nor a layer where nothing was pruned (Fisher's p is then 1: the table is fixed by its margins)
    e = enrichment(torch.zeros(4, dtype=torch.bool), torch.tensor([1, 1, 0, 0], dtype=torch.bool))
    assert e["odds_ratio"] is None and e["fisher_p"] == 1.0


def test_analyze_run_writes_tables_and_plots(llama_folder, data_files, tmp_path):
    import json

    from conftest import tiny_config_dict

    from koff.cli import main
    from koff.config.recipe import config_from_dict
    from koff.training.pipeline import decompose

    cfg = config_from_dict(tiny_config_dict(llama_folder, data_files, tmp_path / "run", steps=3))
    cfg.reference = False
    decompose(cfg, progress=False)
    assert main(["analyze", str(tmp_path / "run"), "--tokens", "256", "--specific-rate", "0.1",
                 "--general-rate", "0.1"]) == 0
    out = json.loads((tmp_path / "run" / "analysis" / "specialization.json").read_text())
    assert set(out["masks"]) == {"koff", "magnitude", "wanda-sp"}
    assert out["counts"]["general"] == round(0.1 * 96)
    for r in out["masks"].values():
        assert r["pruned_fraction"] == pytest.approx(24 / 96)
        assert len(r["per_layer"]) == 2 and set(r["per_language"]) == {"en", "fr"}
    for f in ("specialization.md", "specific_per_layer.png", "odds_ratio_per_layer.png"):
        assert (tmp_path / "run" / "analysis" / f).stat().st_size > 0
