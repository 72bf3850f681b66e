"""The llama.cpp engine: a GGUF model through llama-cpp-python, LoRA GGUFs switched in place.

On a CPU this is the fast path (SmolLM2 Q4_1 decodes ~10x faster than MLX's CPU backend), so
``--engine auto`` picks it there whenever a GGUF of the model can be found. All LoRA GGUFs are
loaded once next to the base model (``llama_adapter_lora_init``); switching only changes which
one is applied to the context (``llama_set_adapters_lora``) and drops the KV cache.

Adapters in the training format (``adapters.safetensors``) are turned into LoRA GGUFs in a
temporary directory on load: ``lora_a`` (in, r) is written transposed, ``lora_b`` (r, out) as
(out, r) with llama's Q/K rows permuted like the base weights, and the scale as
``adapter.lora.alpha = scale * r`` (llama.cpp applies ``alpha / r``).
"""
from __future__ import annotations

import ctypes
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Iterator

from ...errors import UserError, require
from ...model.llama_load import open_llama
from ..adapters import AdapterSpec
from ..generate import ByteDetokenizer, SamplingConfig, common_prefix
from .base import Engine

DEFAULT_N_CTX = 4096  # tokens; SmolLM2 allows 8192, but each doubles the KV cache (~90 MB here)


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]]:
    """``{cpu: (idle ticks, all ticks)}`` from /proc/stat for the given CPUs (idle counts iowait)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                out[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))
    return out


def idle_cores(cpus: set[int], interval: float = 0.2) -> float | None:
    """How many of ``cpus`` sat idle over the last ``interval`` seconds (0.0 .. len(cpus)), from
    /proc/stat; None where there is no /proc/stat (macOS)."""
    try:
        before = _cpu_times(cpus)
        time.sleep(interval)
        after = _cpu_times(cpus)
    except (OSError, ValueError):
        return None
    if not before:
        return None
    idle = 0.0
    for cpu, (i0, t0) in before.items():
        i1, t1 = after.get(cpu, (i0, t0))
        idle += (i1 - i0) / (t1 - t0) if t1 > t0 else 1.0  # no tick at all: nothing ran there
    return idle


def default_threads(interval: float = 0.2) -> int:
    """One thread per core that is idle now (sampled over ``interval`` s), at least 1.

    llama.cpp's threads meet at a barrier after every op, so a thread that the OS deschedules for
    another process stalls them all: on this 2-core dev box, busy with other jobs, SmolLM2 decoded
    at 0.4 tok/s with 2 threads and ~50 with 1; idle, 2 threads are fastest (~80 tok/s). A core
    counts only when at least 3/4 of it was idle. The 1-minute load average, used before, lags:
    right after a training run it still said busy and chat ran on 1 of 2 idle cores.
    """
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    idle = idle_cores(set(cpus), interval)
    if idle is None:  # no /proc/stat: the load average is the signal left
        try:
            idle = len(cpus) - os.getloadavg()[0]
        except OSError:
            idle = len(cpus)
    return max(1, min(len(cpus), int(idle + 0.25)))


def find_lora_gguf(spec: AdapterSpec) -> Path | None:
    """A LoRA GGUF for the adapter: the path itself, or the one .gguf inside its directory."""
    p = spec.path
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir():
        hits = sorted(p.glob("*.gguf"))
        if len(hits) == 1:
            return hits[0]
        for name in ("adapter.gguf", "adapters.gguf", "lora.gguf"):
            if (p / name).is_file():
                return p / name
    return None


def write_lora_gguf(spec: AdapterSpec, meta: dict, out: Path) -> Path:
    """Adapter dir (training format) -> LoRA GGUF for a base whose GGUF metadata is ``meta``:
    the same writer as ``mlx_qlora export --adapter-only``, fed the head counts from the GGUF."""
    from ...export.gguf import write_lora_gguf as write
    from ...train.adapter_files import read_adapter

    arch = meta.get("general.architecture", "llama")
    heads = {"num_attention_heads": int(meta.get(f"{arch}.attention.head_count", 0)),
             "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", 0))}
    return write(read_adapter(spec.path, spec.name), out, arch, heads)


class LlamaCppEngine(Engine):
    name = "llama.cpp"

    def __init__(self, gguf_path: str | Path, adapters: list[AdapterSpec] = (), n_ctx: int = DEFAULT_N_CTX,
                 n_threads: int | None = None, model_name: str | None = None):
        super().__init__()
        try:
            import llama_cpp
        except ImportError:
            raise UserError("the llama.cpp engine needs llama-cpp-python: pip install llama-cpp-python "
                            "(or use --engine mlx)") from None
        self._lc = llama_cpp
        self.gguf_path = Path(gguf_path)
        require(self.gguf_path.is_file(), f"GGUF file {str(self.gguf_path)!r} not found; pass --gguf FILE "
                                          f"(mlx_qlora export writes one) or use --engine mlx")
        self.model_name = model_name or self.gguf_path.stem
        n_threads = n_threads or default_threads()
        self.n_threads = n_threads
        self.llm = open_llama(self.gguf_path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads)
        self.n_ctx = self.llm.n_ctx()
        meta = self.llm.metadata
        self.stop_ids = {self.llm.token_eos()}
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._template = meta.get("tokenizer.chat_template")
        self._tmp = None
        self._loras: dict[str, object] = {}
        for spec in adapters:
            self._loras[spec.name] = self._load_lora(spec, meta)
            self.adapter_names.append(spec.name)

    def _load_lora(self, spec: AdapterSpec, meta: dict):
        path = find_lora_gguf(spec)
        if path is None:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="mlx_qlora_lora_")
            path = write_lora_gguf(spec, meta, Path(self._tmp.name) / f"{spec.name}.gguf")
        handle = self._lc.llama_adapter_lora_init(self.llm.model, str(path).encode())
        require(bool(handle), f"adapter {spec.name!r}: llama.cpp could not load {path} as a LoRA of "
                              f"{self.gguf_path.name} (different base model?)")
        return handle

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def chat_text(self, messages: list[dict]) -> str:
        if not self._template:
            lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
            return "\n".join(lines) + "\nAssistant:"
        import jinja2
        import jinja2.sandbox

        # the settings Hugging Face renders chat templates with
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise UserError(f"the chat template rejected the messages: {msg}")
        try:
            tmpl = env.from_string(self._template)
            return tmpl.render(messages=messages, add_generation_prompt=True, raise_exception=raise_exception,
                               bos_token="", eos_token="")
        except jinja2.TemplateError as e:
            raise UserError(f"the chat template of {self.gguf_path.name} failed: {e}") from None

    def _set_adapter(self, name: str | None) -> None:
        lc = self._lc
        if name is None:
            rc = lc.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            arr = (lc.llama_adapter_lora_p_ctypes * 1)(self._loras[name])
            rc = lc.llama_set_adapters_lora(self.llm.ctx, arr, 1, (ctypes.c_float * 1)(1.0))
        require(rc == 0, f"llama.cpp refused to switch to adapter {name!r} (code {rc})")
        self.llm.reset()  # cached keys/values belong to the previous adapter

    def _tokens(self, prompt: list[int], cfg: SamplingConfig, info: dict) -> Iterator[int]:
        require(len(prompt) > 0, "empty prompt: give at least one token of text")
        require(len(prompt) < self.n_ctx, f"the prompt is {len(prompt)} tokens, the context holds {self.n_ctx}; "
                                          f"start over (/reset) or shorten it")
        max_tokens = min(cfg.max_tokens, self.n_ctx - len(prompt))
        llm = self.llm
        info["reused"] = min(common_prefix(llm.input_ids[:llm.n_tokens].tolist(), prompt), len(prompt) - 1)
        # an unseeded request must not inherit the previous request's seed
        llm.set_seed(cfg.seed if cfg.seed is not None else random.getrandbits(31))
        greedy = cfg.temperature == 0
        grammar = None
        if cfg.json_schema is not None:  # llama.cpp's grammar sampler (infer/structured.py)
            from ..structured import llamacpp_grammar

            grammar = llamacpp_grammar(cfg.json_schema)
        gen = llm.generate(prompt, temp=cfg.temperature, top_k=1 if greedy else cfg.top_k,
                           top_p=cfg.top_p, min_p=cfg.min_p, repeat_penalty=cfg.repetition_penalty,
                           grammar=grammar)
        info["finish_reason"] = "length"
        n = 0
        try:
            for token in gen:
                eog = token in self.stop_ids or self._lc.llama_vocab_is_eog(self._vocab, token)
                if eog and not cfg.ignore_eos:
                    info["finish_reason"] = "stop"
                    return
                yield token
                n += 1
                if n >= max_tokens:
                    return
        except GeneratorExit:  # the caller stopped reading: the cache is consistent, keep it
            raise
        except BaseException:
            llm.reset()  # interrupted inside a decode: the cache position is unknown
            raise
        finally:
            gen.close()

    def _detokenizer(self):
        return ByteDetokenizer(lambda t: self.llm.detokenize([t]))

    def reset(self) -> None:
        self.llm.reset()

    def close(self) -> None:
        self.llm.close()  # LoRA adapters belong to the model and are freed with it
        if self._tmp is not None:
            self._tmp.cleanup()

