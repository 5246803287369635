"""Memory folders: refitting a LoRA between dense and pruned widths, and the backbone identity."""

import torch

from koff.model.memory import LoraState
from koff.serve.loading import mask_digest


def _state(width: int, hidden: int = 6, rank: int = 2) -> LoraState:
    p = "base_model.model.model.layers.0.mlp."
    t = {f"{p}gate_proj.lora_A.weight": torch.randn(rank, hidden), f"{p}gate_proj.lora_B.weight": torch.randn(width, rank),
         f"{p}down_proj.lora_A.weight": torch.randn(rank, width), f"{p}down_proj.lora_B.weight": torch.randn(hidden, rank),
         "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(rank, hidden)}
    return LoraState({"r": rank, "lora_alpha": 4, "peft_type": "LORA"}, t)


def test_refit_cuts_kept_neurons_and_zero_fills_back():
    keep = [torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)]
    dense = _state(8)
    sliced = dense.fit_ffn(keep, to_sliced=True)
    p = "base_model.model.model.layers.0.mlp."
    assert sliced.tensors[f"{p}gate_proj.lora_B.weight"].shape == (4, 2)
    assert sliced.tensors[f"{p}down_proj.lora_A.weight"].shape == (2, 4)
    torch.testing.assert_close(sliced.tensors[f"{p}gate_proj.lora_B.weight"], dense.tensors[f"{p}gate_proj.lora_B.weight"][keep[0]])
    for k in (f"{p}gate_proj.lora_A.weight", f"{p}down_proj.lora_B.weight",
              "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"):
        assert torch.equal(sliced.tensors[k], dense.tensors[k])
    back = sliced.fit_ffn(keep, to_sliced=False)
    b = back.tensors[f"{p}gate_proj.lora_B.weight"]
    assert torch.equal(b[keep[0]], dense.tensors[f"{p}gate_proj.lora_B.weight"][keep[0]])
    assert not b[~keep[0]].any()
    a = back.tensors[f"{p}down_proj.lora_A.weight"]
    assert torch.equal(a[:, keep[0]], dense.tensors[f"{p}down_proj.lora_A.weight"][:, keep[0]])
    assert not a[:, ~keep[0]].any()


def test_mask_digest_tells_masks_apart():
    a = [torch.tensor([1, 0, 1], dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
    b = [torch.tensor([1, 1, 0], dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
    assert mask_digest(a, (3, 2)) == mask_digest([t.clone() for t in a], (3, 2))
    assert mask_digest(a, (3, 2)) != mask_digest(b, (3, 2))
    assert mask_digest(None, (3, 2)) == mask_digest([torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)], (3, 2))
