import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from koff.evaluation.generation import generate
from koff.model.gates import NeuronGates
from koff.model.koff_model import KoffModel
from koff.model.memory import KVMemory, lora_config


def _model(arch):
    tok = tiny_tokenizer()
    base = tiny_model(arch, vocab=len(tok))
    gates = NeuronGates.for_model(base)
    gates.set_mask([torch.rand(w) > 0.3 for w in gates.widths])
    km = KoffModel(base, gates)
    torch.manual_seed(2)
    for name, m in (("en", 3), ("fr", 6), ("kvonly", 4)):
        k, v = km.capture_kv(torch.randint(3, 60, (m,)))
        lora = None if name == "kvonly" else lora_config(4)
        km.add_memory(name, lora=lora, kv=KVMemory(k + 0.2 * torch.randn_like(k), v + 0.2 * torch.randn_like(v)))
    with torch.no_grad():
        for n, p in km.parts.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return km, tok


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_batch_generation_equals_each_prompt_alone(arch):
    km, tok = _model(arch)
    prompts = ["the cat sat on", "le chien court au parc avec", "el gato", "the dog ran to the park with a red"]
    names = ["en", "fr", None, "kvonly"]
    mixed = generate(km, tok, prompts, names, max_new_tokens=8)
    alone = [generate(km, tok, [p], n, max_new_tokens=8)[0] for p, n in zip(prompts, names)]
    assert mixed == alone
    assert len(set(mixed)) > 1
    # the memory changes what is generated
    assert generate(km, tok, [prompts[0]], "en", max_new_tokens=8) != generate(km, tok, [prompts[0]], "fr",
                                                                                max_new_tokens=8)


def test_swapping_memories_never_copies_the_backbone():
    km, tok = _model("llama")
    before = {n: p.data_ptr() for n, p in km.model.named_parameters()}
    modules = {n: id(m) for n, m in km.model.named_modules()}
    for name in ["en", "fr", None, "kvonly", "en"]:
        generate(km, tok, ["the cat"], name, max_new_tokens=2)
    assert before == {n: p.data_ptr() for n, p in km.model.named_parameters()}
    assert modules == {n: id(m) for n, m in km.model.named_modules()}


def test_sampling_is_seeded_and_eos_stops():
    km, tok = _model("llama")
    a = generate(km, tok, ["the cat"], "en", max_new_tokens=6, temperature=1.0, seed=3)
    b = generate(km, tok, ["the cat"], "en", max_new_tokens=6, temperature=1.0, seed=3)
    assert a == b
    with pytest.raises(KeyError, match="no memory named"):
        generate(km, tok, ["x"], "de")
    with pytest.raises(ValueError, match="2 memory names for a batch of 1"):
        generate(km, tok, ["x"], ["en", "fr"])
