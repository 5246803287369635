import pytest
import torch

from koff.gates import NeuronGates
from koff.memory import KVMemory, lora_config
from koff.model import KoffModel, lm_loss

from conftest import ARCHS, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_memory_from_tokens_equals_real_prefix(arch):
    """A KV memory initialised from tokens t gives the same next-token logits as feeding t."""
    km = KoffModel(tiny_model(arch))
    t = torch.randint(3, 150, (7,))
    x = torch.randint(3, 150, (2, 20))  # 7 + 20 tokens: longer than gemma3's 16-token sliding window
    k, v = km.capture_kv(t)
    km.add_memory("d", kv=KVMemory(k, v))
    with torch.no_grad():
        with_memory = km(x, memory="d")
        full = km.model(input_ids=torch.cat([t[None].expand(2, -1), x], dim=1)).logits[:, t.numel():]
        bare = km(x)
    torch.testing.assert_close(with_memory, full, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(with_memory, bare, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kv_memory_with_left_padding(arch):
    """Left-padded rows score like unpadded ones (positions continue after the memory)."""
    km = KoffModel(tiny_model(arch))
    t = torch.randint(3, 150, (5,))
    k, v = km.capture_kv(t)
    km.add_memory("d", kv=KVMemory(k, v))
    x = torch.randint(3, 150, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        a = km(x, memory="d")
        b = km(padded, memory="d", attention_mask=mask)[:, 3:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_memories_in_one_batch_match_single_rows(arch):
    """Each row of a mixed batch gets its own LoRA delta and KV prefix (different lengths too)."""
    km = KoffModel(tiny_model(arch))
    torch.manual_seed(1)
    for name, m in (("m1", 4), ("m2", 7)):
        k, v = km.capture_kv(torch.randint(3, 150, (m,)))
        km.add_memory(name, lora=lora_config(4), kv=KVMemory(k + 0.1 * torch.randn_like(k), v))
    with torch.no_grad():  # make the LoRA deltas non-zero and different
        for n, p in km.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    x = torch.randint(3, 150, (3, 8))
    names = ["m1", "m2", None]
    with torch.no_grad():
        mixed = km(x, memory=names)
        for i, n in enumerate(names):
            single = km(x[i: i + 1], memory=n)
            torch.testing.assert_close(mixed[i: i + 1], single, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(mixed[0], mixed[1], atol=1e-3)


def test_sink_tokens_never_train():
    km = KoffModel(tiny_model("llama"))
    k, v = km.capture_kv(torch.randint(3, 150, (6,)))
    mem = KVMemory(k, v, num_frozen=2)
    km.add_memory("d", kv=mem)
    x = torch.randint(3, 150, (2, 10))
    lm_loss(km(x, memory="d"), x).backward()
    assert mem.keys.grad[:, :, :2].abs().sum() == 0
    assert mem.keys.grad[:, :, 2:].abs().sum() > 0
    assert mem.values.grad[:, :, :2].abs().sum() == 0


def test_gradients_reach_only_gates_and_the_active_memory():
    km = KoffModel(tiny_model("qwen2"), NeuronGates.for_model(tiny_model("qwen2")))
    for name in ("m1", "m2"):
        k, v = km.capture_kv(torch.randint(3, 150, (4,)))
        km.add_memory(name, lora=lora_config(4), kv=KVMemory(k, v, num_frozen=0))
    x = torch.randint(3, 150, (2, 10))
    km.gates.resample()
    lm_loss(km(x, memory="m2"), x).backward()
    with_grad = {n for n, p in km.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("gates.") for n in with_grad)
    assert any(".m2." in n and "lora_B" in n for n in with_grad)
    assert {"kv.m2.keys", "kv.m2.values"} <= with_grad
    assert not any(".m1." in n or n.startswith("kv.m1.") for n in with_grad)
    frozen = [n for n, p in km.model.named_parameters() if "lora_" not in n]
    assert frozen and not any(n in with_grad for n in frozen)
    assert all(not p.requires_grad for n, p in km.model.named_parameters() if "lora_" not in n)


def test_memory_validation():
    km = KoffModel(tiny_model("llama"))
    k, v = km.capture_kv(torch.randint(3, 150, (4,)))
    with pytest.raises(ValueError, match="expected"):
        km.add_memory("x", kv=KVMemory(k[:, :1], v[:, :1]))
    km.add_memory("x", kv=KVMemory(k, v))
    with pytest.raises(ValueError, match="already exists"):
        km.add_memory("x", kv=KVMemory(k, v))
    with pytest.raises(KeyError, match="no memory named"):
        km(torch.randint(3, 150, (1, 4)), memory="nope")
    with pytest.raises(ValueError, match="must both be"):
        KVMemory(k, v[0])
    for bad in ("a", "lora", "", "x/y", ".hidden", "__base__"):
        with pytest.raises(ValueError, match="invalid memory name"):
            km.add_memory(bad, kv=KVMemory(k, v))


def test_fast_memory_switch_equals_peft_set_adapter():
    km = KoffModel(tiny_model("llama"))
    for name in ("m1", "m2", "m3"):
        km.add_memory(name, lora=lora_config(4))
    with torch.no_grad():
        for n, p in km.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    x = torch.randint(3, 150, (2, 8))
    with torch.no_grad():
        fast = {n: km(x, memory=n) for n in ("m2", "m1", "m3", "m2")}
    # every adapter stays trainable after switching
    assert all(p.requires_grad for n in ("m1", "m2", "m3") for p in km.lora_parameters(n))
    with torch.no_grad():
        for n in ("m1", "m2", "m3"):
            km.model.set_adapter(n)  # peft's own switch
            torch.testing.assert_close(km.model(input_ids=x).logits, fast[n], atol=0, rtol=0)
    assert not torch.allclose(fast["m1"], fast["m2"])
