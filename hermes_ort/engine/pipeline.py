"""PipeLoad: loading agents prepare the next stages while the inference agent runs the current one, and a
daemon destroys each streamed session as soon as its stage has run.

A Pipeline is a context manager: its exit joins every thread and drops every session it made, on
success, on error and on KeyboardInterrupt. It serves one pass over the stages, or (`cyclic`, for
decoding: generation steps) as many passes as `run()` is called, the loaders running ahead into the next
pass: the window wraps from the head back to block 0. Stages the plan keeps resident are handed to a `Resident` store
that outlives the pipeline, so later passes and later pipelines skip them.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from . import loading
from .chain import OutputSink, Prepared, run_chain
from ..errors import HermesError, RunTerminated, StageError
from ..format.manifest import Manifest, StageSpec
from .memory import give_back
from .merged import MergedStages, mergeable_runs
from .persistent import PersistentSessions
from .plan import Plan
from .sessions import SessionConfig
from .templates import Templates
from .trace import NullTracer, Tracer

POLL_S = 0.05  # waits wake this often so KeyboardInterrupt reaches the inference agent


@dataclass
class Resident:
    """What outlives a pass: prepared stages the plan keeps, by index (a merged run under each of its
    indices), the shared template sessions and the persistent ones. `close()` drops them all."""

    templates: Templates | None = None
    stages: dict[int, Prepared] = field(default_factory=dict)
    log_severity: int = 3  # of every ORT session this InferenceSession creates
    persistent: PersistentSessions | None = None  # quantized stages' sessions kept for the process (persistent.py)
    cold: bool = False  # every streamed stage's files leave the page cache after its use (a board's view)

    def names(self, manifest: Manifest) -> tuple[str, ...]:
        return tuple(manifest.stages[i].name for i in self.stages)

    def keep_only(self, names: set[str], manifest: Manifest, batched: bool = False, decoding: bool = False) -> None:
        """Drops resident stages a new plan streams, so they do not count beside its window, template
        stages prepared for the other layout (a pass's after a generation's, and back), and, before a
        pass that is no generation, stages only a generation step runs through a template (a head part:
        3x slower so at a pass's many positions)."""
        for i in [i for i, p in self.stages.items() if manifest.stages[i].name not in names
                  or getattr(p, "batched", batched) != batched or (getattr(p, "steps_only", False) and not decoding)]:
            self.drop(i)

    def drop(self, i: int) -> None:
        """Closes what stage i runs through; a merged run it belongs to is dropped whole."""
        prepared = self.stages.pop(i, None)
        if isinstance(prepared, MergedStages):
            for k in range(prepared.start, prepared.stop):
                self.stages.pop(k, None)
        if prepared is not None:
            prepared.close()

    def merge_runs(self, directory: Path, manifest: Manifest, plan: Plan, decoding: bool = False) -> None:
        """Every maximal run of stages the plan keeps resident and prepacked as one session (engine/merged.py),
        made once: a later plan with the same runs reuses them. A plan streaming nothing spins its threads."""
        lookups = self.templates.lookups() if self.templates else set()
        runs = mergeable_runs(manifest, plan, lookups, decoding)
        alone = len(runs) == 1 and not any(plan.streams(s.name) for s in manifest.stages)
        for start, stop in runs:
            held = self.stages.get(start)
            if isinstance(held, MergedStages) and (held.start, held.stop, held.spinning) == (start, stop, alone):
                continue
            for i in range(start, stop):
                self.drop(i)
                if self.templates is not None:  # each file hashed on first load, as a loader does (also a read)
                    self.templates.integrity.stage(manifest.stages[i])
            config = dataclasses.replace(stage_config(plan, manifest.stages[start], self.log_severity), spinning=alone)
            merged = MergedStages(directory, manifest, start, stop, config, decoding)
            self.stages.update(dict.fromkeys(range(start, stop), merged))

    def close(self) -> None:
        for prepared in self.stages.values():
            prepared.close()
        self.stages.clear()
        if self.templates is not None:
            self.templates.close()
        if self.persistent is not None:
            self.persistent.close()
        give_back()


def stage_config(plan: Plan, stage: StageSpec, log_severity: int = 3) -> SessionConfig:
    """Streamed stages run beside loaders: no spinning threads to steal their cores."""
    return SessionConfig(intra_op_threads=plan.compute_threads, prepacking=stage.name in plan.prepacked,
                         spinning=False, log_severity=log_severity)


class Schedule:
    """What loaders load, position by position: the stages not yet resident, in order, then (cyclic) the
    streamed stages again and again."""

    def __init__(self, first: list[int], cycle: list[int], cyclic: bool):
        self.first, self.cycle = first, cycle if cyclic else []

    def __getitem__(self, position: int) -> int | None:
        if position < len(self.first):
            return self.first[position]
        if not self.cycle:
            return None
        return self.cycle[(position - len(self.first)) % len(self.cycle)]


class Pipeline:
    def __init__(self, directory: Path, manifest: Manifest, plan: Plan, resident: Resident,
                 tracer: Tracer | None = None, cyclic: bool = False, every_position: bool = False):
        """every_position: a cyclic pipeline's heads run on their own, so a pass may ask for the logits of
        several last positions (no merged run that keeps only the last)."""
        self.directory, self.manifest, self.plan, self.resident = directory, manifest, plan, resident
        self.tracer = tracer or NullTracer()
        self.every_position = every_position
        steps = cyclic and not every_position
        resident.keep_only(set(plan.resident), manifest, plan.batched_layout, decoding=steps)
        if plan.merge_resident:
            resident.merge_runs(directory, manifest, plan, decoding=steps)
        self.cyclic = cyclic
        count = range(len(manifest.stages))
        self.schedule = Schedule([i for i in count if i not in resident.stages],
                                 [i for i in count if plan.streams(manifest.stages[i].name)], cyclic)
        self.last_use = manifest.last_use()
        self.ready: dict[int, Prepared] = {}  # by schedule position
        self.claimed = 0  # schedule positions handed to loaders
        self.used = 0  # schedule positions the inference agent has taken
        self.running: dict[int, int] = {}  # stage index -> schedule position, while it runs
        self.in_window = 0  # streamed sessions loading, ready or not yet destroyed
        self.error: BaseException | None = None
        self.run_options = None  # of the pass running now
        self.stopping = False
        self.cond = threading.Condition()
        self.trash: queue.Queue = queue.Queue()
        self.loaders = [threading.Thread(target=self._loader, name=f"loader-{k}", daemon=True)
                        for k in range(plan.loaders)]
        self.daemon = threading.Thread(target=self._daemon, name="daemon", daemon=True)

    def __enter__(self) -> "Pipeline":
        for t in (*self.loaders, self.daemon):
            t.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for t in self.loaders:
            t.join()
        for position, prepared in list(self.ready.items()):  # prepared but never run (error, interrupt, the
            self._discard(self.schedule[position], prepared)  # next pass of a finished generation)
        self.ready.clear()
        self.trash.put(None)
        self.daemon.join()
        if exc_type is None and self.error is not None:  # a stage failed to close after the last run
            raise self.error

    def run(self, feed: Mapping[str, np.ndarray], decoding: bool = False, run_options=None,
            sink: OutputSink | None = None, head_positions: int = 1) -> dict[str, np.ndarray]:
        """The inference agent: one pass over every stage, in order, on the caller's thread (decoding, sink,
        head_positions: see run_chain; more than one needs every_position). An onnxruntime RunOptions whose
        `terminate` is set (from any thread) stops the pass before its next stage."""
        if head_positions != 1 and not self.every_position:
            raise ValueError("logits of several positions per pass need Pipeline(every_position=True)")
        self.run_options = run_options
        return run_chain(self.manifest, feed, self._prepared_for, self._after_run, self._traced, self.last_use,
                         decoding, sink, head_positions)

    def _traced(self, i: int):
        return self.tracer.span(f"run {self.manifest.stages[i].name}", "run", thread="inference")

    def _prepared_for(self, i: int) -> Prepared:
        if self.run_options is not None and self.run_options.terminate:
            raise RunTerminated(f"run stopped by run_options.terminate before {self.manifest.stages[i].describe()}")
        if i in self.resident.stages:
            return self.resident.stages[i]
        position = self.used
        assert self.schedule[position] == i, "the inference agent runs stages in schedule order"
        self.used += 1
        self.running[i] = position
        with self.cond:
            while position not in self.ready:
                if self.error is not None:
                    raise self.error
                self.cond.wait(POLL_S)
            return self.ready[position]

    def _after_run(self, i: int) -> None:
        if i not in self.running:
            return
        with self.cond:
            prepared = self.ready.pop(self.running.pop(i))
        if self.plan.streams(self.manifest.stages[i].name):
            self._discard(i, prepared)
        else:
            self.resident.stages[i] = prepared
            with self.cond:  # resident stages hold no window slot once they have run
                self.in_window -= 1
                self.cond.notify_all()

    def _discard(self, i: int, prepared: Prepared) -> None:
        self.trash.put((i, prepared))

    def _claim(self) -> tuple[int, int] | None:
        """(schedule position, stage index) to load next once the window has room; None when there is
        nothing left or the pipeline stops."""
        with self.cond:
            while not self.stopping and self.error is None and self.schedule[self.claimed] is not None and (
                    self.in_window >= self.plan.window):
                self.cond.wait(POLL_S)
            i = self.schedule[self.claimed]
            if self.stopping or self.error is not None or i is None:
                return None
            self.claimed += 1
            self.in_window += 1
            return self.claimed - 1, i

    def _loader(self) -> None:
        while (claim := self._claim()) is not None:
            position, i = claim
            stage = self.manifest.stages[i]
            try:
                with self.tracer.span(f"load {stage.name}", "load"):
                    config = stage_config(self.plan, stage, self.resident.log_severity)
                    prepared = loading.prepare(self.directory, stage, config, self.resident.templates,
                                               self.plan.batched_layout, self.cyclic, self.resident.persistent)
            except BaseException as e:  # reaches the caller through _prepared_for, named by stage
                with self.cond:
                    self.error = e if isinstance(e, HermesError) else StageError(
                        f"{stage.describe()}: loading failed: {type(e).__name__}: {e}")
                    self.cond.notify_all()
                return
            with self.cond:
                self.ready[position] = prepared
                self.cond.notify_all()

    def _daemon(self) -> None:
        while (item := self.trash.get()) is not None:
            i, prepared = item
            stage = self.manifest.stages[i]
            try:
                with self.tracer.span(f"destroy {stage.name}", "destroy"):
                    prepared.close()  # unmaps a template stage's weights; an owned session also trims the heap
                    if self.resident.cold:
                        loading.evict(self.directory, stage)
                        if self.resident.persistent is not None:
                            self.resident.persistent.evict(stage)
            except BaseException as e:  # reaches the caller like a loading failure; the slot is freed anyway
                with self.cond:
                    self.error = self.error or StageError(f"{stage.describe()}: closing failed: {e}")
            finally:
                del prepared, item
                with self.cond:
                    self.in_window -= 1
                    self.cond.notify_all()
