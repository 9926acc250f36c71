"""A progress bar on stderr with no dependencies (the runtime must install with numpy and ORT only)."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int, label: str, enabled: bool = True) -> Iterator[T]:
    for done, item in enumerate(items):
        if enabled:
            bar = "#" * (24 * done // max(total, 1))
            sys.stderr.write(f"\r{label} [{bar:<24}] {done}/{total}")
            sys.stderr.flush()
        yield item
    if enabled:
        sys.stderr.write(f"\r{label} [{'#' * 24}] {total}/{total}\n")
