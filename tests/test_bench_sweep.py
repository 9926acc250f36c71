"""bench.run's loading-agent sweep: each forced loader count runs the widest window that fits its budget."""
from hermes_ort.planning.planner import plan
from hermes_ort.planning.profiles import Profile, StageCost, StageProfile

MiB = 1 << 20


def block(name, mib):
    cost = StageCost(0.02, 0.01, 0.01, mib * MiB)
    return StageProfile(name, mib * MiB, cost, StageCost(0.06, 0.05, 0.008, mib * MiB))


MODEL = Profile(base_bytes=50 * MiB, transient_bytes=2 * MiB, cores=2, compute_threads=2, disk_bytes_per_s=1e9,
                feed={}, stages=tuple(block(f"block_{i:02d}", 40) for i in range(8)))


def test_a_sweep_row_widens_the_window_only_as_far_as_its_budget_allows():
    from bench.strategies import swept_plan

    budget = int((52 + 100) * MiB / 0.97)  # room for two 40 MiB blocks in flight, not three
    chosen = plan(MODEL, budget)
    for loaders, window in ((1, chosen.window), (2, 2), (3, 2)):
        swept = swept_plan(MODEL, chosen, loaders)
        assert (swept.loaders, swept.window) == (loaders, window)
        assert swept.predicted_peak_bytes <= budget


def test_a_sweep_row_with_room_takes_a_window_as_wide_as_its_loaders():
    from bench.strategies import swept_plan

    budget = 2000 * MiB
    swept = swept_plan(MODEL, plan(MODEL, budget), 3)
    assert swept.loaders == 3 and swept.window >= 3 and swept.predicted_peak_bytes <= budget
