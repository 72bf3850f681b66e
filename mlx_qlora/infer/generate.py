"""Sampling, incremental detokenization and KV-cached generation on an MLX model.

:class:`KVSession` keeps one KV cache and the exact tokens it holds. Each new prompt reuses the
longest common prefix with those tokens and only runs the rest through the model, so a chat turn
costs the new message, not the whole history. Everything here is engine-agnostic except
``KVSession``/``generate_tokens``, which drive an mlx-lm model (``model(tokens, cache=...)``).
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx

from ..errors import require

PREFILL_STEP = 512  # tokens per prefill chunk: bounds peak memory of the attention scores


@dataclass
class SamplingConfig:
    temperature: float = 0.0          # 0 = greedy (argmax)
    top_p: float = 1.0                # nucleus; 1 = off
    top_k: int = 0                    # 0 = off
    min_p: float = 0.0                # 0 = off
    repetition_penalty: float = 1.0   # 1 = off; >1 discourages tokens seen in the last window
    repetition_context_size: int = 64  # tokens, the penalty's window
    seed: int | None = None
    max_tokens: int = 256
    ignore_eos: bool = False          # generate exactly max_tokens (benchmarks)
    json_schema: dict | None = None   # constrain the output to JSON valid against it (infer/structured.py)
    grammar: str | None = None        # or to this llguidance (lark) grammar (MLX engine; apps/compact_grammar.py)

    def validate(self) -> "SamplingConfig":
        require(self.temperature >= 0, f"--temperature {self.temperature}: must be >= 0")
        require(0 < self.top_p <= 1, f"--top-p {self.top_p}: must be in (0, 1]")
        require(self.top_k >= 0, f"--top-k {self.top_k}: must be >= 0 (0 = off)")
        require(0 <= self.min_p < 1, f"--min-p {self.min_p}: must be in [0, 1)")
        require(self.repetition_penalty > 0, f"--repetition-penalty {self.repetition_penalty}: must be > 0")
        require(self.max_tokens >= 1, f"--max-tokens {self.max_tokens}: must be >= 1")
        return self


def make_sampler(cfg: SamplingConfig) -> tuple[Callable, list[Callable]]:
    """(sampler over log-probs, logits processors) in mlx-lm's conventions."""
    from mlx_lm.sample_utils import make_logits_processors
    from mlx_lm.sample_utils import make_sampler as _make

    sampler = _make(temp=cfg.temperature, top_p=cfg.top_p if cfg.top_p < 1 else 0.0,
                    min_p=cfg.min_p, top_k=cfg.top_k)
    procs = []
    if cfg.repetition_penalty != 1.0:
        procs = make_logits_processors(repetition_penalty=cfg.repetition_penalty,
                                       repetition_context_size=cfg.repetition_context_size)
    return sampler, procs


class Detokenizer:
    """Token ids -> text pieces, streaming-safe for byte-level BPE.

    Decodes a short window (the last few tokens before the new ones) and emits only the new
    suffix, holding back text that ends in an incomplete UTF-8 sequence (U+FFFD). O(1) per token,
    unlike decoding the whole output each time.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0   # start of the context window
        self.read = 0     # ids[prefix:read] is already emitted

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


class ByteDetokenizer:
    """For engines that detokenize to bytes (llama.cpp): an incremental UTF-8 decoder."""

    def __init__(self, piece: Callable[[int], bytes]):
        self.piece = piece
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self.utf8.decode(self.piece(token))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class KVSession:
    """One KV cache and the tokens whose keys/values it holds (for prefix reuse across turns)."""

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.tokens: list[int] = []

    def reset(self):
        self.cache, self.tokens = None, []

    def _rewind(self, keep: int) -> int:
        """Drop cached tokens after ``keep``; returns how many are kept (0 if the cache can't trim)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

        if self.cache is None or keep == 0 or not can_trim_prompt_cache(self.cache):
            self.cache, self.tokens = make_prompt_cache(self.model), []
            return 0
        drop = len(self.tokens) - keep
        if drop:
            trim_prompt_cache(self.cache, drop)
            self.tokens = self.tokens[:keep]
        return keep

    def feed(self, tokens: list[int]) -> mx.array:
        """Run ``tokens`` after the cached ones; returns the last position's logits (1, vocab)."""
        try:
            while len(tokens) > PREFILL_STEP:
                self.model(mx.array(tokens[:PREFILL_STEP])[None], cache=self.cache)
                mx.eval([c.state for c in self.cache])
                self.tokens.extend(tokens[:PREFILL_STEP])
                tokens = tokens[PREFILL_STEP:]
            logits = self.model(mx.array(tokens)[None], cache=self.cache)[:, -1, :]
            self.tokens.extend(tokens)
            return logits
        except BaseException:
            # interrupted inside the model: the cache may be half-updated, so forget it
            self.reset()
            raise

    def prefill(self, prompt: list[int]) -> tuple[mx.array, int]:
        """Logits after ``prompt`` reusing the cached prefix; returns (logits, reused tokens)."""
        require(len(prompt) > 0, "empty prompt: give at least one token of text")
        # keep at least one token to run, so there are fresh logits to sample from
        reused = self._rewind(min(common_prefix(self.tokens, prompt), len(prompt) - 1))
        return self.feed(prompt[reused:]), reused


def generate_tokens(session: KVSession, prompt: list[int], cfg: SamplingConfig,
                    stop_ids: set[int] | frozenset = frozenset(), info: dict | None = None,
                    constraint=None) -> Iterator[int]:
    """Yield sampled token ids after ``prompt``; stops at a stop id (not yielded) or max_tokens.

    The next step's graph is queued (``async_eval``) before the current token is read back, so
    Python overhead overlaps compute, as in mlx-lm. ``info`` (if given) receives ``reused``
    (prefix tokens not recomputed) and ``finish_reason`` ("stop" or "length"). ``constraint``
    (``structured.GuidanceConstraint``) masks the logits before sampling and sees every token;
    generation stops when it allows nothing more.
    """
    sampler, procs = make_sampler(cfg)
    stop_ids = frozenset() if cfg.ignore_eos else stop_ids
    if cfg.seed is not None:
        mx.random.seed(cfg.seed)
    info = {} if info is None else info
    history = mx.array(prompt[-cfg.repetition_context_size:]) if procs else None

    def sample(logits):
        for p in procs:
            logits = p(history, logits)
        if constraint is not None:
            logits = constraint.mask(logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs)

    logits, info["reused"] = session.prefill(prompt)
    y = sample(logits)
    mx.async_eval(y)
    info["finish_reason"] = "length"
    for n in range(cfg.max_tokens):
        token = y.item()
        if token in stop_ids:
            info["finish_reason"] = "stop"
            return
        if constraint is not None:
            constraint.accept(token)
            if constraint.done:
                info["finish_reason"] = "stop"
                yield token
                return
        if n + 1 < cfg.max_tokens:
            if procs:
                history = mx.concatenate([history, y.reshape(1)])[-cfg.repetition_context_size:]
            y = sample(session.feed([token]))
            mx.async_eval(y)
        yield token
