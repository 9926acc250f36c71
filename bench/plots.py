"""The pictures readers decide from (matplotlib, the `bench` extra): single-pass latency and peak RSS against
the budget for every strategy, latency against the number of loading agents (the paper's sweep), and decode
tokens/s against the budget per model, precision and batch.

Hermes, measured at each budget, is a line (or, at one budget, a bar beside the others); the strategies that do
not read the budget (whole-model ORT, stream-everything, llama.cpp, ...) are labelled reference lines. Warm runs
are red, solid, round markers; cold runs blue, dashed, square markers, hatched bars.

Redraw from kept results without rerunning: `python -m bench.plots bench/results/<dir>/run.json ...` writes the
PNGs beside each JSON file."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display on a board or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator, ScalarFormatter  # noqa: E402

MiB = 2**20
MODES = {"warm": {"color": "C3", "linestyle": "-", "marker": "o", "hatch": "", "fill": "C3"},
         "cold": {"color": "C0", "linestyle": "--", "marker": "s", "hatch": "//", "fill": "none"}}
PEERS = {"whole-model ORT": "C4", "stream-everything": "C5", "llama.cpp (same GGUF)": "C6"}  # one colour each
LABEL_GAP = 0.07  # reference labels at least this far apart, in axes heights (7 pt text on a 3.6 in panel)


def draw(kind: str, records: list[dict], out: Path) -> list[Path]:
    if kind == "run":
        return [p for p in (against_budget(records, out, "first_s", "latency s", "latency-vs-budget.png"),
                            against_budget(records, out, "peak_rss", "peak RSS MiB", "peak-rss-vs-budget.png"),
                            against_loaders(records, out)) if p]
    if kind == "generate":
        return [p for p in (decode_against_budget(records, out),) if p]
    return []  # other kinds (accuracy, cold decoding): their one table says it all


def grouped(records: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def grid(count: int, columns: int = 4):
    cols = min(count, columns)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def budgets_of(rows: list[dict]) -> list[int]:
    """The distinct budgets hermes ran at (rows without a budget are the strategies that ignore it)."""
    return sorted({r["budget_bytes"] for r in rows if r.get("budget_bytes")})


def against_budget(records: list[dict], out: Path, field: str, label: str, name: str) -> Path | None:
    """Per model: hermes warm and cold over the budgets, the other strategies as labelled reference lines; one
    budget only: grouped bars, warm beside cold, for every strategy."""
    swept = [r for r in records if r.get("loaders") is None]
    if not swept:
        return None
    models = grouped(swept, "model")
    fig, axes = grid(len(models))
    scale = MiB if field == "peak_rss" else 1
    for ax, ((model,), rows) in zip(axes, models.items()):
        (run_bars if len(budgets_of(rows)) <= 1 else run_lines)(ax, rows, field, scale)
        ax.set_title(model)
        ax.set_ylabel(label)
        plain_y(ax)
    return finish(fig, out / name)


def run_lines(ax, rows: list[dict], field: str, scale: float) -> None:
    budgets = budgets_of(rows)
    references = []
    for mode, style in MODES.items():
        points = sorted((r["budget_bytes"], r[field]) for r in rows if r["budget_bytes"] and r["mode"] == mode)
        if points:
            ax.plot([b / MiB for b, _ in points], [v / scale for _, v in points], color=style["color"],
                    linestyle=style["linestyle"], marker=style["marker"], markerfacecolor=style["fill"],
                    label=f"hermes {mode}")
        references += [(r[field] / scale, f"{r['strategy']} {mode}", style) for r in rows
                       if not r["budget_bytes"] and r["mode"] == mode]
    if field == "peak_rss":
        ax.plot([b / MiB for b in budgets], [b / MiB for b in budgets], ":", color="grey", label="budget")
    values = [r[field] / scale for r in rows] + ([b / MiB for b in budgets] if field == "peak_rss" else [])
    ax.set_ylim(0, 1.08 * max(values))
    reference_lines(ax, references)
    budget_axis(ax, budgets)
    ax.legend(fontsize=7, loc="best")


def run_bars(ax, rows: list[dict], field: str, scale: float) -> None:
    order = list(dict.fromkeys(r["strategy"] for r in rows if not r["budget_bytes"])) + ["hermes"]
    budget = next((r["budget_bytes"] for r in rows if r["budget_bytes"]), None)
    for k, (mode, style) in enumerate(MODES.items()):
        values = [next((r[field] / scale for r in rows if r["strategy"] == s and r["mode"] == mode), 0)
                  for s in order]
        bars = ax.bar([i + (k - 0.5) * 0.4 for i in range(len(order))], values, 0.4, label=mode,
                      color=style["color"], alpha=0.85 if mode == "warm" else 0.55, hatch=style["hatch"],
                      edgecolor="white")
        ax.bar_label(bars, fmt=lambda v: f"{v:.0f}" if v >= 100 else f"{v:.3g}", fontsize=6, padding=1)
    names = [s if s != "hermes" or not budget else f"hermes\n{budget / MiB:.0f} MiB" for s in order]
    ax.set_xticks(range(len(order)), names, fontsize=8)
    ax.set_ylim(0, 1.3 * max(bar.get_height() for bar in ax.patches))  # room for the legend above the bars
    if field == "peak_rss" and budget:
        reference_lines(ax, [(budget / MiB, f"budget {budget / MiB:.0f} MiB", {"color": "grey", "linestyle": ":"})])
    ax.legend(fontsize=7, loc="upper right", ncol=2)


def reference_lines(ax, references: list[tuple[float, str, dict]]) -> None:
    """Flat lines across the panel, each named at its height just right of the axes (moved apart to stay legible)."""
    low, high = ax.get_ylim()
    heights = [(value - low) / (high - low) for value, _, _ in references]
    lines = max([text.count("\n") + 1 for _, text, _ in references], default=1)
    for (value, text, style), at in zip(references, spread(heights, LABEL_GAP * lines)):
        ax.axhline(value, color=style["color"], linestyle=style["linestyle"], linewidth=1, alpha=0.7)
        ax.text(1.02, at, text, transform=ax.transAxes, color=style["color"], fontsize=7, va="center",
                clip_on=False)


def spread(heights: list[float], gap: float) -> list[float]:
    """The heights, in the order given, moved as little as needed to lie at least `gap` apart inside [0, 1]."""
    order = sorted(range(len(heights)), key=heights.__getitem__)
    placed = [min(max(heights[i], 0.0), 1.0) for i in order]
    for k in range(1, len(placed)):
        placed[k] = max(placed[k], placed[k - 1] + gap)
    for k in reversed(range(len(placed))):
        ceiling = 1.0 if k == len(placed) - 1 else placed[k + 1] - gap
        placed[k] = min(placed[k], ceiling)
    result = [0.0] * len(heights)
    for i, at in zip(order, placed):
        result[i] = at
    return result


def budget_axis(ax, budgets: list[int]) -> None:
    """Ticks at the measured budgets, in plain MiB; a log scale when they span more than 4x."""
    mib = [b / MiB for b in budgets]
    if mib and mib[-1] > 4 * mib[0]:
        ax.set_xscale("log")
        ax.set_xlim(mib[0] / 1.25, mib[-1] * 1.25)
    ax.xaxis.set_major_locator(FixedLocator(thinned(mib, ax.get_xscale() == "log")))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
    ax.set_xlabel("budget MiB")


def thinned(ticks: list[float], log: bool) -> list[float]:
    """Drops ticks too close to the one kept before them (under 1/8 of the span, in the axis's own scale)."""
    at = [math.log(t) for t in ticks] if log else list(ticks)
    span = (at[-1] - at[0]) or 1.0
    kept = [0] if ticks else []
    for i in range(1, len(ticks)):
        if at[i] - at[kept[-1]] >= span / 8:
            kept.append(i)
    return [ticks[i] for i in kept]


def plain_y(ax) -> None:
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
    ax.yaxis.get_major_formatter().set_scientific(False)


def against_loaders(records: list[dict], out: Path) -> Path | None:
    sweep = [r for r in records if r.get("loaders") is not None]
    if not sweep:
        return None
    fig, axes = grid(1)
    for (model,), rows in grouped(sweep, "model").items():
        points = sorted((r["loaders"], r["first_s"]) for r in rows)
        axes[0].plot([n for n, _ in points], [s for _, s in points], marker="o", label=model)
    axes[0].set(title="hermes, warm, by loading agents", xlabel="loading agents", ylabel="latency s")
    axes[0].set_ylim(0, 1.1 * max(r["first_s"] for r in sweep))
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    plain_y(axes[0])
    axes[0].legend(fontsize=7)
    return finish(fig, out / "latency-vs-loaders.png")


def decode_against_budget(records: list[dict], out: Path) -> Path | None:
    """Per model and batch: hermes tokens/s over its budgets, the budget-free strategies as labelled lines."""
    panels = grouped(records, "model", "batch")
    if not any(budgets_of(rows) for rows in panels.values()):
        return None
    if all(len(budgets_of(rows)) == 1 for rows in panels.values()):
        return decode_bars(records, out)
    fig, axes = grid(len(panels), columns=3)
    for ax, ((model, batch), rows) in zip(axes, panels.items()):
        decode_panel(ax, rows)
        ax.set_title(f"{model} ({rows[0]['precision']}), batch {batch}", fontsize=10)
        ax.set_ylabel("tokens/s")
        plain_y(ax)
    return finish(fig, out / "decode-vs-budget.png")


def decode_panel(ax, rows: list[dict]) -> None:
    hermes = sorted((r for r in rows if r["budget_bytes"]), key=lambda r: r["budget_bytes"])
    ax.plot([r["budget_bytes"] / MiB for r in hermes], [r["tokens_per_s"] for r in hermes], color="C3", marker="o",
            label="hermes")
    peers = [r for r in hermes if r["strategy"] != "hermes"]  # hermes at a peer's memory: its own marker
    if peers:
        ax.plot([r["budget_bytes"] / MiB for r in peers], [r["tokens_per_s"] for r in peers], "D", color="C1",
                label="hermes at llama.cpp's peak RSS (1x, 0.7x)")
    others = [r for r in rows if not r["budget_bytes"]]
    ax.set_ylim(0, 1.1 * max(r["tokens_per_s"] for r in rows))
    reference_lines(ax, [(r["tokens_per_s"], f"{r['strategy']}\n(peak {r['peak_rss'] / MiB:.0f} MiB)",
                          {"color": PEERS.get(r["strategy"], "C7"), "linestyle": "--"}) for r in others])
    budget_axis(ax, budgets_of(rows))
    ax.legend(fontsize=7, loc="best")


def decode_bars(records: list[dict], out: Path) -> Path:
    """One budget per model: per batch, a group of bars per model, one bar per strategy, each with its value."""
    batches = grouped(records, "batch")
    fig, axes = grid(len(batches), columns=2)
    for ax, ((batch,), rows) in zip(axes, batches.items()):
        models = list(dict.fromkeys(r["model"] for r in rows))
        names = list(dict.fromkeys(strategy_name(r) for r in rows))
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            values = [next((r["tokens_per_s"] for r in rows if r["model"] == m and strategy_name(r) == name), 0)
                      for m in models]
            bars = ax.bar([i + (k - (len(names) - 1) / 2) * width for i in range(len(models))], values, width,
                          label=name, color="C3" if name.startswith("hermes") else PEERS.get(name, "C7"))
            ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
        ax.set_xticks(range(len(models)), models, fontsize=8)
        ax.set_ylim(0, 1.3 * max(r["tokens_per_s"] for r in rows))  # room for the legend above the bars
        ax.set(title=f"decoding, batch {batch}", ylabel="tokens/s")
        ax.legend(fontsize=7, loc="upper right", ncol=len(names))
        plain_y(ax)
    return finish(fig, out / "decode-vs-budget.png")


def strategy_name(r: dict) -> str:
    return f"hermes at {r['budget']}" if r["strategy"] == "hermes" else r["strategy"]


def finish(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(paths: list[str]) -> int:
    for path in map(Path, paths):
        document = json.loads(path.read_text())
        for written in draw(document["kind"], document["records"], path.parent):
            print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
