"""The pictures readers decide from (matplotlib, the `bench` extra): single-pass latency and peak RSS against
the budget for every strategy, latency against the number of loading agents (the paper's sweep), and decode
tokens/s against the budget per model and precision."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display on a board or in CI
import matplotlib.pyplot as plt  # noqa: E402

MiB = 2**20


def draw(kind: str, records: list[dict], out: Path) -> list[Path]:
    if kind == "run":
        return [p for p in (against_budget(records, out, "first_s", "latency s", "latency-vs-budget.png"),
                            against_budget(records, out, "peak_rss", "peak RSS MiB", "peak-rss-vs-budget.png"),
                            against_loaders(records, out)) if p]
    if kind == "generate":
        return [p for p in (decode_against_budget(records, out),) if p]
    return []  # other kinds (accuracy, cold decoding): their one table says it all


def by_model(records: list[dict]) -> dict[str, list[dict]]:
    models: dict[str, list[dict]] = {}
    for r in records:
        models.setdefault(r["model"], []).append(r)
    return models


def grid(count: int):
    fig, axes = plt.subplots(1, count, figsize=(4.2 * count, 3.6), squeeze=False)
    return fig, axes[0]


def against_budget(records: list[dict], out: Path, field: str, label: str, name: str) -> Path | None:
    """Hermes at each budget as a line, the budget-free strategies as flat lines; warm solid, cold dashed."""
    swept = [r for r in records if r.get("loaders") is None]
    if not swept:
        return None
    models = by_model(swept)
    fig, axes = grid(len(models))
    scale = MiB if field == "peak_rss" else 1
    for ax, (model, rows) in zip(axes, models.items()):
        budgets = sorted({r["budget_bytes"] for r in rows if r["strategy"] == "hermes"})
        colors = {s: f"C{k}" for k, s in enumerate(dict.fromkeys(r["strategy"] for r in rows))}
        for mode, style in (("warm", "-"), ("cold", "--")):
            for strategy, color in colors.items():
                points = sorted((r["budget_bytes"], r[field]) for r in rows
                                if r["strategy"] == strategy and r["mode"] == mode)
                if not points:
                    continue
                if strategy != "hermes":  # measured once: it does not read the budget
                    points = [(b, points[0][1]) for b in budgets] or points
                ax.plot([b / MiB for b, _ in points], [v / scale for _, v in points], style, marker="o",
                        color=color, label=f"{strategy} {mode}")
        if field == "peak_rss":
            ax.plot([b / MiB for b in budgets], [b / MiB for b in budgets], ":", color="grey", label="budget")
        ax.set(title=model, xlabel="budget MiB", ylabel=label)
    axes[0].legend(fontsize=7)
    return finish(fig, out / name)


def against_loaders(records: list[dict], out: Path) -> Path | None:
    sweep = [r for r in records if r.get("loaders") is not None]
    if not sweep:
        return None
    fig, axes = grid(1)
    for model, rows in by_model(sweep).items():
        points = sorted((r["loaders"], r["first_s"]) for r in rows)
        axes[0].plot([n for n, _ in points], [s for _, s in points], marker="o", label=model)
    axes[0].set(title="hermes, warm, by loading agents", xlabel="loading agents", ylabel="latency s")
    axes[0].legend(fontsize=7)
    return finish(fig, out / "latency-vs-loaders.png")


def decode_against_budget(records: list[dict], out: Path) -> Path | None:
    hermes = [r for r in records if r["strategy"] == "hermes"]
    if not hermes:
        return None
    batches = sorted({r["batch"] for r in hermes})
    fig, axes = grid(len(batches))
    for ax, batch in zip(axes, batches):
        for model, rows in by_model([r for r in hermes if r["batch"] == batch]).items():
            points = sorted((r["budget_bytes"], r["tokens_per_s"]) for r in rows)
            ax.plot([b / MiB for b, _ in points], [t for _, t in points], marker="o",
                    label=f"{model} ({rows[0]['precision']})")
        ax.set(title=f"decoding, batch {batch}", xlabel="budget MiB", ylabel="tokens/s", xscale="log")
        ax.legend(fontsize=7)
    return finish(fig, out / "decode-vs-budget.png")


def finish(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
