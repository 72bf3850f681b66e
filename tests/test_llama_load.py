"""Every llama.cpp model load goes through one place (``model.llama_load.open_llama``), which sets
the load parameters this CPU needs (issue #21: llama.cpp's AMX buffer type segfaulted on AMX
Xeons), and the choice follows the key, the measurement and the CPU's features."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tiny
from mlx_qlora.model import llama_load
from mlx_qlora.model.cpu import parse_cpuinfo
from mlx_qlora.model.llama_load import BuftChoice, choose_extra_bufts

ROOT = Path(__file__).resolve().parent.parent
# calls that open a llama.cpp model: the high-level class and the C API's loaders
LOADERS = {"Llama", "llama_model_load_from_file", "llama_load_model_from_file", "llama_model_load_from_splits"}

XEON_AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""
EPYC_AVX2 = "model name\t: AMD EPYC 7B12\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\nCPU part\t: 0xd0c\n"


def loads_outside(files) -> list[str]:
    found = []
    for path in files:
        if path.name == "llama_load.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name in LOADERS:
                    found.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno} {name}(")
    return found


def project_files():
    for d in ("mlx_qlora", "tests", "bench", "examples", "scripts"):
        yield from sorted((ROOT / d).rglob("*.py"))


def test_no_llama_cpp_model_is_loaded_outside_open_llama():
    assert loads_outside(project_files()) == []


def test_the_bypass_detector_fires(tmp_path):
    """A planted direct load, in each spelling, must be seen, else the test above proves nothing."""
    planted = tmp_path / "bypass.py"
    planted.write_text("import llama_cpp\nfrom llama_cpp import Llama\n"
                       "a = Llama('m.gguf')\nb = llama_cpp.Llama(model_path='m.gguf')\n"
                       "c = llama_cpp.llama_model_load_from_file(b'm.gguf', p)\n")
    assert [s.split()[-1] for s in loads_outside([planted])] == ["Llama(", "Llama(", "llama_model_load_from_file("]


@pytest.mark.parametrize("text,machine,features", [
    (XEON_AMX, "x86_64", ["AVX2", "AVX-512", "AVX512-BF16", "AMX", "AMX-INT8", "AMX-BF16"]),
    (EPYC_AVX2, "x86_64", ["AVX2"]),
    (GRAVITON, "aarch64", ["NEON"]),
    ("", "arm64", ["NEON"]),                        # macOS: no /proc/cpuinfo, Apple silicon has NEON
])
def test_cpu_features_are_read_from_cpuinfo(text, machine, features):
    assert parse_cpuinfo(text, machine).features == features


def test_extra_buffer_types_follow_key_measurement_and_cpu():
    amx, avx2, neon = (parse_cpuinfo(t, m) for t, m in ((XEON_AMX, "x86_64"), (EPYC_AVX2, "x86_64"), (GRAVITON, "aarch64")))
    none = {}
    # the rule by CPU and build: off on AMX with pip's build (the crash), on with the fixed build of
    # scripts/llama_cpp_wheel.py; llama.cpp's default elsewhere, whichever the build
    fixed, plain = "0.3.36" + llama_load.AMX_FIX_TAG, "0.3.36"
    assert choose_extra_bufts("Q4_1", amx, none, none, plain).extra_bufts is False
    assert choose_extra_bufts("Q4_1", amx, none, none, fixed).extra_bufts is True
    assert choose_extra_bufts("Q4_1", amx, none, none, fixed + ".1").extra_bufts is False   # a tag that is not ours
    for version in (plain, fixed):
        assert choose_extra_bufts("Q4_1", avx2, none, none, version).extra_bufts is True
        assert choose_extra_bufts("Q4_0", neon, none, none, version).extra_bufts is True
    # the key wins over everything
    assert choose_extra_bufts("Q4_1", amx, {llama_load.ENV_VAR: "1"}, none) == BuftChoice(True, f"on ({llama_load.ENV_VAR}=1)")
    assert choose_extra_bufts("Q4_1", avx2, {llama_load.ENV_VAR: "off"}, none).extra_bufts is False
    # a measurement for this type wins over the rule: on only when correct and faster
    good = {"Q8_0": {"correct": True, "speedup": 1.4, "verdict": "correct, faster"}}
    slow = {"Q8_0": {"correct": True, "speedup": 0.9, "verdict": "correct, slower"}}
    crash = {"Q4_0": {"correct": False, "speedup": 0.0, "verdict": "crashed"}}
    assert choose_extra_bufts("Q8_0", amx, none, good).extra_bufts is True
    assert choose_extra_bufts("Q8_0", amx, none, slow, fixed).extra_bufts is False
    assert choose_extra_bufts("Q4_0", avx2, none, crash).extra_bufts is False
    assert choose_extra_bufts("Q4_1", amx, none, good, plain).extra_bufts is False  # no measurement of Q4_1: the rule


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_the_choice_reaches_llama_cpp_model_parameters(qtype, tmp_path, monkeypatch):
    """The parameter is set on the model llama.cpp loads (llama-cpp-python has no argument for it),
    and only for that load: the library's default params are restored after."""
    pytest.importorskip("llama_cpp")
    from llama_cpp import llama_cpp as C

    gguf = tiny.write_gguf(tiny.write_hf_dir(tmp_path / "hf", arch="llama", seed=2), tmp_path / "m.gguf", qtype)
    assert llama_load.gguf_weight_type(gguf) == qtype
    default = C.llama_model_default_params().use_extra_bufts
    for key, want in (("0", False), ("1", True)):
        monkeypatch.setenv(llama_load.ENV_VAR, key)
        llm = llama_load.open_llama(gguf, n_ctx=32, n_threads=1)
        assert llm.model_params.use_extra_bufts is want
        assert len(llm.tokenize(b"hello")) > 0
        assert C.llama_model_default_params().use_extra_bufts is default
        llm.close()


