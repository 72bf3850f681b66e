"""Pieces of a training step that the SFT loop (loop.py) and preference tuning (preference.py)
share: the fused head's lookup, per-block gradient checkpointing, and the step functions' type.
Kept apart so that preference.py needs nothing from loop.py (which calls into it)."""
from __future__ import annotations

from typing import Callable, NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .engines import mlx_cpu_kernels
from .lora import dropout_key

# Architectures whose ``model.model(x)`` returns the final normed hidden states and whose logits
# are a plain projection (lm_head or tied embedding): the fused chunked loss applies to them.
FUSED_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3", "starcoder2"}


def output_head(model: nn.Module):
    """The projection to the vocabulary when the fused loss applies, else None."""
    mtype = getattr(getattr(model, "args", None), "model_type", None) or getattr(model, "model_type", None)
    inner = getattr(model, "model", None)
    if mtype not in FUSED_HEAD_TYPES or inner is None:
        return None
    return model["lm_head"] if "lm_head" in model else inner.embed_tokens


def _checkpointed_call(self, x, *args, **kwargs):
    # the block's LoRA dropout masks come from one key drawn here, so the recompute in backward
    # draws the same masks as the forward did (lora.dropout_key)
    key = mx.random.randint(0, 2 ** 31 - 1, (2,)).astype(mx.uint32)
    base_call = _keyed(type(self).__mro__[1].__call__, key)
    if not mlx_cpu_kernels.on_cpu():
        def inner(params, x):
            self.update(params)
            return base_call(self, x, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), x)

    # CPU: the fast path evaluates inside the forward, and MLX keeps every intermediate of an
    # array evaluated under a transformation alive; so the block's output is detached from its
    # graph (keeping only the input) and the vjp recomputes the block, as mx.checkpoint does.
    keys = [k for k, _ in tree_flatten(self.trainable_parameters())]

    def run(x, *values):
        self.update(tree_unflatten(list(zip(keys, values))))
        return base_call(self, x, *args, **kwargs)

    @mx.custom_function
    def block(x, *values):
        return mlx_cpu_kernels.detached(run(x, *values))

    @block.vjp
    def block_vjp(primals, cotangent, output):
        _, grads = mx.vjp(run, list(primals), [cotangent])
        # Computed now and detached, so this block's recomputed activations are freed before
        # the next block's backward (the cotangent arriving here is itself detached).
        return tuple(mlx_cpu_kernels.detached(g) for g in grads)

    return block(x, *[v for _, v in tree_flatten(self.trainable_parameters())])


def _keyed(call, key):
    def run(*args, **kwargs):
        with dropout_key(key):
            return call(*args, **kwargs)

    return run


def grad_checkpoint(model: nn.Module) -> None:
    """Recompute each adapted block in backward; per instance, so other models are untouched."""
    classes = {}
    for layer in model.layers:
        if not tree_flatten(layer.trainable_parameters()):
            continue  # nothing to differentiate below: its activations are never kept anyway
        cls = type(layer)
        if cls not in classes:
            classes[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": _checkpointed_call})
        layer.__class__ = classes[cls]


class StepFns(NamedTuple):
    grad: Callable        # (batch, seed) -> (summed token loss, gradient tree)
    loss: Callable        # batch -> summed token loss
    packed: bool          # rows packed without padding (the CPU engine)
    whole_step: Callable | None = None   # GPU path: (optimizer, max_norm) -> one-graph train_step
    metrics: Callable | None = None      # preference: split -> that split's extra metrics since last asked
