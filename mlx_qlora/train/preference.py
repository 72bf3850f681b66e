"""Preference tuning of LoRA adapters: DPO (sigmoid, IPO, label smoothing) and ORPO.

Both train on pairs (``preference_data``): one forward of the chosen rows and the rejected rows
together gives each answer's log-probability ``log p(answer | prompt)`` (the sum over its
answer tokens, in nats). Per pair, with ``c``/``r`` the policy's and ``c_ref``/``r_ref`` the
reference's log-probabilities, and beta = ``preference.beta``:

- DPO sigmoid: ``z = beta ((c - c_ref) - (r - r_ref))``, loss ``-(1-e) log sig(z) - e log sig(-z)``
  with e = ``label_smoothing`` (conservative DPO; e = 0 is the DPO paper and TRL's ``sigmoid``).
- DPO IPO: ``((c - c_ref)/n_c - (r - r_ref)/n_r - 1/(2 beta))^2`` over per-token means (n: answer
  tokens), as TRL normalises it.
- ORPO: ``-a_c - beta log sig(log_odds)`` with a = the per-token mean log-probability and
  ``log_odds = (a_c - a_r) - (log(1-e^a_c) - log(1-e^a_r))``; no reference model. TRL's
  ORPOTrainer averages its NLL term over every chosen token of a batch, prompts included; here
  it is each pair's mean over its answer tokens (``-a_c``), so that gradient accumulation and
  data parallelism stay equal to one larger batch and the prompt is never a target.

The step loss is the sum over pairs; the loop divides by the pair count (``PairBatch.n_loss``).

DPO's reference is the same quantized model with the *starting* adapter (a fresh one, which
leaves the base unchanged, or ``init_adapter``): its weights are swapped in for one no-grad pass
over every pair before the first step, and the log-probabilities are cached on the pairs. No
second copy of the base weights exists, and a resumed run recomputes the same numbers. That pass
walks the batches of epoch 0 (and validation's batches) with the shapes training uses, so with a
fresh adapter the first steps see policy == reference bit for bit: loss ln 2, margin 0 exactly.

Metrics per step (``metrics.jsonl``, the step line, the PNG): rewards chosen / rejected (DPO:
``beta (c - c_ref)``; ORPO: ``beta a``, as TRL logs them), their margin and the share of pairs
whose chosen reward is higher (accuracy); ORPO adds its NLL and log odds.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import distributed as dist
from .engines import mlx_cpu_kernels
from .config import TrainConfig
from .data import batch_order
from .lora import LoRALinear, apply_lora, load_adapter, seed_dropout
from .preference_data import PairBatch, PairDataset, collate_pairs

# ORPO's log(1 - p) is -inf at p = 1: an answer whose mean token log-prob rounds above this (nats)
# is held at it, so the loss stays finite (e^-1e-6 = 0.999999: far past anything trained).
MAX_MEAN_LOGP = -1e-6


# ------------------------------------------------------------------ losses (per pair)
def dpo_losses(c, r, c_ref, r_ref, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
               n_c=None, n_r=None) -> mx.array:
    """Per-pair DPO losses from sequence log-probabilities (arrays of shape (pairs,))."""
    if loss_type == "ipo":
        d = (c - c_ref) / n_c - (r - r_ref) / n_r
        return (d - 1 / (2 * beta)) ** 2
    z = beta * ((c - c_ref) - (r - r_ref))
    if not label_smoothing:
        return -nn.log_sigmoid(z)
    return -(1 - label_smoothing) * nn.log_sigmoid(z) - label_smoothing * nn.log_sigmoid(-z)


def log1mexp(x: mx.array) -> mx.array:
    """log(1 - e^x) for x < 0, without cancellation on either side of -ln 2."""
    return mx.where(x < -math.log(2), mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))


def orpo_losses(a_c, a_r, beta: float):
    """(per-pair ORPO losses, log odds) from per-token mean log-probabilities ``a_c``, ``a_r``."""
    a_c, a_r = mx.minimum(a_c, MAX_MEAN_LOGP), mx.minimum(a_r, MAX_MEAN_LOGP)
    log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
    return -a_c - beta * nn.log_sigmoid(log_odds), log_odds


# ------------------------------------------------------------------ log-probabilities
def _token_logps_np(h: mx.array, w: mx.array, targets: mx.array, grad: bool):
    """(per-token log-probs, their gradient w.r.t. ``h`` or None): the projection in row chunks,
    the softmax in NumPy (``numpy_kernels.softmax_ce``, fp64 sums), no (tokens, vocab) array kept."""
    from .engines import numpy_kernels

    t = np.asarray(targets)
    out, grads = [], []
    for start in range(0, h.shape[0], mlx_cpu_kernels.CE_CHUNK_ROWS):
        hc = h[start:start + mlx_cpu_kernels.CE_CHUNK_ROWS]
        logits = hc @ w.T
        mx.eval(logits)
        buf = np.array(logits)    # a private copy: softmax_ce writes softmax - onehot into it
        out.append(-numpy_kernels.softmax_ce(buf, t[start:start + len(buf)], grad))
        if grad:   # d(-ce)/dh = -(softmax - onehot) @ W
            grads.append(mlx_cpu_kernels.detached(-(mx.array(buf) @ w)))
    lp = mx.array(np.concatenate(out))
    return lp, (mx.concatenate(grads) if grad else None)


@mx.custom_function
def _fused_token_logps(h, w, targets):
    return _token_logps_np(h, w, targets, grad=True)


@_fused_token_logps.vjp
def _fused_token_logps_vjp(primals, cotangents, outputs):
    h, w, targets = primals
    return cotangents[0][:, None] * outputs[1], mx.zeros(w.shape, w.dtype), mx.zeros(targets.shape, targets.dtype)


def make_seq_logps(model: nn.Module):
    """seq_logps(model, batch arrays) -> (rows,) summed answer-token log-probs (fp32, nats).

    The vocabulary projection runs only at answer positions. On CPU it goes through the head's
    dense fp32 weight, dequantized once (the head is frozen), with the softmax in NumPy and the
    gradient w.r.t. the hidden states formed in the forward, as the SFT loss does (MLX's CPU exp
    is scalar; no (tokens, vocab) logits are kept for backward). Elsewhere: plain MLX.
    """
    from .model_parts import output_head

    head = output_head(model)
    weight = None
    if head is not None and mlx_cpu_kernels.on_cpu():
        weight = mlx_cpu_kernels.dense_weight(head)
        mx.eval(weight)

    def token_logps(h, t, with_grad):
        if weight is not None:
            h = h.astype(mx.float32)
            return _fused_token_logps(h, weight, t)[0] if with_grad else _token_logps_np(h, weight, t, False)[0]
        logits = head.as_linear(h) if isinstance(head, (nn.Embedding, nn.QuantizedEmbedding)) else head(h)
        return plain_token_logps(logits, t)

    def seq_logps(model, inputs, targets, index, onehot, with_grad=True):
        t = targets.reshape(-1)[index]
        if head is not None:
            h = model.model(inputs)
            lp = token_logps(h.reshape(-1, h.shape[-1])[index], t, with_grad)
        else:
            logits = model(inputs)
            lp = plain_token_logps(logits.reshape(-1, logits.shape[-1])[index], t)
        return onehot @ lp    # (rows, loss tokens) @ (loss tokens,): each row's sum

    return seq_logps


def plain_token_logps(logits: mx.array, t: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return mx.take_along_axis(logits, t[:, None], axis=-1).squeeze(-1) - mx.logsumexp(logits, axis=-1)


def batch_arrays(b: PairBatch):
    rows = 2 * b.pairs
    onehot = (b.row_of_loss[None, :] == np.arange(rows)[:, None]).astype(np.float32)
    return (mx.array(b.inputs), mx.array(b.targets), mx.array(b.loss_index), mx.array(onehot))


# ------------------------------------------------------------------ reference
def start_adapter(model: nn.Module, cfg: TrainConfig) -> dict:
    """Apply LoRA (from ``cfg.init_adapter`` when given: its rank, targets and weights, with this
    recipe's dropout) and return the starting adapter weights (arrays are immutable: no copy)."""
    if cfg.init_adapter:
        load_adapter(model, cfg.init_adapter)
        cfg.lora = dataclasses.replace(model._lora_info["cfg"], dropout=cfg.lora.dropout)
        model._lora_info["cfg"] = cfg.lora
        for _, m in model.named_modules():
            if isinstance(m, LoRALinear):
                m.dropout = nn.Dropout(p=cfg.lora.dropout)
    else:
        apply_lora(model, cfg.lora)
    return dict(tree_flatten(model.trainable_parameters()))


def _epoch0_batches(pairs, batch_size: int, seed: int, world: dist.World):
    """This rank's share of every batch of epoch 0: the shapes training and validation use."""
    order = batch_order([len(p.tokens) for p in pairs], batch_size, seed, 0)
    return [idx for idx in map(world.share, order) if idx]


def cache_reference(model: nn.Module, start: dict, ds: PairDataset, batch_size: int, seed: int,
                    world: dist.World, seq_logps) -> None:
    """Set ``pair.ref = (c_ref, r_ref)`` on every pair: one no-grad pass with the starting
    adapter's weights swapped in (dropout off), the current ones restored after."""
    current = dict(tree_flatten(model.trainable_parameters()))
    modes = [(m, m.training) for _, m in model.named_modules()]
    model.update(tree_unflatten(list(start.items())))
    model.eval()
    splits = [ds.train, ds.valid]
    found = [np.zeros((len(s), 2), np.float32) for s in splits]
    try:
        for pairs, out in zip(splits, found):
            for idx in _epoch0_batches(pairs, batch_size, seed, world):
                b = collate_pairs([pairs[i] for i in idx])
                lp = seq_logps(model, *batch_arrays(b), with_grad=False)
                mx.eval(lp)
                lp = np.array(lp)
                out[idx, 0], out[idx, 1] = lp[:b.pairs], lp[b.pairs:]
    finally:
        model.update(tree_unflatten(list(current.items())))
        for m, was in modes:   # Module.train() recurses: restore each module's own flag
            m._set_training_mode(was)
    # every rank computed its own shares: adding the (zero elsewhere) tables gives all of them
    flat = dist.sum_numbers(world, np.concatenate([f.reshape(-1) for f in found]).tolist(),
                            "the reference log-prob all_sum")
    at = 0
    for pairs, f in zip(splits, found):
        vals = np.array(flat[at:at + f.size], np.float32).reshape(f.shape)
        at += f.size
        for p, (rc, rr) in zip(pairs, vals):
            p.ref = (float(rc), float(rr))


# ------------------------------------------------------------------ metrics
class Metrics:
    """Sums of per-pair numbers over a step's micro-batches (or a validation pass), per split."""

    def __init__(self, method: str, beta: float):
        self.method, self.beta = method, beta
        self.sums = defaultdict(lambda: defaultdict(float))

    def add(self, split: str, b: PairBatch, seq: np.ndarray) -> None:
        n = b.pairs
        c, r = seq[:n].astype(np.float64), seq[n:].astype(np.float64)
        if self.method == "dpo":
            ref = np.array([p for p in b.ref], np.float64).reshape(n, 2)
            rc, rr = self.beta * (c - ref[:, 0]), self.beta * (r - ref[:, 1])
        else:
            cnt = b.answer_tokens.astype(np.float64)
            a_c, a_r = c / cnt[:n], r / cnt[n:]
            rc, rr = self.beta * a_c, self.beta * a_r
            ac32, ar32 = mx.array(a_c.astype(np.float32)), mx.array(a_r.astype(np.float32))
            _, log_odds = orpo_losses(ac32, ar32, self.beta)
            s = self.sums[split]
            s["nll"] += float(-a_c.sum())
            s["log_odds"] += float(np.array(log_odds, np.float64).sum())
        s = self.sums[split]
        s["pairs"] += n
        s["rewards_chosen"] += float(rc.sum())
        s["rewards_rejected"] += float(rr.sum())
        s["reward_margin"] += float((rc - rr).sum())
        s["reward_accuracy"] += float((rc > rr).sum())

    def take(self, split: str, world: dist.World) -> dict:
        """The means over all ranks (one all_sum), reset for the next step."""
        keys = ["pairs", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"]
        if self.method == "orpo":
            keys += ["nll", "log_odds"]
        s = self.sums.pop(split, {})
        vals = dist.sum_numbers(world, [s.get(k, 0.0) for k in keys], f"the {split} metrics all_sum")
        n = max(vals[0], 1)
        return {k: v / n for k, v in zip(keys[1:], vals[1:])}


# ------------------------------------------------------------------ step functions
def make_step_fns(model: nn.Module, cfg: TrainConfig, ds: PairDataset, start: dict, world: dist.World, say=print):
    """The loop's ``StepFns`` for ``cfg.method`` (dpo / orpo) on MLX autodiff (any device).

    The NumPy CPU engine computes one summed token loss, not per-answer log-probabilities, so
    preference tuning runs on MLX autodiff (with the CPU fast-path kernels) and says so.
    """
    from .model_parts import StepFns, grad_checkpoint

    p = cfg.preference
    if mlx_cpu_kernels.on_cpu() and cfg.cpu_engine:
        say(f"engine: MLX autodiff (the CPU NumPy engine trains SFT only; method={cfg.method} needs each "
            f"answer's log-probability)")
    seq_logps = make_seq_logps(model)
    if cfg.method == "dpo":
        cache_reference(model, start, ds, cfg.batch_size, cfg.seed, world, seq_logps)
    if cfg.grad_checkpoint:
        grad_checkpoint(model)
    metrics = Metrics(cfg.method, p.beta)

    def loss_fn(model, inputs, targets, index, onehot, ref, counts, with_grad=True):
        seq = seq_logps(model, inputs, targets, index, onehot, with_grad)
        n = seq.shape[0] // 2
        c, r = seq[:n], seq[n:]
        if cfg.method == "dpo":
            losses = dpo_losses(c, r, ref[:, 0], ref[:, 1], p.beta, p.loss_type, p.label_smoothing,
                                counts[:n], counts[n:])
        else:
            losses, _ = orpo_losses(c / counts[:n], r / counts[n:], p.beta)
        return losses.sum(), seq

    value_and_grad = nn.value_and_grad(model, loss_fn)

    def arrays(b: PairBatch):
        ref = np.array([q for q in b.ref], np.float32).reshape(b.pairs, 2) if cfg.method == "dpo" \
            else np.zeros((b.pairs, 2), np.float32)
        return (*batch_arrays(b), mx.array(ref), mx.array(b.answer_tokens.astype(np.float32)))

    def grad_fn(b: PairBatch, seed):
        seed_dropout(seed)
        (loss, seq), g = value_and_grad(model, *arrays(b))
        mx.eval(loss, seq, g)
        metrics.add("train", b, np.array(seq))
        return loss.item(), g

    def eval_fn(b: PairBatch):
        loss, seq = loss_fn(model, *arrays(b), with_grad=False)
        mx.eval(loss, seq)
        metrics.add("valid", b, np.array(seq))
        return loss.item()

    return StepFns(grad_fn, eval_fn, False, metrics=lambda split: metrics.take(split, world))
