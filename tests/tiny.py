"""Tiny random models for fast tests: HF directories (llama / qwen2) with a real byte-level BPE
tokenizer and a ChatML chat template. Weights are seeded numpy arrays in HF tensor names, so the
same files feed the converter, mlx-lm's loader and (via ``write_gguf``) llama.cpp.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Merges learned by hand from English text; enough to make BPE do real work in tests.
_MERGE_WORDS = ["Ġt", "he", "Ġa", "in", "er", "an", "Ġthe", "on", "re", "Ġs", "at", "en", "Ġw",
                "or", "Ġo", "it", "is", "Ġc", "al", "ar", "ĠS", "EL", "ECT", "ĠSELECT", "ĠF", "RO",
                "ROM", "ĠFROM", "ĠW", "HE"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-char map (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_json() -> dict:
    """A byte-level BPE tokenizer.json: 256 bytes, the merges above, then the special tokens."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    merges = []
    for word in _MERGE_WORDS:
        # find a split of `word` into two tokens already in the vocabulary
        for cut in range(1, len(word)):
            a, b = word[:cut], word[cut:]
            if a in vocab and b in vocab:
                merges.append(f"{a} {b}")
                vocab[word] = len(vocab)
                break
    added = []
    for s in SPECIALS:
        vocab[s] = len(vocab)
        added.append({"id": vocab[s], "content": s, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }


def vocab_size() -> int:
    return len(tokenizer_json()["model"]["vocab"])


def hf_config(arch: str = "llama", hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
              intermediate: int = 128, tie: bool = True, rope_theta: float = 100000.0) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate, "rms_norm_eps": 1e-5, "vocab_size": vocab_size(),
        "max_position_embeddings": 512, "rope_theta": rope_theta, "tie_word_embeddings": tie,
        "torch_dtype": "float32", "bos_token_id": None, "eos_token_id": SPECIALS.index("<|im_end|>") + vocab_size() - 3,
    }
    return cfg


def hf_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in HF names; scaled like a trained model so logits are not flat."""
    rng = np.random.default_rng(seed)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    w = {"model.embed_tokens.weight": rng.normal(0, 1.0, (cfg["vocab_size"], h)),
         "model.norm.weight": 1 + 0.1 * rng.normal(size=h)}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = rng.normal(0, 0.2, (cfg["vocab_size"], h))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                  "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
                  "mlp.down_proj": (h, inter)}
        for name, shape in shapes.items():
            w[p + name + ".weight"] = rng.normal(0, 1.0 / np.sqrt(shape[1]), shape)
        if cfg["model_type"] == "qwen2":
            for name, n in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
                w[p + f"self_attn.{name}.bias"] = rng.normal(0, 0.1, n)
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=h)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=h)
    return {k: v.astype(np.float32) for k, v in w.items()}


def write_hf_dir(path: Path, arch: str = "llama", seed: int = 0, **cfg_kw) -> Path:
    """Write config.json, model.safetensors and tokenizer files for a tiny random model."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(arch, **cfg_kw)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(hf_weights(cfg, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    return write_tokenizer(path)


def write_tokenizer(path: Path) -> Path:
    """The byte-level BPE tokenizer and ChatML template files of the tiny models, into ``path``."""
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": None,
        "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": CHAT_TEMPLATE,
        "add_bos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": 512}))
    return path


def _gguf_writer(path: Path, cfg: dict):
    """A GGUFWriter with the hyper-parameters of ``cfg`` (HF config keys) already added."""
    import gguf

    w = gguf.GGUFWriter(str(path), cfg["model_type"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    return w


def write_gguf(hf_dir: Path, path: Path, qtype: str = "F32") -> Path:
    """Write the tiny HF model as a GGUF file the way llama.cpp's converter lays it out: llama Q/K
    rows permuted, 2-D weights in ``qtype`` (F32, F16, Q8_0, Q4_0, Q4_1), norms in F32."""
    import gguf
    from safetensors.numpy import load_file

    from mlx_qlora.model.names import mlx_to_gguf
    from mlx_qlora.model.quant import permute_qk

    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    weights = load_file(str(Path(hf_dir) / "model.safetensors"))
    arch = cfg["model_type"]
    w = _gguf_writer(path, cfg)
    tj = tokenizer_json()
    vocab = tj["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(tj["model"]["merges"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    for name, a in weights.items():
        if arch == "llama" and ".q_proj." in name:
            a = permute_qk(a, cfg["num_attention_heads"])
        if arch == "llama" and ".k_proj." in name:
            a = permute_qk(a, cfg["num_key_value_heads"])
        gname = mlx_to_gguf(name)
        if a.ndim == 2 and qtype != "F32":
            data = gguf.quants.quantize(a, qt) if qtype != "F16" else a.astype(np.float16)
            w.add_tensor(gname, data, raw_dtype=qt)
        else:
            w.add_tensor(gname, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "SELECT name FROM users WHERE age > 30;",
    "Hello world, this is a tiny SentencePiece model for tests.", "Numbers like 12345 and 3.14 appear here.",
    "Ünïcödé text: café, naïve, 日本語.", "  leading spaces and\ttabs\nnewlines too",
] * 20


def train_sentencepiece(path: Path, vocab: int = 400) -> Path:
    """A llama-style SentencePiece BPE model (byte fallback, <s>/</s>/<unk>) trained in ~0.5 s."""
    import sentencepiece as spm

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS), model_prefix=str(path / "tokenizer"), vocab_size=vocab,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    return path / "tokenizer.model"


def write_sp_gguf(path: Path, sp_model: Path, seed: int = 0) -> Path:
    """A tiny llama GGUF whose vocabulary is a SentencePiece model (tokenizer.ggml.model = llama)."""
    import sentencepiece as spm

    from mlx_qlora.model.names import mlx_to_gguf
    from mlx_qlora.model.quant import permute_qk

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = sp.get_piece_size()
    cfg = hf_config("llama")
    cfg["vocab_size"] = n
    weights = hf_weights(cfg, seed)
    w = _gguf_writer(path, cfg)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    # llama.cpp token types: 1 normal, 2 unknown, 3 control, 6 byte
    w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                       for i in range(n)])
    w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_unk_token_id(0)
    w.add_add_bos_token(True); w.add_add_eos_token(False); w.add_add_space_prefix(True)
    for name, a in weights.items():
        if ".q_proj." in name:
            a = permute_qk(a, cfg["num_attention_heads"])
        if ".k_proj." in name:
            a = permute_qk(a, cfg["num_key_value_heads"])
        w.add_tensor(mlx_to_gguf(name), a.astype(np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return Path(path)
