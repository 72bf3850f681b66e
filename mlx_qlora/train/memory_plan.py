"""Will a GPU step fit? The estimate that switches gradient checkpointing on by itself.

``needs_checkpointing`` adds ``fixed_bytes`` (weights, fp32 adapter copies for gradients and AdamW,
one chunk of the loss's logits, dequant_gemm's transients) and ``activation_bytes`` (what the
backward keeps per layer) and compares them with ``MEMORY_HEADROOM`` of MLX's memory limit;
``choose_checkpointing`` says so when it turns checkpointing on.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .engines import dequant_gemm
from .engines.mlx_step import CUDNN_ATTENTION_MULTIPLE, chunk_rows, pad_multiple

MEMORY_HEADROOM = 0.85        # share of the memory limit a step may plan to use


def activation_bytes(model: nn.Module, batch: int, seq: int, checkpointed: bool) -> int:
    """Rough bytes the backward keeps for a (batch, seq) step: per layer the block's inputs, norms,
    q/k/v, attention output, MLP products and, unless CUDA's fused attention backward applies
    (padded length a multiple of 128), one float32 (heads, T, T) scores array; checkpointed: one
    block input per layer plus one block recomputed. An estimate for choosing checkpointing, not
    an accounting, kept on the safe side: the MLP counts 5 (tokens x intermediate) arrays where
    ``swiglu`` keeps 3, since the H200 peaks ran ~4 GiB over such counts at 8B (allocator, loss
    chunk); on CPU with this path forced (1B dims, 512 fp32 tokens) it says 148 MiB per layer
    where 108 MiB were measured."""
    args = getattr(model, "args", None)
    d = getattr(args, "hidden_size", 0)
    inter = getattr(args, "intermediate_size", 4 * d)
    heads = getattr(args, "num_attention_heads", 1)
    kv = getattr(args, "num_key_value_heads", heads) or heads
    layers = len(getattr(model, "layers", []))
    itemsize = _compute_itemsize(model)
    tokens = batch * seq
    multiple = pad_multiple(seq)
    t = -(-seq // multiple) * multiple
    fused_attention = dequant_gemm.on_cuda() and t % CUDNN_ATTENTION_MULTIPLE == 0
    scores = 0 if fused_attention else 4 * batch * heads * t * t
    per_layer = tokens * itemsize * (8 * d + 4 * d * kv // heads + 5 * inter) + scores
    if checkpointed:
        return layers * tokens * d * itemsize + per_layer
    return layers * per_layer


def _compute_itemsize(model: nn.Module) -> int:
    """2 when most frozen floating weights are half precision (activations follow them), else 4."""
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    half = full = 0
    for k, v in tree_flatten(model.parameters()):
        if k not in trainable and mx.issubdtype(v.dtype, mx.floating):
            half, full = (half + v.nbytes, full) if v.dtype in (mx.float16, mx.bfloat16) else (half, full + v.nbytes)
    return 2 if half >= full else 4


def fixed_bytes(model: nn.Module, vocab: int, tokens: int, dense: bool = False) -> int:
    """Weights, fp32 trainable copies for grads and AdamW (x4), one chunk of logits (x3); with
    ``dense`` (dequant_gemm) also two head slices and two layers' dense weights in flight."""
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    total = weights + 4 * trainable + 3 * 4 * chunk_rows(vocab, tokens) * vocab
    if dense:
        itemsize = _compute_itemsize(model)
        total += 2 * dequant_gemm.SLICE_BYTES + 2 * dequant_gemm.dense_linear_bytes(model, itemsize)
    return total


def memory_limit() -> int:
    return int(mx.get_memory_limit())


def needs_checkpointing(model: nn.Module, vocab: int, batch: int, seq: int, limit: int | None = None,
                        dense: bool = False) -> bool:
    """True when the step without checkpointing would exceed the memory budget."""
    limit = memory_limit() if limit is None else limit
    return fixed_bytes(model, vocab, batch * seq, dense) + activation_bytes(model, batch, seq, False) > \
        MEMORY_HEADROOM * limit


def choose_checkpointing(model: nn.Module, head: nn.Module | None, asked: bool, batch_shape, say=print,
                         dense: bool = False) -> bool:
    """Checkpoint when asked, or when (batch, seq) = ``batch_shape`` would not fit without it."""
    if asked or batch_shape is None:
        return asked
    vocab = head.weight.shape[0] if head is not None else 0
    if not needs_checkpointing(model, vocab, *batch_shape, dense=dense):
        return False
    need = fixed_bytes(model, vocab, batch_shape[0] * batch_shape[1], dense) + \
        activation_bytes(model, *batch_shape, False)
    say(f"gradient checkpointing on: a {batch_shape[0]} x {batch_shape[1]} step needs ~{need / 2**30:.1f} GiB "
        f"without it, over {MEMORY_HEADROOM:.0%} of the {memory_limit() / 2**30:.1f} GiB memory limit")
    return True


def estimate_qlora_bytes(config: dict, batch: int, seq: int, rank: int = 16, bits: int = 4, group_size: int = 64,
                         checkpointed: bool = True, half: bool = True) -> dict[str, int]:
    """This planner's estimate for a QLoRA step on the model ``config`` describes (mlx-lm keys),
    built as a skeleton: MLX is lazy, so no weight is ever materialised. ``half``: fp16 norms and
    scales, as convert writes them on Metal/CUDA. Returns the parts and their ``total`` in bytes;
    an estimate (see ``activation_bytes``), not a measurement."""
    from mlx_lm.utils import _get_classes

    from .config import LoraConfig
    from .lora import apply_lora

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if half:
        model.set_dtype(mx.float16)
    nn.quantize(model, group_size=group_size, bits=bits,
                class_predicate=lambda _, m: isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] % group_size == 0)
    apply_lora(model, LoraConfig(rank=rank, alpha=2.0 * rank))
    vocab = int(config["vocab_size"])
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    fixed = fixed_bytes(model, vocab, batch * seq)
    acts = activation_bytes(model, batch, seq, checkpointed)
    return {"weights": weights, "adapter_and_optimizer": fixed - weights, "activations": acts, "total": fixed + acts}
