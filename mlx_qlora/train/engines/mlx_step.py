"""The MLX-autodiff training step of Metal and CUDA: compiled, chunked loss, optional checkpointing.

This is the path every GPU user gets (the NumPy engine and the MLX CPU kernels are CPU-only); on
CPU it runs when the CPU kernels are switched off (``mlx_cpu_kernels.disabled()``: parity tests
and ``bench/train_gpu.py --shape tiny``). What it does differently from a plain
``nn.value_and_grad`` step:

- ``chunked_cross_entropy``: the vocabulary projection, log-softmax and its gradient w.r.t. the
  hidden states are formed chunk by chunk (``mx.depends`` orders the chunks) inside one custom
  function, so no (tokens x vocabulary) float32 logits exist beyond one chunk; a 4-bit head is
  used through its own kernel (``quantized_matmul``) or, with ``dequant_gemm`` on (CUDA), as
  dense GEMMs on 32 MiB slices of it; never a whole dense copy.
- ``make_train_step``: loss, gradient, clipping and the AdamW update as one ``mx.compile``d graph
  with model, optimizer and random state captured as inputs and outputs (as mlx-lm's trainer
  does), one sync per step; rows are padded to a multiple of ``PAD_MULTIPLE`` (128 for long
  rows on CUDA: ``pad_multiple``) and the loss mask is a weight, so a few shapes cover a whole
  run and recompiles stay rare. (``make_device_step`` gives the loss-and-gradient graph alone:
  gradient accumulation and data parallel.)
- the frozen 4-bit projections as dequantize + dense GEMM where ``base_matmul`` says so
  (``dequant_gemm``: on CUDA by default, the quantized kernels elsewhere).
- gradient checkpointing (``loop.grad_checkpoint``) when asked for, or when ``memory_plan`` says
  the step would not fit the device's memory limit.

LoRA factors are cast to the activations' dtype when the base is half precision
(``lora.LoRALinear``), so a bf16 model trains with bf16 matmuls and fp32 adapter weights.
"""
from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import dequant_gemm
from ..lora import seed_dropout
from .mlx_cpu_kernels import FastQuantizedLinear, route_mlps

# float32 logits held at once by the chunked loss: 2**26 elements = 256 MiB (512 rows of a
# 128k vocabulary); at least 64 rows per chunk so the matmuls stay efficient.
CE_CHUNK_ELEMENTS = 2 ** 26
MIN_CHUNK_ROWS = 64
PAD_MULTIPLE = 32             # row lengths are padded up to this: one compiled graph per bucket
# MLX 0.32's CUDA attention backward is cuDNN's fused kernel only when the length is a multiple of
# 128 (ScaledDotProductAttentionVJP::use_fallback); otherwise the vjp recomputes attention with
# plain ops, holding (batch, heads, T, T) scores: 1 GiB bf16 per layer at 4 x 32 heads x 2048. From
# LONG_ROW tokens that costs more than padding to 128 (<= 12% more tokens), below it less.
CUDNN_ATTENTION_MULTIPLE = 128
LONG_ROW = 1024


