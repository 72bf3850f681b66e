"""Padding-free QLoRA forward and backward for llama-family decoders on CPU, in NumPy + BLAS.

Why: MLX's CPU backend runs one op at a time, single-threaded outside matmul, and its autodiff
keeps every intermediate of an array evaluated inside a transformation alive until the step ends.
On SmolLM2-135M that made a step ~2.3x its BLAS time and a 7B step need 10+ GiB. Here a decoder
block is a short list of BLAS matmuls and vectorised NumPy passes whose backward is written out,
so what is kept between forward and backward is chosen, not inferred:

- the frozen base weights stay 4-bit; each projection is dequantized (``mx.dequantize``) right
  before its matmul and dropped after it, in forward and again in backward;
- the rows of a batch are packed into one (tokens, dim) matrix: projections never touch padding,
  attention runs per row (block-diagonal), and RoPE positions restart per row;
- blocks below the lowest adapted block only run forward and keep nothing;
- the vocabulary projection and loss run only on loss rows, in chunks (``numpy_kernels.softmax_ce``;
  on the bf16 path in cache-sized vocabulary chunks with an online softmax, ``bf16_head``);
- a projection and its LoRA branch are ``cpu_proj._Proj``;
- with ``grad_checkpoint`` a block keeps only its input and is recomputed in backward.

Gradients are those of the summed token loss, exactly what ``nn.value_and_grad`` over
``train.loop.make_loss`` returns (tests/test_cpu_engine.py checks them against it to 1e-4).
Supported: llama / mistral / qwen2 / qwen3 / phi3 / smollm3 blocks (RMSNorm; RoPE plain, partial,
Llama 3 scaled, LongRoPE, or none in SmolLM3's no-rope layers; OLMo 2's norms on the branch
outputs and whole-width q/k norms; Granite's embedding, residual, attention and logit scales; GQA,
SwiGLU, optional biases, Qwen3's per-head RMSNorm on q and k before RoPE, Phi-3's fused qkv and
gate_up projections) with LoRA (dropout, rsLoRA) on any projection; anything else (DoRA, other architectures, RoPE scaling, sliding windows)
trains through MLX autodiff instead, and training says why in one line.
"""
from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from . import bf16_head, cpu_fused, numpy_kernels as ops
from .cpu_gemm import other_blas_serial, round_bf16_into, to_bf16
from .cpu_proj import _np, _Proj, backward_many, forward_many
from ..lora import LoRALinear, linear_dims
from .mlx_cpu_kernels import CE_CHUNK_ROWS

ENGINE_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2", "granite"}
HEAD_NORMS = ("q_norm", "k_norm")   # qwen3: RMSNorm over each head of q and k, before RoPE
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# phi3 keeps q/k/v in one projection (rows q, then k, then v) and gate/up in one (gate rows first)
FUSED_ATTN = ("qkv_proj", "o_proj")
FUSED_MLP = ("gate_up_proj", "down_proj")
F32 = np.float32


def unsupported(model: nn.Module) -> str | None:
    """Why the engine can't train ``model`` (None when it can)."""
    mtype = getattr(getattr(model, "args", None), "model_type", None)
    if mtype not in ENGINE_TYPES:
        return f"model_type {mtype!r} (the CPU engine covers {', '.join(sorted(ENGINE_TYPES))})"
    for layer in model.layers:
        if getattr(layer, "use_sliding", False):
            return "sliding-window attention"
        a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        attn, mlp = _layout(a, m)
        if attn is None or mlp is None:
            return "a block without q/k/v/o (or qkv/o) and gate/up/down (or gate_up/down) projections"
        if rope_spec(a.rope) is None:
            return f"RoPE variant {type(a.rope).__name__}"
        norms = [getattr(layer, n, None) for n in _norm_names(layer)]
        if not all(type(n) is nn.RMSNorm for n in norms):
            return "a norm other than RMSNorm"
        if any(n in a and type(a[n]) is not nn.RMSNorm for n in HEAD_NORMS):
            return "a q/k norm other than RMSNorm"
        for name in attn + mlp:
            mod = (a if name in attn else m)[name]
            if isinstance(mod, LoRALinear) and mod.is_dora:
                return "DoRA"
    if "lm_head" in model and "bias" in model["lm_head"]:
        return "an output head with a bias"
    lora_keys = {f"{n}.{p}" for n, mod in model.named_modules() if isinstance(mod, LoRALinear) for p in ("lora_a", "lora_b")}
    if {k for k, _ in tree_flatten(model.trainable_parameters())} - lora_keys:
        return "trainable parameters other than LoRA factors"
    return None


