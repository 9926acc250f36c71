"""The planner is pure: table rows in, plans out."""
import dataclasses
import pytest

from hermes_ort.errors import BudgetError
from hermes_ort.planning.planner import Rules, default_budgets, minimum_budget, plan, plan_table, simulate
from hermes_ort.planning.profiles import Profile, StageCost, StageProfile

MiB = 1 << 20


def stage(name, mib, load_ms=10.0, run_ms=10.0):
    plain = StageCost(load_ms / 1e3 * 2, load_ms / 1e3, run_ms / 1e3, mib * MiB)
    packed = StageCost(load_ms / 1e3 * 6, load_ms / 1e3 * 5, run_ms / 1e3 * 0.8, mib * MiB)
    return StageProfile(name, mib * MiB, plain, packed)


def profile(*stages):
    return Profile(base_bytes=50 * MiB, transient_bytes=2 * MiB, cores=2, compute_threads=2,
                   disk_bytes_per_s=1e9, feed={}, stages=tuple(stages))


MODEL = profile(stage("embeddings", 20, 2, 1), *[stage(f"block_{i:02d}", 40) for i in range(8)], stage("head", 20))


@pytest.mark.parametrize("loads, runs, loaders, window, expected", [
    ([1, 1, 1], [1, 1, 1], 1, 1, 6),  # window 1: load, run, load, run ...
    ([1, 1, 1], [1, 1, 1], 1, 2, 4),  # the next load hides behind the current run
    ([2, 2, 2], [1, 1, 1], 1, 3, 7),  # one loader is the bottleneck
    ([2, 2, 2], [1, 1, 1], 2, 3, 5),  # two loaders share it
    ([None, None, 1], [1, 1, 1], 1, 1, 3),  # resident stages need no load
])
def test_simulate(loads, runs, loaders, window, expected):
    assert simulate(loads, runs, loaders, window) == pytest.approx(expected)


def test_budget_below_minimum_states_the_minimum():
    least = minimum_budget(MODEL)
    assert least == int((50 + 2 + 40) * MiB / 0.97) + 1
    with pytest.raises(BudgetError, match="below the smallest feasible plan, 94.8 MiB"):
        plan(MODEL, least - 1)
    assert plan(MODEL, least).window == 1


@pytest.mark.parametrize("budget_mib", [95, 140, 200, 300, 500])
def test_predicted_peak_fits_the_budget(budget_mib):
    p = plan(MODEL, budget_mib * MiB)
    assert p.predicted_peak_bytes <= budget_mib * MiB
    assert 1 <= p.loaders <= min(p.window, MODEL.cores)


