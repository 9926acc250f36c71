"""Spans per thread, written as Chrome trace-event JSON (opens in Perfetto or chrome://tracing)."""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Span:
    name: str
    category: str  # "load", "run", "destroy"
    thread: str
    start_s: float
    end_s: float


class Tracer:
    """Records spans from any thread; `NullTracer` is the default and records nothing."""

    def __init__(self):
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        self._origin = time.perf_counter()

    @contextlib.contextmanager
    def span(self, name: str, category: str, thread: str | None = None) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.spans.append(Span(name, category, thread or threading.current_thread().name,
                                       start - self._origin,
                                       time.perf_counter() - self._origin))

    def chrome_events(self) -> list[dict]:
        threads = {name: tid for tid, name in enumerate(dict.fromkeys(s.thread for s in self.spans), 1)}
        meta = [{"ph": "M", "name": "thread_name", "pid": os.getpid(), "tid": tid, "args": {"name": name}}
                for name, tid in threads.items()]
        return meta + [{"ph": "X", "name": s.name, "cat": s.category, "pid": os.getpid(), "tid": threads[s.thread],
                        "ts": s.start_s * 1e6, "dur": (s.end_s - s.start_s) * 1e6} for s in self.spans]

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump({"traceEvents": self.chrome_events(), "displayTimeUnit": "ms"}, f)


class NullTracer(Tracer):
    @contextlib.contextmanager
    def span(self, name: str, category: str, thread: str | None = None) -> Iterator[None]:
        yield
