"""Plain-text tables for the CLI: profiles and plans."""
from __future__ import annotations

from ..engine.memory import format_bytes
from .planner import Plan
from .profiles import Profile


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def profile_table(profile: Profile) -> str:
    rows = [[s.name, format_bytes(s.file_bytes), f"{s.plain.load_cold_s * 1e3:.1f}", f"{s.plain.load_warm_s * 1e3:.1f}",
             f"{s.plain.run_s * 1e3:.1f}", format_bytes(s.plain.bytes), f"{s.prepacked.load_warm_s * 1e3:.1f}",
             f"{s.prepacked.run_s * 1e3:.1f}", format_bytes(s.prepacked.bytes)] for s in profile.stages]
    head = ["stage", "file", "cold ms", "warm ms", "run ms", "resident", "pp load", "pp run", "pp resident"]
    return (table(head, rows) + f"\nbase RSS {format_bytes(profile.base_bytes)}, tensors in flight "
            f"{format_bytes(profile.transient_bytes)}, disk {profile.disk_bytes_per_s / 1e9:.2f} GB/s, "
            f"{profile.compute_threads} compute threads; pp = prepacking on")


def plan_rows(plans: list[Plan]) -> str:
    rows = [[format_bytes(p.budget), str(p.loaders), str(p.window), str(len(p.resident)), str(len(p.prepacked)),
             f"{p.predicted_first_s * 1e3:.0f}", f"{p.predicted_steady_s * 1e3:.0f}",
             format_bytes(p.predicted_peak_bytes)] for p in plans]
    head = ["budget", "loaders", "window", "resident", "prepacked", "first ms", "steady ms", "peak"]
    return table(head, rows)


def plan_text(plan: Plan) -> str:
    return (f"plan for budget {format_bytes(plan.budget)}:\n" + plan_rows([plan]) + f"\nresident: {', '.join(plan.resident) or 'none'}"
            f"\nprepacked: {', '.join(plan.prepacked) or 'none'}"
            f"\ncompute threads: {plan.compute_threads}" + (
                "\nbatched layout: template stages read their matrices transposed (hermes batched)" if plan.batched_layout else ""))
