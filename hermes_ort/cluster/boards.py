"""From what a user says about the boards (and what hermes knows of the model) to placement's plain records:
a board's Ray resources and budget, each stage's bytes, compute time and KV cache for a workload."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..engine.memory import parse_bytes
from ..engine.templates import Templates
from ..errors import BudgetError, InputError
from ..format.manifest import Manifest, StageSpec
from ..planning.profiles import Profile, StageProfile
from ..session import model_profile
from .placement import RAY_WORKER_BYTES, Board, StageLoad

DEFAULT_DISK = 300e6  # bytes/s: eMMC (microSD ~90 MB/s, NVMe ~1 GB/s)


@dataclass(frozen=True)
class BoardSpec:
    """One board as the caller names it: the Ray custom resources that pin its actor to its node, its
    memory budget in bytes (Ray's share on the board included; None: a share of what the board has free),
    its disk speed, and its compute speed relative to the machine the profile was measured on."""

    name: str
    resources: dict[str, float] = field(default_factory=dict)
    memory_budget: int | None = None
    disk_bytes_per_s: float = DEFAULT_DISK
    speed: float = 1.0

    @classmethod
    def of(cls, given: "dict | BoardSpec", index: int) -> "BoardSpec":
        """{"resources": {"board0": 1}, "memory_budget": "2GiB", "name": ..., "disk_mb_s": ..., "speed": ...}"""
        if isinstance(given, BoardSpec):
            return given
        unknown = set(given) - {"name", "resources", "memory_budget", "disk_mb_s", "speed"}
        if unknown:
            raise InputError(f"board {index}: unknown keys {sorted(unknown)}; known: name, resources, "
                             f"memory_budget, disk_mb_s, speed")
        resources = dict(given.get("resources") or {})
        name = given.get("name") or next(iter(resources), f"board{index}")
        budget = given.get("memory_budget")
        return cls(name, resources, None if budget is None else parse_bytes(budget),
                   float(given.get("disk_mb_s", DEFAULT_DISK / 1e6)) * 1e6, float(given.get("speed", 1.0)))

    @classmethod
    def parse(cls, text: str) -> "BoardSpec":
        """NAME=BUDGET[,disk=MB/s][,speed=X], as `hermes cluster plan --board` takes it; the board's Ray
        resource is its name."""
        name, _, rest = text.partition("=")
        budget, *options = rest.split(",")
        if not name or not budget:
            raise InputError(f"a board is NAME=BUDGET[,disk=MB/s][,speed=X], got {text!r}")
        given = {"name": name, "resources": {name: 1}, "memory_budget": budget}
        for option in options:
            key, _, value = option.partition("=")
            if key not in ("disk", "speed") or not value:
                raise InputError(f"board {name}: unknown option {option!r}; known: disk=MB/s, speed=X")
            given["disk_mb_s" if key == "disk" else key] = value
        return cls.of(given, 0)

    def session_budget(self) -> int | None:
        """What the board's hermes session may plan for: the budget less Ray's own share on the board."""
        if self.memory_budget is None:
            return None
        if self.memory_budget <= RAY_WORKER_BYTES:
            raise BudgetError(f"board '{self.name}': a budget of {self.memory_budget} bytes leaves nothing "
                              f"beside Ray's {RAY_WORKER_BYTES} bytes on the board")
        return self.memory_budget - RAY_WORKER_BYTES


def held_bytes(stage: StageProfile) -> int:
    """What a resident stage keeps, in the cheaper of its two forms."""
    return min(stage.plain.bytes, stage.prepacked.bytes)


def run_s(stage: StageProfile) -> float:
    cost = stage.plain
    return cost.held_run_s if cost.held_run_s >= 0 else cost.run_s


def kv_bytes(stage: StageSpec, batch: int, length: int) -> int:
    """The cache of the layers a stage holds: past inputs at `length` positions for `batch` rows."""
    return sum(batch * length * math.prod(d for d in t.shape[1:] if isinstance(d, int)) * np.dtype(t.dtype).itemsize
               for t in stage.inputs if t.name.startswith("past."))


def stage_loads(manifest: Manifest, profile: Profile, batch: int, length: int) -> list[StageLoad]:
    by_name = {s.name: s for s in profile.stages}
    return [StageLoad(s.name, held_bytes(by_name[s.name]), kv_bytes(s, batch, length)) for s in manifest.stages]


def boards_of(specs: list[BoardSpec], profile: Profile, available: int) -> list[Board]:
    """Placement's boards: the profile's run times divided by each board's speed; no budget: `available`."""
    seconds = [run_s(s) for s in profile.stages]
    return [Board(b.name, b.memory_budget if b.memory_budget is not None else available,
                  tuple(t / b.speed for t in seconds), b.disk_bytes_per_s) for b in specs]


def process_floor(profile: Profile) -> int:
    """A hermes process before its stages: its base RSS and the tensors in flight (as the planner counts)."""
    return profile.base_bytes + profile.transient_bytes


def profile_of(directory: Path, manifest: Manifest) -> Profile:
    """profile.json when `hermes profile` measured the model, else the estimate from weight sizes."""
    directory = Path(directory)
    return model_profile(directory, manifest, Templates(directory, manifest))
