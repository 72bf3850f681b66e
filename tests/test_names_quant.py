"""Name tables and quantization helpers: inverses, exact GGUF block semantics, reported error."""
import numpy as np
import pytest

import mlx_qlora  # noqa: F401
import mlx.core as mx

from mlx_qlora.model import names
from mlx_qlora.model.quant import QuantStats, bits_per_weight, permute_qk, quantize, unpermute_qk


# llama.cpp's names for a llama block (its llama-arch.cpp), the facts gguf-py's table must give
LLAMA_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "model.layers.{bid}.input_layernorm": "blk.{bid}.attn_norm",
    "model.layers.{bid}.self_attn.q_proj": "blk.{bid}.attn_q", "model.layers.{bid}.self_attn.k_proj": "blk.{bid}.attn_k",
    "model.layers.{bid}.self_attn.v_proj": "blk.{bid}.attn_v",
    "model.layers.{bid}.self_attn.o_proj": "blk.{bid}.attn_output",
    "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.ffn_norm",
    "model.layers.{bid}.mlp.gate_proj": "blk.{bid}.ffn_gate", "model.layers.{bid}.mlp.up_proj": "blk.{bid}.ffn_up",
    "model.layers.{bid}.mlp.down_proj": "blk.{bid}.ffn_down",
}


def test_name_tables_are_inverse():
    for mlx_base, gguf_base in LLAMA_NAMES.items():
        for suffix in ("weight", "bias", "scales", "biases"):
            m = mlx_base.replace("{bid}", "17") + "." + suffix
            g = gguf_base.replace("{bid}", "17") + "." + suffix
            assert names.mlx_to_gguf(m) == g
            assert names.gguf_to_mlx(g) == m
    assert names.gguf_to_mlx("rope_freqs.weight") is None
    assert names.mlx_to_gguf("model.layers.0.self_attn.rotary_emb.inv_freq") is None


@pytest.mark.parametrize("n_head,head_dim", [(4, 16), (3, 64), (1, 8)])
def test_qk_permutation_matches_llama_cpp_layout(n_head, head_dim):
    rows = n_head * head_dim
    w = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    p = permute_qk(w, n_head)
    # llama.cpp interleaves the two rope halves of each head: row 2i <- i, row 2i+1 <- i + d/2
    h0 = w[:head_dim]
    assert np.array_equal(p[0], h0[0]) and np.array_equal(p[1], h0[head_dim // 2])
    assert np.array_equal(p[2], h0[1]) and np.array_equal(p[3], h0[head_dim // 2 + 1])
    assert np.array_equal(unpermute_qk(p, n_head), w)
    assert not np.array_equal(p, w) or head_dim == 2


def test_quantize_reports_its_own_round_trip_error():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 256)).astype(np.float32)
    errs = {}
    for bits in (2, 4, 8):
        stats = QuantStats()
        q, s, b = quantize(w, bits, 64, stats)
        w_hat = np.array(mx.dequantize(q, s, b, group_size=64, bits=bits))
        direct = np.linalg.norm(w_hat - w) / np.linalg.norm(w)
        assert stats.rel_rms == pytest.approx(direct, rel=1e-5)
        errs[bits] = stats.rel_rms
    assert errs[8] < errs[4] < errs[2]
    assert errs[4] < 0.15 and errs[8] < 0.01


def test_bits_per_weight_counts_scales_and_biases():
    w = mx.zeros((128, 256))
    q, s, b = mx.quantize(w, group_size=64, bits=4)
    weights = {"l.weight": q, "l.scales": s.astype(mx.float16), "l.biases": b.astype(mx.float16),
               "n.weight": mx.zeros((256,), dtype=mx.float32)}
    # 128*256 weights at 4 bits + 2 fp16 per 64 weights (0.5 bit) + 256 fp32 norm values
    expected = (128 * 256 * 4.5 + 256 * 32) / (128 * 256 + 256)
    assert bits_per_weight(weights, {"l": 4}) == pytest.approx(expected)