def rope_spec(r) -> tuple[int, bool, np.ndarray | None, float] | None:
    """(rotated dims, traditional, inverse frequencies (dims/2,), input scale) of an mlx-lm rope
    module: nn.RoPE (base, position scale), Llama3RoPE and SuScaledRoPE (explicit per-pair
    periods ``_freqs``: mx.fast.rope divides positions by them; SuScaled also scales the rotated
    features by ``_scale``), NoPE (0 dims: no rotation). None for anything else."""
    kind = type(r).__name__
    if type(r) is nn.RoPE:
        inv = float(r.base) ** (-np.arange(0, r.dims, 2, dtype=np.float64) / r.dims) * float(r.scale)
        return r.dims, bool(r.traditional), inv, 1.0
    if kind in ("Llama3RoPE", "SuScaledRoPE") and hasattr(r, "_freqs"):
        dims = int(getattr(r, "dims", getattr(r, "dim", 0)))
        inv = 1.0 / np.array(r._freqs.astype(mx.float32), dtype=np.float64)
        return dims, bool(getattr(r, "traditional", False)), inv, float(getattr(r, "_scale", 1.0))
    if kind == "NoPE":
        return 0, False, None, 1.0
    return None


def _norm_names(layer) -> tuple[str, str]:
    """The block's two norms: before attention and MLP (llama), or on their outputs (OLMo 2,
    which has no input_layernorm: its post_attention_layernorm normalizes the attention output)."""
    if "input_layernorm" not in layer and "post_feedforward_layernorm" in layer:
        return "post_attention_layernorm", "post_feedforward_layernorm"
    return "input_layernorm", "post_attention_layernorm"


def _layout(a, m) -> tuple[tuple | None, tuple | None]:
    """The projection names of this block's attention and MLP (separate or fused), None if neither."""
    attn = next((t for t in (ATTN, FUSED_ATTN) if a is not None and all(hasattr(a, n) for n in t)), None)
    mlp = next((t for t in (MLP, FUSED_MLP) if m is not None and all(hasattr(m, n) for n in t)), None)
    return attn, mlp


class _Geometry:
    """Row segments of a packed batch and their RoPE tables (cached per rope setting)."""

    def __init__(self, lengths: list[int]):
        self.segments = []
        start = 0
        for n in lengths:
            self.segments.append((start, n))
            start += n
        self.n = start
        self.pos = np.concatenate([np.arange(n, dtype=F32) for n in lengths])
        self._rope = {}

    def rope_tables(self, inv: np.ndarray):
        """cos/sin of position x inverse frequency, (tokens, 1, pairs), per frequency set."""
        key = inv.tobytes()
        if key not in self._rope:
            theta = self.pos[:, None].astype(np.float64) * inv[None, :]
            self._rope[key] = (np.cos(theta).astype(F32)[:, None, :], np.sin(theta).astype(F32)[:, None, :])
        return self._rope[key]


