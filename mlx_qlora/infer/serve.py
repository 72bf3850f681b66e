"""``mlx_qlora serve``: an OpenAI-compatible HTTP server over one engine and its adapters.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both
with ``stream``), ``GET /health``. The request's ``model`` picks the base model (its name or
``base``) or a loaded adapter (its name). One engine serves everyone: requests run one at a time
under a lock (the others wait in arrival order at the lock), which also lets consecutive
requests reuse the KV cache by prefix. Every bad request gets an OpenAI-style JSON error;
nothing a client sends can stop the server. Stdlib only (http.server), no extra dependency.
"""
from __future__ import annotations

import hmac
import json
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import UserError
from .engines import EngineConfig, load_engine
from .generate import SamplingConfig
from .structured import schema_from_response_format

MAX_BODY = 8 * 1024 * 1024  # bytes; a request body larger than this is refused (413)


@dataclass
class ServeConfig:
    engine: EngineConfig
    host: str = "127.0.0.1"       # loopback only unless asked: the API has no rate limits
    port: int = 8080
    api_key: str | None = None     # when set, require "Authorization: Bearer <key>"
    max_tokens: int = 512          # default for requests that give none
    max_tokens_limit: int = 4096   # the most one request may ask for (larger: 400, not a long stall)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _num(body: dict, key: str, default, kind=float, lo=None, hi=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
        raise ApiError(400, f"'{key}' must be a{'n integer' if kind is int else ' number'}, got {v!r}", key)
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ApiError(400, f"'{key}' = {v} is out of range [{lo}, {hi}]", key)
    return v


def sampling_from(body: dict, default_max: int, limit: int = 4096) -> tuple[SamplingConfig, tuple[str, ...]]:
    """OpenAI request fields (plus top_k, min_p, repetition_penalty) -> sampling, stop strings."""
    if _num(body, "n", 1, int) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    cfg = SamplingConfig(
        temperature=_num(body, "temperature", 0.0, lo=0, hi=2),
        top_p=_num(body, "top_p", 1.0, lo=1e-6, hi=1),
        top_k=_num(body, "top_k", 0, int, lo=0),
        min_p=_num(body, "min_p", 0.0, lo=0, hi=0.999),
        repetition_penalty=_num(body, "repetition_penalty", 1.0, lo=0.01, hi=10),
        seed=_num(body, "seed", None, int),
        max_tokens=_num({"max_tokens": max_tokens}, "max_tokens", default_max, int, lo=1,
                        hi=max(limit, default_max)))
    try:  # enforced by the engine's grammar library (infer/structured.py)
        cfg.json_schema = schema_from_response_format(body.get("response_format"))
    except UserError as e:
        raise ApiError(400, str(e), "response_format") from None
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stop = tuple(s for s in stop if s)
    else:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    return cfg, stop


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


