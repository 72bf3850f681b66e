"""``mlx_qlora chat`` driven as a terminal program through a pseudo-terminal: turns, adapter
switches, Ctrl-C; answers checked against the engine's greedy answers computed directly."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

import pytest

import mlx_qlora  # noqa: F401  (fast BLAS before mlx.core)
from test_adapters import make_adapter, write_untied_llama
from subproc import child_env
from tolerance import transient_s

ROOT = Path(__file__).resolve().parent.parent
PROMPT = b">>> "


class Terminal:
    """A child process on a pty: what a user at a terminal sees and types (with echo, \\r\\n)."""

    def __init__(self, argv: list[str]):
        env = child_env(ROOT, TERM="dumb", PYTHONIOENCODING="utf-8")
        pid, fd = pty.fork()
        if pid == 0:  # child: becomes the session leader with the pty as controlling terminal
            os.chdir(ROOT)
            # a shell gives its foreground job the default SIGINT; a test run started in the
            # background (CI, `cmd &`) would otherwise pass on SIG_IGN and Ctrl-C would do nothing
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execvpe(argv[0], argv, env)
        self.pid, self.fd, self.buf = pid, fd, b""

    def read_until(self, marker: bytes, timeout: float = 60) -> bytes:
        end = time.monotonic() + transient_s(timeout)
        while marker not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {marker!r}; screen: {self.buf[-800:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # child gone
                    data = b""
                if not data:
                    raise AssertionError(f"program exited before {marker!r}; screen: {self.buf[-800:]!r}")
                self.buf += data
        i = self.buf.index(marker)
        out, self.buf = self.buf[:i], self.buf[i + len(marker):]
        return out

    def send(self, text: str):
        os.write(self.fd, text.encode())

    def ask(self, line: str) -> str:
        """Type a line, wait for the next prompt; returns what was printed (echo removed)."""
        self.send(line + "\n")
        shown = self.read_until(PROMPT).decode("utf-8")
        # the first line is the echo of what was typed (readline may scroll a long one)
        return shown.partition("\r\n")[2]

    def wait(self, timeout: float = 30) -> int:
        end = time.monotonic() + transient_s(timeout)
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                os.read(self.fd, 65536)
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("chat did not exit")

    def close(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    model = write_untied_llama(d / "model")
    return model, {"sql": make_adapter(model, d / "sql", seed=1), "poem": make_adapter(model, d / "poem", seed=2)}


def _engine(kind: str, model: Path, adapters: dict):
    """The engine the chat process runs, built in-process to compute the expected answers."""
    from mlx_qlora.infer.engines import EngineConfig, load_engine

    return load_engine(EngineConfig(model=str(model), engine=kind, n_ctx=512, threads=1,
                                    adapters=[f"{n}={p}" for n, p in adapters.items()]))


def _cmd(model, adapters, *extra, engine="mlx") -> list[str]:
    argv = [sys.executable, "-m", "mlx_qlora.cli", "chat", str(model), "--engine", engine, "--ctx", "512",
            "--threads", "1"]  # a busy CI box stalls multi-threaded llama.cpp (see engines/llamacpp.py)
    for name, path in adapters.items():
        argv += ["--adapter", f"{name}={path}"]
    return argv + list(extra)


def _screen(text: str) -> str:
    """How the terminal shows an answer: the tty turns each \\n into \\r\\n."""
    return text.replace("\n", "\r\n") + "\r\n"


@pytest.mark.parametrize("engine", ["mlx", pytest.param("llama.cpp", marks=pytest.mark.llamacpp)])
def test_chat_turns_and_adapter_switch_in_a_terminal(chat_model, tmp_path, engine):
    from mlx_qlora.infer.generate import SamplingConfig

    model, adapters = chat_model
    if engine == "llama.cpp":
        pytest.importorskip("llama_cpp")
        import tiny

        if not (model / "model.gguf").exists():
            tiny.write_gguf(model, model / "model.gguf")  # found next to the model by --engine auto
    term = Terminal(_cmd(model, adapters, "-n", "16", engine="auto" if engine == "llama.cpp" else "mlx"))
    try:
        banner = term.read_until(PROMPT).decode()
        assert "adapters: sql, poem" in banner and f"on {engine};" in banner
        shown = [term.ask("hello there")]
        assert "[adapter: sql" in term.ask("/adapter sql")
        shown.append(term.ask("hello there"))
        assert "[adapter: poem" in term.ask("/adapter poem")
        shown.append(term.ask("hello there"))
        assert "*poem" in term.ask("/adapters")
        assert "saved 6 messages" in term.ask(f"/save {tmp_path / 't.json'}")
        term.send("/quit\n")
        assert term.wait() == 0
    finally:
        term.close()

    # the expected answers, from the same engine code driven directly (greedy, no terminal)
    eng = _engine(engine, model, adapters)
    cfg = SamplingConfig(max_tokens=16)
    history, want, alt = [], [], []
    for adapter in (None, "sql", "poem"):
        history.append({"role": "user", "content": "hello there"})
        prompt = eng.chat_prompt(history)
        others = [a for a in (None, "sql", "poem") if a != adapter]
        eng.set_adapter(others[0])
        alt.append(eng.generate(prompt, cfg))   # what another adapter would have said
        eng.set_adapter(adapter)
        want.append(eng.generate(prompt, cfg))
        history.append({"role": "assistant", "content": want[-1]})
    assert shown == [_screen(w) for w in want]
    assert all(w != a for w, a in zip(want, alt)), "adapters must change the answer"
    saved = json.loads((tmp_path / "t.json").read_text())
    assert [m["content"] for m in saved["messages"] if m["role"] == "assistant"] == want
    assert [m.get("adapter") for m in saved["messages"] if m["role"] == "assistant"] == ["base", "sql", "poem"]


def test_ctrl_c_stops_the_answer_not_the_session(chat_model):
    model, adapters = chat_model
    term = Terminal(_cmd(model, adapters, "-n", "100000"))
    try:
        term.read_until(PROMPT)
        term.send("tell me everything\n")
        term.read_until(b"\r\n")  # the echo; the answer now streams
        time.sleep(0.5)
        term.send("\x03")  # Ctrl-C, as the terminal delivers it: SIGINT to the foreground process
        term.read_until(b"[stopped]", timeout=30)
        term.read_until(PROMPT)
        assert "*base" in term.ask("/adapters")  # still alive and answering
        assert "error: unknown adapter" in term.ask("/adapter nope")
        term.send("\x04")  # Ctrl-D at the prompt ends the session cleanly
        assert term.wait() == 0
    finally:
        term.close()


def test_generate_one_shot_matches_chat_engine(chat_model, capsys, monkeypatch):
    import io

    from mlx_qlora.infer.adapters import parse_adapter_specs
    from mlx_qlora.infer.chat import GenerateConfig, run_generate
    from mlx_qlora.infer.engines import EngineConfig
    from mlx_qlora.infer.engines.mlx_engine import MLXEngine
    from mlx_qlora.infer.generate import SamplingConfig

    model, adapters = chat_model
    specs = [f"{n}={p}" for n, p in adapters.items()]
    eng = MLXEngine(model, parse_adapter_specs(specs))
    eng.set_adapter("sql")
    want = eng.generate(eng.chat_prompt([{"role": "user", "content": "count to ten"}]), SamplingConfig(max_tokens=20))
    monkeypatch.setattr(sys, "stdin", io.StringIO("count to ten"))
    got = run_generate(GenerateConfig(engine=EngineConfig(model=str(model), adapters=specs, engine="mlx"),
                                      prompt=None, adapter="sql", sampling=SamplingConfig(max_tokens=20)))
    assert got == want and capsys.readouterr().out == want + "\n"


def test_cli_errors_are_one_line(chat_model, tmp_path):
    import subprocess

    model, _ = chat_model
    for args, needle in [([str(tmp_path / "nope")], "does not exist"),
                         ([str(model), "--adapter", f"x={tmp_path}/missing"], "not found"),
                         ([str(model), "--adapter", "base=/x"], "bad adapter name"),
                         ([str(model), "--top-p", "0"], "top-p")]:
        r = subprocess.run([sys.executable, "-m", "mlx_qlora.cli", "generate", "--engine", "mlx", "-p", "hi", *args],
                           capture_output=True, text=True, cwd=ROOT, env=child_env(ROOT))
        assert r.returncode == 2 and r.stderr.startswith("error: ") and needle in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
