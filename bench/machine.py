"""Which machine ran a benchmark: these machines differ between sessions, so every table names its CPU."""
from __future__ import annotations

import os
import platform

import onnxruntime


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The flags ORT's kernels choose between (AVX2/FMA, AVX-512, VNNI for int8), or 'flags unknown'."""
    try:
        with open("/proc/cpuinfo") as f:
            found = next(line for line in f if line.startswith("flags")).split()
        return " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "asimd", "i8mm")
                        if x in found) or "flags unknown"
    except (OSError, StopIteration):
        return "flags unknown"


def describe() -> str:
    return f"{cpu_name()} ({os.cpu_count()} cores; {cpu_flags()}), onnxruntime {onnxruntime.__version__}"
