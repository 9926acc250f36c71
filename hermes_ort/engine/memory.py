"""Memory as the OS sees it: resident set, lifetime peak, what the device has free, and byte sizes."""
from __future__ import annotations

import ctypes
import re
import resource
import sys

import psutil

from ..errors import BudgetError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "tb": 10**12}


def parse_bytes(text: str | int) -> int:
    """'400MiB' -> 419430400; plain integers are bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise BudgetError(f"cannot read {text!r} as a size: use a number with B, KiB, MiB, GiB, KB, MB or GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_budget(text: str | int, model_bytes: int) -> int:
    """A size ("400MiB", bytes as an int) or a share of the model's bytes on disk ("25%")."""
    if str(text).strip().endswith("%"):
        try:
            return int(float(str(text).strip()[:-1]) / 100 * model_bytes)
        except ValueError:
            raise BudgetError(f"cannot read {text!r} as a share of the model: use e.g. 25%") from None
    return parse_bytes(text)


def warn_above_machine(budget: int) -> None:
    """A budget above the machine's memory is allowed (the OS may swap) but is most likely a typo."""
    total = psutil.virtual_memory().total
    if budget > total:
        import warnings

        warnings.warn(f"memory budget {format_bytes(budget)} is above this machine's memory "
                      f"({format_bytes(total)}): the plan may count on memory the OS does not have", stacklevel=3)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def rss() -> int:
    """Resident set of this process now, in bytes."""
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Lifetime peak resident set of this process, in bytes: the kernel's VmHWM on Linux, else ru_maxrss.

    ru_maxrss survives execve: a child spawned by a large process (pytest with torch loaded) reports the
    parent's size as its own peak. VmHWM belongs to the new address space only.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak() -> bool:
    """Restart the kernel's peak-RSS count (VmHWM) from the current RSS, so the peak of one step can be
    read; False where the OS does not allow it (then peaks are lifetime peaks)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def available() -> int:
    """Memory the device can give this process without swapping, in bytes."""
    return psutil.virtual_memory().available


def give_back() -> None:
    """Return freed heap pages to the OS: glibc keeps them after a session is destroyed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): nothing to trim


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
LARGE_ALLOCATION = 1 << 20


def map_large_allocations() -> None:
    """Makes glibc serve allocations of 1 MiB or more with mmap and unmap them on free, for the whole process.

    ORT's activations and a decoder's KV cache change size every step; from glibc's heap their freed
    space stays in RSS (a GPT-2 medium decode at 25% grew ~5 MiB a step through a shared arena, and
    ended 2% over its plan on malloc's heap). A fixed threshold also stops glibc raising it after frees."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator decides
