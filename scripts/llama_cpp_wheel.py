"""Build llama-cpp-python from its source with the AMX fix, once per machine; print the wheel's path.

    python scripts/llama_cpp_wheel.py [--sdist PATH] [--cache DIR]      (scripts/setup.sh runs it)

Why: on Intel CPUs with AMX (Sapphire Rapids and later: ``amx_tile amx_int8`` in /proc/cpuinfo,
most cloud VMs) llama.cpp moves quantized weights into its AMX buffer type, whose matmuls crash
as pip builds them (issue #21; upstream ggml-org/llama.cpp#20824, PR #26954). Two faults, both in
``ggml_tile_config_init`` (ggml/src/ggml-cpu/amx/mmq.cpp), read with gdb on a 2-core AMX Xeon:

1. SIGSEGV at ``ldtilecfg``: GCC does not see the intrinsic read its operand and drops the stores
   that fill the tile configuration on the stack, so the CPU loads garbage (#GP).
2. SIGILL at ``tilezero``: the configuration was loaded once per thread (a thread-local flag), but
   other libraries in the same process (oneDNN through torch, oneMKL's AMX GEMMs of our CPU engine)
   release the tiles after their own kernels; a tile op on an unconfigured tile is #UD.

The patch loads the configuration through an ``"m"`` asm operand (the compiler must write it) at
every AMX GEMM (one ``ldtilecfg`` per thread per matmul: nanoseconds beside the GEMM). With it the
AMX path answers, and on that Xeon llama.cpp evaluates a compact MAMS extraction 1.7x as fast
(README, "AMX"). The wheel's version carries ``+mlxqlora.amx1`` so ``model/llama_load.py`` knows
the fix is in; the wheel is cached per CPU (the build is ``-march=native``) and patch.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"                   # the release the patch was written and measured against
LOCAL = "mlxqlora.amx1"              # PEP 440 local version: "the AMX fix is in" (llama_load.AMX_FIX_TAG)
MMQ = "vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp"

OLD_INIT = re.compile(r"inline void ggml_tile_config_init\(void\) \{.*?_tile_loadconfig\(&tc\);\s*done = true;\s*\}",
                      re.S)
NEW_INIT = """inline void ggml_tile_config_init(void) {
    // mlx_qlora patch (scripts/llama_cpp_wheel.py): loaded at every AMX GEMM, since other libraries
    // in the process release the tiles after their own AMX kernels, and through an "m" operand so
    // the compiler writes the configuration before ldtilecfg reads it
    alignas(64) tile_config_t tc = {};
    tc.palette_id = 1;
    tc.start_row = 0;
    tc.rows[0] = 8;   tc.colsb[0] = 64;
    tc.rows[1] = 8;   tc.colsb[1] = 64;
    tc.rows[2] = 16;  tc.colsb[2] = 32;
    tc.rows[3] = 16;  tc.colsb[3] = 32;
    tc.rows[4] = 16;  tc.colsb[4] = 64;
    tc.rows[5] = 16;  tc.colsb[5] = 64;
    tc.rows[6] = 16;  tc.colsb[6] = 64;
    tc.rows[7] = 16;  tc.colsb[7] = 64;
    __asm__ __volatile__("ldtilecfg %0" : : "m"(tc) : "memory");
}"""


def patch(src: Path) -> None:
    """Apply the fix to an unpacked sdist; a source that does not match is an error, not a guess."""
    mmq = src / MMQ
    text = mmq.read_text()
    new, n = OLD_INIT.subn(lambda _: NEW_INIT, text)
    if n != 1:
        sys.exit(f"llama_cpp_wheel: {mmq} has no ggml_tile_config_init of the expected form ({n} matches); "
                 f"the patch is for llama-cpp-python {VERSION}")
    mmq.write_text(new)
    init = src / "llama_cpp" / "__init__.py"
    text = init.read_text()
    new, n = re.subn(r'__version__ = "([^"+]+)"', rf'__version__ = "\1+{LOCAL}"', text)
    if n != 1:
        sys.exit(f"llama_cpp_wheel: no __version__ line in {init}")
    init.write_text(new)


def cpu_key() -> str:
    """The build is -march=native: a wheel is reused only on a CPU with the same flags."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        import platform
        flags = platform.machine() + platform.processor()
    return hashlib.sha256((flags + NEW_INIT).encode()).hexdigest()[:12]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", help=f"llama_cpp_python-{VERSION}.tar.gz (default: pip download it)")
    ap.add_argument("--cache", default=os.environ.get("MLX_QLORA_CACHE", str(Path.home() / ".cache" / "mlx_qlora")))
    args = ap.parse_args()
    out = Path(args.cache) / "wheels" / f"llama_cpp_python-{VERSION}-{cpu_key()}"
    have = sorted(out.glob("*.whl"))
    if have:
        print(have[-1])
        return
    pip = [sys.executable, "-m", "pip"]
    print(f"llama_cpp_wheel: building llama-cpp-python {VERSION} with the AMX fix (once per machine, ~6 min on "
          f"2 cores) into {out}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sdist = Path(args.sdist) if args.sdist else None
        if sdist is None:
            subprocess.run(pip + ["download", "-q", f"llama-cpp-python=={VERSION}", "--no-deps", "--no-binary", ":all:",
                                  "-d", str(tmp)], check=True, stdout=sys.stderr)
            sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            try:
                tar.extractall(tmp / "src", filter="data")
            except TypeError:                      # Pythons before the extraction filters (< 3.11.4)
                tar.extractall(tmp / "src")
        src = next((tmp / "src").iterdir())
        patch(src)
        out.mkdir(parents=True, exist_ok=True)
        part = out.parent / (out.name + ".part")
        shutil.rmtree(part, ignore_errors=True)   # an interrupted build's leftovers
        subprocess.run(pip + ["wheel", "-q", "--no-deps", "-w", str(part), str(src)], check=True, stdout=sys.stderr)
        wheel = next(part.glob("*.whl"))
        wheel.rename(out / wheel.name)        # only a finished build lands in the cache
        part.rmdir()
    print(out / wheel.name)


if __name__ == "__main__":
    main()
