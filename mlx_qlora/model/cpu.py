"""What CPU this is: model name, vendor and feature flags, read once from /proc/cpuinfo (or
sysctl on macOS). The one reader for everything that picks a path by CPU: llama.cpp's extra buffer
types (``llama_load``) and the CPU training engine's GEMMs (``train.engines.cpu_gemm``)."""
from __future__ import annotations

import hashlib
import platform
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# /proc/cpuinfo flag -> the name said to users. NEON is "asimd" in an aarch64 "Features" line (and
# always present on Apple silicon).
FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16",
            "amx_tile": "AMX", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16", "asimd": "NEON"}


@dataclass(frozen=True)
class CpuInfo:
    model: str                 # "Intel(R) Xeon(R) Processor", "Apple M2", ...
    vendor: str                # "GenuineIntel", "AuthenticAMD", or "unknown"
    flags: frozenset           # every flag of the first CPU

    @property
    def features(self) -> list[str]:
        return [name for flag, name in FEATURES.items() if flag in self.flags]

    @property
    def key(self) -> str:
        """Stable id of the CPU class (name and the features above), for caches of measurements."""
        shown = sorted(f for f in self.flags if f in FEATURES)
        return hashlib.sha1(f"{self.model}|{shown}".encode()).hexdigest()[:12]


def parse_cpuinfo(text: str, machine: str = "") -> CpuInfo:
    """The first CPU of a /proc/cpuinfo text; ``machine`` (platform.machine()) adds NEON on arm64."""
    model, vendor, flags = "", "", None
    for line in text.splitlines():
        k, _, v = line.partition(":")
        k = k.strip().lower()
        if k in ("model name", "hardware", "cpu model") and not model:
            model = v.strip()
        elif k == "vendor_id" and not vendor:
            vendor = v.strip()
        elif k in ("flags", "features") and flags is None:
            flags = set(v.split())
    flags = flags or set()
    if machine in ("arm64", "aarch64"):
        flags.add("asimd")             # NEON is mandatory on ARMv8-A
    return CpuInfo(model or machine or "unknown CPU", vendor or "unknown", frozenset(flags))


def cpuinfo_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        try:   # macOS
            return "model name: " + subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                                   capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return ""


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    return parse_cpuinfo(cpuinfo_text(), platform.machine().lower())