class _Block:
    """One decoder block: forward (optionally keeping what backward needs) and backward."""

    def __init__(self, layer: nn.Module, prefix: str, bf16=None):
        a, m = layer.self_attn, layer.mlp
        attn, mlp = _layout(a, m)
        self.fused_qkv, self.fused_mlp = attn == FUSED_ATTN, mlp == FUSED_MLP
        self.proj = {n: _Proj(a[n], f"{prefix}.self_attn.{n}", bf16) for n in attn}
        self.proj.update({n: _Proj(m[n], f"{prefix}.mlp.{n}", bf16) for n in mlp})
        self.trainable = any(p.lora is not None for p in self.proj.values())
        self.bf16 = bf16
        self.fused = cpu_fused.load()[0] if bf16 is not None else None
        head_dim = linear_dims(self.proj["o_proj"].base)[0] // a.n_heads   # o_proj's input: heads x head_dim
        self.heads = ops.Heads(a.n_heads, a.n_kv_heads, head_dim, a.scale)
        self.rope = rope_spec(a.rope)
        names = _norm_names(layer)
        self.post_norms = names[0] == "post_attention_layernorm"   # OLMo 2: norms on the branch outputs
        n1, n2 = layer[names[0]], layer[names[1]]
        self.w1, self.eps1, self.w2, self.eps2 = _np(n1.weight), n1.eps, _np(n2.weight), n2.eps
        self.res = F32(getattr(layer, "residual_multiplier", 1.0))   # Granite scales both branches
        self.head_norm = {n: (_np(a[n].weight), a[n].eps) for n in HEAD_NORMS if n in a}
        d = self.heads.d
        self._qkv_cuts = [self.heads.h * d, (self.heads.h + self.heads.hkv) * d]

    @property
    def k(self):
        """The elementwise kernels: fused C ones on the bf16 path (when they built), else NumPy's
        (the fp32 path's bits, and every evaluation: ``CpuEngine._fp32_products`` clears ``bf16``)."""
        return self.fused if self.bf16 is not None and self.fused is not None else ops

    def _norm_heads(self, x: np.ndarray, name: str, ctx: dict | None) -> np.ndarray:
        """Qwen3's RMSNorm over each head of q or k (identity where the block has none)."""
        kn = self.k
        if name not in self.head_norm:
            return x
        w, eps = self.head_norm[name]
        y, n, r = kn.rms(x.reshape(-1, w.shape[0]), w, eps)
        if ctx is not None:
            ctx[name] = (n, r)
        return y.reshape(x.shape)

    def _norm_heads_back(self, dy: np.ndarray, name: str, ctx: dict) -> np.ndarray:
        kn = self.k
        if name not in self.head_norm:
            return dy
        w, _ = self.head_norm[name]
        n, r = ctx.pop(name)
        return kn.rms_back(dy.reshape(-1, w.shape[0]), w, n, r).reshape(dy.shape)

    def _rope(self, x: np.ndarray, heads: int, geo: _Geometry, inverse: bool) -> np.ndarray:
        """RoPE on (tokens, heads * d): +theta, or -theta (its transpose) for gradients."""
        kn = self.k
        dims, trad, inv, pre = self.rope
        if not dims:
            return x
        if pre != 1.0 and not inverse:   # SuScaledRoPE scales the rotated features first ...
            x = x.reshape(x.shape[0], heads, -1).copy()
            x[..., :dims] *= F32(pre)
            x = x.reshape(x.shape[0], -1)
        cos, sin = geo.rope_tables(inv)
        y = kn.rope(x, heads, cos, sin, dims, trad, inverse)
        if pre != 1.0 and inverse:       # ... so their gradient is scaled after the inverse rotation
            y = y.reshape(y.shape[0], heads, -1)
            y[..., :dims] *= F32(pre)
            y = y.reshape(y.shape[0], -1)
        return y

    def forward(self, x: np.ndarray, geo: _Geometry, rng, ctx: dict | None) -> np.ndarray:
        kn = self.k
        P = self.proj
        post = self.post_norms
        # bf16: q, k, v share one bf16 copy of their input, rounded inside the norm's row blocks
        a16 = np.empty(x.shape, np.uint16) if self.bf16 else None
        a_in, n1, r1 = (x, None, None) if post else kn.rms(x, self.w1, self.eps1, a16, round_bf16_into)
        if post and a16 is not None:
            a16 = to_bf16(a_in)
        if self.fused_qkv:
            q, k, v = np.split(P["qkv_proj"].forward(a_in, rng, ctx, a16), self._qkv_cuts, axis=1)
        else:
            q, k, v = forward_many([P[n] for n in ("q_proj", "k_proj", "v_proj")], a_in, rng, ctx, a16)
        del a16
        q = self._rope(self._norm_heads(q, "q_norm", ctx), self.heads.h, geo, False)
        k = self._rope(self._norm_heads(k, "k_norm", ctx), self.heads.hkv, geo, False)
        o, probs = kn.attention(q, k, v, geo.segments, self.heads, ctx is not None)
        r = P["o_proj"].forward(o, rng, ctx)
        del o
        if post:
            r, n1, r1 = kn.rms(r, self.w1, self.eps1)
        h = x + r * self.res if self.res != 1 else x + r
        m16 = np.empty(h.shape, np.uint16) if self.bf16 else None      # gate and up share theirs
        m_in, n2, r2 = (h, None, None) if post else kn.rms(h, self.w2, self.eps2, m16, round_bf16_into)
        if post and m16 is not None:
            m16 = to_bf16(m_in)
        if self.fused_mlp:
            g, u = np.split(P["gate_up_proj"].forward(m_in, rng, ctx, m16), 2, axis=1)
        else:
            g, u = forward_many([P["gate_proj"], P["up_proj"]], m_in, rng, ctx, m16)
        del m16
        act16 = np.empty(g.shape, np.uint16) if self.bf16 else None   # rounded while each block is in cache
        act, sig = kn.swiglu(g, u, ctx is not None, act16, round_bf16_into)
        r = P["down_proj"].forward(act, rng, ctx, act16)
        del act16
        if post:
            r, n2, r2 = kn.rms(r, self.w2, self.eps2)
        out = h + r * self.res if self.res != 1 else h + r
        if ctx is not None:
            ctx.update(n1=n1, r1=r1, q=q, k=k, v=v, probs=probs, n2=n2, r2=r2, g=g, u=u, sig=sig)
        return out

    def backward(self, dout: np.ndarray, ctx: dict, geo: _Geometry, grads: dict, need_dx: bool) -> np.ndarray | None:
        kn = self.k
        P = self.proj
        post = self.post_norms
        dr = dout * self.res if self.res != 1 else dout
        if post:
            dr = kn.rms_back(dr, self.w2, ctx.pop("n2"), ctx.pop("r2"))
        dact = P["down_proj"].backward(dr, ctx, grads, True)
        # bf16: dL/dg and dL/du also rounded while each block is in cache, for gate/up's input gradients
        d16 = (np.empty(dact.shape, np.uint16), np.empty(dact.shape, np.uint16)) \
            if self.bf16 and not self.fused_mlp else (None, None)
        dg, du = kn.swiglu_back(dact, ctx.pop("g"), ctx.pop("u"), ctx.pop("sig"),
                                 None if d16[0] is None else d16, round_bf16_into)
        del dact
        if self.fused_mlp:
            dm = P["gate_up_proj"].backward(np.concatenate([dg, du], axis=1), ctx, grads, True)
        else:
            dm, dmu = backward_many([(P["gate_proj"], dg, d16[0]), (P["up_proj"], du, d16[1])], ctx, grads, True)
            dm += dmu
        del d16
        dh = dout + (dm if post else kn.rms_back(dm, self.w2, ctx.pop("n2"), ctx.pop("r2")))
        dr = dh * self.res if self.res != 1 else dh
        if post:
            dr = kn.rms_back(dr, self.w1, ctx.pop("n1"), ctx.pop("r1"))
        do = P["o_proj"].backward(dr, ctx, grads, True)
        dq, dk, dv = kn.attention_back(do, ctx.pop("q"), ctx.pop("k"), ctx.pop("v"), ctx.pop("probs"), geo.segments,
                                        self.heads)
        dq = self._norm_heads_back(self._rope(dq, self.heads.h, geo, True), "q_norm", ctx)
        dk = self._norm_heads_back(self._rope(dk, self.heads.hkv, geo, True), "k_norm", ctx)
        if self.fused_qkv:
            da = P["qkv_proj"].backward(np.concatenate([dq, dk, dv], axis=1), ctx, grads, need_dx)
            if not need_dx:
                return None
        else:
            da, dka, dva = backward_many([(P["q_proj"], dq, None), (P["k_proj"], dk, None), (P["v_proj"], dv, None)],
                                         ctx, grads, need_dx)
            if not need_dx:
                return None
            da += dka
            da += dva
        return dh + (da if post else kn.rms_back(da, self.w1, ctx.pop("n1"), ctx.pop("r1")))