@pytest.mark.llamacpp
def test_embedded_q4_1_answers_through_open_llama(smollm2_gguf):
    """The reduced crash of issue #21: a plain completion from the embedded Q4_1 GGUF (segfaulted on
    AMX CPUs with llama.cpp's defaults)."""
    pytest.importorskip("llama_cpp")
    llm = llama_load.open_llama(smollm2_gguf, n_ctx=256, n_threads=2)
    text = llm("The capital of France is", max_tokens=4, temperature=0.0)["choices"][0]["text"]
    assert "Paris" in text, text


@pytest.mark.llamacpp
def test_probe_reports_a_crash_as_a_measured_no(tmp_path, monkeypatch):
    """doctor --probe-llama runs each setting in a child: a child killed by a signal is a verdict
    (not a dead doctor), cached for the choice. The crash is planted (a child that segfaults),
    so this holds on every CPU."""
    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(llama_load, "CACHE_DIR", tmp_path / "cache")
    gguf = tiny.write_gguf(tiny.write_hf_dir(tmp_path / "hf", arch="llama", seed=2), tmp_path / "m.gguf", "Q8_0")
    crash_when_on = llama_load._CHILD.replace("from mlx_qlora", "import ctypes\nif sys.argv[2] == '1': ctypes.string_at(0)\nfrom mlx_qlora")
    monkeypatch.setattr(llama_load, "_CHILD", crash_when_on)
    got = llama_load.probe(gguf, threads=1)["Q8_0"]
    assert got["correct"] is False and "crashed" in got["verdict"] and "-11" in got["verdict"]
    monkeypatch.delenv(llama_load.ENV_VAR, raising=False)
    assert choose_extra_bufts("Q8_0", parse_cpuinfo(EPYC_AVX2, "x86_64")).extra_bufts is False


@pytest.mark.llamacpp
def test_probe_of_a_type_without_a_crash_compares_logits(tmp_path, monkeypatch):
    """On a tiny F32 model both settings run; the verdict is "correct" with a speed ratio."""
    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(llama_load, "CACHE_DIR", tmp_path / "cache")
    gguf = tiny.write_gguf(tiny.write_hf_dir(tmp_path / "hf", arch="llama", seed=2), tmp_path / "m.gguf", "F32")
    got = llama_load.probe(gguf, threads=1)["F32"]
    assert got["correct"] is True and got["speedup"] > 0, got
    assert llama_load.read_probe()["F32"] == got


@pytest.mark.llamacpp
def test_probe_calls_a_less_accurate_path_wrong(tmp_path, monkeypatch):
    """The accuracy bound can fail: a planted "kernel" that perturbs the logits by 3% of their spread
    when the extra types are on (noise of a wrong sum order would be far smaller) is WRONG, cached
    as a no."""
    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(llama_load, "CACHE_DIR", tmp_path / "cache")
    gguf = tiny.write_gguf(tiny.write_hf_dir(tmp_path / "hf", arch="llama", seed=2), tmp_path / "m.gguf", "Q8_0")
    noisy = llama_load._CHILD.replace(
        "np.save(out, np.asarray(llm.scores[:len(ids)], np.float32))",
        "s = np.asarray(llm.scores[:len(ids)], np.float32)\n"
        "if on: s = s + 0.03 * (s.max() - s.min()) * np.random.default_rng(0).standard_normal(s.shape).astype(np.float32)\n"
        "np.save(out, s)")
    assert noisy != llama_load._CHILD
    monkeypatch.setattr(llama_load, "_CHILD", noisy)
    got = llama_load.probe(gguf, threads=1)["Q8_0"]
    assert got["correct"] is False and got["verdict"].startswith("WRONG"), got
    monkeypatch.delenv(llama_load.ENV_VAR, raising=False)
    assert choose_extra_bufts("Q8_0", parse_cpuinfo(XEON_AMX, "x86_64"), version="0.3.36" + llama_load.AMX_FIX_TAG
                              ).extra_bufts is False


