"""bench's plots draw from plain records at one budget and at several (no pixels compared; the PNGs are looked at)."""
import json

import pytest

pytest.importorskip("matplotlib")
from bench import plots  # noqa: E402

MiB = 1 << 20
PNG = b"\x89PNG"


def run_records(budgets):
    """What bench.run keeps: every strategy cold and warm, hermes at each budget, one loading-agent row."""
    rows = [{"model": "tiny", "strategy": s, "mode": m, "budget": None, "budget_bytes": None, "loaders": None,
             "first_s": 1.0 + k, "peak_rss": (200 + 100 * k) * MiB}
            for k, s in enumerate(("whole", "sequential", "pipeswitch")) for m in ("warm", "cold")]
    rows += [{"model": "tiny", "strategy": "hermes", "mode": m, "budget": f"{b}MiB", "budget_bytes": b * MiB,
              "loaders": None, "first_s": 0.5, "peak_rss": b * MiB // 2} for b in budgets for m in ("warm", "cold")]
    return rows + [{**rows[-1], "loaders": 2}]


def generate_records(budgets, models=("tiny",)):
    """What bench.generate keeps: the budget-free strategies and hermes at each budget, per model."""
    rows = []
    for model in models:
        rows += [{"model": model, "precision": "fp32", "batch": 1, "strategy": s, "budget": None, "budget_bytes": None,
                  "tokens_per_s": rate, "peak_rss": 300 * MiB} for s, rate in
                 (("whole-model ORT", 20.0), ("stream-everything", 1.0), ("llama.cpp (same GGUF)", 30.0))]
        rows += [{"model": model, "precision": "fp32", "batch": 1, "strategy": "hermes", "budget": f"{b}MiB",
                  "budget_bytes": b * MiB, "tokens_per_s": b / 10, "peak_rss": b * MiB} for b in budgets]
    return rows


@pytest.mark.parametrize("budgets", [[150], [150, 300, 600]])
def test_run_plots_draw_at_one_budget_and_at_several(tmp_path, budgets):
    written = plots.draw("run", run_records(budgets), tmp_path)
    assert [p.name for p in written] == ["latency-vs-budget.png", "peak-rss-vs-budget.png", "latency-vs-loaders.png"]
    assert all(p.read_bytes()[:4] == PNG for p in written)


@pytest.mark.parametrize("budgets, models", [([150], ("tiny",)), ([150], ("tiny", "tiny-int4")),
                                             ([100, 150, 4096], ("tiny",)), ([100, 200], ("tiny", "tiny-int4"))])
def test_the_decode_plot_draws_at_one_budget_and_at_several(tmp_path, budgets, models):
    (written,) = plots.draw("generate", generate_records(budgets, models), tmp_path)
    assert written.name == "decode-vs-budget.png" and written.read_bytes()[:4] == PNG


def test_kinds_without_budgets_draw_nothing(tmp_path):
    assert plots.draw("accuracy", [], tmp_path) == []
    assert plots.draw("generate", [r for r in generate_records([]) if not r["budget_bytes"]], tmp_path) == []


@pytest.mark.parametrize("heights, gap, expected", [
    ([0.5], 0.1, [0.5]),
    ([0.2, 0.8], 0.1, [0.2, 0.8]),                  # already apart: unmoved
    ([0.5, 0.5], 0.1, [0.5, 0.6]),                  # equal: the later one moves up
    ([0.95, 0.96, 0.97], 0.1, [0.8, 0.9, 1.0]),     # at the top: pushed down inside [0, 1]
    ([0.6, 0.1, 0.55], 0.1, [0.65, 0.1, 0.55]),     # kept in the order given
])
def test_reference_labels_spread_apart_as_little_as_needed(heights, gap, expected):
    assert plots.spread(heights, gap) == pytest.approx(expected)


@pytest.mark.parametrize("ticks, log, expected", [
    ([100, 200, 300], False, [100, 200, 300]),
    ([129, 138, 258, 517], False, [129, 258, 517]),  # 138 MiB sits on 129's label
    ([448, 825, 1179, 4096], True, [448, 825, 1179, 4096]),
])
def test_budget_ticks_leave_out_the_ones_that_would_overlap(ticks, log, expected):
    assert plots.thinned(ticks, log) == expected


def test_plots_redraw_from_a_kept_results_file(tmp_path, capsys):
    (tmp_path / "generate.json").write_text(json.dumps({"kind": "generate", "records": generate_records([100, 200])}))
    assert plots.main([str(tmp_path / "generate.json")]) == 0
    assert (tmp_path / "decode-vs-budget.png").read_bytes()[:4] == PNG
    assert "decode-vs-budget.png" in capsys.readouterr().out
