"""`koff serve` as a real process on 127.0.0.1 (ephemeral port), driven by the official openai client."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout

import pytest

from koff.cli import main as koff_main

from .conftest import API_KEY, Server

PROMPTS = {"en": "the cat sat on the mat and", "fr": "le chien court au parc avec", "es": "el perro corre al parque"}


def _koff_generate(run, memory: str, prompt: str, tokens: int, chat: bool = False) -> str:
    """What `koff generate` prints after the prompt."""
    out = io.StringIO()
    args = ["generate", str(run), "--memory", memory, prompt, "--max-new-tokens", str(tokens), "--device", "cpu"]
    with redirect_stdout(out):
        assert koff_main(args + (["--chat"] if chat else [])) == 0
    line = out.getvalue().rstrip("\n")
    head = f"[{'backbone' if memory == 'none' else memory}] {prompt}"
    assert line.startswith(head), line
    return line[len(head):]


def test_models_list_every_memory_the_backbone_and_auto(server):
    models = server.client().models.list()
    ids = [m.id for m in models.data]
    assert ids == ["en", "es", "fr", "general", "none", "auto"]  # general: what a request naming no domain gets
    en = next(m for m in models.data if m.id == "en")
    assert en.koff["kind"] == "memory" and en.koff["lora_rank"] == 4 and en.koff["kv_tokens"] == 4
    assert en.koff["router_text"] and en.koff["router_text"][0].endswith("en/train.txt")
    assert models.data[-1].koff == {"kind": "router", "method": "classifier"}


@pytest.mark.parametrize("memory", ["en", "fr", "none"])
def test_greedy_completion_equals_koff_generate(server, tiny_run, memory):
    prompt = PROMPTS.get(memory, "the dog ran")
    r = server.client().completions.create(model=memory, prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == _koff_generate(tiny_run.run, memory, prompt, 10)
    assert r.model == memory and r.object == "text_completion"
    assert r.usage.completion_tokens <= 10 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_memories_change_the_output(server):
    c = server.client()
    texts = {m: c.completions.create(model=m, prompt="the cat", max_tokens=10, temperature=0).choices[0].text
             for m in ("en", "fr", "es", "none")}
    assert len(set(texts.values())) == 4, texts


def test_chat_uses_the_template_and_equals_koff_generate_chat(server, tiny_run):
    prompt = "le chat est sur le tapis"
    r = server.client().chat.completions.create(model="fr", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _koff_generate(tiny_run.run, "fr", prompt, 8, chat=True)
    assert r.object == "chat.completion" and r.model == "fr"


def test_streaming_pieces_add_up_to_the_whole_answer(server):
    c = server.client()
    whole = c.completions.create(model="es", prompt=PROMPTS["es"], max_tokens=12, temperature=0)
    chunks = list(c.completions.create(model="es", prompt=PROMPTS["es"], max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].text) > 1, "not streamed piece by piece"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "user", "content": "the dog ran to the park"}]
    chat_whole = c.chat.completions.create(model="en", messages=messages, max_tokens=10, temperature=0)
    chat_chunks = list(c.chat.completions.create(model="en", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chat_chunks) == chat_whole.choices[0].message.content
    assert chat_chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_sequences_and_seeded_sampling(server):
    c = server.client()
    free = c.completions.create(model="en", prompt="the cat", max_tokens=16, temperature=0).choices[0].text
    stop = free.split()[2]
    cut = c.completions.create(model="en", prompt="the cat", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"
    a, b = (c.completions.create(model="fr", prompt="le chat", max_tokens=12, temperature=1.0, seed=5)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text
    several = c.completions.create(model="fr", prompt="le chat", max_tokens=12, temperature=1.0, seed=5, n=3)
    assert [ch.index for ch in several.choices] == [0, 1, 2]
    assert several.choices[0].text == a.choices[0].text
    assert len({ch.text for ch in several.choices}) > 1


def test_16_concurrent_requests_over_three_memories_equal_one_by_one(server):
    c = server.client()
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "the", "dog", "ran", "to", "the", "park", "with", "a", "red", "ball"]
    jobs = [(["en", "fr", "es"][i % 3], " ".join(words[i % 5: i % 5 + 2 + i % 7]), 6 + (i * 5) % 17) for i in range(16)]

    def ask(job):
        memory, prompt, tokens = job
        return c.completions.create(model=memory, prompt=prompt, max_tokens=tokens, temperature=0).choices[0].text

    alone = [ask(j) for j in jobs]
    steps_before = server.metric("koff_decode_steps_total")
    rows_before = server.metric("koff_batch_rows_sum")
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, jobs))
    assert together == alone
    steps = server.metric("koff_decode_steps_total") - steps_before
    rows = server.metric("koff_batch_rows_sum") - rows_before
    assert rows / steps > 2, f"requests were not batched: {rows} rows over {steps} steps"


def test_hot_load_and_unload(server, tiny_run):
    c = server.client()
    de = str(tiny_run.with_de / "memories" / "de")
    status, _, body = server.raw("POST", "/v1/memories", {"path": de})
    assert status == 201, body
    info = json.loads(body)
    assert info["name"] == "de" and info["source"] == de
    assert "de" in [m.id for m in c.models.list().data]
    got = c.completions.create(model="de", prompt="die katze sitzt", max_tokens=8, temperature=0).choices[0].text
    assert got == _koff_generate(tiny_run.with_de, "de", "die katze sitzt", 8)

    # the exported (sliced) copy of fr, loaded under a new name, gives what fr gives
    status, _, body = server.raw("POST", "/v1/memories", {"path": str(tiny_run.export / "memories" / "fr"),
                                                          "name": "fr_export"})
    assert status == 201, body
    fr = c.completions.create(model="fr", prompt=PROMPTS["fr"], max_tokens=8, temperature=0).choices[0].text
    assert c.completions.create(model="fr_export", prompt=PROMPTS["fr"], max_tokens=8,
                                temperature=0).choices[0].text == fr

    refused = [
        ({"path": de}, 409),                                                          # already loaded
        ({"path": str(tiny_run.foreign / "memories" / "en"), "name": "en2"}, 400),    # another backbone's
        ({"path": str(tiny_run.run / "memories" / "nope")}, 400),                     # no such folder
        ({"path": str(tiny_run.run)}, 400),                                           # not a memory folder
        ({"path": "relative/memories/x"}, 400),
        ({"path": de, "name": "auto"}, 400),                                          # reserved name
        ({"path": de, "name": "bad name!"}, 400),
        ({"path": 5}, 400),
    ]
    for body, want in refused:
        status, _, text = server.raw("POST", "/v1/memories", body)
        assert status == want, (body, status, text)
        assert json.loads(text)["error"]["message"]

    # unload de while a request on it is streaming: that request finishes with its full answer
    want = c.completions.create(model="de", prompt="der hund", max_tokens=40, temperature=0).choices[0].text
    stream = c.completions.create(model="de", prompt="der hund", max_tokens=40, temperature=0, stream=True)
    first = next(stream)
    status, _, body = server.raw("DELETE", "/v1/memories/de")
    assert status == 200, body
    assert json.loads(body)["status"] in ("unloading", "unloaded")
    rest = list(stream)
    assert first.choices[0].text + "".join(ch.choices[0].text for ch in rest) == want
    assert "de" not in [m.id for m in c.models.list().data]
    status, _, body = server.raw("POST", "/v1/completions", {"model": "de", "prompt": "der hund"})
    assert status == 404 and "available: en, es, fr, fr_export" in json.loads(body)["error"]["message"]
    assert server.raw("DELETE", "/v1/memories/de")[0] == 404
    # ... and can be loaded again once its requests are done
    import time

    deadline = time.time() + 30
    while (status := server.raw("POST", "/v1/memories", {"path": de})[0]) == 409 and time.time() < deadline:
        time.sleep(0.2)
    assert status == 201
    for name in ("de", "fr_export"):
        assert server.raw("DELETE", f"/v1/memories/{name}")[0] == 200


def test_auto_routes_each_language_to_its_memory(server):
    c = server.client()
    picked = {}
    for lang, prompt in {"en": "the dog ran to the park with a red ball every day and the cat sat on a mat",
                         "fr": "le chat est sur le tapis et le chien court au parc avec une balle rouge",
                         "es": "el gato se sienta en la alfombra y el perro corre al parque con una pelota"}.items():
        r = c.completions.create(model="auto", prompt=prompt, max_tokens=2, temperature=0)
        picked[lang] = r.model
    assert picked == {"en": "en", "fr": "fr", "es": "es"}


def _bad_requests(server, tiny_run) -> list[tuple[str, str, object, dict, int]]:
    """(method, path, body, headers, expected status): at least 30 kinds of bad input."""
    good = {"model": "en", "prompt": "the cat", "max_tokens": 4}
    chat = {"model": "en", "messages": [{"role": "user", "content": "hi"}]}
    ctx = 512
    return [
        ("POST", "/v1/completions", "{not json", {}, 400),
        ("POST", "/v1/completions", '{"model": "en", "prompt": "a",}', {}, 400),
        ("POST", "/v1/completions", "[1, 2]", {}, 400),
        ("POST", "/v1/completions", "", {}, 400),
        ("POST", "/v1/completions", b"\xff\xfe\x00", {}, 400),
        ("POST", "/v1/completions", '{"model": "en", "prompt": "a", "temperature": NaN}', {}, 400),
        ("POST", "/v1/completions", '{"model": "en", "prompt": "a", "max_tokens": Infinity}', {}, 400),
        ("POST", "/v1/completions", {**good, "model": "xx"}, {}, 404),
        ("POST", "/v1/completions", {"prompt": "a"}, {}, 400),
        ("POST", "/v1/completions", {**good, "model": 3}, {}, 400),
        ("POST", "/v1/completions", {**good, "prompt": ""}, {}, 400),
        ("POST", "/v1/completions", {**good, "prompt": []}, {}, 400),
        ("POST", "/v1/completions", {**good, "prompt": {"text": "a"}}, {}, 400),
        ("POST", "/v1/completions", {**good, "prompt": [1, "a"]}, {}, 400),
        ("POST", "/v1/completions", {**good, "prompt": [10 ** 9]}, {}, 400),
        ("POST", "/v1/completions", {**good, "prompt": [3] * (ctx + 10)}, {}, 400),
        ("POST", "/v1/completions", {**good, "prompt": [3] * (ctx - 10), "max_tokens": 60}, {}, 400),
        ("POST", "/v1/completions", {**good, "max_tokens": 65}, {}, 400),
        ("POST", "/v1/completions", {**good, "max_tokens": 10 ** 30}, {}, 400),
        ("POST", "/v1/completions", {**good, "max_tokens": 0}, {}, 400),
        ("POST", "/v1/completions", {**good, "max_tokens": -1}, {}, 400),
        ("POST", "/v1/completions", {**good, "max_tokens": "4"}, {}, 400),
        ("POST", "/v1/completions", {**good, "max_tokens": 4.5}, {}, 400),
        ("POST", "/v1/completions", {**good, "temperature": -0.5}, {}, 400),
        ("POST", "/v1/completions", {**good, "temperature": 2.5}, {}, 400),
        ("POST", "/v1/completions", {**good, "temperature": "hot"}, {}, 400),
        ("POST", "/v1/completions", {**good, "top_p": 0}, {}, 400),
        ("POST", "/v1/completions", {**good, "top_p": 1.5}, {}, 400),
        ("POST", "/v1/completions", {**good, "stop": ["a", "b", "c", "d", "e"]}, {}, 400),
        ("POST", "/v1/completions", {**good, "stop": 7}, {}, 400),
        ("POST", "/v1/completions", {**good, "stop": [""]}, {}, 400),
        ("POST", "/v1/completions", {**good, "seed": "x"}, {}, 400),
        ("POST", "/v1/completions", {**good, "seed": 2 ** 70}, {}, 400),
        ("POST", "/v1/completions", {**good, "stream": "yes"}, {}, 400),
        ("POST", "/v1/completions", {**good, "n": 0}, {}, 400),
        ("POST", "/v1/completions", {**good, "n": 1000}, {}, 400),
        ("POST", "/v1/completions", {**good, "echo": True}, {}, 400),
        ("POST", "/v1/completions", {**good, "logprobs": 2}, {}, 400),
        ("POST", "/v1/completions", {**good, "presence_penalty": 0.5}, {}, 400),
        ("POST", "/v1/completions", {**good, "stream_options": {"include_usage": True}}, {}, 400),
        ("POST", "/v1/completions", json.dumps({**good, "prompt": "x" * (2 << 20)}), {}, 413),
        ("POST", "/v1/completions", good, {"Authorization": ""}, 401),
        ("POST", "/v1/completions", good, {"Authorization": "Bearer wrong"}, 401),
        ("POST", "/v1/completions", good, {"Authorization": "Basic dGVzdC1rZXk="}, 401),
        ("GET", "/v1/models", None, {"Authorization": "Bearer nope"}, 401),
        ("POST", "/v1/chat/completions", {"model": "en"}, {}, 400),
        ("POST", "/v1/chat/completions", {**chat, "messages": []}, {}, 400),
        ("POST", "/v1/chat/completions", {**chat, "messages": [{"content": "hi"}]}, {}, 400),
        ("POST", "/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "hi"}]}, {}, 400),
        ("POST", "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": 5}]}, {}, 400),
        ("POST", "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         {}, 400),
        ("POST", "/v1/chat/completions", {**chat, "messages": "hi"}, {}, 400),
        ("POST", "/v1/chat/completions", {**chat, "model": "nope"}, {}, 404),
        ("POST", "/v1/chat/completions", {**chat, "max_tokens": 4, "max_completion_tokens": 4}, {}, 400),
        ("POST", "/v1/chat/completions", {**chat, "max_completion_tokens": 1000}, {}, 400),
        ("POST", "/v1/chat/completions", {**chat, "tools": [{"type": "function"}]}, {}, 400),
        ("POST", "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "a " * 2000}]}, {}, 400),
        ("GET", "/v1/completions", None, {}, 405),
        ("GET", "/v1/nothing-here", None, {}, 404),
        ("GET", "/v1/models/xx", None, {}, 404),
        ("DELETE", "/v1/memories/xx", None, {}, 404),
        ("POST", "/v1/memories", {"path": "/nonexistent/memories/x"}, {}, 400),
        ("POST", "/v1/memories", {}, {}, 400),
        # found by the 2026-12-06 probe: each was a 500
        ("POST", "/v1/completions", '{"model": "en", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", {}, 400),
        ("POST", "/v1/completions", '{"model": "en", "prompt": "a\\ud800b", "max_tokens": 4}', {}, 400),
        ("POST", "/v1/completions", '{"model": "en", "prompt": "a\\udc00", "max_tokens": 4, "stream": true}', {}, 400),
        ("POST", "/v1/chat/completions", '{"model": "en", "messages": [{"role": "user", "content": "\\ud83d"}]}', {},
         400),
        ("POST", "/v1/memories", '{"path": "/tmp/x\\ud800"}', {}, 400),
    ]


def test_bad_requests_get_4xx_in_openai_shape_and_the_server_keeps_serving(server, tiny_run):
    cases = _bad_requests(server, tiny_run)
    assert len(cases) >= 30
    for method, path, body, headers, want in cases:
        key = None if "Authorization" in headers else API_KEY
        hdrs = {k: v for k, v in headers.items() if v}
        status, resp_headers, text = server.raw(method, path, body, key=key, headers=hdrs)
        shown = body if not isinstance(body, str) or len(body) < 80 else body[:80]
        assert status == want, (method, path, shown, status, text[:300])
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        if want == 401:
            assert resp_headers.get("www-authenticate") == "Bearer"
    # an error never echoes a huge input back in full
    status, _, text = server.raw("POST", "/v1/completions", {"model": "m" * 900_000, "prompt": "a"})
    assert status == 404 and len(text) < 2000, len(text)
    # the unknown model's message lists what there is
    status, _, text = server.raw("POST", "/v1/completions", {"model": "xx", "prompt": "a"})
    assert json.loads(text)["error"]["message"].endswith("available: en, es, fr, general, none, auto")
    # ... and the server still serves
    r = server.client().completions.create(model="en", prompt="the cat", max_tokens=3, temperature=0)
    assert r.choices[0].text
    assert server.raw("GET", "/health")[0] == 200
    assert server.metric('koff_requests_total{endpoint="/v1/completions",status="5') == 0


def test_an_exported_backbone_serves_what_the_run_serves_and_the_queue_is_bounded(server, tiny_run):
    exported = Server(tiny_run.export, "--max-batch", "1", "--max-queue", "1", "--memory-dir", str(tiny_run.with_de))
    try:
        c = exported.client()
        assert [m.id for m in c.models.list().data] == ["en", "es", "fr", "general", "none", "auto"]
        for memory in ("en", "fr", "none"):
            a = exported.client().completions.create(model=memory, prompt="the cat", max_tokens=10, temperature=0)
            b = server.client().completions.create(model=memory, prompt="the cat", max_tokens=10, temperature=0)
            assert a.choices[0].text == b.choices[0].text
        # the exported run's own memory folder loads back into the run server's backbone and vice versa
        status, _, body = exported.raw("POST", "/v1/memories", {"path": str(tiny_run.with_de / "memories" / "de")})
        assert status == 201, body
        # ... but only from below --memory-dir
        status, _, body = exported.raw("POST", "/v1/memories", {"path": str(tiny_run.run / "memories" / "en"),
                                                                "name": "en2"})
        assert status == 403 and json.loads(body)["error"]["code"] == "forbidden_path"
        status, _, body = exported.raw("POST", "/v1/memories", {"path": str(tiny_run.with_de / "memories" / ".." /
                                                                              ".." / "run" / "memories" / "en"),
                                                                "name": "en3"})
        assert status == 403

        def ask(_):
            return exported.raw("POST", "/v1/completions", {"model": "fr", "prompt": "le chat", "max_tokens": 64,
                                                            "temperature": 0})

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        statuses = sorted(a[0] for a in answers)
        assert statuses.count(200) >= 2 and 429 in statuses, statuses
        for status, headers, body in answers:
            if status == 429:
                assert int(headers["retry-after"]) >= 1
                assert json.loads(body)["error"]["type"] == "rate_limit_error"
    finally:
        exported.close()
