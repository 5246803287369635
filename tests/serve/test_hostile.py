"""What a hostile probe of `koff serve` found on 2026-12-06, one test each: clients that leave,
signals during a stream, memories copied or tampered with, requests that run too long."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import API_KEY, Server


def _send_raw(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(data)
    return s


def _request_head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_leaves_frees_its_place_and_is_not_a_server_error(tiny_run):
    # one row at a time: a stream of 16 long choices holds it, so the request behind it waits in the
    # queue for as long as the test needs, whatever the machine's speed
    server = Server(tiny_run.run, "--api-key", API_KEY, "--max-batch", "1", "--max-tokens", "400",
                    "--max-context", "512")
    try:
        long = {"model": "en", "prompt": "the cat", "max_tokens": 400, "temperature": 1.0, "stop": ["\x00never"]}
        body = json.dumps({**long, "n": 16, "stream": True}).encode()
        holder = _send_raw(server.port, _request_head("/v1/completions", len(body)) + body)
        assert _wait_for(lambda: server.metric("koff_running_requests") == 1), "the stream never ran"
        body = json.dumps(long).encode()
        before = server.metric("koff_queue_depth")
        s = _send_raw(server.port, _request_head("/v1/completions", len(body)) + body)
        assert _wait_for(lambda: server.metric("koff_queue_depth") > before, timeout=60), \
            "the second request never queued behind the stream"  # closed any earlier, it would not be counted
        s.close()  # a non-streaming request whose client leaves is answered 499 at once, not after it ran
        counted = 'koff_requests_total{endpoint="/v1/completions",status="499"'
        assert _wait_for(lambda: server.metric(counted) >= 1, timeout=10), \
            "a non-streaming request kept its place after its client left"
        assert server.metric("koff_running_requests") == 1  # the stream is still going: it held the row
        # a client that leaves in the middle of its body
        s = _send_raw(server.port, _request_head("/v1/completions", 1000) + b'{"model": "en", "pro')
        time.sleep(0.3)
        s.close()
        assert _wait_for(lambda: server.metric(counted) >= 2), server.raw("GET", "/metrics")[2].decode()[:3000]
        holder.close()  # the stream's client leaves too: its rows are freed
        assert _wait_for(lambda: server.metric("koff_running_requests") == 0, timeout=30)
        assert server.metric('koff_requests_total{endpoint="/v1/completions",status="5') == 0
        r = server.client().completions.create(model="en", prompt="the cat", max_tokens=3, temperature=0)
        assert r.choices[0].text
    finally:
        server.close()
    assert server.proc.returncode == 0
    assert "Traceback" not in "".join(server.stderr), "".join(server.stderr)[-3000:]


def test_sigterm_during_a_stream_ends_it_with_an_error_and_done_and_exits_0(tiny_run):
    server = Server(tiny_run.run, "--api-key", API_KEY, "--max-tokens", "400", "--max-context", "512")
    try:
        body = json.dumps({"model": "fr", "prompt": "le chat", "max_tokens": 400, "temperature": 1.0,
                           "stream": True, "stop": ["\x00never"]}).encode()
        s = _send_raw(server.port, _request_head("/v1/completions", len(body)) + body)
        got = b""
        while got.count(b"data: ") < 3:  # the stream is under way
            got += s.recv(65536)
        server.proc.send_signal(signal.SIGTERM)
        s.settimeout(30)
        while b"[DONE]" not in got:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        s.close()
        server.proc.wait(30)
    finally:
        server.close()
    events = [line[6:] for line in got.decode(errors="replace").splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["message"] == "the server is shutting down" and error["type"]
    assert server.proc.returncode == 0
    assert "Traceback" not in "".join(server.stderr), "".join(server.stderr)[-3000:]


def test_a_request_past_the_time_limit_is_stopped(tiny_run):
    # 16 choices of 400 tokens, one row at a time: thousands of decoding steps, far past 0.5 s anywhere
    server = Server(tiny_run.run, "--api-key", API_KEY, "--max-tokens", "400", "--max-context", "512",
                    "--request-timeout", "0.5", "--max-batch", "1")
    try:
        request = {"model": "en", "prompt": "the cat", "max_tokens": 400, "temperature": 1.0, "stop": ["\x00never"],
                   "n": 16}
        status, _, text = server.raw("POST", "/v1/completions", request)
        assert status == 504, text[:300]
        assert json.loads(text)["error"]["code"] == "request_timeout"
        status, _, text = server.raw("POST", "/v1/completions", {**request, "stream": True})
        events = [line[6:] for line in text.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
        assert _wait_for(lambda: server.metric("koff_running_requests") == 0, timeout=10)
        status, _, text = server.raw("POST", "/v1/completions", {**request, "max_tokens": 2, "n": 1})
        assert status == 200, text[:300]
    finally:
        server.close()


def test_copied_and_tampered_memories(server, tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run, run)
    copy = run / "memories" / "fr2"
    shutil.copytree(run / "memories" / "fr", copy)
    status, _, text = server.raw("POST", "/v1/memories", {"path": str(copy)})
    assert status == 400
    message = json.loads(text)["error"]["message"]
    assert "'name' is 'fr' but the folder is 'fr2'" in message and '"name": "fr2"' in message
    # ... and what the message says works
    status, _, text = server.raw("POST", "/v1/memories", {"path": str(run / "memories" / "fr"), "name": "fr2"})
    assert status == 201, text
    assert server.raw("DELETE", "/v1/memories/fr2")[0] == 200

    # huge but finite values (KV x 1e30) are refused, naming the tensor
    from koff.core.files import sha256_file

    kv_file = run / "memories" / "es" / "kv.safetensors"
    tensors = load_file(str(kv_file))
    tensors = {k: (v * 1e30 if k == "values" else v) for k, v in tensors.items()}
    assert all(bool(torch.isfinite(v).all()) for v in tensors.values())
    save_file(tensors, str(kv_file))
    info = json.loads((run / "memories" / "es" / "memory.json").read_text())
    info["files"]["kv.safetensors"] = sha256_file(kv_file)
    (run / "memories" / "es" / "memory.json").write_text(json.dumps(info))
    status, _, text = server.raw("POST", "/v1/memories", {"path": str(run / "memories" / "es"), "name": "es_huge"})
    assert status == 400, text
    assert "'values' holds values up to" in json.loads(text)["error"]["message"]


@pytest.mark.parametrize("garbage", [b"GARBAGE\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n"])
def test_http_garbage_gets_a_4xx_and_the_server_keeps_serving(server, garbage):
    s = _send_raw(server.port, garbage)
    s.settimeout(10)
    try:
        reply = s.recv(65536)
    except (TimeoutError, ConnectionResetError):
        reply = b""
    s.close()
    assert not reply or reply.startswith(b"HTTP/1.1 4"), reply[:200]
    assert server.raw("GET", "/health")[0] == 200
