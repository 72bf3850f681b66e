"""The CPU engine's bf16 GEMM path (train/engines/cpu_gemm.py) against its fp32 path.

Bounds (derived in cpu_gemm's docstring; u = 2^-8, bf16's unit roundoff):
- one GEMM: |C_bf16 - C| <= (2u + u^2 + K 2^-24) (|A| @ |B|) elementwise, and the oneMKL result
  equals the exact product of the bf16-rounded operands up to fp32 accumulation (K 2^-24);
- inside the engine every oneMKL call is checked against that identity (``Checked``); the
  engine as a whole can't be compared with an fp32 emulation bit for bit, since an fp32-ulp
  difference upstream flips a later bf16 rounding now and then;
- against the fp32 engine, a first-order bound: every bf16 GEMM on the way from the embeddings to
  the loss perturbs its output by at most gamma = 2u + u^2 + K 2^-24 relative, and RMSNorm /
  residual / softmax pass a relative perturbation on with gain about 1, so the loss moves by at
  most n_fwd * gamma (n_fwd: GEMMs in sequence, 4 per block (q|k|v, o, gate|up, down) + the
  head) and a gradient, whose backward chain is as long again, by 2 n_fwd * gamma (norm-wise).
"""
from __future__ import annotations

import json

import mlx_qlora  # noqa: F401  (BLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_qlora.errors import UserError
from mlx_qlora.train.config import LoraConfig, load_config
from mlx_qlora.train.lora import LoRALinear
from mlx_qlora.train.engines import cpu_gemm
from mlx_qlora.train.engines.cpu_gemm import from_bf16, gemm_bound, to_bf16
from mlx_qlora.train.engines.numpy_engine import CpuEngine
from test_cpu_engine import batch, model_for
from tolerance import tol

LIB, WHY = cpu_gemm.load_library()
needs_lib = pytest.mark.skipif(LIB is None, reason=f"no bf16 GEMM library: {WHY}")
SPR = "vendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
AVX2 = "vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse avx avx2 fma\n"
ZEN4 = "vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"


class Checked:
    """oneMKL's product, each call checked against the exact product of its bf16 operands: only
    fp32 accumulation error (K 2^-24 |A| @ |B|) may separate them."""

    def __init__(self):
        self.calls = 0

    def matmul(self, a, b, transpose_b):
        got = LIB.matmul(a, b, transpose_b)
        a, b = from_bf16(a).astype(np.float64), from_bf16(b).astype(np.float64)
        b = b.T if transpose_b else b
        assert (np.abs(got - a @ b) <= a.shape[1] * cpu_gemm.U_FP32 * (np.abs(a) @ np.abs(b))).all()
        self.calls += 1
        return got

    def sgemm(self, a, b, c=None, ta=False, tb=False, alpha=1.0, beta=0.0, serial=False):
        """The fp32 LoRA products: within fp32 accumulation error of the float64 product."""
        before = np.array(c, np.float64) if beta else 0.0
        got = LIB.sgemm(a, b, c, ta, tb, alpha, beta, serial)
        a, b = (np.asarray(t, np.float64) for t in (a, b))
        a, b = a.T if ta else a, b.T if tb else b
        slack = (a.shape[1] + 2) * cpu_gemm.U_FP32 * (abs(alpha) * np.abs(a) @ np.abs(b) + np.abs(beta * before))
        assert (np.abs(got - (alpha * (a @ b) + beta * before)) <= slack).all()
        return got

    def sgemm_tn(self, a, b):
        got = LIB.sgemm_tn(a, b)
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert (np.abs(got - a.T @ b) <= (a.shape[0] + 2) * cpu_gemm.U_FP32 * (np.abs(a.T) @ np.abs(b))).all()
        return got

    def gemm(self, a, b, transpose_b, c, beta=0.0):
        before = np.array(c, np.float64) if beta else 0.0     # beta 0: c is not read (may hold garbage)
        got = LIB.gemm(a, b, transpose_b, c, beta)
        a, b = from_bf16(a).astype(np.float64), from_bf16(b).astype(np.float64)
        b = b.T if transpose_b else b
        # fp32 accumulation of K products, plus one fp32 rounding of the sum with beta * c
        slack = a.shape[1] * cpu_gemm.U_FP32 * (np.abs(a) @ np.abs(b)) + cpu_gemm.U_FP32 * np.abs(beta * before)
        assert (np.abs(got - (a @ b + beta * before)) <= slack * (1 + 2 * cpu_gemm.U_FP32)).all()
        self.calls += 1
        return got


