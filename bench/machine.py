"""Which machine ran a benchmark: these machines differ between sessions, so every table names its CPU."""
from __future__ import annotations

import os
import platform
from pathlib import Path

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


DAMON = Path("/sys/kernel/mm/damon/admin/kdamonds")


def proactive_reclaim() -> str | None:
    """'DAMON pageout after N s unused' when the kernel reclaims memory nobody touched lately, else None.

    Why it matters: such a kernel (this project's CI VMs run one: DAMON, pageout of regions idle for 12
    aggregations of 5 s, up to 128 MiB/s) drops a model's page cache a minute after its last read, and
    what is read back comes in small pages. A warm-cache benchmark must warm right before each run."""
    for scheme in DAMON.glob("*/contexts/*/schemes/*"):
        try:
            if (scheme / "action").read_text().strip() != "pageout":
                continue
            age = int((scheme / "access_pattern/age/min").read_text())
            aggregation_us = int((scheme.parents[1] / "monitoring_attrs/intervals/aggr_us").read_text())
            on = (scheme.parents[3] / "state").read_text().strip() == "on"
        except (OSError, ValueError):
            continue
        if on:
            return f"DAMON pageout after {age * aggregation_us / 1e6:.0f} s unused"
    return None


def describe() -> str:
    reclaim = proactive_reclaim()
    return (f"{cpu_name()} ({os.cpu_count()} cores; {cpu_flags()}), onnxruntime {onnxruntime.__version__}"
            + (f"; kernel reclaims idle memory ({reclaim})" if reclaim else ""))
