"""Load test of `koff serve` on loopback, with the ratios the serving issue asks for.

    python benchmarks/serve.py --run RUN [--requests 200] [--clients 16] [--malformed 0.1]

Starts `koff serve` processes on 127.0.0.1 (ephemeral ports, one at a time, OMP_NUM_THREADS=1
unless --threads says otherwise) and drives them with closed-loop clients (each sends its next
request when the last one is answered) over plain HTTP:

  (a) the load test: --requests requests from --clients clients, prompts from the valid split of
      each memory's language with that memory, --malformed of them bad requests (malformed JSON,
      unknown memory, negative temperature, empty prompt): p50 / p99 latency of the good ones,
      output tokens/s, responses by status;
  (b) mixed / single memory: the same --ratio-requests prompts at --clients clients, once all with
      one memory, once each with its own language's memory (rounds alternate, --rounds each);
  (c) batched / one at a time: --ratio-requests requests of varied lengths at 8 clients, served
      with --max-batch 16 and by a server started with --max-batch 1;
  (d) continuous / static batching: the workload of (c) on a server with --batching static.

Throughput is generated tokens (the usage counts) per second of wall time. Every request is
greedy (temperature 0).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Server:
    def __init__(self, run: Path, threads: int, *args: str):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT / "src"))
        self.args = args
        self.proc = subprocess.Popen([sys.executable, "-m", "koff", "serve", str(run), "--port", "0", "--device",
                                      "cpu", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        line = self.proc.stdout.readline()
        if "listening on http://127.0.0.1:" not in line:
            self.close()
            raise SystemExit(f"koff serve did not start: {line!r} {''.join(self.stderr)[-2000:]}")
        self.port = int(line.rsplit(":", 1)[-1])
        while True:
            try:
                if request(self.port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)

    def metric(self, name: str) -> float:
        text = request(self.port, "GET", "/metrics")[1]
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def load(port: int, bodies: list[bytes], clients: int) -> dict:
    """Send `bodies` from `clients` closed-loop clients; latency, tokens and statuses."""
    queue = list(enumerate(bodies))
    lock = threading.Lock()
    results: list[tuple[int, float, int]] = []

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                _, body = queue.pop(0)
            t = time.perf_counter()
            status, text = request(port, "POST", "/v1/completions", body)
            elapsed = time.perf_counter() - t
            tokens = json.loads(text)["usage"]["completion_tokens"] if status == 200 else 0
            with lock:
                results.append((status, elapsed, tokens))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    ok = sorted(e for s, e, _ in results if s == 200)
    tokens = sum(t for *_, t in results)
    return {"wall": wall, "tokens": tokens, "tok_s": tokens / wall, "statuses": dict(Counter(s for s, *_ in results)),
            "p50": statistics.median(ok) if ok else float("nan"),
            "p99": ok[min(len(ok) - 1, int(round(0.99 * (len(ok) - 1))))] if ok else float("nan"),
            "requests": len(results)}


def prompts_by_language(run: Path, langs: list[str], per_language: int, words: int = 12) -> dict[str, list[str]]:
    """The first `words` words of documents of each memory's valid split (else its test split), as
    the run recorded them (bundled languages: the shared data folder)."""
    from koff.data.text import data_root, read_documents

    manifest = json.loads((run / "koff.json").read_text()) if (run / "koff.json").is_file() else {}
    out = {}
    for lang in langs:
        data = (manifest.get("data") or {}).get(lang) or {}
        files = data.get("valid") or data.get("test") or [data_root() / "text" / lang / "valid.txt"]
        docs = [d for f in files for d in read_documents(Path(f), data.get("text_field", "text"))]
        out[lang] = [" ".join(d.split()[:words]) for d in docs if len(d.split()) >= words]
        if len(out[lang]) < per_language:  # a small split: cycle through it
            out[lang] = [out[lang][i % len(out[lang])] for i in range(per_language)]
    return out


def body(model: str, prompt: str, max_tokens: int) -> bytes:
    return json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()


MALFORMED = [b'{"model": "en", "prompt": "The', b'{"model": "xx", "prompt": "a", "max_tokens": 4}',
             b'{"model": "en", "prompt": "a", "temperature": -1}', b'{"model": "en", "prompt": ""}']


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a run directory (or an exported backbone)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--malformed", type=float, default=0.1)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request in (a) and (b)")
    p.add_argument("--ratio-requests", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds per side in (b)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each server")
    p.add_argument("--skip-a", action="store_true", help="only the ratios")
    p.add_argument("--out", type=Path, help="also write the results as JSON")
    args = p.parse_args()

    rng = random.Random(0)
    run = args.run
    from koff.storage.run_dir import load_run

    memories = sorted(load_run(run).memories) if (run / "koff.json").is_file() else \
        sorted(d.name for d in (run / "memories").iterdir() if d.is_dir())
    langs = memories[:3]
    prompts = prompts_by_language(run, langs, max(args.requests, args.ratio_requests))
    results: dict = {"run": str(run), "memories": langs, "threads": args.threads}
    print(f"koff serve load test: run {run}, memories {', '.join(langs)}, server OMP_NUM_THREADS={args.threads}")

    server = Server(run, args.threads, "--max-batch", "16", "--max-queue", str(max(64, args.requests)))
    try:
        warm = [body(langs[i % 3], prompts[langs[i % 3]][i], 4) for i in range(6)]
        load(server.port, warm, 3)
        if not args.skip_a:
            bodies = []
            for i in range(args.requests):
                lang = langs[i % len(langs)]
                bodies.append(rng.choice(MALFORMED) if rng.random() < args.malformed else
                              body(lang, prompts[lang][i // len(langs)], args.max_tokens))
            steps0, rows0 = server.metric("koff_decode_steps_total"), server.metric("koff_batch_rows_sum")
            a = load(server.port, bodies, args.clients)
            steps = server.metric("koff_decode_steps_total") - steps0
            a["mean_rows"] = (server.metric("koff_batch_rows_sum") - rows0) / max(1, steps)
            results["a"] = a
            print(f"\n(a) {a['requests']} requests, {args.clients} clients, {args.malformed:.0%} malformed, "
                  f"max_tokens {args.max_tokens}: {a['wall']:.1f} s")
            print(f"    latency of good requests: p50 {a['p50']:.2f} s, p99 {a['p99']:.2f} s")
            print(f"    output {a['tokens']} tokens, {a['tok_s']:.1f} tok/s; mean rows per decoding step "
                  f"{a['mean_rows']:.1f}")
            print(f"    responses by status: {json.dumps(dict(sorted(a['statuses'].items())))}; "
                  f"5xx: {sum(v for k, v in a['statuses'].items() if k >= 500)}")

        n = args.ratio_requests
        mixed = [body(langs[i % 3], prompts[langs[i % 3]][i // 3], args.max_tokens) for i in range(n)]
        single = [body(langs[0], prompts[langs[i % 3]][i // 3], args.max_tokens) for i in range(n)]
        sides: dict[str, list] = {"single": [], "mixed": []}
        for _ in range(args.rounds):
            for name, bodies in (("single", single), ("mixed", mixed)):
                sides[name].append(load(server.port, bodies, args.clients))
        tok_s = {k: sum(r["tokens"] for r in v) / sum(r["wall"] for r in v) for k, v in sides.items()}
        results["b"] = {**tok_s, "ratio": tok_s["mixed"] / tok_s["single"]}
        print(f"\n(b) {n} requests x {args.rounds} round(s) per side, {args.clients} clients: one memory "
              f"{tok_s['single']:.1f} tok/s, three memories mixed {tok_s['mixed']:.1f} tok/s, "
              f"ratio {results['b']['ratio']:.2f}  (target >= 0.8)")

        varied = [body(langs[i % 3], prompts[langs[i % 3]][i // 3], rng.randint(8, 40)) for i in range(n)]
        batched = load(server.port, varied, 8)
    finally:
        server.close()
    one = Server(run, args.threads, "--max-batch", "1", "--max-queue", "64")
    try:
        alone = load(one.port, varied, 8)
    finally:
        one.close()
    static_server = Server(run, args.threads, "--max-batch", "16", "--batching", "static", "--max-queue", "64")
    try:
        static = load(static_server.port, varied, 8)
    finally:
        static_server.close()
    results["c"] = {"batched": batched, "one_at_a_time": alone, "ratio": batched["tok_s"] / alone["tok_s"]}
    results["d"] = {"continuous": batched, "static": static, "ratio": batched["tok_s"] / static["tok_s"]}
    print(f"\n(c) {n} requests (max_tokens 8-40), 8 clients: batched (continuous, up to 16 rows) "
          f"{batched['tok_s']:.1f} tok/s, p50 {batched['p50']:.1f} s; one request at a time "
          f"{alone['tok_s']:.1f} tok/s, p50 {alone['p50']:.1f} s; ratio {results['c']['ratio']:.2f}  (target >= 2)")
    print(f"(d) same workload: continuous {batched['tok_s']:.1f} tok/s, p50 {batched['p50']:.1f} s; static "
          f"micro-batching {static['tok_s']:.1f} tok/s, p50 {static['p50']:.1f} s; ratio {results['d']['ratio']:.2f}")
    fives = sum(v for r in (results.get("a"), batched, alone, static) if r for k, v in r["statuses"].items()
                if k >= 500) + sum(v for side in sides.values() for r in side for k, v in r["statuses"].items()
                                    if k >= 500)
    results["5xx"] = fives
    print(f"\n5xx responses over every phase: {fives}  (target 0)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
