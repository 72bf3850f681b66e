"""``serve`` with OpenAI's ``response_format`` (json_schema, json_object), through the real
``openai`` client, on both engines: the answer validates even from an untrained model."""
from __future__ import annotations

import json
import threading

import pytest

import mlx_qlora  # noqa: F401  (fast BLAS before mlx.core)
import tiny

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "required": ["city", "stars"], "additionalProperties": False,
          "properties": {"city": {"type": "string", "maxLength": 8},
                         "stars": {"enum": [1, 2, 3, 4, 5]},
                         "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["cheap", "loud", "cozy"]}}}}
MSGS = [{"role": "user", "content": "Rate the place as JSON."}]


def _engine(kind: str, d):
    hf = tiny.write_hf_dir(d / "hf", arch="llama", seed=5)
    if kind == "llama.cpp":
        from mlx_qlora.infer.engines.llamacpp import LlamaCppEngine

        pytest.importorskip("llama_cpp")
        return LlamaCppEngine(tiny.write_gguf(hf, d / "tiny.gguf"), n_ctx=1024, n_threads=1)
    from mlx_qlora.infer.engines.mlx_engine import MLXEngine
    from mlx_qlora.model.convert import ConvertConfig, run_convert

    run_convert(ConvertConfig(source=str(hf), out_dir=str(d / "mlx")))
    return MLXEngine(d / "mlx")


@pytest.fixture(scope="module", params=["mlx", "llama.cpp"])
def client(request, tmp_path_factory):
    from mlx_qlora.infer.engines import EngineConfig
    from mlx_qlora.infer.serve import ServeConfig, make_server

    engine = _engine(request.param, tmp_path_factory.mktemp("serve_json"))
    server = make_server(engine, ServeConfig(engine=EngineConfig(), host="127.0.0.1", port=0, max_tokens=300))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0,
                      timeout=120)
    yield lambda **kw: c.chat.completions.create(model=engine.model_name, messages=MSGS, **kw)
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_json_schema_answer_validates(client):
    rf = {"type": "json_schema", "json_schema": {"name": "rating", "schema": SCHEMA, "strict": True}}
    for seed in (1, 2):
        r = client(response_format=rf, temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    # the same schema without response_format: the untrained model does not write it
    plain = client(max_tokens=30)
    with pytest.raises((ValueError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(plain.choices[0].message.content), SCHEMA)


def test_json_object_answer_is_an_object_or_cut(client):
    r = client(response_format={"type": "json_object"}, max_tokens=60)
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_bad_response_format_is_a_400_and_the_server_lives(client):
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client(response_format={"type": "yaml"})
    with pytest.raises(openai.BadRequestError, match="not a valid JSON schema"):
        client(response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}})
    bounded = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["n"],
        "additionalProperties": False}}}
    try:     # llguidance enforces the bounds; llama.cpp's grammar cannot, and says so
        r = client(response_format=bounded, max_tokens=40)
        assert 1 <= json.loads(r.choices[0].message.content)["n"] <= 5
    except openai.BadRequestError as e:
        assert "does not enforce maximum, minimum" in str(e)
    r = client(max_tokens=4)
    assert r.choices[0].message.content is not None
