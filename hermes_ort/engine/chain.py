"""Running stages in order on a shared tensor table, dropping each tensor after its last consumer."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Mapping, Protocol

import numpy as np

from ..format.manifest import Manifest, StageSpec


class Prepared(Protocol):
    """A stage ready to run: its own session, or a shared template with its weights mapped. `into`: arrays
    some outputs are to be written into, by name (the rest are allocated by ORT)."""

    def run(self, tensors: dict[str, np.ndarray],
            into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class OutputSink(Protocol):
    """Chooses arrays for a stage's outputs before it runs and learns what it returned (a decoder's KV
    cache buffers, cache_buffers.py)."""

    def buffers_for(self, stage: StageSpec, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def ran(self, stage: StageSpec, into: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None: ...


PreparedFor = Callable[[int], Prepared]  # stage index -> a ready stage


def run_chain(manifest: Manifest, feed: Mapping[str, np.ndarray], prepared_for: PreparedFor,
              after_run: Callable[[int], None] = lambda i: None,
              span: Callable[[int], ContextManager] = lambda i: contextlib.nullcontext(),
              last_use: dict[str, int] | None = None, decoding: bool = False,
              sink: OutputSink | None = None, head_positions: int = 1) -> dict[str, np.ndarray]:
    """Runs every stage once; returns the model outputs. Each tensor is kept once, however many stages read it.
    A prepared stage with a `stop` covers stages [i, stop) in one run (engine/merged.py).
    decoding: the chain owns `feed` (it empties it as tensors die, so a step holds one KV cache, not the
    previous one too) and head stages see the last `head_positions` positions only (the next token's logits,
    or one per token a speculative pass verifies). sink: where outputs it names are written (a decoder's KV
    cache buffers)."""
    tensors = feed if decoding else dict(feed)
    last_use = last_use or manifest.last_use()
    i = 0
    while i < len(manifest.stages):
        prepared = prepared_for(i)
        stages = manifest.stages[i:getattr(prepared, "stop", i + 1)]
        if decoding and stages[0].kind == "head":
            last_position_only(tensors, stages[0], head_positions)
        into = {s.name: sink.buffers_for(s, tensors) for s in stages} if sink is not None else {}
        bound = {name: array for arrays in into.values() for name, array in arrays.items()}
        with span(i):
            outputs = prepared.run(tensors, bound) if bound else prepared.run(tensors)
        tensors.update(outputs)
        for s in stages if sink is not None else ():
            sink.ran(s, into[s.name], outputs)
        del prepared, outputs
        for k in range(i, i + len(stages)):
            after_run(k)
        i += len(stages)
        for name in [n for n in tensors if last_use.get(n, -1) < i]:
            del tensors[name]
    return {t.name: tensors[t.name] for t in manifest.outputs}


def last_position_only(tensors: dict[str, np.ndarray], stage: StageSpec, positions: int = 1) -> None:
    """Cuts a head's [batch, sequence, E] inputs to the last `positions`: a head works position by position."""
    for t in stage.inputs:
        value = tensors[t.name]
        if len(t.shape) == 3 and value.shape[1] > positions and np.issubdtype(value.dtype, np.floating):
            tensors[t.name] = np.ascontiguousarray(value[:, -positions:])