@pytest.mark.llamacpp
def test_open_llama_follows_a_measurement_of_the_files_type(tmp_path, monkeypatch):
    """A cached verdict for the file's weight type decides the load, against the CPU's rule either
    way: the measurement is planted as the opposite of what the rule says on this CPU."""
    pytest.importorskip("llama_cpp")
    import json

    monkeypatch.delenv(llama_load.ENV_VAR, raising=False)
    monkeypatch.setattr(llama_load, "CACHE_DIR", tmp_path / "cache")
    gguf = tiny.write_gguf(tiny.write_hf_dir(tmp_path / "hf", arch="llama", seed=2), tmp_path / "m.gguf", "F32")
    rule = choose_extra_bufts(None, probe={}).extra_bufts
    verdict = {"correct": not rule, "speedup": 2.0 if not rule else 0.0, "verdict": "planted"}
    llama_load.CACHE_DIR.mkdir(parents=True)
    llama_load._probe_cache().write_text(json.dumps({"F32": verdict}))
    llm = llama_load.open_llama(gguf, n_ctx=32, n_threads=1)
    assert llm.model_params.use_extra_bufts is (not rule)
    llm.close()


AFTER_TORCH_AMX = r"""
import sys, torch
from mlx_qlora.model.llama_load import open_llama
# oneDNN's bf16 GEMM runs on AMX tiles here and releases them after (TILERELEASE): llama.cpp's AMX
# matmuls then met unconfigured tiles (SIGILL at tilezero) in pip's build
a = torch.randn(256, 256, dtype=torch.bfloat16)
(a @ a).sum().item()
llm = open_llama(sys.argv[1], n_ctx=256, n_threads=2)
assert llm.model_params.use_extra_bufts, "the AMX path is off"
print(llm("The capital of France is", max_tokens=4, temperature=0.0)["choices"][0]["text"])
"""


@pytest.mark.llamacpp
@pytest.mark.real
def test_amx_build_answers_correctly_after_another_library_used_the_tiles(smollm2_gguf, tmp_path, monkeypatch):
    """On an AMX CPU with the build scripts/setup.sh makes (scripts/llama_cpp_wheel.py), llama.cpp's
    AMX buffer type is on by default and (1) answers at all (pip's build: SIGSEGV at ldtilecfg),
    (2) after torch's AMX kernels ran in the same process (pip's build: SIGILL at tilezero), in a
    child so a crash is this test's failure, and (3) gives the plain path's logits within the
    probe's bound: the same argmax at all 96 positions, max|Δ| <= 2% of the logits' spread (AMX
    quantizes the activations per block as the plain Q8 dot product does, in another order)."""
    import subprocess
    import sys

    pytest.importorskip("llama_cpp")
    pytest.importorskip("torch")
    from mlx_qlora.model.cpu import cpu_info

    if "amx_tile" not in cpu_info().flags:
        pytest.skip("no AMX on this CPU: llama.cpp's AMX buffer type is not used")
    if not llama_load.llama_version().endswith(llama_load.AMX_FIX_TAG):
        pytest.skip(f"llama-cpp-python {llama_load.llama_version()} is not the fixed build (setup.sh fell back to pip's)")
    monkeypatch.delenv(llama_load.ENV_VAR, raising=False)
    p = subprocess.run([sys.executable, "-c", AFTER_TORCH_AMX, str(smollm2_gguf)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-1500:]}"
    assert "Paris" in p.stdout, p.stdout
    monkeypatch.setattr(llama_load, "CACHE_DIR", tmp_path / "cache")
    got = llama_load.probe(smollm2_gguf, threads=2)["Q4_1"]
    assert got["correct"] is True, got


def test_the_llama_cpp_wheel_patch_replaces_the_tile_setup_and_refuses_other_sources(tmp_path):
    """scripts/llama_cpp_wheel.py's patch on a stand-in sdist tree: the once-per-thread tile setup of
    the released form becomes the load at every call through an "m" operand, the version gets the
    tag llama_load trusts, and a source of another form is refused (exit with the file's name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("llama_cpp_wheel", ROOT / "scripts" / "llama_cpp_wheel.py")
    wheel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wheel)
    src = tmp_path / "sdist"
    mmq = src / wheel.MMQ
    mmq.parent.mkdir(parents=True)
    (src / "llama_cpp").mkdir()
    (src / "llama_cpp" / "__init__.py").write_text('__version__ = "0.3.36"\n')
    before = ("static int other = 1;\n\ninline void ggml_tile_config_init(void) {\n"
              "    static thread_local bool done = false;\n    if (done) {\n        return;\n    }\n"
              "    alignas(64) tile_config_t tc = {};\n    tc.palette_id = 1;\n"
              "    _tile_loadconfig(&tc);\n    done = true;\n}\n\nint after(void) { return 2; }\n")
    mmq.write_text(before)
    wheel.patch(src)
    text = mmq.read_text()
    assert 'ldtilecfg %0" : : "m"(tc)' in text and "thread_local" not in text and "_tile_loadconfig" not in text
    assert text.startswith("static int other = 1;") and text.endswith("int after(void) { return 2; }\n")
    assert (src / "llama_cpp" / "__init__.py").read_text() == f'__version__ = "0.3.36{llama_load.AMX_FIX_TAG}"\n'
    assert wheel.LOCAL == llama_load.AMX_FIX_TAG.lstrip("+")
    with pytest.raises(SystemExit, match="mmq.cpp has no ggml_tile_config_init of the expected form"):
        wheel.patch(src)      # already patched: not the released form any more
