"""The batching engine, in process: continuous batching gives each job what it gets alone."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from koff.evaluation.generation import generate
from koff.model.gates import NeuronGates
from koff.model.koff_model import KoffModel
from koff.model.memory import KVMemory, lora_config
from koff.serve.scheduler import AUTO, Engine, EngineConfig, Job, QueueFull, Sampling, UnknownMemory


def _model(arch: str = "llama"):
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
    km.add_memory("loraonly", lora=lora_config(2))
    with torch.no_grad():
        for n, p in km.parts.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return km, tok


class Collect:
    """Events of one job, gathered on the scheduler thread."""

    def __init__(self):
        self.events = []
        self.done = threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if ev.kind in ("end", "error"):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if e.kind == "text")

    @property
    def end(self):
        return self.events[-1]


def _engine(km, tok, **cfg):
    names = km.memory_names
    from koff.serve.loading import StoredMemory

    stored = [StoredMemory(n, km.snapshot_memory(n), "test") for n in names]
    for n in names:
        km.remove_memory(n)
    return Engine(km, tok, EngineConfig(**cfg)).start(stored)


@contextlib.contextmanager
def held(engine):
    """The scheduler thread parked between two steps while the block runs, so what the block does
    (queueing jobs one by one, unloading, checking the queue) cannot race with decoding however
    slow or loaded the machine is. The park is a command on the engine's own command queue."""
    parked, release = threading.Event(), threading.Event()

    def park():
        parked.set()
        release.wait(120)

    engine._schedule(park)
    assert parked.wait(60), "the scheduler thread never reached its command queue"
    try:
        yield
    finally:
        release.set()


def _run(engine, jobs_spec, hold: bool = False):
    """Submit each job on its own (as separate requests do) and wait for all. With `hold`, every
    job is queued before the scheduler admits any, so the first admission batches them together
    and the rest join the batch as rows finish: sharing a batch does not depend on timing."""
    out = []
    with held(engine) if hold else contextlib.nullcontext():
        for prompt_ids, memory, sampling in jobs_spec:
            c = Collect()
            engine.submit([Job(prompt_ids, memory, sampling, c)])
            out.append(c)
    for c in out:
        assert c.done.wait(60), "job did not finish"
    return out


PROMPTS = ["the cat sat on", "le chien court au parc avec", "el gato", "the dog ran to the park with a red",
           "la alfombra", "une balle rouge", "the mat", "le tapis et le chien"]
NAMES = ["en", "fr", None, "kvonly", "loraonly", "fr", "en", "kvonly"]
LENGTHS = [8, 3, 12, 6, 9, 1, 5, 10]


@pytest.mark.parametrize("arch,batching", [("llama", "continuous"), ("llama", "static"), ("qwen2", "continuous"),
                                           ("gemma3", "continuous")])
def test_batched_jobs_equal_generate_alone(arch, batching):
    """gemma3's sliding-window cache layers cannot be merged: the engine batches it statically."""
    km, tok = _model(arch)
    alone = [generate(km, tok, [p], n, max_new_tokens=m) for p, n, m in zip(PROMPTS, NAMES, LENGTHS)]
    engine = _engine(km, tok, max_batch=4, batching=batching)
    assert engine.mergeable == (arch != "gemma3")
    try:
        spec = [(tok(p, add_special_tokens=False)["input_ids"], n, Sampling(max_tokens=m))
                for p, n, m in zip(PROMPTS, NAMES, LENGTHS)]
        got = _run(engine, spec, hold=True)
    finally:
        engine.stop()
    assert [c.text for c in got] == [a[0] for a in alone]
    assert all(c.end.kind == "end" for c in got)
    for c, n, m in zip(got, NAMES, LENGTHS):
        assert c.events[0].kind == "start" and c.events[0].memory == n
        assert c.end.completion_tokens <= m
        assert c.end.finish_reason == ("length" if c.end.completion_tokens == m else "stop")
    if engine.mergeable:
        assert engine.max_rows_seen > 1, "the jobs never shared a batch"
    assert len(set(c.text for c in got)) > 3