def chunk_rows(vocab: int, rows: int) -> int:
    return max(MIN_CHUNK_ROWS, min(rows, CE_CHUNK_ELEMENTS // max(vocab, 1)))


def _head_layout(head: nn.Module):
    """(arrays, quantization layout or None) of a Linear / Embedding output head."""
    if isinstance(head, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return dequant_gemm.quant_args(head)
    return (head.weight,), None


def _matmul(x, arrays, quant, transpose: bool):
    """x @ W.T (transpose) or x @ W, with the quantized kernel for a quantized head."""
    if quant is None:
        w = arrays[0]
        return x @ (w.T if transpose else w)
    group_size, bits, mode, has_biases = quant
    w, scales = arrays[:2]
    biases = arrays[2] if has_biases else None
    return mx.quantized_matmul(x, w, scales, biases, transpose=transpose, group_size=group_size, bits=bits,
                               mode=mode)


def _rows(arrays, quant, ids):
    """Rows ``ids`` of the head's (vocab, dim) weight, dequantized when quantized."""
    if quant is None:
        return arrays[0][ids]
    group_size, bits, mode, has_biases = quant
    w, scales = arrays[0][ids], arrays[1][ids]
    biases = arrays[2][ids] if has_biases else None
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)


def _chunks(h, targets, weights, arrays, quant, rows: int, grad: bool):
    """(sum of weighted token losses, dL/dh or None), one chunk of rows after another."""
    dense = quant is not None and dequant_gemm.applies(h)   # dense GEMMs on slices of the 4-bit head
    losses, grads, done = [], [], None
    for start in range(0, h.shape[0], rows):
        hc = h[start:start + rows]
        if done is not None:   # chunk i+1 starts after chunk i is finished: one chunk of logits live
            hc = mx.depends(hc, done)
        tc, wc = targets[start:start + rows, None], weights[start:start + rows, None]
        logits = (dequant_gemm.sliced_matmul(hc, arrays, quant, transpose=True) if dense else
                  _matmul(hc, arrays, quant, transpose=True)).astype(mx.float32)
        lse = mx.logsumexp(logits, axis=-1, keepdims=True)
        loss = mx.sum((lse - mx.take_along_axis(logits, tc, axis=-1)) * wc)
        losses.append(loss)
        done = [loss]
        if grad:
            # d(loss)/d logits = weight * (softmax - onehot), pushed through the head right away;
            # onehot @ W is the targets' rows of W, so no second (rows, vocab) array is made
            p = (mx.exp(logits - lse) * wc).astype(h.dtype)
            back = dequant_gemm.sliced_matmul(p, arrays, quant, transpose=False) if dense else \
                _matmul(p, arrays, quant, transpose=False)
            gh = back - wc.astype(h.dtype) * _rows(arrays, quant, tc[:, 0])
            grads.append(gh.astype(h.dtype))
            done = [loss, grads[-1]]
    total = losses[0] if len(losses) == 1 else mx.sum(mx.stack(losses))
    return total, (mx.concatenate(grads) if grad else None)


@lru_cache(maxsize=None)
def _chunked_ce_fn(quant, rows: int):
    """One custom function per head layout and chunk size (static, not traced)."""

    @mx.custom_function
    def f(h, targets, weights, *arrays):
        return _chunks(h, targets, weights, arrays, quant, rows, grad=True)

    @f.vjp
    def f_vjp(primals, cotangents, outputs):
        # the head is frozen and the targets/weights are data: only dL/dh is ever used (MLX
        # picks the cotangents it needs; the zeros of the others are never evaluated)
        # in h's dtype: an fp32 scalar times bf16 would promote the whole backward to fp32
        dh = outputs[1] * cotangents[0].astype(outputs[1].dtype)
        return (dh,) + tuple(mx.zeros_like(a) for a in primals[1:])

    return f


def chunked_cross_entropy(h: mx.array, head: nn.Module, targets: mx.array, weights: mx.array,
                          with_grad: bool = True, rows: int | None = None) -> mx.array:
    """sum_i weights[i] * CE(head(h[i]), targets[i]) for ``h`` (rows, dim).

    Equal to ``plain_cross_entropy`` on the full logits; the logits are float32 one chunk of
    ``rows`` at a time (default: ``chunk_rows``), and the gradient w.r.t. ``h`` is formed in the
    forward pass so backward keeps nothing of the vocabulary's size.
    """
    arrays, quant = _head_layout(head)
    vocab = head.weight.shape[0]
    rows = rows or chunk_rows(vocab, h.shape[0])
    weights = weights.astype(mx.float32)
    if not with_grad:
        return _chunks(h, targets, weights, arrays, quant, rows, grad=False)[0]
    return _chunked_ce_fn(quant, rows)(h, targets, weights, *arrays)[0]


# ---------------------------------------------------------------- the step
def pad_multiple(t: int, cuda: bool | None = None) -> int:
    """The multiple a batch of ``t``-token rows is padded to (see ``CUDNN_ATTENTION_MULTIPLE``)."""
    cuda = dequant_gemm.on_cuda() if cuda is None else cuda
    return CUDNN_ATTENTION_MULTIPLE if cuda and t >= LONG_ROW else PAD_MULTIPLE


def pad_batch(b, multiple: int | None = None):
    """(inputs, targets, weights) as MLX arrays, rows padded to a multiple of ``multiple``
    (default ``pad_multiple``); the loss positions carry weight 1, everything else 0."""
    n, t = b.inputs.shape
    multiple = multiple or pad_multiple(t)
    tp = -(-t // multiple) * multiple
    inputs = np.zeros((n, tp), np.int32)
    targets = np.zeros((n, tp), np.int32)
    inputs[:, :t], targets[:, :t] = b.inputs, b.targets
    weights = np.zeros(n * t, np.float32)
    weights[b.loss_index] = 1.0
    full = np.zeros((n, tp), np.float32)
    full[:, :t] = weights.reshape(n, t)
    return mx.array(inputs), mx.array(targets), mx.array(full)


def make_loss(model: nn.Module, head: nn.Module | None):
    """loss(model, inputs, targets, weights, with_grad) -> weighted sum of token cross-entropies."""

    def loss(model, inputs, targets, weights, with_grad=True):
        flat_t, flat_w = targets.reshape(-1), weights.reshape(-1)
        if head is not None:
            h = model.model(inputs)
            return chunked_cross_entropy(h.reshape(-1, h.shape[-1]), head, flat_t, flat_w, with_grad)
        logits = model(inputs).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_t, reduction="none")
        return mx.sum(ce * flat_w)

    return loss


def prepare_gpu(model: nn.Module, dense: bool) -> None:
    """Per instance (class swaps; names and isinstance unchanged): SwiGLU MLPs through
    ``mlx_cpu_kernels.swiglu`` (its lean backward off CPU); with ``dense``, frozen QuantizedLinears
    outside LoRA (untargeted projections) through ``base_linear`` so ``dequant_gemm`` covers them."""
    route_mlps(model)
    if dense:
        for _, m in model.named_modules():
            if type(m) is nn.QuantizedLinear:
                m.__class__ = FastQuantizedLinear


def make_device_step(model: nn.Module, head: nn.Module | None, compile: bool = True, dense: bool = False):
    """(grad_fn, eval_fn) for StepFns: grad_fn(batch, seed) -> (summed token loss, gradient tree);
    eval_fn(batch) -> summed token loss. ``compile=False`` runs the same graph eagerly; ``dense``:
    4-bit projections and head as dequantize + GEMM (``dequant_gemm``)."""
    prepare_gpu(model, dense)
    loss_fn = make_loss(model, head)
    value_and_grad = nn.value_and_grad(model, loss_fn)

    def lg(inputs, targets, weights):
        return value_and_grad(model, inputs, targets, weights)

    def ev(inputs, targets, weights):
        return loss_fn(model, inputs, targets, weights, with_grad=False)

    if compile:
        state = [model.state, mx.random.state]
        lg = mx.compile(lg, inputs=state, outputs=state)
        ev = mx.compile(ev, inputs=state, outputs=state)

    def grad_fn(b, seed):
        seed_dropout(seed)
        with dequant_gemm.enabled(dense):      # read while (re)tracing
            loss, g = lg(*pad_batch(b))
            mx.eval(loss, g)
        return loss.item(), g

    def eval_fn(b):
        with dequant_gemm.enabled(dense):
            loss = ev(*pad_batch(b))
            mx.eval(loss)
        return loss.item()

    return grad_fn, eval_fn


def make_train_step(model: nn.Module, head: nn.Module | None, optimizer, max_norm: float | None,
                    dense: bool = False, compile: bool = True):
    """train_step(batch, seed) -> (summed token loss, gradient norm) as floats: a whole optimizer
    step of one micro-batch in one compiled graph, as mlx-lm's trainer compiles it (loss and
    gradient, / loss tokens, clipping, AdamW) and one sync per step instead of three. The update
    is kept only where loss and norm are finite (``mx.where`` in the graph), so a NaN step leaves
    adapter and optimizer state as they were and the loop stops on the returned values."""
    from mlx.utils import tree_map

    prepare_gpu(model, dense)
    loss_fn = make_loss(model, head)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    scale_clip = make_scale_clip(max_norm, compiled=False)
    optimizer.init(model.trainable_parameters())   # the state exists before tracing (kept on resume)

    def step(inputs, targets, weights, n):
        loss, grads = value_and_grad(model, inputs, targets, weights)
        grads, norm = scale_clip(grads, n)
        ok = mx.isfinite(loss) & mx.isfinite(norm)
        params, opt_state = model.trainable_parameters(), tree_map(lambda a: a, optimizer.state)
        optimizer.update(model, grads)
        keep = lambda new, old: mx.where(ok, new, old)          # noqa: E731
        model.update(tree_map(keep, model.trainable_parameters(), params))
        optimizer.state.update(tree_map(keep, optimizer.state, opt_state))   # in place: compile's capture
        return loss, norm

    if compile:
        state = [model.state, optimizer.state, mx.random.state]
        step = mx.compile(step, inputs=state, outputs=state)

    def train_step(b, seed):
        seed_dropout(seed)
        with dequant_gemm.enabled(dense):
            loss, norm = step(*pad_batch(b), mx.array(b.n_loss, mx.float32))
            mx.eval(loss, norm, model.trainable_parameters(), optimizer.state)
        return loss.item(), norm.item()

    return train_step


def make_update(model: nn.Module, optimizer):
    """update(grads): ``optimizer.update(model, grads)`` compiled with the model's and optimizer's
    state captured (hundreds of small LoRA tensors: one graph instead of a kernel per op each)."""
    state = [model.state, optimizer.state]

    def update(grads):
        optimizer.update(model, grads)

    return mx.compile(update, inputs=state, outputs=state)


def make_scale_clip(max_norm: float | None, compiled: bool):
    """scale_clip(grads, n) -> (grads / n clipped to ``max_norm`` (None: not clipped), their norm),
    as the loop does before the update; compiled on the GPU path (one graph for every tensor)."""
    import mlx.optimizers as optim
    from mlx.utils import tree_map

    def scale_clip(grads, n):
        grads = tree_map(lambda g: g / n, grads)
        if max_norm is None:
            return grads, optim.clip_grad_norm(grads, float("inf"))[1]
        return optim.clip_grad_norm(grads, max_norm)

    if not compiled:
        return scale_clip
    fn = mx.compile(scale_clip)
    return lambda grads, n: fn(grads, mx.array(n, mx.float32))   # a traced count: no recompiles