class Server(ThreadingHTTPServer):
    daemon_threads = True     # a hung client never keeps the process alive
    allow_reuse_address = True

    def __init__(self, engine, cfg: ServeConfig):
        self.engine, self.cfg = engine, cfg
        self.lock = threading.Lock()   # one generation at a time on the shared engine and KV cache
        super().__init__((cfg.host, cfg.port), Handler)

    def model_ids(self) -> list[str]:
        return [self.engine.model_name] + self.engine.adapter_names

    def adapter_for(self, model) -> str | None:
        if model in (None, "", "base", self.engine.model_name):
            return None
        if isinstance(model, str) and model in self.engine.adapter_names:
            return model
        raise ApiError(404, f"model {model!r} not found; available: {', '.join(self.model_ids())}",
                       "model", "model_not_found")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, fmt, *args):  # one short line per request on stderr, no access log noise
        pass

    # --- plumbing --------------------------------------------------------------------------
    def _send_json(self, status: int, obj: dict, close: bool = False):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:  # tell the client, or its pool may reuse a socket we are about to close
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _auth(self):
        key = self.server.cfg.api_key
        if key:
            got = self.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {key}".encode()):
                raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    def _body(self) -> dict:
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
        if n > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(n) if n > 0 else b""
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    def _handle(self, fn):
        try:
            self._auth()
            fn()
        except ApiError as e:
            # the body may be unread: close rather than parse its rest as the next request
            self._send_json(e.status, e.body(), close=True)
        except UserError as e:
            self._send_json(400, ApiError(400, str(e)).body(), close=True)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug: report it, keep serving
            traceback.print_exc()
            try:
                self._send_json(500, ApiError(500, f"internal error: {type(e).__name__}: {e}").body(), close=True)
            except OSError:
                self.close_connection = True

    def do_GET(self):
        if self.path.rstrip("/") == "/health":
            return self._send_json(200, {"status": "ok"})
        self._handle(self._get)

    def do_POST(self):
        self._handle(self._post)

    def _get(self):
        if self.path.rstrip("/") != "/v1/models":
            raise ApiError(404, f"no route GET {self.path}")
        created = int(time.time())
        self._send_json(200, {"object": "list", "data": [
            {"id": m, "object": "model", "created": created, "owned_by": "mlx_qlora"}
            for m in self.server.model_ids()]})

    def _post(self):
        path = self.path.rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            raise ApiError(404, f"no route POST {self.path}")
        body = self._body()
        chat = path == "/v1/chat/completions"
        model = body.get("model")
        adapter = self.server.adapter_for(model)
        sampling, stop = sampling_from(body, self.server.cfg.max_tokens, self.server.cfg.max_tokens_limit)
        if chat:
            msgs = _messages(body)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
        stream = bool(body.get("stream", False))
        usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage", False))
        engine = self.server.engine
        with self.server.lock:
            engine.set_adapter(adapter)
            tokens = engine.chat_prompt(msgs) if chat else engine.encode(prompt)
            pieces = engine.stream(tokens, sampling, stop)
            meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], "created": int(time.time()),
                    "model": model or engine.model_name}
            if stream:
                self._stream(pieces, meta, chat, usage_in_stream)
            else:
                text = "".join(pieces)
                self._send_json(200, _complete(meta, chat, text, engine.stats))

    def _stream(self, pieces, meta: dict, chat: bool, include_usage: bool):
        # run up to the first piece before answering 200, so a prompt the engine rejects
        # (too long for the context, ...) still gets a JSON error
        first = next(pieces, None)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the end of the body is the end of the stream
        self.end_headers()
        self.close_connection = True
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict | None, usage=None):
            obj = {**meta, "object": kind, "choices": [] if choice is None else [{"index": 0, **choice}]}
            if usage is not None:
                obj["usage"] = usage
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        try:
            if chat:
                event({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            for piece in _chain(first, pieces):
                event({"delta": {"content": piece}, "finish_reason": None} if chat
                      else {"text": piece, "logprobs": None, "finish_reason": None})
            st = self.server.engine.stats
            event({"delta": {}, "finish_reason": st.finish_reason} if chat
                  else {"text": "", "logprobs": None, "finish_reason": st.finish_reason})
            if include_usage:
                event(None, _usage(st))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        finally:
            pieces.close()  # a client that hung up stops the generation here


def _chain(first, rest):
    if first is not None:
        yield first
        yield from rest


def _usage(st) -> dict:
    return {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.generated_tokens,
            "total_tokens": st.prompt_tokens + st.generated_tokens}


def _complete(meta: dict, chat: bool, text: str, st) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": st.finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": st.finish_reason}
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": _usage(st)}


def make_server(engine, cfg: ServeConfig) -> Server:
    """A bound, not yet running server (``port=0`` picks a free port: see ``server_address``)."""
    try:
        return Server(engine, cfg)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}; pick another --port") from None


def run_serve(cfg: ServeConfig) -> None:
    engine = load_engine(cfg.engine)
    server = make_server(engine, cfg)
    host, port = server.server_address[:2]
    print(f"mlx_qlora serve: http://{host}:{port}/v1  models: {', '.join(server.model_ids())}  "
          f"engine: {engine.name}{'  (API key required)' if cfg.api_key else ''}", flush=True)
    if engine.note:
        print(engine.note, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()
