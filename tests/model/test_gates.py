import math

import pytest
import torch
from conftest import ARCHS, tiny_model

from koff.model.base_model import gated_mlps
from koff.model.gates import NeuronGates, keep_probability, sample_hard_concrete, sparsity_report, topk_keep_mask


def test_expected_sparsity_matches_monte_carlo():
    torch.manual_seed(0)
    gates = NeuronGates([300, 200], [10, 10], init=[torch.randn(300) * 2, torch.randn(200) * 2 + 1])
    gen = torch.Generator().manual_seed(1)
    n = 4000
    kept = torch.zeros(())
    for _ in range(n):
        kept += sum((sample_hard_concrete(la, gen) > 0).float().sum() for la in gates.log_alpha)
    mc = 1 - float(kept) / (n * 500)
    assert abs(gates.expected_sparsity().item() - mc) < 0.005


def test_expected_sparsity_weights_by_parameters():
    la = [torch.full((10,), 20.0), torch.full((10,), -20.0)]  # layer 0 kept, layer 1 removed
    gates = NeuronGates([10, 10], [1, 3], init=la, log_alpha_range=(-30.0, 30.0))
    assert gates.expected_sparsity().item() == pytest.approx(30 / 40, abs=1e-4)


def test_samples_are_in_unit_interval_and_differentiable():
    la = torch.zeros(1000, requires_grad=True)
    z = sample_hard_concrete(la)
    assert float(z.min()) >= 0 and float(z.max()) <= 1
    assert 0 < float((z == 0).float().mean()) < 1 and float((z == 1).float().mean()) > 0
    z.sum().backward()
    assert la.grad is not None and la.grad.abs().sum() > 0


def test_keep_probability_is_monotone():
    x = torch.linspace(-5, 5, 101)
    p = keep_probability(x)
    assert bool((p[1:] > p[:-1]).all())


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.2, 0.37, 0.5])
def test_topk_mask_removes_exact_count_of_lowest(scope, sparsity):
    torch.manual_seed(3)
    scores = [torch.randn(48), torch.randn(48) + 0.5, torch.randn(96)]
    keep = topk_keep_mask(scores, sparsity, scope=scope)
    if scope == "global":
        assert sum(int((~k).sum()) for k in keep) == round(sparsity * 192)
        flat, kflat = torch.cat(scores), torch.cat(keep)
        if (~kflat).any():
            assert float(flat[~kflat].max()) <= float(flat[kflat].min())
    else:
        for s, k in zip(scores, keep):
            assert int((~k).sum()) == round(sparsity * s.numel())
            if (~k).any():
                assert float(s[~k].max()) <= float(s[k].min())


def test_final_mask_uses_keep_probability_ranking():
    la = [torch.tensor([3.0, -1.0, 2.0, 0.0]), torch.tensor([1.0, 4.0, -2.0, 0.5])]
    gates = NeuronGates([4, 4], [1, 1], init=la)
    keep = gates.final_mask(0.25)
    assert [k.tolist() for k in keep] == [[True, False, True, True], [True, True, False, True]]


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_gate_equals_deleting_the_neuron(arch):
    """Masking neuron j with a zero gate = deleting row j of gate/up and column j of down."""
    model = tiny_model(arch)
    x = torch.randint(3, 100, (2, 12))
    gates = NeuronGates.for_model(model)
    gen = torch.Generator().manual_seed(0)
    keep = [torch.rand(w, generator=gen) > 0.4 for w in gates.widths]
    gates.attach(model)
    gates.set_mask(keep)
    with torch.no_grad():
        masked = model(input_ids=x).logits
    gates.detach()
    with torch.no_grad():
        for mlp, k in zip(gated_mlps(model), keep):
            idx = k.nonzero().squeeze(1)
            for name in ("gate_proj", "up_proj"):
                old = getattr(mlp, name)
                new = torch.nn.Linear(old.in_features, len(idx), bias=old.bias is not None)
                new.weight.copy_(old.weight[idx])
                setattr(mlp, name, new)
            old = mlp.down_proj
            new = torch.nn.Linear(len(idx), old.out_features, bias=old.bias is not None)
            new.weight.copy_(old.weight[:, idx])
            if old.bias is not None:
                new.bias.copy_(old.bias)
            mlp.down_proj = new
        deleted = model(input_ids=x).logits
    torch.testing.assert_close(masked, deleted, atol=1e-5, rtol=1e-5)
    # and the mask matters at all
    gates2 = NeuronGates.for_model(model)
    assert gates2.widths == [int(k.sum()) for k in keep]


def test_gate_modes_off_and_sample():
    model = tiny_model("llama")
    x = torch.randint(3, 100, (1, 8))
    with torch.no_grad():
        dense = model(input_ids=x).logits
    gates = NeuronGates.for_model(model, init=-4.0).attach(model)
    gates.mode = "off"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, dense)
    gates.mode = "sample"
    with pytest.raises(RuntimeError, match="resample"):
        model(input_ids=x)
    gates.resample()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=x).logits, dense)


def test_sparsity_report_counts():
    model = tiny_model("llama")  # hidden 32, width 48, 2 layers, untied embeddings
    keep = [torch.ones(48, dtype=torch.bool), torch.ones(48, dtype=torch.bool)]
    keep[0][:12] = False
    r = sparsity_report(model, keep, 0.125)
    assert r["removed_neurons"] == 12
    assert r["removed_parameters"] == 12 * 3 * 32
    assert r["ffn"] == pytest.approx(12 / 96)
    total = sum(p.numel() for p in model.parameters())
    assert r["total_parameters"] == total
    assert r["global"] == pytest.approx(12 * 96 / total)
    emb = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    assert r["global_without_embeddings"] == pytest.approx(12 * 96 / (total - emb))
    assert math.isclose(r["ffn"], 0.125)
