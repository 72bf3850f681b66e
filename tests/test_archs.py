"""Every supported family end to end on tiny random models built by transformers itself:
convert (HF and GGUF) = transformers, F32 GGUF in llama.cpp = transformers, the 4-bit model's
Q8_0 / Q4_1 exports in llama.cpp = MLX 4-bit, and a QLoRA adapter trained a few steps reaching
llama.cpp (adapter-only GGUF on the Q4_1 base, and merged), PEFT (on the transformers model)
and MLX with the same logits. The measurements fill the README's support matrix
(``MLX_QLORA_WRITE_MATRIX=1 pytest tests/test_archs.py`` rewrites it; otherwise the README's
figures are checked against the bounds asserted here).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import arch_models as am
from lora_fixtures import llama, llama_logits, mlx_logits, mlx_model
from tolerance import tol_abs

pytestmark = [pytest.mark.llamacpp, pytest.mark.cpu_math]
pytest.importorskip("llama_cpp")
pytest.importorskip("torch")

FAMILIES = list(am.FAMILIES)
README = Path(__file__).resolve().parent.parent / "README.md"
# Bounds. MLX and transformers both run fp32 (1e-4 absolute on logits of std 5-9). llama.cpp on
# an F32 file keeps its KV cache in F16 (10-bit mantissa): measured mean |dlogit| 1e-4 to 2.3e-3,
# max 0.02 on these models, so mean <= 0.01 (test_export_gguf.py's f32 bound). Q8_0/Q4_1 files:
# llama.cpp rounds activations to 8 bits in its quantized dot products; the SmolLM2 floor measured
# there is top-1 98.6-99.3%, mean 0.2 (README, Convert), hence top-1 >= 99% and mean <= 0.25.
MLX_HF = 1e-4
F32_MEAN = 0.01
Q_MEAN, TOP1 = 0.25, 0.99
MEASURED: dict[str, dict[str, str]] = {}   # family -> matrix column -> cell


def _convert(src, out, **kw):
    from mlx_qlora.model.convert import ConvertConfig, run_convert

    run_convert(ConvertConfig(source=str(src), out_dir=str(out), **kw))
    return Path(out)


def _export(model, out, **kw):
    from mlx_qlora.export import ExportConfig, run_export

    return run_export(ExportConfig(model=str(model), out=str(out), **kw))


def _compare(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float, float]:
    """(top-1 agreement, mean |dlogit|, max |dlogit|) over every position of every prompt.

    Top-1 is counted where the reference's top-2 gap exceeds the 99th percentile of |dlogit|
    between the two (test_export_gguf.py's rule for greedy paths): at a closer tie no faithful
    implementation can promise the same argmax. Float files leave out almost none of the 112
    positions; the 8-bit-activation noise of Q8_0/Q4_1 (p99 0.1-0.8 on logits of std 5-9) leaves
    out up to 43% (gemma2, a flat head after soft-capping), so at least half must remain."""
    d = np.concatenate([np.abs(a - b).ravel() for a, b in zip(ref, got)])
    top = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ref, got)])
    r = np.sort(np.concatenate(ref), -1)
    decided = (r[:, -1] - r[:, -2]) > np.percentile(d, 99)
    assert decided.mean() >= 0.5   # a comparison of near-ties only would prove nothing
    return float(top[decided].mean()), float(d.mean()), float(d.max())


_BUILT: dict = {}


@pytest.fixture(params=FAMILIES)
def fam(request, tmp_path_factory):
    """family -> dict(hf, f32, q4 dirs, torch logits, prompts), built once per session."""
    family = request.param
    if family not in _BUILT:
        root = tmp_path_factory.mktemp(f"arch_{family}")
        hf = am.write_family(root / "hf", family)
        tokens = am.prompts_tokens()
        tm = am.torch_model(hf)
        _BUILT[family] = dict(
            name=family, root=root, hf=hf, tokens=tokens, ref=[am.torch_logits(tm, t) for t in tokens],
            f32=_convert(hf, root / "f32", quantize=False, dtype="float32"),
            q4=_convert(hf, root / "q4", q_group_size=32, dtype="float32"))
        MEASURED.setdefault(family, {})
    return _BUILT[family]


def test_convert_matches_transformers(fam):
    model = mlx_model(fam["f32"])[0]
    got = [mlx_logits(model, t) for t in fam["tokens"]]
    top, mean, mx_ = _compare(fam["ref"], got)
    assert mx_ <= tol_abs(MLX_HF, fam["ref"][0]), (fam["name"], mx_)
    assert np.std(fam["ref"][0]) > 2.0  # logits far from uniform: the comparison has teeth
    MEASURED[fam["name"]]["convert"] = f"✓ {mx_:.0e}"


def test_f32_gguf_in_llamacpp_and_back(fam, tmp_path):
    """The exported F32 GGUF runs in llama.cpp as transformers runs the HF model, and that file
    (llama.cpp's conventions, as llama.cpp's own run of it shows) converts back to the same MLX."""

    out = tmp_path / "m.gguf"
    _export(fam["f32"], out, type="f32")
    llm = llama(out)
    top, mean, mx_ = _compare(fam["ref"], [llama_logits(llm, t) for t in fam["tokens"]])
    print(f"{fam['name']}: llama.cpp F32 vs transformers top-1 {top:.3f} mean {mean:.2e} max {mx_:.2e}")
    assert top >= TOP1 and mean <= F32_MEAN, (fam["name"], top, mean)
    MEASURED[fam["name"]]["llama.cpp F32"] = f"✓ {top:.1%}, {mean:.0e}"
    back = mlx_model(_convert(out, tmp_path / "back", quantize=False, dtype="float32"))[0]
    _, _, mx_back = _compare(fam["ref"], [mlx_logits(back, t) for t in fam["tokens"]])
    assert mx_back <= tol_abs(MLX_HF, fam["ref"][0]), (fam["name"], mx_back)
    MEASURED[fam["name"]]["GGUF→MLX"] = f"✓ {mx_back:.0e}"


def test_4bit_q8_0_and_q4_1_in_llamacpp(fam, tmp_path):
    model = mlx_model(fam["q4"])[0]
    ref = [mlx_logits(model, t) for t in fam["tokens"]]
    cells = []
    for t in ("q8_0", "q4_1"):
        out = tmp_path / f"m_{t}.gguf"
        _export(fam["q4"], out, type=t)
        llm = llama(out)
        top, mean, mx_ = _compare(ref, [llama_logits(llm, tk) for tk in fam["tokens"]])
        print(f"{fam['name']} {t}: llama.cpp vs MLX 4-bit top-1 {top:.3f} mean {mean:.3f} max {mx_:.3f}")
        assert top >= TOP1 and mean <= Q_MEAN, (fam["name"], t, top, mean)
        cells.append(f"{top:.0%}/{mean:.2f}")
        del llm
    MEASURED[fam["name"]]["Q8_0 / Q4_1"] = "✓ " + ", ".join(cells)


def _train(model_dir: Path, out: Path) -> tuple[Path, str]:
    """A few QLoRA steps with a large learning rate on every linear; (adapter dir, engine line)."""
    import contextlib
    import io

    from mlx_qlora.train.config import load_config
    from mlx_qlora.train.loop import train

    data = out.parent / "data"
    data.mkdir(exist_ok=True)
    rows = ["SELECT name FROM users WHERE age > 30", "The capital of France is Paris.",
            "Once upon a time, there was a little fox.", "def fibonacci(n): return n"]
    (data / "train.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows * 4))
    (data / "valid.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):   # the report goes to stderr
        train(load_config(None, {"model": str(model_dir), "out_dir": str(out), "steps": 4, "batch_size": 2,
                                 "progress": False, "checkpoint_every": 0, "eval_every": 0, "data.train": str(data),
                                 "lora.rank": 4, "lora.alpha": 8.0, "optim.learning_rate": 3e-2}))
    engine = next((ln.strip() for ln in buf.getvalue().splitlines() if ln.strip().startswith("engine:")), "")
    return out, engine


def test_qlora_adapter_reaches_llamacpp_peft_and_fuse(fam, tmp_path):
    from peft import PeftModel

    from mlx_qlora.export.fuse import FuseConfig, run_fuse

    adapter, engine = _train(fam["q4"], tmp_path / "adapter")
    tokens = fam["tokens"]
    tuned = mlx_model(fam["q4"], adapter)[0]
    ref = [mlx_logits(tuned, t) for t in tokens]
    plain = mlx_model(fam["q4"])[0]
    effect = np.mean([np.abs(a - mlx_logits(plain, t)).mean() for a, t in zip(ref, tokens)])
    assert effect > 0.1, (fam["name"], effect)   # the adapter really moves the logits

    # adapter-only LoRA GGUF applied by llama.cpp = MLX 4-bit base + adapter: on the base's exact
    # F32 form (the adapter file's names, Q/K order and scale, to float noise), and on the Q4_1
    # base users run, within the 4-bit floor's mean (a trained adapter sharpens the model, so one
    # row can move by more than the 8-bit activation noise: phi4mini measured a row at 4 logits
    # once, mean 0.06; the F32 check above is the identity)
    lora = tmp_path / "lora.gguf"
    _export(fam["q4"], lora, adapter=str(adapter), adapter_only=True)
    cells = []
    for t, mean_bound in (("f32", F32_MEAN), ("q4_1", Q_MEAN)):
        base = tmp_path / f"base_{t}.gguf"
        _export(fam["q4"], base, type=t)
        llm = llama(base, lora=lora)
        top_a, mean_a, _ = _compare(ref, [llama_logits(llm, t_) for t_ in tokens])
        del llm
        assert mean_a <= mean_bound and (t != "f32" or top_a >= TOP1), (fam["name"], t, top_a, mean_a)
        cells.append((top_a, mean_a))

    # merged: fused into float weights (exactly dequantized base + adapter), F32 GGUF in llama.cpp
    fused = run_fuse(FuseConfig(model=str(fam["q4"]), adapter=str(adapter), out_dir=str(tmp_path / "fused"),
                                dequantize=True))
    merged = tmp_path / "merged.gguf"
    _export(fused, merged, type="f32")
    llm = llama(merged)
    top_m, mean_m, _ = _compare(ref, [llama_logits(llm, t) for t in tokens])
    del llm
    assert top_m >= TOP1 and mean_m <= F32_MEAN, (fam["name"], top_m, mean_m)

    # PEFT export loaded by real PEFT on the transformers model = MLX float base + adapter
    _export(fam["f32"], tmp_path / "peft", to="peft", adapter=str(adapter))
    hf = PeftModel.from_pretrained(am.torch_model(fam["hf"]), str(tmp_path / "peft")).eval()
    mlx_f32 = mlx_model(fam["f32"], adapter)[0]
    d = max(float(np.abs(am.torch_logits(hf, t) - mlx_logits(mlx_f32, t)).max()) for t in tokens)
    assert d <= tol_abs(1e-3, ref[0]), (fam["name"], d)
    # ... and imported back, the same factors and scale (PEFT import of this family's module names)
    from mlx_qlora.export.peft import run_import_peft
    from mlx_qlora.train.adapter_files import read_adapter

    back, orig = read_adapter(run_import_peft(str(tmp_path / "peft"), str(tmp_path / "back"))), read_adapter(adapter)
    assert set(back.pairs) == set(orig.pairs) and abs(back.scale - orig.scale) < 1e-6
    for m, (a, b) in orig.pairs.items():
        assert np.array_equal(np.array(back.pairs[m][0]), np.array(a)) and np.array_equal(np.array(back.pairs[m][1]), np.array(b))
    (top_f, mean_f), (top_a, mean_a) = cells
    print(f"{fam['name']}: adapter effect {effect:.2f}; LoRA GGUF on F32 top-1 {top_f:.3f} mean {mean_f:.4f}, "
          f"on Q4_1 top-1 {top_a:.3f} mean {mean_a:.3f}; "
          f"merged top-1 {top_m:.3f} mean {mean_m:.4f}; PEFT max {d:.1e}; {engine}")
    MEASURED[fam["name"]].update({"QLoRA train": "✓ " + ("NumPy engine" if "NumPy" in engine else "MLX autodiff"),
                                  "adapter GGUF": f"✓ {mean_f:.0e}; Q4_1 {top_a:.0%}/{mean_a:.2f}", "fuse → GGUF": f"✓ {mean_m:.0e}",
                                  "PEFT": f"✓ {d:.0e}, import exact"})


LABELS = {"llama3": "llama — Llama 3.1/3.2 (`llama3` rope, untied head)", "llama": "llama — Llama 2, SmolLM2 (tied)",
          "mistral": "mistral", "qwen2": "qwen2 (Qwen2.5)", "qwen3": "qwen3", "gemma2": "gemma2",
          "gemma3": "gemma3_text (Gemma 3)", "phi3": "phi3 (Phi-3 4k, partial rotary)",
          "phi4mini": "phi3 — Phi-4-mini, Phi-3-128k (LongRoPE)",
          "smollm3": "smollm3", "olmo2": "olmo2", "granite": "granite (3.x)"}
COLUMNS = ["convert", "GGUF→MLX", "llama.cpp F32", "Q8_0 / Q4_1", "QLoRA train", "adapter GGUF", "fuse → GGUF", "PEFT"]
BEGIN, END = "<!-- support-matrix:begin -->", "<!-- support-matrix:end -->"


def render_matrix() -> str:
    head = "| architecture | " + " | ".join(COLUMNS) + " |"
    rows = [head, "| " + " | ".join(["---"] * (len(COLUMNS) + 1)) + " |"]
    for f in FAMILIES:
        rows.append(f"| {LABELS[f]} | " + " | ".join(MEASURED[f].get(c, "") for c in COLUMNS) + " |")
    return "\n".join(rows)


def _status(table: str) -> list[list[str]]:
    """Each cell's verdict (its first word: ✓ or refused), numbers left out: they vary by BLAS."""
    return [[c.strip().split(" ")[0] if c.strip() else "" for c in line.strip("|").split("|")]
            for line in table.strip().splitlines()[2:]]


def test_support_matrix_in_readme():
    """Runs after the family tests (file order): the README's matrix says what they measured.
    ``MLX_QLORA_WRITE_MATRIX=1`` rewrites it with this run's figures."""
    if set(MEASURED) != set(FAMILIES) or any(len(MEASURED[f]) < len(COLUMNS) for f in FAMILIES):
        pytest.skip("the matrix needs every family test of this file in the same run")
    table = render_matrix()
    text = README.read_text()
    assert BEGIN in text and END in text, "README lacks the support-matrix markers"
    if os.environ.get("MLX_QLORA_WRITE_MATRIX"):
        a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
        README.write_text(text[:a] + "\n" + table + "\n" + text[b:])
        text = README.read_text()
    current = text[text.index(BEGIN) + len(BEGIN): text.index(END)]
    assert _status(current) == _status(table), "README's support matrix is stale: MLX_QLORA_WRITE_MATRIX=1 pytest tests/test_archs.py"


def test_both_engines_generate_alike_with_an_adapter_switched(fam, tmp_path):
    """chat/generate/serve/extract run on these engines: MLX and llama.cpp (on the lossless F32
    GGUF built on first use) give the same greedy text for the base and for an adapter switched
    in without reloading (llama.cpp gets it as a LoRA GGUF written from the base file's metadata)."""
    import shutil

    import mlx.core as mx

    from mlx_qlora.infer.engines import EngineConfig, load_engine
    from mlx_qlora.infer.generate import SamplingConfig
    from lora_fixtures import write_adapter

    import tiny

    SPECIAL_FROM = tiny.vocab_size() - len(tiny.SPECIALS)
    model = tmp_path / "model"
    shutil.copytree(fam["f32"], model)
    adapter = write_adapter(tmp_path / "ad", model, targets=("self_attn.o_proj", "mlp.down_proj"), seed=3, b_std=0.2)
    engines = {kind: load_engine(EngineConfig(model=str(model), adapters=[f"tuned={adapter}"], engine=kind,
                                              n_ctx=256, threads=2)) for kind in ("mlx", "llama.cpp")}
    ref, cfg = engines["mlx"], SamplingConfig(max_tokens=10)
    compared = 0
    for name in (None, "tuned"):
        for eng in engines.values():
            eng.set_adapter(name)
        for text in ("the cat sat on", "hello there", "SELECT name FROM"):
            prompt = ref.chat_prompt([{"role": "user", "content": text}])
            ids, gaps = list(prompt), []
            for _ in range(10):   # greedy path by full recomputation, with its smallest top-2 gap
                logits = np.array(ref.model(mx.array(ids)[None])[0, -1].astype(mx.float32))
                top2 = np.sort(logits)[-2:]
                gaps.append(float(top2[1] - top2[0]))
                ids.append(int(np.argmax(logits)))
            if min(gaps) < 0.05 or max(ids[len(prompt):]) >= SPECIAL_FROM:
                # a near-tie (llama.cpp's F16 KV cache may pick either token), or a special token:
                # llama.cpp ends at every end-of-generation token (<|endoftext|> too), MLX at eos
                continue
            assert engines["llama.cpp"].generate(prompt, cfg) == ref.generate(prompt, cfg), (fam["name"], name, text)
            compared += 1
    for eng in engines.values():
        eng.close()
    assert compared >= 2, (fam["name"], compared)
