"""The `hermes split`, `profile`, `plan`, `run`, `verify` and `update` commands: a model's stages and one pass
through them, as plain functions over parsed arguments (the parser lives in __main__.py)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .commands import print_generation_plan
from .format.manifest import weights_note
from .engine.memory import format_bytes, parse_budget, peak_rss


def cmd_split(args) -> None:
    from .graphs.split import SplitRequest, split_model

    manifest = split_model(args.model, args.out, SplitRequest(stages=args.stages, cuts=tuple(args.cut or ())))
    print(f"split {args.model}: {len(manifest.stages)} stages, {format_bytes(manifest.bytes)} -> {args.out}")
    for s in manifest.stages:
        print(f"  {s.name:<12} {format_bytes(s.bytes):>11}  {len(s.inputs)} in, {len(s.outputs)} out")


def axes(args) -> dict:
    return {"batch": args.batch, "sequence": args.sequence}


def decode_axes(args, manifest) -> dict:
    """A one-token step at the longest context: the model's positions, at most 1024, unless --max-length."""
    from .generation.decoding import CacheLayout

    longest = args.max_length or min(CacheLayout.of(manifest).max_positions or 1024, 1024)
    return {"batch": args.batch, "sequence": 1, "past_sequence": longest - 1}


def cmd_profile(args) -> None:
    import dataclasses

    from .format import manifest as manifest_io
    from .planning import profiles
    from .engine.feeds import synthetic_feed
    from .format.batched_layout import load_layout
    from .planning.profiler import prefill_bytes, profile_model
    from .generation.decode_plan import decode_profile_name
    from .planning.report import profile_table

    manifest = manifest_io.load(args.model_dir)
    sizes = decode_axes(args, manifest) if args.decode else axes(args)
    batched = args.decode and load_layout(Path(args.model_dir), manifest) is not None
    profile = profile_model(Path(args.model_dir), manifest, synthetic_feed(manifest, sizes), sizes, args.threads,
                            batched=batched, decoding=args.decode)
    if args.decode:
        prompt = {"batch": args.batch, "sequence": args.prompt, "past_sequence": 0}
        held = prefill_bytes(Path(args.model_dir), manifest, synthetic_feed(manifest, prompt), args.threads)
        profile = dataclasses.replace(profile, prefill_bytes=held, prefill_sequence=args.prompt)
    print(profile_table(profile))
    name = decode_profile_name(args.batch) if args.decode else profiles.PROFILE_NAME
    saved = profiles.save(profile, args.model_dir, name)
    print(f"profiled {args.model_dir}{weights_note(manifest)}: saved {saved}")


def cmd_plan(args) -> None:
    from .format import manifest as manifest_io
    from .planning.planner import default_budgets, plan, plan_table
    from .planning.report import plan_rows, plan_text
    from .session import model_profile

    from .engine.templates import Templates

    manifest = manifest_io.load(args.model_dir)
    if args.decode:
        return print_generation_plan(args, manifest)
    profile = model_profile(Path(args.model_dir), manifest, Templates(Path(args.model_dir), manifest))
    print(f"plans for {args.model_dir}{weights_note(manifest)}")
    if args.budget:
        print(plan_text(plan(profile, parse_budget(args.budget, manifest.bytes), args.cold)))
    else:
        print(plan_rows(plan_table(profile, default_budgets(profile), args.cold)))


def cmd_run(args) -> None:
    import numpy as np

    from .engine.feeds import synthetic_feed
    from .session import InferenceSession
    from .engine.trace import Tracer

    from .format import manifest as manifest_io
    from .planning.profiles import PROFILE_NAME

    tracer = Tracer() if args.trace else None
    budget = parse_budget(args.budget, manifest_io.load(args.model_dir).bytes) if args.budget else None
    if not (Path(args.model_dir) / PROFILE_NAME).is_file():
        print(f"hermes: no {PROFILE_NAME} in {args.model_dir}: planning from weight sizes; "
              f"`hermes profile {args.model_dir}` measures a better plan", file=sys.stderr)
    start = time.perf_counter()
    with InferenceSession(args.model_dir, memory_budget=budget, tracer=tracer) as session:
        feed = dict(np.load(args.inputs)) if args.inputs else synthetic_feed(session.manifest, axes(args))
        outputs = session.run(None, feed)
        names = [o.name for o in session.get_outputs()]
    seconds = time.perf_counter() - start
    p = session.plan
    print(f"ran {args.model_dir}{weights_note(session.manifest)} in {seconds:.3f} s, "
          f"peak RSS {format_bytes(peak_rss())} "
          f"(budget {format_bytes(p.budget)}; plan: {p.loaders} loaders, window {p.window}, "
          f"{len(p.resident)} resident)")
    if args.out:
        np.savez(args.out, **dict(zip(names, outputs)))
        print(f"outputs -> {args.out}")
    if tracer:
        tracer.save(args.trace)
        print(f"trace -> {args.trace}")


def cmd_verify(args) -> None:
    from .format import manifest as manifest_io

    manifest = manifest_io.load(args.model_dir, deep=True)
    files = {f.path for s in manifest.stages for f in s.files} | {f.path for f in manifest.files}
    print(f"{args.model_dir}{weights_note(manifest)}: {len(manifest.stages)} stages, {len(files)} files, "
          f"every size and sha256 as the manifest says")


def cmd_update(args) -> None:
    from .format.update import update_model

    r = update_model(args.model_dir, args.new_dir)
    old = (f"the old version waits at {r.retired} until the sessions reading it close" if r.retired
           else "the old version is removed")
    print(f"updated {args.model_dir} from {args.new_dir}: {len(r.copied)} files copied "
          f"({format_bytes(r.copied_bytes)}), {len(r.linked)} unchanged (hard links); {old}")
