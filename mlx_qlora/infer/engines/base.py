"""The small interface chat, generate and serve use, whatever runs the model underneath.

An engine owns one model, its tokenizer, the loaded adapters and one KV cache that is reused by
prefix across calls (a chat's history, a server's repeated system prompt). Engines are not
thread-safe: callers that share one (the server) hold a lock around each generation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

from ...errors import require
from ..generate import SamplingConfig


@dataclass
class GenStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0        # prompt tokens whose KV came from the cache (not recomputed)
    generated_tokens: int = 0
    ttft_s: float = 0.0           # seconds from the call to the first generated token
    decode_s: float = 0.0         # seconds from the first to the last generated token
    finish_reason: str = "stop"   # "stop" (eos or stop string), "length" (max_tokens)

    @property
    def decode_tps(self) -> float:
        """Decode speed, tokens/s, excluding the first token (that one pays for the prompt)."""
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


class Engine:
    """Subclasses set ``name``/``model_name`` and implement the ``_``-prefixed methods."""

    name = "base"
    model_name = "model"
    note: str | None = None   # one line for the user about the engine choice (why MLX runs on a CPU)

    def __init__(self):
        self.adapter_names: list[str] = []
        self.active_adapter: str | None = None
        self.stats = GenStats()

    # --- implemented by engines -------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text -> ids, special tokens in the text parsed as such, nothing added."""
        raise NotImplementedError

    def chat_text(self, messages: list[dict]) -> str:
        """Messages rendered with the model's chat template, ending with the assistant prompt."""
        raise NotImplementedError

    def _set_adapter(self, name: str | None) -> None:
        raise NotImplementedError

    def _tokens(self, prompt: list[int], cfg: SamplingConfig, info: dict) -> Iterator[int]:
        """Sampled ids after ``prompt`` (stop ids excluded); sets info['reused'], ['finish_reason']."""
        raise NotImplementedError

    def _detokenizer(self):
        """A fresh object with ``add(id) -> str`` and ``flush() -> str``."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the KV cache (the next prompt is computed from scratch)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # --- shared -----------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.encode(self.chat_text(messages))

    def set_adapter(self, name: str | None) -> float:
        """Activate adapter ``name`` (None/'base' = none) without reloading; returns seconds."""
        from ..adapters import BASE

        t0 = time.perf_counter()
        name = None if name in (None, BASE) else name
        require(name is None or name in self.adapter_names,
                f"unknown adapter {name!r}; loaded: {', '.join(self.adapter_names) or 'none'} "
                f"(load one with --adapter NAME=DIR)")
        if name != self.active_adapter:
            self._set_adapter(name)
            self.active_adapter = name
        return time.perf_counter() - t0

    def stream(self, prompt: list[int], cfg: SamplingConfig, stop: tuple[str, ...] = ()) -> Iterator[str]:
        """Yield text pieces of the continuation of ``prompt``; stats land in ``self.stats``.

        ``stop`` strings end the text before them (as OpenAI's ``stop``); they are held back
        while they could still be forming, so no piece of a stop string is ever emitted.
        """
        cfg.validate()
        t0 = time.perf_counter()
        st = self.stats = GenStats(prompt_tokens=len(prompt))
        info: dict = {}
        detok = self._detokenizer()
        hold = max((len(s) for s in stop), default=1) - 1
        pending = ""
        t_first = None
        try:
            for token in self._tokens(prompt, cfg, info):
                st.generated_tokens += 1
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                    st.ttft_s = now - t0
                st.decode_s = now - t_first
                pending += detok.add(token)
                if stop:
                    cut = _find_stop(pending, stop)
                    if cut is not None:
                        st.finish_reason = "stop"
                        if pending[:cut]:
                            yield pending[:cut]
                        return
                    if len(pending) > hold:
                        yield pending[:len(pending) - hold]
                        pending = pending[len(pending) - hold:]
                elif pending:
                    yield pending
                    pending = ""
            pending += detok.flush()
            cut = _find_stop(pending, stop) if stop else None
            if cut is not None:
                pending = pending[:cut]
                info["finish_reason"] = "stop"
            if pending:
                yield pending
            st.finish_reason = info.get("finish_reason", "stop")
        finally:
            st.reused_tokens = info.get("reused", 0)

    def generate(self, prompt: list[int], cfg: SamplingConfig, stop: tuple[str, ...] = ()) -> str:
        return "".join(self.stream(prompt, cfg, stop))


def _find_stop(text: str, stop: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None
