"""hermes_ort.cluster.Pipeline: a model's stage ranges on several boards, one Ray actor per board.

Over a Ray cluster the caller has connected (`ray.init(address=...)`). Each board's actor is pinned to its
node by that board's custom resource and holds a hermes InferenceSession over its range `[start, stop)`
under the board's budget less Ray's share. Between boards only what the manifest's flow says crosses: the
hidden state (with the embeddings' small per-position tensors: rotary tables, the mask row), and the sampled
ids back to the first board; each board keeps its own layers' KV cache. Each call of a generation is one
chain of actor calls whose arguments are the previous boards' results, so the boards hand tensors to each
other directly and work on several requests at once. Every wait has a timeout; a lost board is a BoardError
naming it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from ..engine.inputs import check_feed
from ..engine.memory import available
from ..errors import InputError
from ..format import manifest as manifest_io
from ..generation.decoding import CacheLayout, check_prompt, prompt_positions
from ..generation.generate import eos_ids, sampling_of
from ..generation.sampling import Sampling
from .boards import BoardSpec, boards_of, process_floor, profile_of, stage_loads
from .placement import Placement, place
from .ranges import RangeFlow, StageRange, check_ranges, flow
from .ray_api import BoardError, chained_get, get, need_ray
from .worker import RangeWorker

PIN = 0.001  # of a board's custom resource: enough to pin the actor to its node, never a limit
_ids = itertools.count()


class Pipeline:
    """boards: one dict (or BoardSpec) per board, in pipeline order: {"resources": {"board0": 1},
    "memory_budget": "2GiB"}; placement: the ranges to run (else placed from the model's profile for
    `max_in_flight` requests of `context` positions). timeout_s bounds every wait on a board."""

    def __init__(self, model_dir: str | Path, boards: Sequence[dict | BoardSpec] | None = None,
                 placement: Placement | None = None, *, max_in_flight: int = 8, context: int = 1024,
                 timeout_s: float = 60.0):
        self._ray = need_ray()
        self.directory = Path(model_dir).resolve()
        self.manifest = manifest_io.load(self.directory)
        self.specs = [BoardSpec.of(b, i) for i, b in enumerate(boards or ())] or specs_of(placement)
        self.placement = placement or self._place(max_in_flight, context)
        check_ranges(self.manifest, list(self.placement.ranges))
        self.flows = [flow(self.manifest, r) for r in self.placement.ranges]
        self.producers = producers(self.flows)
        self.timeout_s, self._slots = timeout_s, threading.BoundedSemaphore(max_in_flight)
        self._actors: list[tuple[str, object]] = []
        self.boards: dict[str, dict] = {}  # board -> what its actor reported when it started
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    @property
    def ranges(self) -> tuple[StageRange, ...]:
        return self.placement.ranges

    def _place(self, max_in_flight: int, context: int) -> Placement:
        profile = profile_of(self.directory, self.manifest)
        layout_length = min(context, CacheLayout.of(self.manifest).max_positions or context) if any(
            t.name.startswith("past.") for t in self.manifest.inputs) else 0
        loads = stage_loads(self.manifest, profile, max_in_flight, layout_length)
        return place(boards_of(self.specs, profile, available()), loads, process_floor(profile))

    def _start(self) -> None:
        worker = self._ray.remote(RangeWorker)
        spec = {s.name: s for s in self.specs}
        for a in self.placement.assignments:
            if a.board not in spec:
                raise InputError(f"the placement names board '{a.board}', which is not among {sorted(spec)}")
            b = spec[a.board]
            actor = worker.options(num_cpus=0, resources={k: PIN for k in b.resources}, max_concurrency=1,
                                   max_restarts=0, max_task_retries=0).remote(
                b.name, str(self.directory), self.manifest.to_json(), a.range.start, a.range.stop,
                b.session_budget())
            self._actors.append((b.name, actor))
        for name, actor in self._actors:
            try:
                self.boards[name] = get(actor.ready.remote(), name, "starting", self.timeout_s)
            except BoardError as e:
                raise BoardError(f"{e} (is a node with resources {spec[name].resources} connected?)") from e

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, np.ndarray],
            run_options=None) -> list[np.ndarray]:
        """As InferenceSession.run: one pass over every board, the model's outputs gathered from each."""
        known = [t.name for t in self.manifest.outputs]
        names = list(output_names) if output_names else known
        if unknown := [n for n in names if n not in known]:
            raise InputError(f"unknown outputs {unknown}; the model gives {known}")
        feed = check_feed(self.manifest, input_feed)
        forward, made = [], {}
        outputs = []
        for k, (name, actor) in enumerate(self._actors):
            model = {n: feed[n] for n in self.flows[k].from_model}
            f, o = actor.run.options(num_returns=2).remote(model, *[forward[j] for j in self.producers[k]])
            forward.append(f)
            outputs.append((name, o))
        for name, ref in outputs:
            made |= get(ref, name, "a run", self.timeout_s)
        return [made[n] for n in names]

    def stream(self, input_ids: np.ndarray, max_new_tokens: int, *, attention_mask: np.ndarray | None = None,
               eos_token_id: int | Sequence[int] | None = None, **sampling) -> Iterator[np.ndarray]:
        """As hermes_ort.stream: the next token of every row [B] per step, prompts LEFT-padded."""
        choice = sampling_of(sampling)
        ids, mask = check_prompt(input_ids, attention_mask, max_new_tokens, CacheLayout.of(self.manifest))
        return self._tokens(ids, mask, max_new_tokens, eos_ids(eos_token_id), choice)

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
                 *, attention_mask: np.ndarray | None = None, **sampling) -> np.ndarray:
        """As hermes_ort.generate: prompt ids [B, S] -> [B, S + n], n <= max_new_tokens."""
        ids = np.asarray(input_ids)
        tokens = list(self.stream(ids, max_new_tokens, attention_mask=attention_mask, eos_token_id=eos_token_id,
                                  **sampling))
        return np.concatenate([ids.astype(np.int64), *[t[:, None] for t in tokens]], axis=1)

    def _tokens(self, ids, mask, max_new_tokens: int, eos: np.ndarray, choice: Sampling) -> Iterator[np.ndarray]:
        if max_new_tokens == 0:
            return
        done = np.zeros(ids.shape[0], bool)
        with self._slots, self._request() as request:
            feed = {"input_ids": ids, "position_ids": prompt_positions(mask), "attention_mask": mask}
            token = self._step(request, feed, {"sampling": dataclasses.asdict(choice), "prompt": ids, "mask": mask})
            for n in range(max_new_tokens):
                token = np.where(done, eos[0] if eos.size else 0, token)
                done |= np.isin(token, eos)
                yield token
                if done.all() or n == max_new_tokens - 1:
                    return
                positions = mask.sum(axis=1, keepdims=True)  # [B, 1]: each row's count of real tokens
                mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
                token = self._step(request, {"input_ids": token.reshape(-1, 1).astype(np.int64),
                                             "position_ids": positions, "attention_mask": mask})

    def _step(self, request: str, feed: dict[str, np.ndarray], first: dict | None = None) -> np.ndarray:
        """One step through every board: each takes the results of the boards it reads, the last chooses."""
        forward: list[object] = []
        chain = []
        for k, (name, actor) in enumerate(self._actors):
            model = {n: feed[n] for n in self.flows[k].from_model if n not in self.flows[k].cache}
            extra = first if first and k == len(self._actors) - 1 else {}
            ref = actor.step.remote(request, model, *[forward[j] for j in self.producers[k]], **extra)
            forward.append(ref)
            chain.append((name, ref))
        return chained_get(chain, f"a step of request {request}", self.timeout_s)

    @contextlib.contextmanager
    def _request(self) -> Iterator[str]:
        """A request id whose caches every board drops at the end (the calls queue behind its steps)."""
        request = f"r{next(_ids)}"
        try:
            yield request
        finally:
            for _, actor in self._actors:
                actor.end.remote(request)

    def stats(self) -> dict[str, dict]:
        """Each board's counters: requests held, bytes received from other boards (latest call and total)."""
        return {name: get(actor.stats.remote(), name, "stats", self.timeout_s) for name, actor in self._actors}

    def close(self) -> list[str]:
        """Closes every board's session and ends its actor. A board already lost has nothing left to close:
        it is only ended, and named in the list returned (its loss was raised where it was met)."""
        lost = []
        for name, actor in self._actors:
            try:
                get(actor.close.remote(), name, "closing", min(self.timeout_s, 10.0))
            except BoardError:
                lost.append(name)
            self._ray.kill(actor, no_restart=True)
        self._actors = []
        return lost

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def specs_of(placement: Placement | None) -> list[BoardSpec]:
    """Boards named only by a placement: each pinned by a custom resource of its own name."""
    if placement is None:
        raise InputError("Pipeline needs boards=[{...}, ...] or placement=...")
    return [BoardSpec(name, {name: 1}) for name in placement.boards]


def producers(flows: list[RangeFlow]) -> list[list[int]]:
    """For each range, the earlier ranges whose results it reads (a middle range may skip the previous)."""
    made = [set(f.forward) for f in flows]
    return [[j for j in range(k) if made[j] & set(flows[k].from_upstream)] for k in range(len(flows))]
