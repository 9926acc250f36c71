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


def describe() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            found = next(line for line in f if line.startswith("flags")).split()
        flags = " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if x in found)
    except (OSError, StopIteration):
        pass
    return f"{cpu_name()} ({os.cpu_count()} cores; {flags or 'flags unknown'}), onnxruntime {onnxruntime.__version__}"