def norm_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------ values and one GEMM
def nearest_even_bf16(x):
    """The rounding written out on the bits (reference for ``to_bf16``, which is MLX's)."""
    u = x.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def test_to_bf16_rounds_to_nearest_even():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10_000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.0e38, 1e-40, 1.0 + 2 ** -8])]).astype(np.float32)
    assert np.array_equal(to_bf16(x), nearest_even_bf16(x))
    assert to_bf16(np.float32([1 + 2 ** -8]))[0] == to_bf16(np.float32([1.0]))[0]     # tie to even: down
    assert from_bf16(to_bf16(np.float32([1 + 3 * 2 ** -8])))[0] == 1 + 2 ** -6           # tie to even: up
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7FFFFFFF, 0xFFFFFFFF], np.uint32).view(np.float32)
    assert np.isnan(from_bf16(to_bf16(nans))).all()                                    # no payload rounds to inf/0
    assert np.array_equal(from_bf16(to_bf16(x[:10_000])).view(np.uint32) & 0xFFFF, np.zeros(10_000, np.uint32))


def test_round_bf16_into_equals_to_bf16():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((300, 577)) * 10.0 ** rng.integers(-30, 30, (300, 577))).astype(np.float32)
    x[0, :4] = [np.inf, -np.inf, np.nan, 1 + 2 ** -8]
    out = np.empty(x.shape, np.uint16)
    assert cpu_gemm.round_bf16_into(x, out) is out
    assert np.array_equal(out[1:], nearest_even_bf16(x[1:]))
    assert np.array_equal(out[0, [0, 1, 3]], to_bf16(x[0, [0, 1, 3]])) and np.isnan(from_bf16(out[0, 2:3]))[0]


@needs_lib
@pytest.mark.parametrize("m,k,n,transpose", [(37, 576, 1536, True), (300, 1536, 576, False), (5, 64, 7, True),
                                             (360, 576, 1536, False), (9, 64, 1000, True)])   # split by columns
def test_gemm_within_derived_bound(m, k, n, transpose):
    rng = np.random.default_rng(m)
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((n, k) if transpose else (k, n)) * 0.02).astype(np.float32)
    got = LIB.matmul(to_bf16(a), to_bf16(w), transpose)
    wt = w.T if transpose else w
    exact = a.astype(np.float64) @ wt.astype(np.float64)
    scale = np.abs(a).astype(np.float64) @ np.abs(wt).astype(np.float64)
    err = np.abs(got - exact)
    assert (err <= gemm_bound(k) * scale).all()
    assert err.max() > k * cpu_gemm.U_FP32 * scale.max()       # bf16 really was used (fp32 would be this close)
    rounded = from_bf16(to_bf16(a)).astype(np.float64) @ from_bf16(to_bf16(wt.copy())).astype(np.float64)
    assert (np.abs(got - rounded) <= k * cpu_gemm.U_FP32 * scale).all()   # only fp32 accumulation left