def test_plans_keep_three_percent_of_the_budget_free():
    """The margin covers what the profile cannot see; a planner that spends it shows in some budget."""
    budgets = range(95 * MiB, 500 * MiB, MiB // 2)
    assert all(plan(MODEL, b).predicted_peak_bytes <= 0.97 * b for b in budgets)
    assert any(plan(MODEL, b).predicted_peak_bytes > 0.95 * b for b in budgets)  # the margin is what binds


def test_more_memory_never_predicts_slower():
    plans = plan_table(MODEL, default_budgets(MODEL, 10))
    steady = [p.predicted_steady_s for p in plans]
    assert steady == sorted(steady, reverse=True) and len(plans) == 10
    assert len(plans[-1].resident) == len(MODEL.stages)  # the top budget keeps everything loaded
    assert plans[0].resident == () and plans[0].window == 1


def test_tight_budget_streams_and_overlaps_loading():
    p = plan(MODEL, 140 * MiB)
    assert p.window == 2 and p.predicted_first_s < simulate([0.01] * 10, [0.01] * 10, 1, 1)


def test_prepacking_chosen_when_load_is_cheap_relative_to_run():
    slow_compute = profile(*[stage(f"block_{i}", 10, load_ms=1, run_ms=50) for i in range(4)])
    assert set(plan(slow_compute, 400 * MiB).prepacked) == {f"block_{i}" for i in range(4)}


def test_prepacks_only_the_streamed_stage_where_it_pays():
    """Blocks gain little from prepacking; a head whose run drops a lot is prepacked while blocks run."""
    head = StageProfile("head", 40 * MiB, StageCost(0.004, 0.002, 0.030, 40 * MiB),
                        StageCost(0.040, 0.035, 0.010, 44 * MiB))
    block = lambda i: StageProfile(f"block_{i:02d}", 40 * MiB, StageCost(0.004, 0.002, 0.010, 40 * MiB),
                                   StageCost(0.040, 0.035, 0.0099, 40 * MiB))  # a 1% gain for a 17x load
    blocks = [block(i) for i in range(6)]
    p = plan(profile(*blocks, head), 200 * MiB)
    assert p.prepacked == ("head",) and p.resident == ()


def test_contended_loads_are_charged_serially_and_keep_a_window_of_two():
    """Decoding rules: a load takes its CPU from compute, so each streamed stage adds CONTENDED_LOAD x its
    load to a step, residency pays, and the window keeps room for the next stage."""
    from hermes_ort.planning.planner import CONTENDED_LOAD, Rules

    rules = Rules(first_slack=None, max_loaders=1, contended=True, min_window=2)
    p = plan(MODEL, 200 * MiB, rules=rules)
    streamed = [s for s in MODEL.stages if s.name not in p.resident]
    runs = sum(s.plain.run_s if s.name not in p.prepacked else s.prepacked.run_s for s in MODEL.stages)
    assert p.window >= 2 and p.loaders == 1 and streamed
    assert p.predicted_steady_s == pytest.approx(runs + CONTENDED_LOAD * sum(s.plain.load_warm_s for s in streamed))
    assert len(p.resident) >= len(plan(MODEL, 200 * MiB).resident)


def test_each_resident_stage_is_charged_what_its_session_holds_beyond_the_profile():
    """Profiled one at a time, a stage's figure leaves out what its session keeps once gone (its pool
    thread's malloc arena); sessions alive together all hold it (SmolLM2 native: ~8 MiB over 30 blocks)."""
    from hermes_ort.planning.planner import RESIDENT_SESSION_BYTES

    top = plan(MODEL, default_budgets(MODEL)[-1])
    assert len(top.resident) == len(MODEL.stages)
    stages = {s.name: s for s in MODEL.stages}
    held = sum((stages[n].prepacked if n in top.prepacked else stages[n].plain).bytes for n in top.resident)
    assert top.predicted_peak_bytes == (MODEL.base_bytes + MODEL.transient_bytes + held
                                        + len(top.resident) * RESIDENT_SESSION_BYTES)


def decode_block(name, held=True):
    """A GPT-2 medium-like block at one row: prepacking peaks 63 MiB while created and holds 48 as plain
    does; its first run is slower, a later one as fast as plain (as a profile times it alone)."""
    plain = StageCost(0.008, 0.004, 0.0045, 48 * MiB, 48 * MiB if held else -1, 0.0044 if held else -1)
    packed = StageCost(0.13, 0.10, 0.0049, 63 * MiB, 48 * MiB if held else -1, 0.0044 if held else -1)
    return StageProfile(name, 48 * MiB, plain, packed)


DECODER = profile(*[decode_block(f"block_{i:02d}") for i in range(8)])
DECODING = Rules(first_slack=None, max_loaders=1, contended=True, min_window=2, prepack_resident=True)


def test_resident_prepacked_stages_are_charged_what_they_hold_and_one_creation():
    budget = int((50 + 2 + 8 * 48.25 + 15) * MiB / 0.97) + MiB // 2  # all resident (48 MiB + 256 KiB), one 15 MiB peak
    p = plan(DECODER, budget, rules=DECODING)
    assert len(p.resident) == 8 and set(p.prepacked) == set(p.resident)
    assert p.predicted_peak_bytes <= 0.97 * budget
    assert len(plan(DECODER, budget - 14 * MiB, rules=DECODING).prepacked) < 8  # no room for the creation peak
    old = profile(*[decode_block(f"block_{i:02d}", held=False) for i in range(8)])  # profiles without held bytes
    assert len(plan(old, budget, rules=DECODING).prepacked) < 8  # charged their 63 MiB peak each


def test_decode_plans_keep_resident_stages_prepacked_where_single_passes_weigh_the_first_run():
    budget = 800 * MiB
    assert set(plan(DECODER, budget, rules=DECODING).prepacked) == {s.name for s in DECODER.stages}
    single = plan(DECODER, budget)  # the default rules: prepacked loads make the first run 100 ms a block slower
    assert len(single.resident) == 8 and not single.prepacked


def test_a_resident_stage_is_timed_by_its_later_runs():
    slow_first = profile(*[StageProfile(f"b{i}", 48 * MiB, StageCost(0.01, 0.004, 0.010, 48 * MiB, 48 * MiB, 0.004),
                                        StageCost(0.1, 0.1, 0.010, 48 * MiB, 48 * MiB, 0.004)) for i in range(4)])
    p = plan(slow_first, 800 * MiB, rules=DECODING)
    assert len(p.resident) == 4 and p.predicted_steady_s == pytest.approx(4 * 0.004)
    assert p.predicted_first_s >= 4 * 0.010


def test_a_noisy_profile_does_not_talk_a_decode_plan_out_of_prepacked_resident_stages():
    """Packed and plain are timed at different moments; a prepacked resident stage is timed as no slower."""
    noisy = profile(*[StageProfile(f"b{i}", 48 * MiB, StageCost(0.008, 0.004, 0.011, 48 * MiB, 48 * MiB, 0.0107),
                                   StageCost(0.13, 0.10, 0.011, 63 * MiB, 48 * MiB, 0.0153)) for i in range(4)])
    p = plan(noisy, 800 * MiB, rules=DECODING)
    assert len(p.prepacked) == 4 and p.predicted_steady_s == pytest.approx(4 * 0.0107)


def test_rules_without_prepacking_prepack_nothing_even_where_it_would_pay():
    """One-row steps on the transposed layout run faster plain: a plan under Rules(prepack=False) keeps the
    same stages resident without prepacking any, resident or streamed."""
    cheap_prepack = profile(*[StageProfile(f"b{i}", 48 * MiB, StageCost(0.01, 0.004, 0.010, 48 * MiB, 48 * MiB, 0.010),
                                           StageCost(0.01, 0.004, 0.002, 48 * MiB, 48 * MiB, 0.002)) for i in range(6)])
    rules = dataclasses.replace(DECODING, prepack_resident=False, prepack=False)
    for budget, resident in ((800 * MiB, 6), (300 * MiB, 2)):  # all resident; base, window of 2, 2 resident
        packed, plain = plan(cheap_prepack, budget, rules=DECODING), plan(cheap_prepack, budget, rules=rules)
        assert packed.prepacked and not plain.prepacked
        assert len(plain.resident) == resident


def test_persistent_sessions_are_counted_between_their_loads():
    """A streamed quantized stage keeps its session (engine/persistent.py): every streamed stage's parked
    bytes are held beside the window, in the minimum budget and in each plan's predicted peak."""
    kept = lambda s: dataclasses.replace(s, plain=dataclasses.replace(s.plain, parked_bytes=3 * MiB),
                                         prepacked=dataclasses.replace(s.prepacked, parked_bytes=3 * MiB))
    with_kept = profile(*[kept(s) for s in MODEL.stages])
    assert minimum_budget(with_kept) - minimum_budget(MODEL) >= 10 * 3 * MiB
    budget = minimum_budget(with_kept) + 5 * MiB
    p = plan(with_kept, budget)
    streamed = len(MODEL.stages) - len(p.resident)
    assert streamed > 0 and p.predicted_peak_bytes <= 0.97 * budget
    alone = plan(MODEL, budget)  # the same budget without kept sessions keeps more resident
    assert len(alone.resident) > len(p.resident) or alone.window > p.window
    assert p.predicted_peak_bytes >= MODEL.base_bytes + MODEL.transient_bytes + 10 * 3 * MiB


def test_a_stage_smaller_prepacked_streams_prepacked_and_sets_the_minimum_so():
    """A lookup table holds its whole file plain and the rows it reads through its template (prepacked):
    the smallest plan streams it in that form, and every plan's peak counts the form it streams."""
    table = stage("embeddings", 60, 2, 1)
    table = dataclasses.replace(table, prepacked=dataclasses.replace(table.prepacked, bytes=1 * MiB))
    model = profile(table, *[stage(f"block_{i:02d}", 10) for i in range(4)], stage("head", 10))
    least = minimum_budget(model)
    assert least <= (50 + 2 + 10) * MiB / 0.97 + 1  # base, in flight, a block: not the table's 60 MiB
    p = plan(model, least)
    assert "embeddings" not in p.resident and "embeddings" in p.prepacked
    assert p.predicted_peak_bytes <= 0.97 * least + 1
