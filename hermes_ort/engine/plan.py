"""The contract between the planner and the engine: what to keep resident, prepack and stream, with how
many loading agents and what window. The planner (planning/planner.py) makes one; the pipeline runs it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    budget: int
    loaders: int
    window: int  # streamed stages loaded at once, the running one included
    resident: tuple[str, ...]  # stages kept loaded across runs
    prepacked: tuple[str, ...]  # stages created with ORT prepacking on
    compute_threads: int
    predicted_first_s: float  # first run: every stage loaded once
    predicted_steady_s: float  # later runs: resident stages are already loaded
    predicted_peak_bytes: int
    batched_layout: bool = False  # template stages read their matrices transposed (generation; `hermes batched`)
    merge_resident: bool = True  # runs of resident prepacked stages as one session each (engine/merged.py)

    def streams(self, name: str) -> bool:
        return name not in self.resident
