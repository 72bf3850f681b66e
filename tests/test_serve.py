"""``mlx_qlora serve`` tested with the real ``openai`` client against a server on 127.0.0.1
(random free port) started and stopped by the fixture: answers equal the engine's own greedy
answers, ``model`` picks the adapter, streaming, JSON errors, concurrent requests."""
from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import mlx_qlora  # noqa: F401  (fast BLAS before mlx.core)
from test_adapters import make_adapter, write_untied_llama
from subproc import child_env
from tolerance import transient_s

openai = pytest.importorskip("openai")
KEY = "test-key-123"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from mlx_qlora.infer.adapters import parse_adapter_specs
    from mlx_qlora.infer.engines import EngineConfig
    from mlx_qlora.infer.engines.mlx_engine import MLXEngine
    from mlx_qlora.infer.serve import ServeConfig, make_server

    d = tmp_path_factory.mktemp("serve")
    model = write_untied_llama(d / "tiny")
    specs = [f"sql={make_adapter(model, d / 'sql', seed=1)}", f"poem={make_adapter(model, d / 'poem', seed=2)}"]
    engine = MLXEngine(model, parse_adapter_specs(specs))
    cfg = ServeConfig(engine=EngineConfig(model=str(model)), host="127.0.0.1", port=0, api_key=KEY, max_tokens=16)
    server = make_server(engine, cfg)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=transient_s(60))
    ref = MLXEngine(model, parse_adapter_specs(specs))  # a second engine computes expected answers
    yield {"client": client, "port": port, "ref": ref, "server": server}
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


def expected_chat(ref, adapter, messages, max_tokens=16, stop=()):
    from mlx_qlora.infer.generate import SamplingConfig

    ref.set_adapter(adapter)
    return ref.generate(ref.chat_prompt(messages), SamplingConfig(max_tokens=max_tokens), stop)


MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat on"}]


def test_models_lists_base_and_adapters(served):
    ids = [m.id for m in served["client"].models.list().data]
    assert ids == ["tiny", "sql", "poem"]


def test_model_field_picks_the_adapter(served):
    client, ref = served["client"], served["ref"]
    answers = {}
    for model in ["tiny", "sql", "poem", "base"]:
        r = client.chat.completions.create(model=model, messages=MSGS, temperature=0)
        answers[model] = r.choices[0].message.content
        assert answers[model] == expected_chat(ref, None if model in ("tiny", "base") else model, MSGS)
        assert r.model == model and r.usage.completion_tokens > 0 and r.choices[0].finish_reason in ("stop", "length")
    assert answers["tiny"] == answers["base"]
    assert len({answers["tiny"], answers["sql"], answers["poem"]}) == 3


def test_streaming_equals_non_streaming(served):
    client = served["client"]
    full = client.chat.completions.create(model="sql", messages=MSGS, max_tokens=12)
    chunks = list(client.chat.completions.create(model="sql", messages=MSGS, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_endpoint(served):
    from mlx_qlora.infer.generate import SamplingConfig

    client, ref = served["client"], served["ref"]
    r = client.completions.create(model="poem", prompt="SELECT name FROM", max_tokens=10)
    ref.set_adapter("poem")
    want = ref.generate(ref.encode("SELECT name FROM"), SamplingConfig(max_tokens=10))
    assert r.choices[0].text == want
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="poem", prompt="SELECT name FROM", max_tokens=10, stream=True) if c.choices)
    assert streamed == want
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10


def test_stop_and_sampling_parameters(served):
    client, ref = served["client"], served["ref"]
    full = expected_chat(ref, None, MSGS, max_tokens=16)
    stop = full[4:7]
    r = client.chat.completions.create(model="tiny", messages=MSGS, stop=[stop])
    assert r.choices[0].message.content == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    kw = dict(model="tiny", messages=MSGS, temperature=1.2, top_p=0.9, seed=7,
              extra_body={"top_k": 50, "min_p": 0.05, "repetition_penalty": 1.1})
    a = client.chat.completions.create(**kw).choices[0].message.content
    assert a == client.chat.completions.create(**kw).choices[0].message.content  # seeded: reproducible


def test_bad_requests_get_json_errors_and_the_server_lives(served):
    client, port = served["client"], served["port"]
    with pytest.raises(openai.NotFoundError, match="model 'nope' not found"):
        client.chat.completions.create(model="nope", messages=MSGS)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=MSGS, extra_body={"temperature": "hot"})
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="tiny", messages=MSGS, n=2)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="tiny", prompt=[1, 2, 3])
    bad_key = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    # raw HTTP: broken JSON, unknown route, wrong method: JSON errors, never a dropped connection
    for method, path, body, status in [("POST", "/v1/chat/completions", b"{not json", 400),
                                       ("POST", "/v1/chat/completions", b"[1, 2]", 400),
                                       ("GET", "/v1/nothing", None, 404),
                                       ("POST", "/v1/models", b"{}", 404)]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=transient_s(30))
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}",
                                                      "Content-Type": "application/json"})
        resp = conn.getresponse()
        err = json.loads(resp.read())
        conn.close()
        assert resp.status == status and "message" in err["error"], (path, err)
    # still serving
    assert client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2).choices[0].message.content


def test_concurrent_requests_are_queued_safely(served):
    client, ref = served["client"], served["ref"]
    models = ["tiny", "sql", "poem"] * 3
    want = {m: expected_chat(ref, None if m == "tiny" else m, MSGS) for m in set(models)}

    def ask(i_model):
        i, model = i_model
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=model, messages=MSGS, stream=True) if c.choices)
        return client.chat.completions.create(model=model, messages=MSGS).choices[0].message.content

    with ThreadPoolExecutor(max_workers=len(models)) as pool:
        got = list(pool.map(ask, enumerate(models)))
    assert got == [want[m] for m in models]


class ServeProcess:
    """``mlx_qlora serve ARGS --port 0`` as a real process (as from an interactive shell: SIGINT at
    its default even when this test run was started in the background with SIGINT ignored):
    ``line`` is its first line of output, ``client`` an OpenAI client for its URL (None if the
    line named none); ``stop()`` sends Ctrl-C (SIGINT) and returns the exit code."""

    def __init__(self, *args):
        import re
        import signal
        import subprocess
        import sys
        from pathlib import Path

        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen([sys.executable, "-m", "mlx_qlora.cli", "serve", *map(str, args), "--port", "0"],
                                     cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=child_env(root),
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", self.line)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{m.group(1)}/v1", api_key="none",
                                    max_retries=0) if m else None

    def stop(self) -> int:
        import signal
        import subprocess

        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=transient_s(20))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def test_serve_command_starts_answers_and_stops(tmp_path):
    """The real `mlx_qlora serve` process: prints its URL (port 0 = a free one), answers, and
    exits cleanly on Ctrl-C (SIGINT), which the test sends in any case."""
    model = write_untied_llama(tmp_path / "m")
    adapter = make_adapter(model, tmp_path / "sql", seed=1)
    srv = ServeProcess(model, "--engine", "mlx", "--adapter", f"sql={adapter}")
    try:
        assert srv.client is not None, srv.line
        assert [x.id for x in srv.client.models.list().data] == ["m", "sql"]
        r = srv.client.chat.completions.create(model="sql", messages=MSGS, max_tokens=4)
        assert r.usage.completion_tokens >= 1
    finally:
        rc = srv.stop()
    assert rc == 0