def test_sliding_window_model_batches_only_rows_that_need_no_padding():
    """gemma3's sliding window counts padded slots: equal prompts of one memory still share a batch
    (and give what they give alone); a padded batch would not (the case above caught it)."""
    km, tok = _model("gemma3")
    prompts = ["the cat sat on", "the dog ran to", "le chien court au"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert len({len(i) for i in ids}) == 1
    alone = [generate(km, tok, [p], "fr", max_new_tokens=6)[0] for p in prompts]
    engine = _engine(km, tok, max_batch=4, batching="static")
    try:
        got = _run(engine, [(i, "fr", Sampling(max_tokens=6)) for i in ids], hold=True)
    finally:
        engine.stop()
    assert [c.text for c in got] == alone
    assert engine.max_rows_seen == 3


def test_jobs_admitted_while_others_decode_get_the_same_text():
    """A job joining a batch whose cache is longer (and shorter) than its own."""
    km, tok = _model()
    long_ids = tok("the dog ran to the park with a red ball every day", add_special_tokens=False)["input_ids"]
    short_ids = tok("le chat", add_special_tokens=False)["input_ids"]
    alone_long = generate(km, tok, ["the dog ran to the park with a red ball every day"], "en", max_new_tokens=30)[0]
    alone_short = generate(km, tok, ["le chat"], "fr", max_new_tokens=10)[0]
    engine = _engine(km, tok, max_batch=4)
    try:
        second = Collect()

        class JoinAtStep5(Collect):
            """Submits the second job from the scheduler thread itself, after the fifth decoding step
            (events are emitted outside the engine's lock), so it always joins mid-decode."""

            def __call__(self, ev):
                super().__call__(ev)
                if engine.steps >= 5 and not getattr(self, "joined", False):
                    self.joined = True
                    engine.submit([Job(short_ids, "fr", Sampling(max_tokens=10), second)])

        first = JoinAtStep5()
        engine.submit([Job(long_ids, "en", Sampling(max_tokens=30), first)])
        assert first.done.wait(60) and second.done.wait(60)
    finally:
        engine.stop()
    assert (first.text, second.text) == (alone_long, alone_short)
    assert engine.max_rows_seen == 2


def test_stop_sequences_cut_the_text_and_pieces_add_up():
    km, tok = _model()
    ids = tok("the cat sat on", add_special_tokens=False)["input_ids"]
    engine = _engine(km, tok)
    try:
        [free] = _run(engine, [(ids, "en", Sampling(max_tokens=12))])
        words = free.text.split()
        assert len(words) >= 3
        stop = " " + words[2]
        [cut] = _run(engine, [(ids, "en", Sampling(max_tokens=12, stop=(stop, "zzzz")))])
    finally:
        engine.stop()
    assert cut.text == free.text[: free.text.index(stop)]
    assert cut.end.finish_reason == "stop"


def test_seeded_sampling_does_not_depend_on_the_batch():
    km, tok = _model()
    ids = tok("the cat sat on", add_special_tokens=False)["input_ids"]
    s = Sampling(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    engine = _engine(km, tok, max_batch=8)
    try:
        [alone] = _run(engine, [(ids, "en", s)])
        crowd = _run(engine, [(ids, "en", s)] + [(ids, n, Sampling(max_tokens=10, temperature=1.0, seed=i))
                                                 for i, n in enumerate(["fr", "kvonly", None])])
        [other_seed] = _run(engine, [(ids, "en", Sampling(max_tokens=10, temperature=1.0, top_p=0.9, seed=8))])
    finally:
        engine.stop()
    assert crowd[0].text == alone.text
    assert other_seed.text != alone.text


def test_unload_waits_for_running_jobs_and_queue_is_bounded():
    km, tok = _model()
    ids = tok("the cat sat on", add_special_tokens=False)["input_ids"]
    want = generate(km, tok, ["the cat sat on"], "en", max_new_tokens=40)[0]
    engine = _engine(km, tok, max_batch=1, max_queue=2)
    try:
        running = Collect()
        engine.submit([Job(ids, "en", Sampling(max_tokens=40), running)])
        while engine.running() == 0:
            time.sleep(0.001)
        with held(engine):  # the running job cannot finish (and free the queue) during the checks
            status = engine.unload("en")
            assert status["status"] == "unloading" and status["requests"] == 1
            assert "en" not in engine.memory_names()
            with pytest.raises(UnknownMemory, match="no memory named 'en'; available: fr, kvonly, loraonly"):
                engine.submit([Job(ids, "en", Sampling(max_tokens=2), Collect())])
            queued = [Collect(), Collect()]
            engine.submit([Job(ids, "fr", Sampling(max_tokens=2), c) for c in queued])
            with pytest.raises(QueueFull) as e:
                engine.submit([Job(ids, "fr", Sampling(max_tokens=2), Collect())])
            assert e.value.retry_after >= 1
        assert running.done.wait(60) and all(c.done.wait(60) for c in queued)
        assert running.text == want
        deadline = time.time() + 10
        while "en" in km.memory_names and time.time() < deadline:
            time.sleep(0.01)
        assert "en" not in km.memory_names
    finally:
        engine.stop()


def test_auto_picks_the_memory_with_the_lowest_loss():
    from koff.model.koff_model import lm_loss

    km, tok = _model()
    ids = tok("le chien court au parc avec une balle rouge", add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        losses = {n: float(lm_loss(km(x, memory=n), x)) for n in km.memory_names}
    best = min(losses, key=losses.get)
    engine = _engine(km, tok)
    try:
        [c] = _run(engine, [(ids, AUTO, Sampling(max_tokens=3))])
    finally:
        engine.stop()
    assert c.events[0].memory == best and c.end.memory == best


def test_cancelled_jobs_leave_the_batch_and_never_start():
    km, tok = _model()
    ids = tok("the cat sat on", add_special_tokens=False)["input_ids"]
    engine = _engine(km, tok, max_batch=2)
    engine.eos = None  # nothing ends early: only the cancellation stops the long job
    try:
        jobs: list[Job] = []

        class CancelAtStep3(Collect):
            """Cancels the long and the queued job from the scheduler thread after the third step,
            while the short one is surely still running (no race with the machine's speed)."""

            def __call__(self, ev):
                super().__call__(ev)
                if engine.steps >= 3 and not jobs[0].cancelled:
                    jobs[0].cancel()
                    jobs[2].cancel()

        long, short, queued = CancelAtStep3(), Collect(), Collect()
        jobs += [Job(ids, "en", Sampling(max_tokens=400), long), Job(ids, "fr", Sampling(max_tokens=30), short),
                 Job(ids, "en", Sampling(max_tokens=5), queued)]
        engine.submit(jobs)
        assert short.done.wait(60)
        deadline = time.time() + 30
        while engine.running() and time.time() < deadline:
            time.sleep(0.01)
        assert engine.running() == 0 and engine.queue_depth() == 0
        assert not long.done.is_set() and len(long.text) > 0
        assert queued.events == []
        assert engine.memories()["en"]["requests"] == 0
    finally:
        engine.stop()


def test_serve_cli_reports_a_bad_path_in_one_line(capsys, tmp_path):
    from koff.cli import main

    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and "run directory" in err[0]
    assert main(["serve", str(tmp_path), "--port", "0"]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_auto_uses_the_classifier_for_the_memories_with_training_text():
    km, tok = _model()
    from koff.serve.loading import StoredMemory

    names = km.memory_names
    vocab = km.model.get_input_embeddings().num_embeddings
    stored = []
    for i, n in enumerate(names):
        counts = torch.zeros(vocab)
        counts[10 + i] = 1000.0  # each memory's "training text" is one token repeated
        stored.append(StoredMemory(n, km.snapshot_memory(n), "test", token_counts=counts))
        km.remove_memory(n)
    engine = Engine(km, tok, EngineConfig()).start(stored)
    try:
        assert engine.router_method() == "classifier"
        [c] = _run(engine, [([3, 12, 12, 5], AUTO, Sampling(max_tokens=2))])
        assert c.events[0].memory == names[2]
        extra = StoredMemory("extra", stored[0].states, "test")  # no training text
        engine.install(extra).result(30)
        # the classifier stays for the memories it knows; "extra" is reachable by its name only
        assert engine.router_method() == "classifier"
        for i, n in enumerate(names):
            [c] = _run(engine, [([3, 10 + i, 10 + i, 5], AUTO, Sampling(max_tokens=2))])
            assert c.events[0].memory == n
        engine.unload("extra")
        assert engine.router_method() == "classifier"
    finally:
        engine.stop()
