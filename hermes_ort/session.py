"""hermes_ort.InferenceSession: the onnxruntime.InferenceSession API over a directory of streamed stages."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from .format import manifest as manifest_io
from .planning import profiles
from .generation.decode_plan import (Workload, decode_profile, has_transposed_layout, plan_generation,
                                     with_merged_cache)
from .generation.decoding import CacheLayout
from .errors import HermesError, InputError
from .planning.estimate import estimate_profile
from .engine.inputs import check_feed
from .format.manifest import TensorSpec
from .engine.memory import available, parse_budget, rss, warn_above_machine
from .model_cache import model_directory
from .format.pinned import PinnedDirectory
from .ort_api import (PROVIDER, UNSUPPORTED, ModelMetadata, budget_of, check_providers, log_severity_of,
                      threads_of)
from .engine.pipeline import Pipeline, Resident
from .engine.persistent import PersistentSessions
from .planning.planner import Plan, check_floor, plan
from .planning.profiles import Profile
from .engine.templates import Templates
from .engine.trace import Tracer

_ORT_TYPES = {"float32": "float", "float64": "double", "float16": "float16", "int64": "int64",
              "int32": "int32", "int8": "int8", "uint8": "uint8", "bool": "bool"}
HEADROOM = 0.8  # with no budget given, plan for this share of the memory the device has available


@dataclass(frozen=True)
class NodeArg:
    """Mirrors onnxruntime.NodeArg: name, ORT type string and shape with symbolic axes as strings."""

    name: str
    type: str
    shape: list

    @classmethod
    def of(cls, spec: TensorSpec) -> "NodeArg":
        return cls(spec.name, f"tensor({_ORT_TYPES.get(spec.dtype, spec.dtype)})", list(spec.shape))


def model_profile(directory: Path, manifest: manifest_io.Manifest, templates: Templates,
                  feed: Mapping[str, np.ndarray] | None = None) -> Profile:
    """profile.json when `hermes profile` has measured the model, else an estimate from weight sizes and
    the feed's shapes."""
    if (directory / profiles.PROFILE_NAME).is_file():
        return profiles.load(directory)
    return estimate_profile(manifest, templates, feed)


def in_this_process(profile: Profile, templates: Templates, held: Sequence[str] = ()) -> Profile:
    """The profile as this process can run it: its memory as the base when that is larger (what the app, a
    tokenizer, its own arrays already hold counts against the budget; SmolLM2's tokenizer: +40 MiB), less
    what the stages this session already `held` resident take (else the next plan would count them twice and
    keep fewer, and the one after more: gpt2-medium at 25% swung between 1 and 4 resident stages, 80 and
    228 MiB, from one generation to the next); and quantized stages prepacked only (unprepacked,
    MatMulNBits dequantizes its whole matrix every run: 10x slower, and SmolLM2 native streamed that way
    overshot its plan by 7%)."""
    packed_only = lambda s: dataclasses.replace(s, plain=s.prepacked) if templates.canonical[s.name].quantized else s
    holding = sum(min(s.plain.bytes, s.prepacked.bytes) for s in profile.stages if s.name in held)
    return dataclasses.replace(profile, base_bytes=max(profile.base_bytes, rss() - holding),
                               stages=tuple(packed_only(s) for s in profile.stages))


def quantized_prepacked(chosen: Plan, templates: Templates) -> Plan:
    """Quantized stages are always created prepacked (in_this_process costs them so)."""
    forced = tuple(n for n, form in templates.canonical.items() if form.quantized and n not in chosen.prepacked)
    return dataclasses.replace(chosen, prepacked=chosen.prepacked + forced) if forced else chosen


