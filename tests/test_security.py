"""Security: nothing unpickles or runs remote code, chat templates render in Jinja's sandbox, and
``serve`` binds loopback by default, checks its API key in constant time, caps body size and
max_tokens, and maps request model names only onto the adapters it was started with."""
from __future__ import annotations

import ast
import hmac
import http.client
import json
import threading
from pathlib import Path

import pytest

import mlx_qlora  # noqa: F401  (fast BLAS before mlx.core)
from mlx_qlora.errors import UserError

PACKAGE = Path(mlx_qlora.__file__).parent
KEY = "sec-key-456"
# a template that reaches for Python's object graph (the classic SSTI escape)
ESCAPE = "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m.content }}{% endfor %}"


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_no_pickle_and_no_remote_code():
    """No pickle/marshal/shelve/joblib import, no torch.load, every np.load says allow_pickle=False,
    and no trust_remote_code=True: weights, adapters, checkpoints and optimizer state are
    safetensors + JSON only."""
    bad = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                bad += [f"{path.name}:{node.lineno} imports {n}" for n in names
                        if n and n.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve", "joblib")]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if node.func.attr == "load" and owner in ("torch", "pickle"):
                    bad.append(f"{path.name}:{node.lineno} {owner}.load")
                if node.func.attr == "load" and owner in ("np", "numpy") and kw.get("allow_pickle") != "False":
                    bad.append(f"{path.name}:{node.lineno} np.load without allow_pickle=False")
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and ast.unparse(node.value) != "False":
                bad.append(f"{path.name}:{node.lineno} trust_remote_code")
    assert not bad, bad


def test_checkpoint_files_are_safetensors_and_json(tmp_path, tiny_hf_llama):
    """What training writes, by suffix: safetensors for tensors, JSON/text for the rest."""
    from lora_fixtures import converted  # noqa: F401  (keeps the import order of the other tests)
    from mlx_qlora.train.config import load_config
    from mlx_qlora.train.loop import train

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": f"row {i} of the data"}) + "\n" for i in range(8)))
    from mlx_qlora.model.convert import ConvertConfig, run_convert

    model = tmp_path / "m"
    run_convert(ConvertConfig(source=str(tiny_hf_llama), out_dir=str(model), q_group_size=32))
    out = tmp_path / "run"
    train(load_config(None, {"model": str(model), "out_dir": str(out), "steps": 2, "batch_size": 2,
                             "progress": False, "checkpoint_every": 1, "eval_every": 0, "data.train": str(data),
                             "lora.rank": 2}))
    suffixes = {p.suffix or p.name for p in out.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".jsonl", ".png", "latest", ".md", ".csv", ".txt"}, suffixes
    for st in out.rglob("*.safetensors"):
        assert json.loads(st.read_bytes()[8:8 + int.from_bytes(st.read_bytes()[:8], "little")])  # a safetensors header


@pytest.fixture(scope="module")
def tiny_tok(tiny_hf_llama):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(tiny_hf_llama)


def test_training_renders_templates_in_the_sandbox(tiny_tok, tmp_path):
    from mlx_qlora.train.config import DataConfig
    from mlx_qlora.train.data import load_dataset

    hf = tiny_tok._tokenizer
    saved = hf.chat_template
    hf.chat_template = ESCAPE
    try:
        (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
        with pytest.raises(UserError, match="chat template failed.*SecurityError") as e:
            load_dataset(DataConfig(train=str(tmp_path)), tiny_tok)
        assert "\n" not in str(e.value)
    finally:
        hf.chat_template = saved


def test_llamacpp_engine_renders_templates_in_the_sandbox():
    """The llama.cpp engine renders the GGUF's template itself: the same escape is refused."""
    from mlx_qlora.infer.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine.__new__(LlamaCppEngine)  # chat_text needs only the template
    engine._template, engine.gguf_path = ESCAPE, Path("evil.gguf")
    with pytest.raises(UserError, match="evil.gguf"):
        engine.chat_text([{"role": "user", "content": "hi"}])
    engine._template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    assert engine.chat_text([{"role": "user", "content": "hi"}]) == "<user>hi"


# ---- serve --------------------------------------------------------------------------------
def test_serve_binds_loopback_by_default():
    import inspect

    from mlx_qlora.cli import serve
    from mlx_qlora.infer.serve import ServeConfig

    assert inspect.signature(ServeConfig).parameters["host"].default == "127.0.0.1"
    assert {p.name: p.default for p in serve.params}["host"] == "127.0.0.1"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from test_adapters import make_adapter, write_untied_llama

    from mlx_qlora.infer.adapters import parse_adapter_specs
    from mlx_qlora.infer.engines import EngineConfig
    from mlx_qlora.infer.engines.mlx_engine import MLXEngine
    from mlx_qlora.infer.serve import ServeConfig, make_server

    d = tmp_path_factory.mktemp("sec_serve")
    model = write_untied_llama(d / "tiny")
    (d / "secret").mkdir()
    make_adapter(model, d / "secret" / "adapter", seed=5)  # on disk, but not configured
    engine = MLXEngine(model, parse_adapter_specs([f"sql={make_adapter(model, d / 'sql', seed=1)}"]))
    cfg = ServeConfig(engine=EngineConfig(model=str(model)), host="127.0.0.1", port=0, api_key=KEY,
                      max_tokens=4, max_tokens_limit=64)
    srv = make_server(engine, cfg)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield {"port": srv.server_address[1], "dir": d}
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def post(port, body, key=KEY, path="/v1/chat/completions", raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("POST", path, body=raw if raw is not None else json.dumps(body).encode(), headers=headers)
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


MSG = [{"role": "user", "content": "hello"}]


def test_api_key_checked_in_constant_time(server, monkeypatch):
    import mlx_qlora.infer.serve as serve_mod

    calls, real = [], hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(serve_mod.hmac, "compare_digest", counting)
    assert post(server["port"], {"messages": MSG}, key=None)[0] == 401
    assert post(server["port"], {"messages": MSG}, key=KEY[:-1] + "x")[0] == 401
    assert post(server["port"], {"messages": MSG, "max_tokens": 1})[0] == 200
    assert len(calls) == 3  # every check went through hmac.compare_digest


def test_request_size_and_max_tokens_are_capped(server):
    from mlx_qlora.infer.serve import MAX_BODY

    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")  # the size is refused before any body is read
    for k, v in (("Authorization", f"Bearer {KEY}"), ("Content-Length", str(MAX_BODY + 1))):
        conn.putheader(k, v)
    conn.endheaders()
    resp = conn.getresponse()
    status, err = resp.status, json.loads(resp.read())
    conn.close()
    assert status == 413 and "body" in err["error"]["message"]
    status, err = post(server["port"], {"messages": MSG, "max_tokens": 65})
    assert status == 400 and err["error"]["param"] == "max_tokens" and "64" in err["error"]["message"]
    assert post(server["port"], {"messages": MSG, "max_tokens": 64, "stop": ["\n", "."]})[0] == 200


@pytest.mark.parametrize("name", ["../secret/adapter", "secret/adapter", "/etc/passwd", "sql/../../secret",
                                  "sql\x00", "SQL", {"path": "x"}])
def test_adapter_names_only_reach_configured_adapters(server, name):
    status, err = post(server["port"], {"messages": MSG, "model": name, "max_tokens": 1})
    assert status == 404, err
    assert "not found" in err["error"]["message"] and "sql" in err["error"]["message"]
    assert post(server["port"], {"messages": MSG, "model": "sql", "max_tokens": 1})[0] == 200
