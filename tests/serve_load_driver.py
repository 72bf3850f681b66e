"""Bounded load on ``mlx_qlora serve`` from a second process over loopback, shared by
tests/test_serve_load.py (a short run) and bench/serve_load.py (200 requests, 8 concurrent).

The server is a real ``mlx_qlora serve`` subprocess (tiny llama, two adapters, an API key). The
load mixes the base model and both adapters, chat and completions, streaming and not, and
malformed requests (broken JSON, unknown model, out-of-range max_tokens, wrong key, a path
outside the API). Every valid answer must equal the one the same request got alone before the
load (greedy decoding: the answer is a function of model, adapter and prompt), so an answer
from the wrong adapter or a mixed-up stream counts as an error.
"""
from __future__ import annotations

import http.client
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

KEY = "load-key-789"
PROMPTS = ["the cat sat on", "SELECT name FROM", "once upon a time", "def add(a, b):", "the capital of"]
MALFORMED = ("bad-json", "bad-model", "bad-max-tokens", "bad-key", "bad-path")


def build_models(root: Path) -> tuple[Path, dict[str, Path]]:
    """The tiny untied llama (HF directory) and two adapters that change its answers."""
    from test_adapters import make_adapter, write_untied_llama

    model = write_untied_llama(root / "tiny")
    return model, {"sql": make_adapter(model, root / "sql", seed=1), "poem": make_adapter(model, root / "poem", seed=2)}


def start_server(model: Path, adapters: dict[str, Path], max_tokens: int = 8) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mlx_qlora.cli", "serve", str(model), "--engine", "mlx", "--port", str(port),
           "--api-key", KEY, "--max-tokens", str(max_tokens), "--max-tokens-limit", "64"]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    end = time.time() + 300
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited: {proc.stdout.read()}")
        try:
            if _http(port, "GET", "/health")[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("serve did not answer /health in 300 s")


def stop_server(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        return proc.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


@dataclass
class Request:
    kind: str                 # chat | completion | stream-chat | stream-completion | one of MALFORMED
    model: str = "base"
    prompt: str = ""

    @property
    def valid(self) -> bool:
        return self.kind not in MALFORMED

    @property
    def key(self) -> tuple:   # what the answer depends on (streaming or not gives the same text)
        return self.kind.removeprefix("stream-"), self.model, self.prompt


@dataclass
class Result:
    request: Request
    status: int
    text: str | None
    error: str | None
    seconds: float


def request_mix(n: int, seed: int = 0, malformed_share: float = 0.15) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < malformed_share:
            out.append(Request(rng.choice(MALFORMED), rng.choice(["base", "sql", "poem"]), rng.choice(PROMPTS)))
        else:
            out.append(Request(rng.choice(["chat", "completion", "stream-chat", "stream-completion"]),
                               rng.choice(["base", "sql", "poem"]), rng.choice(PROMPTS)))
    return out


def _http(port: int, method: str, path: str, body: bytes | None = None, key: str | None = KEY):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def send(port: int, r: Request) -> Result:
    chat = "chat" in r.kind or r.kind in MALFORMED
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": r.model, "max_tokens": 8, "stream": r.kind.startswith("stream-")}
    body.update({"messages": [{"role": "user", "content": r.prompt}]} if chat else {"prompt": r.prompt})
    raw, key = json.dumps(body).encode(), KEY
    if r.kind == "bad-json":
        raw = raw[:-3]
    elif r.kind == "bad-model":
        raw = json.dumps({**body, "model": "../" + r.model}).encode()
    elif r.kind == "bad-max-tokens":
        raw = json.dumps({**body, "max_tokens": 10 ** 6}).encode()
    elif r.kind == "bad-key":
        key = "wrong"
    elif r.kind == "bad-path":
        path = "/v1/../../etc/passwd"
    t = time.perf_counter()
    status, data = _http(port, "POST", path, raw, key)
    dt = time.perf_counter() - t
    if status != 200:
        try:
            return Result(r, status, None, json.loads(data)["error"]["message"], dt)
        except (ValueError, KeyError, TypeError):
            return Result(r, status, None, f"not a JSON error: {data[:100]!r}", dt)
    if body["stream"]:
        text = ""
        for line in data.decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"]
                if choice:
                    text += choice[0].get("delta", {}).get("content", "") if chat else choice[0].get("text", "")
        return Result(r, status, text, None, dt)
    choice = json.loads(data)["choices"][0]
    return Result(r, status, choice["message"]["content"] if chat else choice["text"], None, dt)


def expected_answers(port: int, requests: list[Request]) -> dict[tuple, str]:
    """Each distinct valid request, asked alone and not streamed."""
    out = {}
    for r in requests:
        if r.valid and r.key not in out:
            res = send(port, Request(r.key[0], r.model, r.prompt))
            assert res.status == 200, res
            out[r.key] = res.text
    return out


@dataclass
class LoadReport:
    requests: int = 0
    valid: int = 0
    malformed: int = 0
    wrong: list = field(default_factory=list)   # valid with a wrong answer / malformed without a JSON error
    latencies: list = field(default_factory=list)
    seconds: float = 0.0

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] * 1000 if xs else float("nan")

    def line(self) -> str:
        return (f"{self.requests} requests ({self.valid} valid, {self.malformed} malformed) in {self.seconds:.1f} s: "
                f"{len(self.wrong)} errors, p50 {self.pct(0.5):.0f} ms, p99 {self.pct(0.99):.0f} ms, "
                f"mean {statistics.fmean(self.latencies) * 1000 if self.latencies else float('nan'):.0f} ms")


def run_load(port: int, requests: list[Request], expected: dict, concurrency: int) -> LoadReport:
    rep = LoadReport(requests=len(requests))
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda r: send(port, r), requests))
    rep.seconds = time.perf_counter() - t
    for res in results:
        rep.latencies.append(res.seconds)
        if res.request.valid:
            rep.valid += 1
            if res.status != 200 or res.text != expected[res.request.key]:
                rep.wrong.append((res.request, res.status, res.text, res.error))
        else:
            rep.malformed += 1
            if not (400 <= res.status < 500 and res.error and not res.error.startswith("not a JSON")):
                rep.wrong.append((res.request, res.status, res.error))
    return rep

