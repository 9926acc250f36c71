"""`hermes cluster plan`: the placement of a model's stage ranges on the boards named, as a table."""
from __future__ import annotations

from ..engine.memory import available, format_bytes
from ..format import manifest as manifest_io
from ..generation.decoding import CacheLayout
from .boards import BoardSpec, boards_of, process_floor, profile_of, stage_loads
from .placement import RAY_WORKER_BYTES, Placement, StageLoad, place


def cmd_cluster_plan(args) -> None:
    manifest = manifest_io.load(args.model_dir)
    profile = profile_of(args.model_dir, manifest)
    has_cache = any(t.name.startswith("past.") for t in manifest.inputs)
    length = min(args.context, CacheLayout.of(manifest).max_positions or args.context) if has_cache else 0
    loads = stage_loads(manifest, profile, args.batch, length)
    specs: list[BoardSpec] = args.board
    placement = place(boards_of(specs, profile, available()), loads, process_floor(profile))
    print(f"{len(manifest.stages)} stages, {format_bytes(sum(s.bytes for s in loads))} resident, KV cache "
          f"{format_bytes(sum(s.kv_bytes for s in loads))} for {args.batch} row(s) x {length} positions; per "
          f"board: Ray {format_bytes(RAY_WORKER_BYTES)} + hermes process {format_bytes(process_floor(profile))}")
    print(table(placement, loads, {b.name: b for b in specs}))
    print(f"slowest range {placement.predicted_s * 1000:.1f} ms per pass; "
          f"{'every stage resident' if placement.resident else 'some stages streamed from disk every pass'}; "
          f"{len(placement.assignments)} of {len(specs)} boards used")


def table(placement: Placement, loads: list[StageLoad], specs: dict[str, BoardSpec]) -> str:
    rows = [("board", "budget", "stages", "first", "last", "need", "streamed/pass", "predicted")]
    for a in placement.assignments:
        inside = loads[a.range.start:a.range.stop]
        budget = specs[a.board].memory_budget
        rows.append((a.board, format_bytes(budget) if budget is not None else "free", f"[{a.range.start}, "
                     f"{a.range.stop})", inside[0].name, inside[-1].name, format_bytes(a.need_bytes),
                     format_bytes(a.streamed_bytes), f"{a.predicted_s * 1000:.1f} ms"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
