"""The MLX engine: an mlx-lm model, several LoRA adapters over it, one prefix-reused KV cache.

On CPU the model is first rewritten for decoding speed (``cpu_decode.prepare``): quantized
weights are dequantized once to fp32 and every linear multiplies as ``W @ x`` so that a
one-token step is a BLAS matrix-vector product. On Metal/CUDA the model runs as loaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ...errors import UserError, require
from ..adapters import AdapterSet, AdapterSpec
from ..generate import Detokenizer, KVSession, SamplingConfig, generate_tokens
from .base import Engine


class MLXEngine(Engine):
    name = "mlx"

    def __init__(self, model_dir: str | Path, adapters: list[AdapterSpec] = (), cpu_fast: bool | None = None):
        super().__init__()
        import mlx.core as mx

        from ...model.model_io import load

        self.model_dir = Path(model_dir)
        self.model_name = self.model_dir.name
        self.model, self.tokenizer = load(self.model_dir)
        self.adapters = AdapterSet(self.model)
        for spec in adapters:
            self.adapters.add(spec.name, spec.path)
        self.adapter_names = list(self.adapters.names)
        if cpu_fast is None:
            cpu_fast = mx.default_device().type == mx.DeviceType.cpu
        self.cpu_fast = cpu_fast
        if cpu_fast:
            from .cpu_decode import prepare

            prepare(self.model)
        self.session = KVSession(self.model)
        # mlx-lm gathers eos_token_id and the config's eos ids (e.g. <|im_end|>) here
        self.stop_ids = set(self.tokenizer.eos_token_ids or ()) | {self.tokenizer.eos_token_id} - {None}
        require(bool(self.stop_ids), f"{self.model_dir}: the tokenizer has no eos token; generation could not stop")
        self._hf = self.tokenizer._tokenizer  # the Hugging Face tokenizer under mlx-lm's wrapper

    def encode(self, text: str) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=False))

    def chat_text(self, messages: list[dict]) -> str:
        if not getattr(self._hf, "chat_template", None):
            # no template: a plain transcript the base model can continue
            lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
            return "\n".join(lines) + "\nAssistant:"
        try:
            return self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja errors: roles the template rejects, etc.
            raise UserError(f"the chat template of {self.model_dir} rejected the messages: {e}") from None

    def _set_adapter(self, name: str | None) -> None:
        self.adapters.activate(name)
        # the cached keys/values were computed with the previous adapter's weights
        self.session.reset()

    def _tokens(self, prompt: list[int], cfg: SamplingConfig, info: dict) -> Iterator[int]:
        constraint = None
        if cfg.json_schema is not None or cfg.grammar is not None:  # llguidance masks the logits
            from ..structured import GuidanceConstraint

            n_vocab = getattr(getattr(self.model, "args", None), "vocab_size", None) or len(self._hf)
            constraint = GuidanceConstraint(self._hf, cfg.json_schema, n_vocab, self.stop_ids, lark=cfg.grammar)
        return generate_tokens(self.session, prompt, cfg, self.stop_ids, info, constraint)

    def _detokenizer(self):
        return Detokenizer(lambda ids: self._hf.decode(ids, skip_special_tokens=True))

    def reset(self) -> None:
        self.session.reset()
