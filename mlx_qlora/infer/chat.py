"""``mlx_qlora chat`` (a multi-turn REPL) and ``mlx_qlora generate`` (one shot, for scripts).

The conversation is re-rendered with the chat template every turn, and the engine's KV cache
is reused by prefix, so a turn only computes the new user message (and nothing of the history)
unless the adapter changed. Ctrl-C stops the answer being generated, not the session; the
part already shown stays in the history.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError, require
from .engines import EngineConfig, load_engine
from .generate import SamplingConfig

HELP = """commands:
  /adapter NAME    answer with adapter NAME from now on (/adapter off: the base model)
  /adapters        list the loaded adapters (* = active)
  /system TEXT     set the system prompt (/system alone clears it); the history is kept
  /reset           forget the conversation (keeps the system prompt and adapter)
  /save FILE       write the transcript as JSON
  /help            this text
  /quit            leave (or Ctrl-D); Ctrl-C stops an answer"""
PROMPT = ">>> "


@dataclass
class ChatConfig:
    engine: EngineConfig
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    system: str | None = None
    adapter: str | None = None     # active at start
    stats: bool = False            # print tokens, time to first token and tok/s after each answer


class ChatSession:
    """The REPL's state and commands, independent of the terminal (tests drive it directly)."""

    def __init__(self, engine, cfg: ChatConfig, out=sys.stdout):
        self.engine, self.cfg, self.out = engine, cfg, out
        self.system = cfg.system
        self.messages: list[dict] = []   # user/assistant turns, without the system prompt

    def say(self, text: str = "", end: str = "\n"):
        self.out.write(text + end)
        self.out.flush()

    def conversation(self) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        cmd, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if cmd in ("quit", "exit", "q"):
            return False
        if cmd == "help":
            self.say(HELP)
        elif cmd == "adapters":
            names = ["base"] + self.engine.adapter_names
            active = self.engine.active_adapter or "base"
            self.say("  ".join(("*" if n == active else "") + n for n in names))
        elif cmd == "adapter":
            require(bool(arg), "usage: /adapter NAME (or /adapter off); /adapters lists them")
            seconds = self.engine.set_adapter(None if arg in ("off", "base", "none") else arg)
            self.say(f"[adapter: {self.engine.active_adapter or 'off'} ({seconds * 1e3:.2f} ms)]")
        elif cmd == "reset":
            self.messages = []
            self.say("[conversation cleared]")
        elif cmd == "system":
            self.system = arg or None
            self.say(f"[system prompt {'set' if arg else 'cleared'}]")
        elif cmd == "save":
            require(bool(arg), "usage: /save FILE")
            path = Path(arg).expanduser()
            path.write_text(json.dumps(self.transcript(), indent=2, ensure_ascii=False) + "\n")
            self.say(f"[saved {len(self.messages)} messages to {path}]")
        else:
            self.say(f"unknown command /{cmd}; /help lists them")
        return True

    def transcript(self) -> dict:
        return {"model": self.engine.model_name, "engine": self.engine.name, "system": self.system,
                "sampling": asdict(self.cfg.sampling), "messages": self.messages}

    def turn(self, text: str) -> str:
        """Answer one user message, streaming it; returns the answer (partial if interrupted)."""
        self.messages.append({"role": "user", "content": text})
        prompt = self.engine.chat_prompt(self.conversation())
        answer, interrupted = [], False
        try:
            for piece in self.engine.stream(prompt, self.cfg.sampling):
                answer.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            interrupted = True
        reply = "".join(answer)
        self.messages.append({"role": "assistant", "content": reply,
                              "adapter": self.engine.active_adapter or "base"})
        self.say(" [stopped]" if interrupted else "")
        if self.cfg.stats and not interrupted:
            st = self.engine.stats
            self.say(f"[{st.generated_tokens} tokens, prompt {st.prompt_tokens} ({st.reused_tokens} cached), "
                     f"first token {st.ttft_s * 1e3:.0f} ms, {st.decode_tps:.1f} tok/s, {self.engine.name}]")
        return reply


def _read_line() -> str | None:
    try:
        return input(PROMPT)
    except EOFError:
        return None


def run_chat(cfg: ChatConfig) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    cfg.sampling.validate()
    engine = load_engine(cfg.engine)
    session = ChatSession(engine, cfg)
    if cfg.adapter:
        engine.set_adapter(cfg.adapter)
    adapters = ", ".join(engine.adapter_names) or "none"
    session.say(f"mlx_qlora chat: {engine.model_name} on {engine.name}; adapters: {adapters} "
                f"(active: {engine.active_adapter or 'off'}). /help for commands, Ctrl-D to quit.")
    if engine.note:
        session.say(engine.note)
    try:
        while True:
            try:
                line = _read_line()
            except KeyboardInterrupt:
                session.say("")  # Ctrl-C at the prompt: drop the line, stay in the session
                continue
            if line is None:
                session.say("")
                break
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not session.command(line):
                        break
                else:
                    session.turn(line)
            except UserError as e:
                session.say(f"error: {e}")
    finally:
        engine.close()


@dataclass
class GenerateConfig:
    engine: EngineConfig
    prompt: str | None = None       # None or "-": read stdin
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    system: str | None = None
    adapter: str | None = None
    raw: bool = False               # feed the prompt as is, without the chat template
    stats: bool = False             # timings to stderr


def run_generate(cfg: GenerateConfig) -> str:
    cfg.sampling.validate()
    text = sys.stdin.read() if cfg.prompt in (None, "-") else cfg.prompt
    require(bool(text.strip()), "empty prompt: pass --prompt TEXT or pipe text on stdin")
    engine = load_engine(cfg.engine)
    try:
        if cfg.adapter:
            engine.set_adapter(cfg.adapter)
        if cfg.raw:
            prompt = engine.encode(text)
        else:
            msgs = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + \
                   [{"role": "user", "content": text}]
            prompt = engine.chat_prompt(msgs)
        pieces = []
        for piece in engine.stream(prompt, cfg.sampling):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()  # before the stats on stderr
        if cfg.stats:
            st = engine.stats
            print(f"prompt {st.prompt_tokens} tokens, generated {st.generated_tokens}, first token "
                  f"{st.ttft_s * 1e3:.0f} ms, {st.decode_tps:.1f} tok/s ({engine.name})", file=sys.stderr)
        if engine.note:
            print(engine.note, file=sys.stderr)
        return "".join(pieces)
    finally:
        engine.close()
