"""Placement of stage ranges on boards, from table rows: a pure function, no Ray, no ORT."""
from __future__ import annotations

import pytest

from hermes_ort.cluster.placement import Board, StageLoad, place
from hermes_ort.cluster.ranges import StageRange
from hermes_ort.errors import BudgetError, HermesError

MiB, GiB = 1 << 20, 1 << 30
RAY = 350 * MiB  # what each test board keeps for Ray (the default is 0.35 GiB too)


def stages(n=8, size=100 * MiB, kv=0):
    return [StageLoad(f"block_{i:02}", size, kv) for i in range(n)]


def board(name, budget_mib, per_stage_s=0.01, n=8, disk=300e6):
    return Board(name, budget_mib * MiB, (per_stage_s,) * n, disk, RAY)


def spans(placement):
    return [(a.board, a.range.start, a.range.stop) for a in placement.assignments]


# (boards, stages, process floor, expected (board, start, stop) per range)
CASES = {
    # 8 x 100 MiB fit the first board beside Ray and the process: one board, the second unused
    "fits one board": ([board("a", 1400), board("b", 1400)], stages(), 100 * MiB, [("a", 0, 8)]),
    # neither holds 8 alone, two do: resident over two, balanced 4 + 4
    "needs two": ([board("a", 950), board("b", 950)], stages(), 100 * MiB, [("a", 0, 4), ("b", 4, 8)]),
    # the second is 3x slower per stage: it gets fewer blocks (6 x 0.01 against 2 x 0.03)
    "slower board gets fewer": ([board("a", 1400), board("b", 1400, per_stage_s=0.03)],
                                stages(), 100 * MiB, [("a", 0, 8)]),
    "slower board gets fewer of two": ([board("a", 1050), board("b", 1050, per_stage_s=0.03)],
                                       stages(), 0, [("a", 0, 6), ("b", 6, 8)]),
    # the smaller board of a pair still fits the model: it alone is enough
    "the board that fits": ([board("small", 600), board("big", 1400)], stages(), 0, [("big", 0, 8)]),
    # 8 x 100 MiB weights fit one 1250 MiB board, not with 50 MiB of KV cache per stage
    "KV caches count": ([board("a", 1250), board("b", 1250)], stages(kv=50 * MiB), 0, [("a", 0, 4), ("b", 4, 8)]),
    "without KV caches": ([board("a", 1250), board("b", 1250)], stages(), 0, [("a", 0, 8)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_placement(case):
    boards, loads, floor, expected = CASES[case]
    placement = place(boards, loads, floor)
    assert spans(placement) == expected
    assert placement.resident
    assert placement.ranges[0].start == 0 and placement.ranges[-1].stop == len(loads)


def test_budgets_count_ray_and_the_process_floor():
    # 800 MiB of stages in 1200 MiB: fits beside Ray's 350, not beside Ray and a 100 MiB process
    assert spans(place([board("a", 1200), board("b", 1200)], stages(), 0)) == [("a", 0, 8)]
    assert len(place([board("a", 1200), board("b", 1200)], stages(), 100 * MiB).assignments) == 2


def test_a_model_no_boards_hold_streams_balanced_on_all():
    # 8 x 100 MiB over two 700 MiB boards (350 usable each): neither range resident; the slowest is balanced
    placement = place([board("a", 700), board("b", 700)], stages(), 0)
    assert not placement.resident
    assert spans(placement) == [("a", 0, 4), ("b", 4, 8)]
    streamed = 4 * 100 * MiB - 350 * MiB
    assert placement.assignments[0].streamed_bytes == streamed
    assert placement.predicted_s == pytest.approx(4 * 0.01 + streamed / 300e6)


def test_a_slow_disk_gets_fewer_streamed_stages():
    placement = place([board("a", 700, disk=1e9), board("b", 700, disk=90e6)], stages(), 0)
    a, b = placement.assignments
    assert len(a.range) > len(b.range)


def test_a_board_too_small_for_one_stage_is_named():
    with pytest.raises(BudgetError, match=r"board 'tiny' is too small for any stage.*block_00") as e:
        place([board("a", 1400), board("tiny", 400)], stages(), 0)
    assert isinstance(e.value, HermesError)


def test_no_split_fits_says_why():
    # 300 MiB of KV cache per stage: no range holds its caches beside a stage on 700 MiB boards
    with pytest.raises(BudgetError, match="no split of the 8 stages"):
        place([board("a", 1000), board("b", 1000)], stages(kv=300 * MiB), 0)


def test_compute_times_must_cover_every_stage():
    with pytest.raises(BudgetError, match="board 'a' has compute times for 3 stages; the model has 8"):
        place([Board("a", GiB, (0.1,) * 3)], stages(), 0)


def test_ranges_are_half_open():
    assert len(StageRange(2, 5)) == 3 and list(range(StageRange(2, 5).start, StageRange(2, 5).stop)) == [2, 3, 4]
