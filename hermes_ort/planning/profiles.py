"""profile.json: what `hermes profile` measured per stage, the planner's only input besides the budget."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ManifestError

PROFILE_NAME = "profile.json"
DECODE_PROFILE_NAME = "profile-decode.json"  # `hermes profile --decode`: a one-token step at the maximum context


@dataclass(frozen=True)
class StageCost:
    """One stage under one ORT setting. Times in seconds; bytes is the RSS its destruction gives back after
    it was loaded and had run (weights mapped or copied, packed weights, private buffers)."""

    load_cold_s: float  # files evicted from the page cache, then read ahead + session created
    load_warm_s: float
    run_s: float  # a fresh stage's first run after a load from the page cache (what streaming pays)
    bytes: int
    held_bytes: int = -1  # what it keeps once created and run: prepacking's peak holds the mapped and the
    # packed weights at once, then lets the mapped ones go (-1: not measured, profiles before 2026-11-26)
    held_run_s: float = -1.0  # a later run of the same session: what a resident stage pays (-1: not measured)
    parked_bytes: int = 0  # held between loads by a persistent session (engine/persistent.py), streamed or not


@dataclass(frozen=True)
class StageProfile:
    name: str
    file_bytes: int
    plain: StageCost  # prepacking off: cheap to create, weights stay mapped from the file
    prepacked: StageCost  # prepacking on: slower and larger to create, faster to run


@dataclass(frozen=True)
class Profile:
    """A model measured on one device for one input shape."""

    base_bytes: int  # RSS of the process before any stage is loaded (interpreter, numpy, ORT)
    transient_bytes: int  # what stays beside the stages: tensors in flight, the shared arena, ORT's state
    cores: int
    compute_threads: int
    disk_bytes_per_s: float  # cold sequential read measured alongside
    feed: dict  # axis sizes the stages ran with
    stages: tuple[StageProfile, ...]
    prefill_bytes: int = 0  # decode profiles: what a prefill of prefill_sequence positions holds beyond the stages
    prefill_sequence: int = 0  # (profiler.prefill_bytes); 0: not measured

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        stages = tuple(StageProfile(s["name"], s["file_bytes"], StageCost(**s["plain"]), StageCost(**s["prepacked"]))
                       for s in d["stages"])
        return cls(**{**d, "stages": stages})


def save(profile: Profile, directory: str | os.PathLike, name: str = PROFILE_NAME) -> Path:
    path = Path(directory) / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(profile), indent=1))
    os.replace(tmp, path)
    return path


def load(directory: str | os.PathLike, name: str = PROFILE_NAME) -> Profile:
    path = Path(directory) / name
    if not path.is_file():
        raise ManifestError(f"{path} is missing: run `hermes profile {directory}` first")
    try:
        return Profile.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{path} is corrupt: {type(e).__name__}: {e}") from e
