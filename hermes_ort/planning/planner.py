"""plan(profile, budget) -> Plan: how many loading agents, how wide a window, which stages stay resident,
prepacking per stage. Pure: it touches no ORT and no disk, so it is tested with table rows.

Memory model: peak RSS = base + tensors in flight + resident stages + the `window` largest streamed
stages (the running one included). Latency model: an event simulation of loaders and the inference
agent from the profiled load and run times; it ignores CPU contention between them, so it is a lower bound.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import BudgetError
from ..engine.memory import format_bytes
from ..engine.plan import Plan
from .profiles import Profile, StageCost, StageProfile

MAX_WINDOW = 8  # wider windows buy nothing once loading hides behind compute
MARGIN = 0.03  # share of the budget kept free for what the profile cannot see (heap fragmentation, stacks)
MIN_PREPACK_GAIN = 0.10
NEAR = 0.02  # plans this close to the fastest count as equally fast
FIRST_SLACK = 0.10  # ... if their first run is at most this much slower  # prepack a streamed stage only for a run-time saving above profiling noise


RESIDENT_SESSION_BYTES = 256 << 10  # what each stage kept loaded holds beyond its profiled bytes, see below
CONTENDED_LOAD = 2.0  # a streamed GPT-2 medium block cost ~8.7 ms of a decode step against its profiled 4 ms
# load: mapping beside compute threads plus unmapping it (bench.generate-style decode, 0-8 blocks streamed)


@dataclass(frozen=True)
class Rules:
    """How plan() weighs candidates; the defaults serve single passes."""

    first_slack: float | None = FIRST_SLACK  # how much slower a first run may be for more resident stages
    max_loaders: int | None = None  # default: one per core
    contended: bool = False  # loads take their CPU from compute (no core to spare): charge them serially
    min_window: int = 1  # narrower windows only when nothing else fits (decoding: 2, or no load overlaps)
    prepack_resident: bool = False  # of two equally fast plans, the one keeping its resident stages prepacked
    prepack: bool = True  # False: no stage prepacked (one-row steps reading the transposed layout run faster plain)


def cost(stage: StageProfile, prepacked: bool) -> StageCost:
    return stage.prepacked if prepacked else stage.plain


def minimum_budget(profile: Profile, kv_cache_bytes: int = 0) -> int:
    """The smallest budget any plan meets: one loader, window 1, nothing resident, each stage in its
    smaller form (prepacked where that holds less: a lookup table's template maps only the rows it reads)."""
    need = profile.base_bytes + profile.transient_bytes + kv_cache_bytes + largest_stage(profile) + parked(profile)
    return int(need / (1 - MARGIN)) + 1


def check_floor(profile: Profile, budget: int) -> None:
    """Refuses a budget below what any input needs (the process base and the largest stage, with the
    margin), before anything runs: a session that could never run is no session."""
    least = int((profile.base_bytes + largest_stage(profile)) / (1 - MARGIN)) + 1
    if budget < least:
        raise BudgetError(f"budget {format_bytes(budget)} is below what any input needs, {format_bytes(least)}: "
                          f"process base {format_bytes(profile.base_bytes)} + largest stage "
                          f"{format_bytes(largest_stage(profile))} + {MARGIN:.0%} margin")


def largest_stage(profile: Profile) -> int:
    return max(min(s.plain.bytes, s.prepacked.bytes) for s in profile.stages)


def smaller_packed(profile: Profile) -> set[str]:
    """Stages that hold less prepacked than plain: streamed so even where prepacking runs no faster."""
    return {s.name for s in profile.stages if s.prepacked.bytes < s.plain.bytes}


def parked(profile: Profile) -> int:
    """What persistent sessions (engine/persistent.py) hold between their loads, every stage streamed."""
    return sum(s.plain.parked_bytes for s in profile.stages)


def usable(budget: int) -> int:
    return int(budget * (1 - MARGIN))


def simulate(loads: list[float | None], runs: list[float], loaders: int, window: int) -> float:
    """Latency of one pass. loads[i] is None for a stage already loaded. Streamed stages are claimed in
    order by the first free loader, once the streamed stage `window` places earlier has run."""
    free, run_end, clock = [0.0] * loaders, [], 0.0
    for load, run in zip(loads, runs):
        if load is None:
            clock += run
            continue
        slot = run_end[len(run_end) - window] if len(run_end) >= window else 0.0
        k = min(range(loaders), key=free.__getitem__)
        free[k] = max(free[k], slot) + load
        clock = max(clock, free[k]) + run
        run_end.append(clock)
    return clock


def run_time(stage: StageProfile, prepacked: bool, resident: bool) -> float:
    """A streamed stage runs as a fresh session (its first run), a resident one as a session that has run
    before. A resident prepacked stage runs no slower than plain: the profile times the two settings at
    different moments of a noisy machine (the same GPT-2 large block: 10.7 ms plain, 15.3 prepacked, where
    prepacked blocks ran 7-10% faster in a step's chain), and ORT computes the same product from packed
    weights that it packs on every call otherwise (or reads through a GEMV at one row). On the transposed
    layout one row runs faster plain, and those plans prepack nothing (Rules.prepack)."""
    chosen = cost(stage, prepacked)
    if not resident:
        return chosen.run_s
    later = lambda c: c.held_run_s if c.held_run_s >= 0 else c.run_s
    return min(later(chosen), later(stage.plain)) if prepacked else later(chosen)


def window_bytes(profile: Profile, resident: set[str], window: int, prepacked: set[str]) -> int:
    """Memory of the streamed stages: the `window` largest of them loaded, and what every one of them
    holds between loads (a persistent session's parked bytes)."""
    costs = [cost(s, s.name in prepacked) for s in profile.stages if s.name not in resident]
    streamed = sorted((c.bytes for c in costs), reverse=True)
    return sum(streamed[:window]) + sum(c.parked_bytes for c in costs)


def timings(profile: Profile, resident: set[str], prepacked: set[str], loaders: int, window: int,
            cold: bool, contended: bool = False) -> tuple[float, float]:
    """Predicted (first run, later runs). contended: loads cannot hide, each costs CONTENDED_LOAD x its time."""
    load = lambda s: cost(s, s.name in prepacked).load_cold_s if cold else cost(s, s.name in prepacked).load_warm_s
    fresh = [cost(s, s.name in prepacked).run_s for s in profile.stages]  # the first run: every stage new
    runs = [run_time(s, s.name in prepacked, s.name in resident) for s in profile.stages]
    first = simulate([load(s) for s in profile.stages], fresh, loaders, window)
    steady = simulate([None if s.name in resident else load(s) for s in profile.stages], runs, loaders, window)
    if contended:
        first = max(first, sum(fresh) + CONTENDED_LOAD * sum(load(s) for s in profile.stages))
        steady = max(steady, sum(runs) + CONTENDED_LOAD * sum(load(s) for s in profile.stages
                                                              if s.name not in resident))
    return first, steady


def make_plan(profile: Profile, budget: int, loaders: int, window: int, cold: bool,
              kv_cache_bytes: int = 0, contended: bool = False, prepack_resident: bool = False,
              prepack: bool = True) -> Plan | None:
    """The plan with these knobs, the most useful resident set that fits (resident stages prepacked where
    they fit, or kept plain so more of them fit: whichever predicts faster), and prepacking where it pays;
    None if nothing fits. prepack_resident: of the two, prepacked when it predicts as fast. A profile times
    each stage alone, where a block's weights are partly in the L3 cache and prepacking gains nothing at
    one row; in a step's chain they come from memory, and GPT-2 medium at 100% decoded 7-10% faster with
    its resident stages prepacked (3 alternating rounds: 132 / 119 / 124 ms against 141 / 132 / 135 ms a
    step), in the same memory once created (12 blocks: 600 against 595 MiB). prepack=False: nothing
    prepacked (Rules.prepack)."""
    spare = usable(budget) - profile.base_bytes - profile.transient_bytes - kv_cache_bytes
    smaller = smaller_packed(profile) if prepack else set()
    if window_bytes(profile, set(), window, smaller) > spare:
        return None
    plans = []
    for packed_first in (True, False) if prepack else (False,):
        resident, prepacked, used = pick_resident(profile, spare, cold,
                                                  lambda r: window_bytes(profile, r, window, smaller), packed_first)
        if prepack:
            prepacked = prepack_where_faster(profile, resident, prepacked | (smaller - resident), spare - used,
                                             loaders, window, cold, contended)
        first, steady = timings(profile, resident, prepacked, loaders, window, cold, contended)
        names = [s.name for s in profile.stages]
        peak = profile.base_bytes + profile.transient_bytes + kv_cache_bytes + used + window_bytes(
            profile, resident, window, prepacked)
        plans.append(Plan(budget, loaders, window, tuple(n for n in names if n in resident),
                          tuple(n for n in names if n in prepacked), profile.compute_threads, first, steady, peak))
    if not prepack:
        return plans[0]
    packed, plain = plans
    if prepack_resident and packed.predicted_steady_s <= plain.predicted_steady_s * (1 + NEAR):
        return packed
    return min(plans, key=lambda p: (p.predicted_steady_s, p.predicted_first_s))


def prepack_where_faster(profile: Profile, resident: set[str], prepacked: set[str], spare: int, loaders: int,
                         window: int, cold: bool, contended: bool = False) -> set[str]:
    """Greedy over streamed stages, largest run-time saving first: prepack one when the simulation says
    the runs get faster (its slower load hidden behind compute) and the window still fits."""
    best = sum(timings(profile, resident, prepacked, loaders, window, cold, contended))
    streamed = [s for s in profile.stages
                if s.name not in resident and s.prepacked.run_s < (1 - MIN_PREPACK_GAIN) * s.plain.run_s]
    for s in sorted(streamed, key=lambda s: s.plain.run_s - s.prepacked.run_s, reverse=True):
        trial = prepacked | {s.name}
        if window_bytes(profile, resident, window, trial) > spare:
            continue
        score = sum(timings(profile, resident, trial, loaders, window, cold, contended))
        if score < best * 0.99:
            prepacked, best = trial, score
    return prepacked


def resident_bytes(cost: StageCost) -> int:
    """A stage kept loaded: its profiled bytes, and what its session holds that the profile cannot see.
    The profile measures one stage at a time and leaves out what stays after its session is destroyed
    (the pool thread's malloc arena), which every session alive at once holds: 30 SmolLM2 native blocks
    loaded together held 165 KiB each beyond their profiles before running, 30 sessions of a one-MatMul
    graph 142 KiB each after a run, and with every stage but the head resident the steady RSS stood ~8 MiB
    above the plan (230.4 MiB against a 226.2 MiB budget)."""
    return (cost.bytes if cost.held_bytes < 0 else cost.held_bytes) + cost.parked_bytes + RESIDENT_SESSION_BYTES


def creating_bytes(cost: StageCost) -> int:
    """What a stage holds beyond resident_bytes while its session is created (prepacking's peak: a GPT-2
    medium block 63 MiB created, 48 MiB held, as plain); one creation at a time per loading agent."""
    return max(cost.bytes - cost.held_bytes, 0) if cost.held_bytes >= 0 else 0


def pick_resident(profile: Profile, spare: int, cold: bool, window_for: Callable[[set[str]], int],
                  packed_first: bool = True) -> tuple[set[str], set[str], int]:
    """Greedy: keep the stages that save the most load time per byte, prepacked (if packed_first) when
    that still fits beside the streamed window (which shrinks as stages become resident)."""
    key = (lambda c: c.load_cold_s) if cold else (lambda c: c.load_warm_s)
    resident, prepacked, used, creating = set(), set(), 0, 0
    for s in sorted(profile.stages, key=lambda s: key(s.plain) / max(s.plain.bytes, 1), reverse=True):
        for packed in (True, False) if packed_first else (False,):
            c = cost(s, packed)
            if used + resident_bytes(c) + max(creating, creating_bytes(c)) + window_for(resident | {s.name}) <= spare:
                resident.add(s.name)
                used += resident_bytes(c)
                creating = max(creating, creating_bytes(c))
                if packed:
                    prepacked.add(s.name)
                break
    return resident, prepacked, used + creating


def plan(profile: Profile, budget: int, cold: bool = False, kv_cache_bytes: int = 0, rules: Rules = Rules()) -> Plan:
    """The fastest plan (later runs first, then the first run) whose predicted peak fits the budget.
    kv_cache_bytes: a decoder's KV cache at its maximum length, held beside everything else."""
    least = minimum_budget(profile, kv_cache_bytes)
    if budget < least:
        cache = f" + KV cache at its maximum length {format_bytes(kv_cache_bytes)}" if kv_cache_bytes else ""
        kept = f" + persistent sessions between loads {format_bytes(parked(profile))}" if parked(profile) else ""
        raise BudgetError(
            f"budget {format_bytes(budget)} is below the smallest feasible plan, {format_bytes(least)}: "
            f"process base {format_bytes(profile.base_bytes)} + tensors in flight "
            f"{format_bytes(profile.transient_bytes)}{cache} + largest stage {format_bytes(largest_stage(profile))}"
            f"{kept} + {MARGIN:.0%} margin")
    candidates = [make_plan(profile, budget, loaders, window, cold, kv_cache_bytes, rules.contended,
                            rules.prepack_resident, rules.prepack)
                  for window in range(1, min(MAX_WINDOW, len(profile.stages)) + 1)
                  for loaders in range(1, min(window, rules.max_loaders or profile.cores) + 1)]
    feasible = [p for p in candidates if p]
    feasible = [p for p in feasible if p.window >= rules.min_window] or feasible
    fastest = min(p.predicted_steady_s for p in feasible)
    # Among plans within 2% of the fastest, keep the most stages resident: the same speed here, and far
    # faster for short inputs (a decoding step runs a block in 1-4 ms, too short to hide its load).
    near = [p for p in feasible if p.predicted_steady_s <= fastest * (1 + NEAR)]
    if rules.first_slack is not None:  # nor a much slower first run
        first = min(p.predicted_first_s for p in near)
        near = [p for p in near if p.predicted_first_s <= first * (1 + rules.first_slack)]
    return min(near, key=lambda p: (-len(p.resident), p.predicted_steady_s, p.predicted_first_s))


def plan_table(profile: Profile, budgets: list[int], cold: bool = False) -> list[Plan]:
    """Plans over a range of budgets, as the paper's planner reports them; infeasible budgets are skipped."""
    least = minimum_budget(profile)
    return [plan(profile, b, cold) for b in budgets if b >= least]


def default_budgets(profile: Profile, count: int = 8) -> list[int]:
    """From the minimum to everything resident (prepacked), geometrically."""
    low = minimum_budget(profile)
    high = int((profile.base_bytes + profile.transient_bytes + sum(resident_bytes(s.prepacked) for s in profile.stages))
               / (1 - MARGIN)) + 1
    ratio = (high / low) ** (1 / max(count - 1, 1))
    return [int(low * ratio ** k) + 1 for k in range(count)]