class InferenceSession:
    """Streams a model directory through ORT within `memory_budget` (bytes, "400MiB" or "25%" of the model's
    bytes; None: a share of the memory available now). Inputs are checked against the manifest before
    anything is loaded. Stages the plan keeps resident stay loaded until `close()`."""

    def __init__(self, path_or_bytes: str | os.PathLike | bytes, sess_options=None, providers=None,
                 memory_budget: int | str | None = None, plan_override: Plan | None = None,
                 tracer: Tracer | None = None, *, provider_options=None):
        """path_or_bytes: a model directory, an .onnx file (split on first use into the cache, see
        model_cache.py) or model bytes. onnxruntime's arguments are accepted: providers must include
        CPUExecutionProvider (provider_options are ignored); the budget comes from memory_budget, else sess_options' `hermes.memory_budget`
        entry, else $HERMES_ORT_MEMORY_BUDGET, else a share of the memory available now."""
        if isinstance(sess_options, (str, int)) and memory_budget is None:  # hermes-ort 0.1: (dir, budget)
            sess_options, memory_budget = None, sess_options
        check_providers(providers)
        self.sess_options = sess_options
        self._pin = PinnedDirectory(model_directory(path_or_bytes))  # this version, even after `hermes update`
        self.directory, self._root = self._pin.path, self._pin.root  # named in messages; read from
        try:
            self.manifest = manifest_io.load(self._root)
            memory_budget = budget_of(memory_budget, sess_options)
            self.budget = (parse_budget(memory_budget, self.manifest.bytes) if memory_budget is not None
                           else int(available() * HEADROOM))
            warn_above_machine(self.budget)
            templates = Templates(self._root, self.manifest)
            if plan_override is None:
                check_floor(in_this_process(model_profile(self._root, self.manifest, templates, None), templates),
                            self.budget)
        except BaseException as e:
            self._pin.close()
            raise self._pin.readable(e) if isinstance(e, HermesError) else e
        # the pass plan is made on first use: a session used only to generate never needs it
        self._pass_plan = self._as_the_app_asks(plan_override) if plan_override else None
        self._plan_override = plan_override
        self.last_generation_plan: Plan | None = None  # what the latest generation ran with (CLI stats)
        self._generation_plans: dict[tuple[Workload, int], Plan] = {}
        self.tracer = tracer
        self._resident = Resident(templates, log_severity=log_severity_of(sess_options),
                                  persistent=PersistentSessions.if_enabled())
        self._one_run_at_a_time = threading.Lock()  # passes share the resident stages and templates
        self._running_in: int | None = None  # the thread holding it

    @property
    def plan(self) -> Plan:
        """The plan of one pass at the profiled shape (profile.json, else estimated at the first run's input
        shapes); raises BudgetError when no plan fits. Generation plans its own step (generation_plan)."""
        return self._plan_for(None)

    def _plan_for(self, feed: Mapping[str, np.ndarray] | None) -> Plan:
        if self._pass_plan is None:
            profile = model_profile(self._root, self.manifest, self._resident.templates, feed)
            templates = self._resident.templates
            chosen = plan(in_this_process(profile, templates, self._resident.names(self.manifest)), self.budget)
            self._pass_plan = self._as_the_app_asks(quantized_prepacked(chosen, templates))
        return self._pass_plan

    def _as_the_app_asks(self, chosen: Plan) -> Plan:
        """The app's SessionOptions.intra_op_num_threads, when set, over the plan's compute threads."""
        threads = threads_of(self.sess_options)
        return dataclasses.replace(chosen, compute_threads=threads) if threads else chosen

    def get_providers(self) -> list[str]:
        return [PROVIDER]

    def get_provider_options(self) -> dict:
        return {PROVIDER: {}}

    def get_session_options(self):
        return self.sess_options

    def get_modelmeta(self) -> ModelMetadata:
        return ModelMetadata.of(self.manifest)

    def __getattr__(self, name: str):
        if name in UNSUPPORTED:
            raise NotImplementedError(f"hermes_ort.InferenceSession does not support {name}(): stages stream one "
                                      f"at a time, so use run(output_names, input_feed)")
        raise AttributeError(f"'InferenceSession' object has no attribute '{name}'")

    def get_inputs(self) -> list[NodeArg]:
        return [NodeArg.of(t) for t in self.manifest.inputs]

    def get_outputs(self) -> list[NodeArg]:
        return [NodeArg.of(t) for t in self.manifest.outputs]

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, np.ndarray],
            run_options=None) -> list[np.ndarray]:
        names = self._output_names(output_names)
        feed = check_feed(self.manifest, input_feed, self._resident.templates.index_bounds)
        with self._exclusive(), Pipeline(self._root, self.manifest, self._plan_for(feed), self._resident,
                                               self.tracer) as pipeline:
            outputs = pipeline.run(feed, run_options=run_options)
        return [outputs[n] for n in names]

    def generation_plan(self, work: Workload, reserve: int = 0) -> Plan:
        """The plan for decoding `work` within this session's budget less `reserve` bytes held beside it
        (a resident draft model's weights and cache) (see decode_plan.py)."""
        if self._plan_override is not None:
            return self._as_the_app_asks(self._plan_override)
        key = (work, reserve)
        if key not in self._generation_plans:  # one plan per workload: the same generation loads the same way
            templates, held = self._resident.templates, self._resident.names(self.manifest)
            profile = in_this_process(decode_profile(self._root, self.manifest, templates, work.batch), templates,
                                      held)
            layout = CacheLayout.of(self.manifest)
            chosen = plan_generation(profile, layout, self.manifest, work, self.budget - reserve,
                                     transposed=has_transposed_layout(templates))
            chosen = with_merged_cache(quantized_prepacked(chosen, templates), layout, self.manifest, work,
                                       templates.lookups())
            self._generation_plans[key] = self._as_the_app_asks(chosen)
        self.last_generation_plan = self._generation_plans[key]
        return self.last_generation_plan

    @contextlib.contextmanager
    def engine(self, plan: Plan | None = None, every_position: bool = False) -> Iterator[Pipeline]:
        """A pipeline kept across passes (one generation): its loaders run ahead into the next pass.
        Exclusive while open; its exit joins its threads (resident stages stay, as after run()).
        every_position: a pass may give the logits of several positions (speculative verification)."""
        with self._exclusive(), Pipeline(self._root, self.manifest, plan or self.plan, self._resident, self.tracer,
                                         cyclic=True, every_position=every_position) as pipeline:
            yield pipeline

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One pass or generation at a time; other threads wait, the thread already inside (a run() from
        within an open stream) is told instead of waiting for itself forever."""
        if self._pin.fd is None:
            raise HermesError(f"this session of {self.directory} is closed: open a new InferenceSession")
        if self._running_in == threading.get_ident():
            raise HermesError("this session is already running a pass or a generation on this thread: finish or "
                              "close the open stream first")
        with self._one_run_at_a_time:
            self._running_in = threading.get_ident()
            try:
                yield
            except HermesError as e:
                raise self._pin.readable(e) from e.__cause__
            finally:
                self._running_in = None

    def close(self) -> None:
        """Drops the resident sessions and lets go of the model's version (a retired one is then removed)."""
        self._resident.close()
        self._pin.close()

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _output_names(self, output_names: Sequence[str] | None) -> list[str]:
        known = [t.name for t in self.manifest.outputs]
        names = list(output_names) if output_names else known
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InputError(f"unknown outputs {unknown}; the model gives {known}")
        return names
