"""KoffModel: gradient checkpointing keeps the KV prefix, the per-call routing and the gates, and
saves activation memory."""

import pytest
import torch
from conftest import tiny_model

from koff.model.gates import NeuronGates
from koff.model.koff_model import KoffModel, lm_loss
from koff.model.memory import KVMemory, lora_config


def _km(arch):
    base = tiny_model(arch)
    km = KoffModel(base, NeuronGates.for_model(base))
    for name in ("a", "b"):
        k, v = km.capture_kv(torch.randint(3, 150, (4,)))
        km.add_memory(name, lora=lora_config(4), kv=KVMemory(k + 0.1 * torch.randn_like(k), v, num_frozen=0))
    with torch.no_grad():
        for n, p in km.parts.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return km


def _step(km, x, memory, noise_seed=3):
    km.zero_grad(set_to_none=True)
    km.gates.resample(torch.Generator().manual_seed(noise_seed))
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(km(x, memory=memory), x)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in km.named_parameters() if p.grad is not None}
    return loss.item(), grads, saved[0]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gradient_checkpointing_same_gradients_less_memory(arch):
    km = _km(arch)
    x = torch.randint(3, 150, (2, 24))  # gemma3: longer than its 16-token sliding window
    for memory in ("a", ["a", "b"]):
        loss, grads, plain = _step(km, x, memory)
        km.enable_gradient_checkpointing()
        loss_ckpt, grads_ckpt, ckpt = _step(km, x, memory)
        km.disable_gradient_checkpointing()
        assert loss_ckpt == pytest.approx(loss, rel=1e-6)
        assert set(grads_ckpt) == set(grads) and any(n.startswith("parts.kv.") for n in grads)
        for n in grads:
            torch.testing.assert_close(grads_ckpt[n], grads[n], atol=1e-6, rtol=1e-5, msg=n)
        assert ckpt < 0.6 * plain, (ckpt, plain)
