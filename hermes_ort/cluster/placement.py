"""Which board runs which stages: a pure function over plain records, no Ray, no ORT, no disk.

Each board gets one contiguous, half-open stage range `[start, stop)`. The fewest boards that keep every
stage resident win (a token then costs compute plus one hidden state per hop); when no set of boards holds
the model, every board is used and the slowest range's time is balanced: its compute plus the bytes it
cannot keep, re-read from its disk on every pass.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

from ..engine.memory import format_bytes
from ..errors import BudgetError
from .ranges import StageRange

RAY_WORKER_BYTES = int(0.35 * (1 << 30))  # raylet + core worker on a board: Ray 2.60, 0.3-0.45 GB (FACTS.md)


@dataclass(frozen=True)
class Board:
    """One machine: the bytes it may use in all (Ray's own share included), the seconds each stage of the
    model takes there, and how fast it reads the stages it cannot keep."""

    name: str
    memory_budget: int
    stage_s: tuple[float, ...]  # compute seconds per stage, in the model's stage order
    disk_bytes_per_s: float = 300e6  # eMMC; microSD ~90e6, NVMe ~1e9
    base_bytes: int = RAY_WORKER_BYTES


@dataclass(frozen=True)
class StageLoad:
    """What one stage holds on the board that runs it, for one workload."""

    name: str
    bytes: int  # resident: weights and session state
    kv_bytes: int = 0  # its layers' KV cache at the workload's batch and length (always kept)


@dataclass(frozen=True)
class Assignment:
    board: str
    range: StageRange
    need_bytes: int  # base + process + stages + KV caches, before streaming
    streamed_bytes: int  # re-read on every pass (0: resident)
    predicted_s: float  # compute + streamed bytes at the board's disk speed, per pass

    @property
    def resident(self) -> bool:
        return self.streamed_bytes == 0


@dataclass(frozen=True)
class Placement:
    assignments: tuple[Assignment, ...]

    @classmethod
    def given(cls, *ranges: tuple[str, StageRange]) -> "Placement":
        """Ranges the caller chose, (board, StageRange) in pipeline order; nothing predicted."""
        return cls(tuple(Assignment(board, r, 0, 0, 0.0) for board, r in ranges))

    @property
    def ranges(self) -> tuple[StageRange, ...]:
        return tuple(a.range for a in self.assignments)

    @property
    def boards(self) -> tuple[str, ...]:
        return tuple(a.board for a in self.assignments)

    @property
    def predicted_s(self) -> float:
        """The slowest range's time: a pass of one request can go no faster through the pipeline."""
        return max(a.predicted_s for a in self.assignments)

    @property
    def resident(self) -> bool:
        return all(a.resident for a in self.assignments)


class Costs:
    """Prefix sums over the stages, so a range's bytes and time cost O(range) at most."""

    def __init__(self, stages: Sequence[StageLoad], process_bytes: int):
        self.stages, self.process_bytes = tuple(stages), process_bytes
        self.held = list(itertools.accumulate((s.bytes + s.kv_bytes for s in stages), initial=0))
        self.kv = list(itertools.accumulate((s.kv_bytes for s in stages), initial=0))

    def capacity(self, board: Board) -> int:
        return board.memory_budget - board.base_bytes - self.process_bytes

    def assign(self, board: Board, start: int, stop: int) -> Assignment | None:
        """The board running stages [start, stop), or None when it cannot hold its KV caches plus the
        largest of those stages at once (streaming needs one stage loaded)."""
        cap, kv = self.capacity(board), self.kv[stop] - self.kv[start]
        if cap < kv + max(s.bytes for s in self.stages[start:stop]):
            return None
        held = self.held[stop] - self.held[start]
        streamed = max(0, held - cap)
        seconds = sum(board.stage_s[start:stop]) + streamed / board.disk_bytes_per_s
        need = board.base_bytes + self.process_bytes + held
        return Assignment(board.name, StageRange(start, stop), need, streamed, seconds)


def place(boards: Sequence[Board], stages: Sequence[StageLoad], process_bytes: int = 0) -> Placement:
    """Contiguous ranges in the boards' order. process_bytes: the hermes process floor on each board (its
    profile's base + transient bytes). Raises BudgetError naming a board too small for any stage, or when
    no split fits."""
    check_boards(boards, stages)
    costs = Costs(stages, process_bytes)
    for board in boards:
        smallest = min(stages, key=lambda s: s.bytes + s.kv_bytes)
        if costs.capacity(board) < smallest.bytes + smallest.kv_bytes:
            raise BudgetError(too_small(board, smallest, costs))
    for k in range(1, len(boards) + 1):  # the fewest boards that keep everything resident
        found = [p for chosen in itertools.combinations(boards, k)
                 if (p := balanced(chosen, costs, resident_only=True))]
        if found:
            return min(found, key=lambda p: p.predicted_s)
    placement = balanced(boards, costs, resident_only=False)
    if placement is None:
        raise BudgetError(f"no split of the {len(stages)} stages fits boards "
                          f"{', '.join(repr(b.name) for b in boards)}: each range needs its KV caches plus its "
                          f"largest stage at once")
    return placement


def balanced(boards: Sequence[Board], costs: Costs, resident_only: bool) -> Placement | None:
    """The split over exactly these boards (each at least one stage) whose slowest range is fastest."""
    n = len(costs.stages)
    if len(boards) > n:
        return None
    # best[j]: (slowest time, assignments) of stages [0, j) over the boards placed so far
    best: list[tuple[float, tuple[Assignment, ...]] | None] = [(0.0, ())] + [None] * n
    for board in boards:
        step: list[tuple[float, tuple[Assignment, ...]] | None] = [None] * (n + 1)
        for stop in range(1, n + 1):
            for start in range(stop):
                if best[start] is None or (a := costs.assign(board, start, stop)) is None:
                    continue
                if resident_only and not a.resident:
                    continue
                slowest = max(best[start][0], a.predicted_s)
                if step[stop] is None or slowest < step[stop][0]:
                    step[stop] = (slowest, best[start][1] + (a,))
        best = step
    return Placement(best[n][1]) if best[n] is not None else None


def check_boards(boards: Sequence[Board], stages: Sequence[StageLoad]) -> None:
    if not boards or not stages:
        raise BudgetError(f"placement needs boards and stages, got {len(boards)} boards and {len(stages)} stages")
    for b in boards:
        if len(b.stage_s) != len(stages):
            raise BudgetError(f"board '{b.name}' has compute times for {len(b.stage_s)} stages; the model has "
                              f"{len(stages)}")
    names = [b.name for b in boards]
    if len(set(names)) != len(names):
        raise BudgetError(f"board names must differ, got {names}")


def too_small(board: Board, smallest: StageLoad, costs: Costs) -> str:
    return (f"board '{board.name}' is too small for any stage: its budget {format_bytes(board.memory_budget)} "
            f"less Ray's {format_bytes(board.base_bytes)} and the process's {format_bytes(costs.process_bytes)} "
            f"leaves {format_bytes(max(0, costs.capacity(board)))}; the smallest stage '{smallest.name}' needs "
            f"{format_bytes(smallest.bytes + smallest.kv_bytes)} with its KV cache")
