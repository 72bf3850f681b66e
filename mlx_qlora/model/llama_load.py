"""The one place that opens a llama.cpp model: every ``Llama(...)`` of the package comes from
:func:`open_llama`, so a CPU-specific setting cannot be forgotten by one path (a test walks the
sources for any other ``Llama(`` call).

Why it exists: llama.cpp moves weights into "extra buffer types" on some CPUs -- on x86 the AMX
type (Intel Xeons since Sapphire Rapids: ``amx_tile amx_int8`` in /proc/cpuinfo) and the
repacked CPU type (Q4_0/IQ4_NL/Q4_K/Q8_0 rows interleaved for AVX2/NEON). With
llama-cpp-python 0.3.36 as ``scripts/setup.sh`` builds it, a plain completion from the embedded
Q4_1 GGUF segfaults on a 2-core AMX Xeon while the same call with ``use_extra_bufts=False``
answers (issue #21). So the extra types are used only where they were measured correct there:

1. ``MLX_QLORA_LLAMA_EXTRA_BUFTS=1|0`` forces the choice (a user who measured their machine);
2. a measurement by ``mlx_qlora doctor --probe-llama`` for this CPU, this llama-cpp-python and
   this GGUF weight type (cached under ``~/.cache/mlx_qlora``), which runs both settings in child
   processes, so a crash there is a measured "no", not a dead ``doctor``;
3. otherwise a rule by CPU and build: where the CPU has AMX, on when llama-cpp-python is the build
   ``scripts/setup.sh`` makes with ``scripts/llama_cpp_wheel.py`` (its version ends in
   ``+mlxqlora.amx1``: the two faults of llama.cpp's AMX tile setup fixed, see that script), off
   for any other build (the crash above); on elsewhere -- llama.cpp's own default, the setting of
   every measurement and test made on AVX2 and NEON machines before.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .cpu import CpuInfo, cpu_info


ENV_VAR = "MLX_QLORA_LLAMA_EXTRA_BUFTS"
AMX_FIX_TAG = "+mlxqlora.amx1"      # the local version scripts/llama_cpp_wheel.py gives its build
CACHE_DIR = Path(os.environ.get("MLX_QLORA_CACHE", Path.home() / ".cache" / "mlx_qlora"))


def llama_build() -> str:
    """What llama-cpp-python was built with (llama.cpp's system-info line), or why unknown."""
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python not installed"
    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    parts = [p.split(":")[-1].strip() for p in info.split("|") if p.strip().endswith("= 1")]
    return f"llama-cpp-python {llama_cpp.__version__}: " + " ".join(p.split(" =")[0] for p in parts)


@dataclass(frozen=True)
class BuftChoice:
    extra_bufts: bool
    why: str


def llama_version() -> str:
    try:
        import llama_cpp
    except ImportError:
        return "none"
    return str(llama_cpp.__version__)


def _probe_cache() -> Path:
    return CACHE_DIR / f"llama_bufts-{cpu_info().key}-{llama_version()}.json"


def read_probe() -> dict:
    try:
        return json.loads(_probe_cache().read_text())
    except (OSError, ValueError):
        return {}


def choose_extra_bufts(gguf_type: str | None = None, cpu: CpuInfo | None = None,
                       env: dict | None = None, probe: dict | None = None,
                       version: str | None = None) -> BuftChoice:
    """Whether llama.cpp may move weights of a GGUF of ``gguf_type`` into its extra buffer types
    (``version``: llama-cpp-python's, default the installed one)."""
    env = os.environ if env is None else env
    forced = env.get(ENV_VAR, "").strip().lower()
    if forced in ("1", "on", "true", "yes"):
        return BuftChoice(True, f"on ({ENV_VAR}={forced})")
    if forced in ("0", "off", "false", "no"):
        return BuftChoice(False, f"off ({ENV_VAR}={forced})")
    cpu = cpu or cpu_info()
    probe = read_probe() if probe is None else probe
    got = probe.get(gguf_type) if gguf_type else None
    if got:
        ok = got["correct"] and got["speedup"] > 1.0
        return BuftChoice(ok, f"{'on' if ok else 'off'} (measured by doctor --probe-llama on {gguf_type}: "
                              f"{got['verdict']})")
    if "amx_tile" in cpu.flags:
        version = llama_version() if version is None else version
        if version.endswith(AMX_FIX_TAG):
            return BuftChoice(True, f"on (AMX CPU; llama-cpp-python {version} has the AMX tile fix of "
                                    "scripts/llama_cpp_wheel.py)")
        return BuftChoice(False, f"off (AMX CPU: llama.cpp's AMX matmuls crash in llama-cpp-python {version} "
                                 "as pip builds it; scripts/setup.sh builds the fixed one; "
                                 f"{ENV_VAR}=1 turns it on)")
    return BuftChoice(True, "on (llama.cpp's default; no AMX on this CPU)")


def gguf_weight_type(path: str | Path) -> str | None:
    """The GGUF's main weight type ('Q4_1', 'F16', ...): general.file_type where written, else the
    most common type of its 2-D tensors (what llama.cpp's buffer types act on); None if unreadable."""
    try:
        import gguf
        r = gguf.GGUFReader(str(path))
        field = r.fields.get("general.file_type")
        if field is not None:
            return gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
        kinds = [t.tensor_type.name for t in r.tensors if len(t.shape) == 2]
        return max(set(kinds), key=kinds.count) if kinds else None
    except Exception:  # noqa: BLE001 - a type we cannot read means "no measurement", not an error
        return None


_LOAD_LOCK = threading.Lock()


@contextmanager
def model_params(extra_bufts: bool):
    """llama-cpp-python's ``Llama`` takes no ``use_extra_bufts`` argument: it builds its model
    parameters from ``llama_model_default_params()``. For the duration of one load that function
    returns parameters with the field set; a lock keeps two threads' loads apart."""
    from llama_cpp import llama_cpp as C

    with _LOAD_LOCK:
        original = C.llama_model_default_params

        def params():
            p = original()
            p.use_extra_bufts = extra_bufts
            return p

        C.llama_model_default_params = params
        try:
            yield
        finally:
            C.llama_model_default_params = original


def open_llama(path: str | Path, extra_bufts: bool | None = None, **kwargs):
    """``llama_cpp.Llama(path, **kwargs)`` with the load parameters this CPU needs; ``extra_bufts``
    None = :func:`choose_extra_bufts` for the file's weight type.

    Raises ImportError when llama-cpp-python is missing (callers turn it into their own hint)."""
    from llama_cpp import Llama

    if extra_bufts is None:
        probe = read_probe()   # the file's weight type matters only to a measurement: read it only then
        extra_bufts = choose_extra_bufts(gguf_weight_type(path) if probe else None, probe=probe).extra_bufts
    kwargs.setdefault("verbose", False)
    with model_params(extra_bufts):
        return Llama(model_path=str(path), **kwargs)


# --- the measurement (mlx_qlora doctor --probe-llama) -------------------------------------------
_CHILD = r"""
import sys, time, numpy as np
from mlx_qlora.model.llama_load import open_llama
path, on, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
llm = open_llama(path, extra_bufts=on, n_ctx=256, n_batch=256, n_ubatch=256, logits_all=True,
                 n_threads=int(sys.argv[4]), n_threads_batch=int(sys.argv[4]))
ids = llm.tokenize(b"Reviews at scale: the pasta was great but the service was slow and the room loud. " * 3)[:96]
best = float("inf")
for _ in range(3):
    llm.reset(); t0 = time.perf_counter(); llm.eval(ids); best = min(best, time.perf_counter() - t0)
np.save(out, np.asarray(llm.scores[:len(ids)], np.float32))
print(len(ids) / best)
"""


def rewrite_gguf(src: str | Path, out: str | Path, ftype: str) -> Path:
    """``src`` rewritten by llama.cpp's quantizer as ``LLAMA_FTYPE_<ftype>`` (``MOSTLY_Q8_0``,
    ``ALL_F32``, ...), requantizing where it must: the same weights in another type. RuntimeError
    when llama.cpp refuses."""
    import llama_cpp as lc
    from llama_cpp._utils import suppress_stdout_stderr

    p = lc.llama_model_quantize_default_params()
    p.ftype, p.allow_requantize = getattr(lc, f"LLAMA_FTYPE_{ftype}"), True
    with suppress_stdout_stderr(disable=False):   # it logs every tensor
        rc = lc.llama_model_quantize(str(src).encode(), str(out).encode(), p)
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not write {ftype} from {src} (code {rc})")
    return Path(out)


def probe(gguf: str | Path, threads: int = 2, timeout: float = 300) -> dict:
    """Run a 96-token prompt through ``gguf`` with llama.cpp's extra buffer types on and off, each
    in a child process (a crash is a result here), and through its F32 rewrite (the same weights
    dequantized). Correct = no less accurate than the plain path: mean|Δlogit| to the F32 rewrite
    at most 1.25x the plain path's (+0.01), and max|Δ| between on and off <= 2% of the logits'
    spread. Both paths quantize the activations (Q8 blocks) and sum in their own orders, so equal
    logits are not expected, nor an equal argmax at every position: near-ties flip either way
    (SmolLM2 Q4_1 on the AMX Xeon: mean|Δ| to F32 0.178 off / 0.164 on, on vs off at most 1.02 of a
    spread of 53, and the argmax differs at some of the 96 positions); a wrong kernel is off by far more. The verdict is cached per CPU class,
    llama-cpp-python version and weight type."""
    import sys
    import tempfile

    import numpy as np

    wtype = gguf_weight_type(gguf) or "unknown"
    res = {}
    with tempfile.TemporaryDirectory() as d:
        # the reference: every tensor dequantized to F32 (the same weight values, no buffer type's kernels)
        ref_path = rewrite_gguf(gguf, Path(d) / "f32.gguf", "ALL_F32") if wtype != "F32" else Path(gguf)
        for key, path, on in (("ref", ref_path, False), (False, gguf, False), (True, gguf, True)):
            out = Path(d) / f"{key}.npy"
            p = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(int(on)), str(out), str(threads)],
                               capture_output=True, text=True, timeout=timeout)
            res[key] = (p.returncode, float(p.stdout.split()[-1]) if p.returncode == 0 else 0.0,
                        np.load(out, allow_pickle=False) if p.returncode == 0 else None)
    (rc_off, tps_off, off), (rc_on, tps_on, on_) = res[False], res[True]
    ref = res["ref"][2]
    if rc_off != 0 or ref is None:
        verdict = {"correct": False, "speedup": 0.0, "verdict": f"the plain load failed (exit {rc_off}/{res['ref'][0]})"}
    elif rc_on != 0:
        verdict = {"correct": False, "speedup": 0.0,
                   "verdict": f"crashed with extra buffer types (exit {rc_on}); off: {tps_off:.0f} tok/s"}
    else:
        err_off, err_on = float(np.abs(off - ref).mean()), float(np.abs(on_ - ref).mean())
        diff, spread = float(np.abs(on_ - off).max()), float(off.max() - off.min())
        correct = err_on <= 1.25 * err_off + 0.01 and diff <= 0.02 * spread
        verdict = {"correct": correct, "speedup": tps_on / tps_off,
                   "verdict": f"{'correct' if correct else 'WRONG'} (mean|Δ| to F32 {err_on:.3g} on / {err_off:.3g} off, "
                              f"max|Δ| on-off {diff:.3g} of spread {spread:.3g}), prompt {tps_on:.0f} vs {tps_off:.0f} "
                              f"tok/s on/off"}
    cache = read_probe()
    cache[wtype] = verdict
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    _probe_cache().write_text(json.dumps(cache, indent=1))
    return {wtype: verdict}
