"""An Ollama ``Modelfile`` beside an exported GGUF (``ollama create NAME -f Modelfile``).

Ollama templates are Go templates, not Jinja, so a chat template cannot be translated in
general. Known families are recognised by their marker tokens and get Ollama's equivalent
template; for anything else the TEMPLATE line is left out and Ollama falls back to the
tokenizer.chat_template stored in the GGUF. Stop tokens: the family's turn markers + EOS.
"""
from __future__ import annotations

from pathlib import Path

from .vocab import GGUFVocab

_CHATML = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
           '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
           '<|im_start|>assistant\n')
_LLAMA3 = ('{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
           '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
           '{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n')
_INST = '[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }} [/INST]'

# marker in the Jinja template -> (Ollama template, stop strings)
FAMILIES = {
    "<|im_start|>": (_CHATML, ["<|im_start|>", "<|im_end|>"]),
    "<|start_header_id|>": (_LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "[INST]": (_INST, ["[INST]", "[/INST]"]),
}


def modelfile_text(gguf_name: str, vocab: GGUFVocab, base_name: str | None = None) -> str:
    """Modelfile for ``gguf_name``; with ``base_name`` the GGUF is a LoRA adapter over that base."""
    lines = ["# Ollama Modelfile written by mlx_qlora export: ollama create NAME -f Modelfile"]
    if base_name is None:
        lines.append(f"FROM ./{gguf_name}")
    else:
        if not base_name:
            lines.append("# export the base first: mlx_qlora export MODEL --to gguf -o base.gguf")
        lines.append(f"FROM ./{Path(base_name).name if base_name else 'base.gguf'}")
        lines.append(f"ADAPTER ./{gguf_name}")
    template, stops = None, []
    for marker, (tmpl, family_stops) in FAMILIES.items():
        if vocab.chat_template and marker in vocab.chat_template:
            template, stops = tmpl, list(family_stops)
            break
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    elif vocab.chat_template:
        lines.append("# chat template not recognised: Ollama uses the one stored in the GGUF")
    eos = vocab.special_ids.get("eos")
    if eos is not None and vocab.tokens[eos] not in stops:
        stops.append(vocab.tokens[eos])
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, vocab: GGUFVocab, adapter_of: str | None = None) -> Path:
    """Write ``Modelfile`` beside ``gguf_path`` atomically; returns its path."""
    from ..atomic import atomic_file

    out = gguf_path.parent / "Modelfile"
    with atomic_file(out, force=True) as tmp:
        tmp.write_text(modelfile_text(gguf_path.name, vocab, adapter_of))
    return out