class CpuEngine:
    """``loss_and_grad(batch, seed)`` and ``loss(batch)`` for a LoRA-wrapped mlx-lm model.

    ``bf16``: None (fp32 BLAS throughout) or a ``cpu_gemm.MklBf16``: the frozen base's products
    (projections, output head; forward and input gradient) with bf16 operands, fp32 accumulation."""

    def __init__(self, model: nn.Module, grad_checkpoint: bool = False, weight_cache_mb: float = 0, bf16=None):
        why = unsupported(model)
        if why:
            raise ValueError(f"CPU engine: unsupported {why}")
        self.model = model
        self.grad_checkpoint = grad_checkpoint
        self.bf16 = bf16
        inner = model.model
        names = {id(m): n for n, m in model.named_modules()}
        self.blocks = [_Block(layer, names[id(layer)], bf16) for layer in model.layers]
        trainable = [i for i, b in enumerate(self.blocks) if b.trainable]
        self.first = trainable[0] if trainable else len(self.blocks)
        self.embed = inner.embed_tokens
        self.embed_scale = F32(getattr(inner, "embedding_multiplier", 1.0))   # Granite
        self.logit_scale = F32(1.0 / getattr(model, "logits_scaling", 1.0))   # Granite divides the logits
        self.norm_w, self.norm_eps = _np(inner.norm.weight), inner.norm.eps
        head = model["lm_head"] if "lm_head" in model else inner.embed_tokens
        self.head = _Proj(head, "head", bf16)       # frozen; its weight may be cached too
        self.cached_mb = self._fill_cache(weight_cache_mb)
        self._paths = None

    def kernels_note(self) -> str:
        """'; elementwise: ...' for the training banner on the bf16 path (which kernels, and why)."""
        if self.bf16 is None:
            return ""
        fused, why = cpu_fused.load()
        return "; elementwise: fused C kernels" if fused is not None else f"; elementwise: NumPy ({why})"

    def _fill_cache(self, budget_mb: float) -> float:
        """Keep fp32 (bf16 on that path) copies of frozen weights up to ``budget_mb`` MiB: first the adapted blocks'
        (used twice per step, three times with checkpointing), top down, then the output head and
        the blocks below (once per step each). Returns the MiB used."""
        used, budget = 0, budget_mb * 2 ** 20
        order = [p for b in self.blocks[self.first:][::-1] for p in b.proj.values()] + [self.head] + \
                [p for b in self.blocks[:self.first][::-1] for p in b.proj.values()]
        for p in order:
            if used + p.nbytes > budget:
                break
            p.cached = np.array(p.weight())
            used += p.nbytes
        mx.clear_cache()      # the dequantized originals were copied; don't keep their buffers
        return used / 2 ** 20

    def _pack(self, batch):
        """(token ids, geometry, loss rows, loss targets) of the batch's real tokens, packed."""
        T = batch.inputs.shape[1]
        lengths = [int(n) for n in batch.lengths] if batch.lengths is not None else [T] * batch.inputs.shape[0]
        ids = np.concatenate([batch.inputs[i, :n] for i, n in enumerate(lengths)])
        offsets = np.cumsum([0] + lengths[:-1])
        row, col = np.divmod(batch.loss_index, T)
        rows = (offsets[row] + col).astype(np.int64)
        targets = batch.targets.reshape(-1)[batch.loss_index]
        return ids, _Geometry(lengths), rows, targets

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        x = np.array(_np(self.embed(mx.array(ids.astype(np.int32)))))
        return x * self.embed_scale if self.embed_scale != 1 else x

    def _head_loss(self, x: np.ndarray, rows: np.ndarray, targets: np.ndarray, grad: bool):
        """Summed cross-entropy of the loss rows, and its gradient w.r.t. all of ``x``."""
        hn, n, r = ops.rms(x[rows], self.norm_w, self.norm_eps)
        w = self.head.weight()                                    # (vocab, dim): one dequantize per step
        if self.head.bf16 is not None:                            # bf16: vocabulary chunks in cache
            losses, dhn = bf16_head.head_loss(self.head.bf16, hn, w, targets, grad, self.logit_scale)
            return self._head_back(x, rows, float(losses.sum()), dhn, n, r, grad)
        total, dhn = 0.0, (np.empty_like(hn) if grad else None)
        for s in range(0, hn.shape[0], CE_CHUNK_ROWS):
            logits = self.head.matmul(hn[s:s + CE_CHUNK_ROWS], w, True)
            if self.logit_scale != 1:
                logits *= self.logit_scale
            total += float(ops.softmax_ce_rows(logits, targets[s:s + CE_CHUNK_ROWS], grad).sum(dtype=np.float64))
            if grad:
                dhn[s:s + CE_CHUNK_ROWS] = self.head.matmul(logits, w, False)   # (softmax - onehot) @ W
                if self.logit_scale != 1:
                    dhn[s:s + CE_CHUNK_ROWS] *= self.logit_scale
        return self._head_back(x, rows, total, dhn, n, r, grad)

    def _head_back(self, x, rows, total, dhn, n, r, grad):
        if not grad:
            return total, None
        dx = np.zeros_like(x)
        dx[rows] = ops.rms_back(dhn, self.norm_w, n, r)        # loss rows are distinct positions
        return total, dx

    def loss(self, batch) -> float:
        """Summed token loss of ``batch`` (no gradient, nothing kept). Always fp32 products: a
        validation or ``mlx_qlora eval`` loss is the model's own, whatever GEMM path trains it."""
        ids, geo, rows, targets = self._pack(batch)
        with self._fp32_products():
            x = self._embed(ids)
            for b in self.blocks:
                x = b.forward(x, geo, None, None)
            return self._head_loss(x, rows, targets, grad=False)[0]

    @contextmanager
    def _fp32_products(self):
        """On the bf16 path: every projection fp32 (dequantized per use; the bf16 cache set aside)."""
        if self.bf16 is None:
            yield
            return
        projs = [p for b in self.blocks for p in b.proj.values()] + [self.head]
        kept = [p.cached for p in projs]
        for p in projs:
            p.bf16 = p.cached = None
        for b in self.blocks:
            b.bf16 = None
        try:
            yield
        finally:
            for p, c in zip(projs, kept):
                p.bf16, p.cached = self.bf16, c
            for b in self.blocks:
                b.bf16 = self.bf16

    def loss_and_grad(self, batch, seed=(0,)):
        """(summed token loss, gradient tree shaped like ``model.trainable_parameters()``).

        ``seed``: int or tuple of ints; LoRA dropout masks are a function of it.
        """
        if self.bf16 is None:
            return self._loss_and_grad(batch, seed)
        with other_blas_serial():
            return self._loss_and_grad(batch, seed)

    def _loss_and_grad(self, batch, seed):
        seed = tuple(seed) if isinstance(seed, (tuple, list)) else (seed,)
        ids, geo, rows, targets = self._pack(batch)
        x = self._embed(ids)
        for b in self.blocks[:self.first]:
            x = b.forward(x, geo, None, None)
        kept = []
        # one dropout seed per block, so a recomputed block draws the same masks
        seeds = [seed + (i,) for i in range(self.first, len(self.blocks))]
        for b, s in zip(self.blocks[self.first:], seeds):
            if self.grad_checkpoint:
                kept.append(x)
                x = b.forward(x, geo, np.random.default_rng(s), None)
            else:
                ctx = {}
                x = b.forward(x, geo, np.random.default_rng(s), ctx)
                kept.append(ctx)
        total, dx = self._head_loss(x, rows, targets, grad=True)
        grads: dict[str, np.ndarray] = {}
        for i in range(len(self.blocks) - 1, self.first - 1, -1):
            b, ctx = self.blocks[i], kept.pop()
            if self.grad_checkpoint:
                x_in, ctx = ctx, {}
                b.forward(x_in, geo, np.random.default_rng(seeds[i - self.first]), ctx)
                del x_in
            dx = b.backward(dx, ctx, geo, grads, need_dx=i > self.first)
        if self._paths is None:    # the tree's shape, with leaf paths (walking modules costs ~25 ms)
            self._paths = tree_map_with_path(lambda path, v: path, self.model.trainable_parameters())
        return total, tree_map(lambda path: mx.array(grads[path]), self._paths)
