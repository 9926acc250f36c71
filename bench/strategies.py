"""The strategies the benchmark compares; each runs once in a fresh process (ru_maxrss is a lifetime peak).

whole       whole-model ORT (the stages merged back into one graph), default session options
sequential  one stage at a time: create, run, destroy (load-run-free)
pipeswitch  pipelined loading that never frees: loaders run ahead with no window, nothing is destroyed
hermes      the planner's plan for the budget
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from hermes_ort import InferenceSession
from hermes_ort.engine.chain import run_chain
from hermes_ort.format.manifest import Manifest
from hermes_ort.graphs.merge import merge_stages
from hermes_ort.planning.planner import Plan, make_plan
from hermes_ort.session import in_this_process, model_profile
from hermes_ort.engine.sessions import SessionConfig, open_stage
from hermes_ort.engine.prepared import OwnedStage


def whole(directory: Path, manifest: Manifest, feed: dict, budget: int) -> tuple[dict, float, float]:
    path = directory / "whole_model.onnx"
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, feed)
    first = time.perf_counter() - start
    steady = []
    for _ in range(3):
        start = time.perf_counter()
        session.run(None, feed)
        steady.append(time.perf_counter() - start)
    return dict(zip([o.name for o in session.get_outputs()], outputs)), first, float(np.median(steady))


def sequential(directory: Path, manifest: Manifest, feed: dict, budget: int) -> tuple[dict, float, float]:
    start = time.perf_counter()
    defaults = SessionConfig(optimization="all", shared_arena=False)  # ORT's own defaults, as users run it
    outputs = run_chain(manifest, feed, lambda i: OwnedStage(manifest.stages[i],
                                                            open_stage(directory, manifest.stages[i], defaults)))
    return outputs, time.perf_counter() - start, float("nan")


def pipeswitch(directory: Path, manifest: Manifest, feed: dict, budget: int) -> tuple[dict, float, float]:
    names = tuple(s.name for s in manifest.stages)
    keep_all = Plan(budget, loaders=1, window=len(names), resident=names, prepacked=names, compute_threads=0,
                    predicted_first_s=0, predicted_steady_s=0, predicted_peak_bytes=0)
    return _timed(directory, feed, dict(plan_override=keep_all))


def hermes(directory: Path, manifest: Manifest, feed: dict, budget: int, loaders: int = 0) -> tuple[dict, float, float]:
    """The planner's plan for the budget; with `loaders`, the best plan with this many loading agents and a
    window as wide where one fits (the paper's sweep), its resident stages picked again for that window:
    widening the chosen plan's window alone took GPT-2 medium's 25% row to 358 MiB over 339. Where no
    window that wide fits the budget, the widest that does: the extra loaders wait."""
    if not loaders:
        return _timed(directory, feed, dict(memory_budget=budget))
    with InferenceSession(directory, memory_budget=budget) as planning:
        chosen, templates = planning.plan, planning._resident.templates
        profile = in_this_process(model_profile(directory, manifest, templates, feed), templates)
    return _timed(directory, feed, dict(memory_budget=budget, plan_override=swept_plan(profile, chosen, loaders)))


def swept_plan(profile, chosen: Plan, loaders: int) -> Plan:
    """The plan with `loaders` loading agents and the widest window up to max(chosen.window, loaders) that
    fits the chosen plan's budget (the chosen window always does)."""
    for window in range(max(chosen.window, loaders), chosen.window - 1, -1):
        swept = make_plan(profile, chosen.budget, loaders, window, cold=False)
        if swept is not None:
            return swept
    return dataclasses.replace(chosen, loaders=loaders)


def _timed(directory: Path, feed: dict, options: dict) -> tuple[dict, float, float]:
    start = time.perf_counter()
    with InferenceSession(directory, **options) as session:
        outputs = session.run(None, feed)
        first = time.perf_counter() - start
        start = time.perf_counter()
        session.run(None, feed)
        second = time.perf_counter() - start
        names = [o.name for o in session.get_outputs()]
    return dict(zip(names, outputs)), first, second


STRATEGIES = {"whole": whole, "sequential": sequential, "pipeswitch": pipeswitch, "hermes": hermes}


def prepare_whole(directory: Path, manifest: Manifest) -> None:
    if not (directory / "whole_model.onnx").is_file():
        merge_stages(directory, manifest)
