"""The KV cache in buffers a generation allocates once: each block writes its present keys and values
into one (ORT IO binding), and the next step reads them back from there as its past.

Why: ORT allocates every output fresh, and hermes has glibc map allocations of 1 MiB or more
(memory.map_large_allocations), so each step's present tensors came back as new mappings whose every page
faulted in: a GPT-2 medium block at batch 8 and 255 positions ran 18.3 ms that way and 9.6 ms writing into
a kept buffer (median of 120 runs, same process; 8.9 ms with glibc's heap instead, which then grows
step by step). A block still copies its past into its present (the graph concatenates); what is gone is
the allocation.

Only tensors of LARGE_ALLOCATION or more go to buffers: smaller ones come from glibc's heap without
faults, and binding them cost more than it saved (GPT-2 medium, batch 1, 104 positions: 8% slower).

Buffers rotate: a block's present goes to a free buffer, and once the block has run, the buffer that
held its past is free for the next block. So a generation holds the cache plus one layer's keys and
values, as it did when each step allocated. Buffers are flat, so a prefix of one is a contiguous
[batch, heads, length, head_dim] of any length up to the capacity.
"""
from __future__ import annotations

import math

import numpy as np

from ..engine.memory import LARGE_ALLOCATION
from ..format.manifest import StageSpec
from .cache_layout import CacheLayout


class CacheBuffers:
    """Where the stages' present.* outputs go, pass by pass (the chain's output sink)."""

    def __init__(self, layout: CacheLayout, capacity: int):
        self.capacity = capacity
        self.axis = {t.name: sequence_axis(t.shape) for t in layout.past}
        self.layout = layout
        self.past_of = {present: past for past, present in layout.present_for.items()}
        self.holding: dict[str, np.ndarray] = {}  # past input name -> the buffer its tensor lies in
        self.lent: dict[str, np.ndarray] = {}  # present output name -> the buffer of the stage running now
        self.free: list[np.ndarray] = []
        self.by_stage: dict[str, list[tuple[str, str, int]]] = {}
        self.total = 0

    def forget(self) -> None:
        """Lets go of every buffer: the batch's rows changed, so the cache now lies in new arrays (a join)
        and the buffers, sized for the old rows, would sit beside it until each layer ran again."""
        self.holding.clear()
        self.free.clear()

    def begin(self, total_length: int) -> None:
        """The next pass ends at total_length positions (the attention mask's width)."""
        self.total = total_length

    def buffers_for(self, stage: StageSpec, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Arrays for the stage's present outputs to be written into, by output name."""
        into = {}
        for present, past, axis in self._cache_outputs(stage):
            if past not in tensors:
                continue
            shape = list(tensors[past].shape)
            shape[axis] = self.layout.length_of(past, self.total)
            elements, dtype = math.prod(shape), tensors[past].dtype
            if elements * dtype.itemsize < LARGE_ALLOCATION:
                continue
            most = self.layout.length_of(past, max(self.capacity, self.total))  # a sliding layer: its window
            self.lent[present] = self._take(elements, dtype, elements // max(shape[axis], 1) * most)
            into[present] = self.lent[present][:elements].reshape(shape)
        return into

    def _cache_outputs(self, stage: StageSpec) -> list[tuple[str, str, int]]:
        """(present output, the past input it becomes, positions axis) of the stage, worked out once."""
        if stage.name not in self.by_stage:
            pasts = ((t.name, self.past_of.get(t.name)) for t in stage.outputs)
            self.by_stage[stage.name] = [(present, past, self.axis[past]) for present, past in pasts
                                         if past is not None and self.axis.get(past) is not None]
        return self.by_stage[stage.name]

    def ran(self, stage: StageSpec, into: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """After the stage: the buffers of the pasts it read are free, those of its presents now hold the
        next step's past (unless the stage returned arrays of its own)."""
        for t in stage.inputs:
            if self.holding and t.name in self.holding:
                self.free.append(self.holding.pop(t.name))
        for name, view in into.items():
            buffer = self.lent.pop(name)
            if outputs.get(name) is view:
                self.holding[self.past_of[name]] = buffer
            else:
                self.free.append(buffer)

    def _take(self, elements: int, dtype: np.dtype, at_capacity: int) -> np.ndarray:
        """The smallest free buffer that fits (sliding layers' small ones go to sliding layers), else a new
        one of at_capacity elements: this tensor at the generation's full length."""
        fits = [k for k, b in enumerate(self.free) if b.size >= elements and b.dtype == dtype]
        if fits:
            return self.free.pop(min(fits, key=lambda k: self.free[k].size))
        if not self.layout.kept:  # outgrown: let go (with sliding layers, small buffers still serve them)
            self.free = [b for b in self.free if b.size >= elements or b.dtype != dtype]
        return np.empty(max(elements, at_capacity), dtype)


def sequence_axis(shape: tuple) -> int | None:
    """The cache's positions axis: its one symbolic axis besides the batch (past_sequence)."""
    named = [k for k, d in enumerate(shape) if isinstance(d, str) and k > 0]
    return named[0] if len(named) == 1 else None