@needs_lib
@pytest.mark.parametrize("rows,dim,vocab,scale", [(37, 64, 5000, 1.0), (300, 576, 3 * 1024, 0.25)])
def test_chunked_head_within_derived_bound(rows, dim, vocab, scale):
    """bf16_head.head_loss against float64 cross-entropy over the same bf16 head weights, within
    the bound derived in bf16_head's docstring (row by row, element by element)."""
    from mlx_qlora.train.engines import bf16_head

    rng = np.random.default_rng(rows)
    h = rng.standard_normal((rows, dim)).astype(np.float32)
    w16 = to_bf16((rng.standard_normal((vocab, dim)) * 2 / np.sqrt(dim)).astype(np.float32))
    targets = rng.integers(0, vocab, rows)
    checked = Checked()
    loss, dh = bf16_head.head_loss(checked, h, w16, targets, True, np.float32(scale))
    assert checked.calls >= 2 * (vocab // bf16_head.CHUNK_COLS) and dh.dtype == np.float32
    assert np.array_equal(bf16_head.head_loss(LIB, h, w16, targets, False, np.float32(scale))[0], loss)
    w, hf = from_bf16(w16).astype(np.float64), h.astype(np.float64)
    logits = hf @ w.T * scale
    m = logits.max(axis=1, keepdims=True)
    p = np.exp(logits - m)
    s = p.sum(axis=1, keepdims=True)
    want_loss = (m + np.log(s))[:, 0] - logits[np.arange(rows), targets]
    p /= s
    onehot = np.zeros_like(p)
    onehot[np.arange(rows), targets] = 1
    want_dh = (p - onehot) @ w * scale
    u32 = cpu_gemm.U_FP32
    delta = (gemm_bound(dim) + 2 * u32) * abs(scale) * (np.abs(hf) @ np.abs(w).T).max(axis=1)   # logit error, per row
    assert (np.abs(loss - want_loss) <= 2 * delta + 16 * u32 * (1 + np.abs(want_loss) + np.abs(m[:, 0]))).all()
    mass = p @ np.abs(w) * abs(scale)
    bound = (np.expm1(2 * delta)[:, None] + gemm_bound(vocab) + 16 * u32) * mass + 2 * u32 * np.abs(w[targets]) * abs(scale)
    err = np.abs(dh - want_dh)
    assert (err <= bound).all()
    assert err.max() > 64 * u32 * np.abs(want_dh).max()      # bf16 really was used


# ------------------------------------------------------------------ choosing the path
def test_path_honours_key_and_cpu_flags():
    spr, avx2, lib = cpu_gemm.cpu_flags(SPR), cpu_gemm.cpu_flags(AVX2), object()
    intel = cpu_gemm.cpu_vendor(SPR)
    assert {"amx_bf16", "avx512_bf16", "avx2"} <= spr and "amx_bf16" not in avx2 and intel == "GenuineIntel"
    assert cpu_gemm.choose("auto", spr, lib, intel).path == "bf16"
    assert "amx_bf16" in cpu_gemm.choose("auto", spr, lib, intel).reason
    assert cpu_gemm.choose("auto", avx2, lib, intel).path == "fp32"
    assert cpu_gemm.choose("auto", frozenset({"avx512_bf16"}), lib, intel).path == "bf16"     # Cooper Lake
    zen4 = cpu_gemm.choose("auto", cpu_gemm.cpu_flags(ZEN4), lib, cpu_gemm.cpu_vendor(ZEN4))
    assert zen4.path == "fp32" and "AuthenticAMD" in zen4.reason                      # unmeasured there
    no_lib = cpu_gemm.choose("auto", spr, None, intel)
    assert no_lib.path == "fp32" and "amx_bf16" in no_lib.reason
    assert cpu_gemm.choose("fp32", spr, lib).path == "fp32"
    assert cpu_gemm.choose("bf16", avx2, lib).path == "bf16"        # asked for: honoured (oneMKL emulates)
    with pytest.raises(UserError, match="cpu_gemm=bf16.*pip install mkl"):
        cpu_gemm.choose("bf16", spr, None)
    with pytest.raises(UserError, match="cpu_gemm='fp16'"):
        cpu_gemm.choose("fp16", spr, lib)
    assert cpu_gemm.cpu_summary(SPR) == "Intel(R) Xeon(R) Platinum 8480+ (avx2 avx512f avx512_bf16 amx_bf16 amx_tile)"
    assert cpu_gemm.cpu_summary(AVX2) == "AMD EPYC 7B12 (avx2)"


def test_doctor_lines_name_the_cpu_and_the_path(monkeypatch):
    class Lib:
        version = "oneMKL 2026"

    monkeypatch.setattr(cpu_gemm, "cpuinfo_text", lambda: SPR)
    monkeypatch.setattr(cpu_gemm, "load_library", lambda: (Lib(), "loaded"))
    assert cpu_gemm.doctor_lines() == [
        "CPU GEMMs      bf16 GEMMs, fp32 accumulation (oneMKL 2026; cpu_gemm=auto, CPU has amx_bf16 avx512_bf16)"]
    monkeypatch.setattr(cpu_gemm, "cpuinfo_text", lambda: AVX2)
    assert cpu_gemm.doctor_lines()[0].startswith("CPU GEMMs      fp32 BLAS (cpu_gemm=auto: this CPU has no bf16 units")


def test_doctor_prints_them(capsys):
    from mlx_qlora.doctor import run_doctor

    run_doctor()
    out = capsys.readouterr().out.splitlines()
    assert out[-1:] == cpu_gemm.doctor_lines()


def test_config_key_checked_and_passed(tiny_llama_q4, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="cpu_gemm='half': use one of auto, fp32, bf16"):
        load_config(None, {"model": "m", "data.train": "d", "cpu_gemm": "half"})
    from mlx_qlora.train import loop

    seen = []
    monkeypatch.setattr(cpu_gemm, "cpuinfo_text", lambda: AVX2)          # simulated: an AVX2-only CPU
    real = loop.numpy_engine.CpuEngine
    monkeypatch.setattr(loop.numpy_engine, "CpuEngine", lambda *a, **k: seen.append(k["bf16"]) or real(*a, **k))
    model = model_for(tiny_llama_q4, bits=None)
    said = []
    loop.make_step_fns(model, say=said.append)                              # auto on an AVX2-only CPU
    loop.make_step_fns(model, say=said.append, cpu_gemm="fp32")
    assert seen == [None, None] and "no bf16 units" in said[0] and "fp32 weight cache" in said[0]
    if LIB is not None:
        loop.make_step_fns(model, say=said.append, cpu_gemm="bf16")
        assert seen[-1] is LIB and "bf16 weight cache" in said[-1]


# ------------------------------------------------------------------ the engine
def check_engine(model, b, n_blocks, check_calls=True, **kw):
    lib = Checked() if check_calls else LIB
    (l32, g32), (l16, g16) = (CpuEngine(model, bf16=x, **kw).loss_and_grad(b, seed=(1, 2)) for x in (None, lib))
    g32, g16 = dict(tree_flatten(g32)), dict(tree_flatten(g16))
    # every projection's forward and input gradient (none for the lowest block's q/k/v), the head's two
    assert not check_calls or lib.calls >= 2 * 7 * n_blocks - 3 + 2
    n_fwd = 4 * n_blocks + 1
    a = model.args       # the longest inner dimension: the head's input gradient sums over the vocabulary
    gamma = gemm_bound(max(a.hidden_size, a.intermediate_size, a.vocab_size))
    rel_loss = abs(l16 - l32) / abs(l32)
    assert 0 < rel_loss < n_fwd * gamma                             # bf16 changed something, within the bound
    assert set(g16) == set(g32)
    worst = max(norm_err(g16[k], g32[k]) for k in g32)
    assert worst < 2 * n_fwd * gamma
    return rel_loss, worst


@needs_lib
@pytest.mark.parametrize("arch,cache_mb,checkpoint", [("llama", 0, False), ("llama", 64, True), ("qwen2", 0, False)])
def test_engine_bf16_matches_fp32_tiny(request, arch, cache_mb, checkpoint):
    model = model_for(request.getfixturevalue(f"tiny_hf_{arch}"), 4,
                      LoraConfig(rank=4, alpha=8, layers="all", targets="all-linear", dropout=0.1))
    check_engine(model, batch(), n_blocks=len(model.layers), weight_cache_mb=cache_mb,
                 grad_checkpoint=checkpoint)
    # evaluation (validation, mlx_qlora eval) is fp32 on either path: the same number bit for bit
    assert CpuEngine(model, weight_cache_mb=cache_mb, bf16=LIB).loss(batch()) == CpuEngine(model).loss(batch())
    if cache_mb:                                  # the bf16 cache holds each weight in half the bytes
        e16, e32 = CpuEngine(model, weight_cache_mb=cache_mb, bf16=LIB), CpuEngine(model, weight_cache_mb=cache_mb)
        assert e16.cached_mb == e32.cached_mb / 2 and e16.head.cached.dtype == np.uint16


@needs_lib
def test_lora_branches_side_by_side_equal_one_by_one(tiny_hf_llama, monkeypatch):
    """cpu_proj.forward_many / backward_many (q/k/v and gate/up branches on the pool's threads,
    dropout masks drawn first in order) give the loss and gradients of the one-by-one calls: the
    same products, only oneMKL's thread split of two of them differs (fp32 accumulation order)."""
    from mlx_qlora.train.engines import numpy_engine
    model = model_for(tiny_hf_llama, 4, LoraConfig(rank=4, alpha=8, layers="all", targets="all-linear", dropout=0.1))
    eng = CpuEngine(model, bf16=LIB)
    loss, g = eng.loss_and_grad(batch(), seed=(7,))
    with monkeypatch.context() as m:
        m.setattr(numpy_engine, "forward_many", lambda projs, x, rng, ctx, x16: [p.forward(x, rng, ctx, x16) for p in projs])
        m.setattr(numpy_engine, "backward_many",
                  lambda items, ctx, grads, need_dx: [p.backward(dy, ctx, grads, need_dx, d16) for p, dy, d16 in items])
        want, wg = eng.loss_and_grad(batch(), seed=(7,))
    assert loss == pytest.approx(want, rel=1e-6)
    got, ref = dict(tree_flatten(g)), dict(tree_flatten(wg))
    assert got.keys() == ref.keys() and len(got) == 7 * 2 * len(model.layers)
    for k in ref:
        assert norm_err(np.array(got[k]), np.array(ref[k])) < 1e-5, k


@needs_lib
@pytest.mark.real
def test_engine_bf16_matches_fp32_smollm2(smollm2_mlx):
    from mlx_lm.utils import load_model

    from mlx_qlora.train.lora import apply_lora
    from mlx_qlora.train.loop import prepare_model

    model, _ = load_model(smollm2_mlx)
    prepare_model(model)
    mx.random.seed(0)
    apply_lora(model, LoraConfig(rank=8, alpha=16, layers=4, targets="all-linear"))
    for _, m in model.named_modules():     # a trained-looking adapter: lora_b != 0, so every gradient is
        if isinstance(m, LoRALinear):      # nonzero
            m.lora_b = 0.01 * mx.random.normal(m.lora_b.shape)
    b = batch(3, lengths=(60, 41, 77, 52), vocab=40_000, prompt=10)
    rel_loss, worst = check_engine(model, b, n_blocks=4, check_calls=False, weight_cache_mb=0)  # float64 checks: slow
    print(f"SmolLM2 bf16 vs fp32: loss {rel_loss:.2e}, worst gradient {worst:.2e}")


@needs_lib
def test_sixty_steps_val_loss_within_one_percent(tiny_llama_q4, tmp_path):
    """60 optimizer steps (batch 4, lr 1e-3) on WikiSQL rows: the bf16 path's validation loss
    lands within 1% of the fp32 path's."""
    from conftest import WIKISQL
    from mlx_qlora.train.loop import train
    from test_train import WIKI_ROWS

    path = WIKISQL / "train.jsonl"
    rows = [json.loads(x)["text"] for x in path.read_text().splitlines()[:48]] if path.exists() else \
        [json.loads(f'"{r}"') for r in WIKI_ROWS] * 12
    rows = [r[:160] for r in rows]      # ~160 tokens with the tiny byte-level vocabulary: a quick test
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows[:40]))
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows[40:]))
    val = {}
    for gemm in ("fp32", "bf16"):
        s = train(load_config(None, {"model": str(tiny_llama_q4), "out_dir": str(tmp_path / gemm), "steps": 60,
                                     "batch_size": 4, "progress": False, "checkpoint_every": 0, "eval_every": 0,
                                     "data.train": str(tmp_path), "lora.rank": 4, "lora.alpha": 8.0,
                                     "optim.learning_rate": 1e-3, "cpu_gemm": gemm}))
        val[gemm] = (s["val_loss_start"], s["val_loss"])
    assert val["bf16"][1] < 0.5 * val["bf16"][0]                    # it trained
    assert abs(val["bf16"][1] - val["fp32"][1]) / val["fp32"][1] < 0.01, val
