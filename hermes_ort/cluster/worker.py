"""What runs on one board: a hermes InferenceSession over the directory of its stage range, and the KV cache
of its own layers for every request in flight. Ray wraps this class as an actor (pipeline.py); it imports no
Ray itself, so it is plain Python to read and to test."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from ..format.manifest import Manifest, TensorSpec
from ..generation.sampling import Chooser, Sampling
from ..session import InferenceSession
from .ranges import StageRange, flow, write_range

Tensors = dict[str, np.ndarray]


@dataclass
class Traffic:
    """What reached this board from other boards: the latest call's tensors (name -> bytes) and totals."""

    last: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    calls: int = 0
    compute_s: float = 0.0

    def count(self, upstream: Tensors) -> None:
        self.last = {name: int(value.nbytes) for name, value in upstream.items()}
        self.bytes += sum(self.last.values())
        self.calls += 1


@dataclass
class Request:
    """One generation's state on this board: its layers' cache (past name -> array), and on the last board
    the chooser of its next tokens."""

    past: Tensors
    chooser: Chooser | None = None


class RangeWorker:
    """Stages [start, stop) of the model at `source` (only those files need exist there), linked into a
    directory of their own and opened under `memory_budget`."""

    def __init__(self, board: str, source: str, manifest: dict, start: int, stop: int,
                 memory_budget: int | str | None):
        self.board, whole = board, Manifest.from_json(manifest)
        self.range = StageRange(start, stop)
        self.flow = flow(whole, self.range)
        self.directory = Path(tempfile.mkdtemp(prefix=f"hermes-{board}-"))
        write_range(source, whole, self.range, self.directory / "range")
        self.session = InferenceSession(self.directory / "range", memory_budget=memory_budget)
        self.outputs = [t.name for t in self.session.manifest.outputs]
        self.past_specs = {t.name: t for t in self.session.manifest.inputs if t.name in self.flow.cache}
        self.last = "logits" in self.flow.model_outputs
        self.requests: dict[str, Request] = {}
        self.traffic = Traffic()

    def ready(self) -> dict:
        """Where it runs and what it opened: its directory's files and the files its process maps."""
        return {"board": self.board, "pid": os.getpid(), "range": [self.range.start, self.range.stop],
                "files": sorted(p.name for p in (self.directory / "range").iterdir()), "opened": self.opened()}

    def opened(self) -> list[str]:
        """Names of the files under its directory this process maps or holds open (ORT maps lookup tables)."""
        me = psutil.Process()
        paths = {m.path for m in me.memory_maps()} | {f.path for f in me.open_files()}
        root = str(self.directory / "range") + os.sep
        return sorted({os.path.basename(p) for p in paths if p.startswith(root)})

    def run(self, model_feed: Tensors, *upstream: Tensors) -> tuple[Tensors, Tensors]:
        """One pass of the range: (what later boards read, the model outputs it makes)."""
        out = self._pass(model_feed, upstream)
        return self._split(out)

    def step(self, request: str, model_feed: Tensors, *upstream: Tensors, sampling: dict | None = None,
             prompt: np.ndarray | None = None, mask: np.ndarray | None = None) -> Tensors | np.ndarray:
        """One generation step of `request` through the range with its own cache; the first step (a prefill)
        brings the sampling options and the prompt for the last board's chooser. Returns what later boards
        read, or on the last board the next tokens [B]."""
        state = self.requests.get(request) or self._begin(request, batch_of(model_feed, *upstream), sampling,
                                                          prompt, mask)
        out = self._pass({**model_feed, **state.past}, upstream)
        state.past = {past: out[present] for past, present in self.flow.cache.items()}
        if state.chooser is not None:
            return state.chooser(out["logits"][:, -1])
        return {name: out[name] for name in self.flow.forward}

    def end(self, request: str) -> None:
        """Lets go of a finished (or abandoned) request's cache."""
        self.requests.pop(request, None)

    def stats(self) -> dict:
        return {"board": self.board, "opened": self.opened(), "requests": len(self.requests),
                "last_received": dict(self.traffic.last),
                "bytes_received": self.traffic.bytes, "calls": self.traffic.calls,
                "compute_s": self.traffic.compute_s}

    def close(self) -> None:
        self.requests.clear()
        self.session.close()
        shutil.rmtree(self.directory, ignore_errors=True)  # links only: the model's files stay

    def _begin(self, request: str, batch: int, sampling: dict | None, prompt, mask) -> Request:
        state = Request(past={name: empty(spec, batch) for name, spec in self.past_specs.items()})
        if self.last:
            state.chooser = Chooser(Sampling(**(sampling or {})), prompt, mask, vocab_of(self.session.manifest))
        self.requests[request] = state
        return state

    def _pass(self, model_feed: Tensors, upstream: tuple[Tensors, ...]) -> Tensors:
        arrived = {name: value for part in upstream for name, value in part.items()}
        self.traffic.count(arrived)
        feed = {**model_feed, **{n: arrived[n] for n in self.flow.from_upstream}}
        started = time.perf_counter()
        out = dict(zip(self.outputs, self.session.run(self.outputs, feed)))
        self.traffic.compute_s += time.perf_counter() - started
        return out

    def _split(self, out: Tensors) -> tuple[Tensors, Tensors]:
        return ({n: out[n] for n in self.flow.forward}, {n: out[n] for n in self.flow.model_outputs})


def empty(spec: TensorSpec, batch: int | None) -> np.ndarray:
    """A cache of length 0: [batch, heads, 0, head_dim] (every symbolic axis but the batch is 0)."""
    shape = [batch if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(spec.shape)]
    return np.zeros(shape, spec.dtype)


def batch_of(*parts: Tensors) -> int:
    """The batch of a step: every input's first axis (ids on the first board, hidden states after it)."""
    return next(v.shape[0] for part in parts for v in part.values())


def vocab_of(manifest: Manifest) -> int:
    width = next(t.shape[-1] for t in manifest.outputs if t.name == "logits")
    return width if isinstance(width, int) else manifest.config["vocab_size"]
