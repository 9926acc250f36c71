"""The engine thread of `hermes serve`: one ContinuousBatch over one pipeline, so every pass over the streamed
stages computes every active request.

Admission by reservation: at startup the generation plan is made for `parallel` rows at the server's context
(`plan_generation` counts their KV cache twice over, since a join or a leave copies it, and a pass of that
many rows over a whole context, inside the budget); each request then reserves the cache of its
prompt + max_tokens out of that pool and waits in a bounded queue while the pool cannot hold it. A request
that is admitted can always finish; the budget is never passed for a new one.
"""
from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import BudgetError, InputError
from ..generation.continuous import ContinuousBatch
from ..generation.decode_plan import Workload
from ..generation.decoding import CacheLayout
from ..generation.sampling import Chooser, Sampling, log_softmax
from ..generation.text import RowText
from ..generation.tokenizer import Tokenizer
from ..session import InferenceSession


class TokenCount:
    """RowText's part for a model directory without a tokenizer (token-id prompts): no stops, and an empty
    piece per token, so a stream still sends a chunk for each (time to first token, inter-token latency)."""

    finished = False

    def add(self, token: int, eos) -> str:
        return ""

    def flush(self) -> str:
        return ""


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (its raw logits, before any sampling filter,
    as vLLM reports by default) and the `top` likeliest tokens with theirs, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    scores = log_softmax(logits.astype(np.float64)[None])[0]  # [V]
    best = np.argsort(-scores, kind="stable")[:top]
    return TokenLogprob(token, float(scores[token]), tuple((int(t), float(scores[t])) for t in best))


PREFILL_CHUNK = 512  # prompt positions per pass: attention's [rows, heads, chunk, context] scores stay bounded
# (four rows of 1900-token prompts in one pass peaked at 1.6 GiB on a model whose plan predicted 0.7)


class QueueFull(Exception):
    """More requests wait than --max-queue allows: the caller answers 503."""


@dataclass
class Request:
    """One completion: prompt ids, limits, sampling; `emit(kind, value)` receives ("text", str) pieces,
    ("done", finish_reason) or ("error", message), from the engine thread."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    emit: Callable[[str, object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    logprobs: int | None = None  # None: none; N: each token's log-probability and its N likeliest rivals
    reserved: int = 0
    completion_tokens: int = 0


@dataclass
class Row:
    request: Request
    text: RowText
    choose: Chooser | None = None  # made at the row's first logits (their width is the vocabulary)
    token: int = 0  # the token the next step feeds
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # prompt ids not yet fed

    def feed(self, chunk: int) -> int | np.ndarray:
        """What the next pass feeds: the next chunk of the prompt while one is left, else the token."""
        if not self.pending.size:
            return self.token
        fed, self.pending = self.pending[:chunk], self.pending[chunk:]
        return fed


class Scheduler:
    """Owns the session's engine on a thread of its own; submit() queues, cancel via request.cancelled."""

    def __init__(self, session: InferenceSession, tokenizer: Tokenizer | None, parallel: int, context: int,
                 max_queue: int, say: Callable[[str], None] = print, prefill_chunk: int = PREFILL_CHUNK):
        self.session, self.tokenizer, self.context, self.max_queue = session, tokenizer, context, max_queue
        self.prefill_chunk = max(1, prefill_chunk)
        self.layout = CacheLayout.of(session.manifest)
        self.parallel, self.plan = self._fitting_plan(parallel, say)
        self.pool = self.layout.bytes(self.parallel, context)  # the KV the plan holds room for
        self.reserved = 0
        self.waiting: collections.deque[Request] = collections.deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.draining = False  # SIGTERM: running requests finish, new ones are refused
        self.ids = itertools.count()
        self.thread = threading.Thread(target=self._run, name="hermes-serve-engine", daemon=True)
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self.running = 0  # rows in the batch now
        self.passes = 0  # runs over the stages (a prefill, a step)
        self.streamed_per_pass = sum(st.bytes for st in session.manifest.stages  # a table is looked up, not read
                                     if st.name not in self.plan.resident and st.kind != "embeddings")
        self.requests_total = 0
        self.tokens_total = 0

    def _fitting_plan(self, parallel: int, say):
        """The widest batch up to `parallel` the budget holds at the full context (one line if clamped)."""
        for rows in range(parallel, 0, -1):
            try:
                # twice the context's cache: a join or a leave copies the batch's cache once (continuous.py)
                plan = self.session.generation_plan(Workload(rows, self.context, 2 * self.context))
            except BudgetError as e:
                if rows == 1:
                    raise BudgetError(f"{e} (one request at a context of {self.context} positions)") from e
                continue
            if rows < parallel:
                say(f"hermes serve: --parallel {parallel} clamped to {rows}: the budget holds the KV cache of "
                    f"{rows} rows at {self.context} positions")
            return rows, plan
        raise AssertionError("unreachable")

    def start(self) -> None:
        self.thread.start()

    def drain(self) -> None:
        self.draining = True

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
        self.thread.join(timeout=60)

    def reservation(self, prompt: int, max_tokens: int) -> int:
        return self.layout.bytes(1, prompt + max_tokens)

    def submit(self, request: Request) -> None:
        if len(request.prompt) + request.max_tokens > self.context:
            raise InputError(f"this server's context is {self.context} tokens: the prompt has {len(request.prompt)}"
                             f" and max_tokens is {request.max_tokens}")
        request.reserved = self.reservation(len(request.prompt), request.max_tokens)
        with self.wake:
            self.requests_total += 1
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(request)
            self.wake.notify_all()

    def _run(self) -> None:
        try:
            with self.session.engine(self.plan) as engine:
                self.ready.set()
                self._serve(ContinuousBatch(engine, self.layout, self.context))
        except BaseException as e:  # every waiting and running request hears of it
            self.failed = e
            self.ready.set()
            for request in list(self.waiting):
                request.emit("error", str(e))

    def _serve(self, batch: ContinuousBatch) -> None:
        rows: dict[int, Row] = {}
        eos = self.tokenizer.eos_token_ids if self.tokenizer else []
        while True:
            with self.wake:
                while not self.stopping and not rows and not self.waiting:
                    self.wake.wait()
                if self.stopping:
                    for row in rows.values():
                        row.request.emit("error", "the server is shutting down")
                    return
                admitted = self._admit(len(rows))
            joining = {}
            for request in admitted:
                key = next(self.ids)
                rows[key] = Row(request, RowText(self.tokenizer, request.stop) if self.tokenizer else TokenCount())
                joining[key] = np.array(request.prompt)
                if batch.can_ride:  # a long prompt rides in chunks, pass after pass
                    joining[key], rows[key].pending = np.split(joining[key], [self.prefill_chunk])
            if not batch.can_ride:  # sliding layers: each prompt's prefill is a pass of its own
                for key, prompt in joining.items():
                    self.passes += 1
                    self._advance(batch, rows, key, batch.admit(key, prompt), eos)
                joining = {}
            self.running = len(rows)
            if rows:  # one pass: every running row's next token, and the new prompts riding along
                self.passes += 1
                running = {k: r.feed(self.prefill_chunk) for k, r in rows.items() if k not in joining}
                for key, logits in batch.step(running, joining).items():
                    if rows[key].pending.size and not rows[key].request.cancelled.is_set():
                        continue  # its prompt is not all in yet: these logits choose nothing
                    self._advance(batch, rows, key, logits, eos)

    def _admit(self, running: int) -> list[Request]:
        """Requests that fit the pool now, in arrival order (a request that does not fit waits, and so do
        the ones behind it: no starving the large)."""
        out = []
        while self.waiting and running + len(out) < self.parallel:
            request = self.waiting[0]
            if request.cancelled.is_set():
                self.waiting.popleft()
                continue
            if self.reserved + request.reserved > self.pool:
                break
            self.waiting.popleft()
            self.reserved += request.reserved
            out.append(request)
        return out

    def _advance(self, batch: ContinuousBatch, rows: dict[int, Row], key: int, logits: np.ndarray,
                 eos: list[int]) -> None:
        """Chooses the row's next token, emits its stable text, retires it at its stop."""
        row = rows[key]
        request = row.request
        if request.cancelled.is_set():
            return self._retire(batch, rows, key)
        if row.choose is None:
            prompt = np.array([request.prompt])
            row.choose = Chooser(request.sampling, prompt, np.ones_like(prompt), logits.shape[-1])
        token = int(row.choose(logits[None])[0])
        if request.logprobs is not None:
            request.emit("logprob", token_logprobs(logits, token, request.logprobs))
        request.completion_tokens += 1
        self.tokens_total += 1
        piece = row.text.add(token, eos)
        if piece or isinstance(row.text, TokenCount):
            request.emit("text", piece)
        stopped = row.text.finished  # an end-of-sequence token or a stop string
        if stopped or request.completion_tokens >= request.max_tokens:
            tail = row.text.flush()
            if tail:
                request.emit("text", tail)
            self._retire(batch, rows, key)  # first: a client told "done" finds its reservation back
            return request.emit("done", "stop" if stopped else "length")
        row.token = token

    def _retire(self, batch: ContinuousBatch, rows: dict[int, Row], key: int) -> None:
        batch.retire(key)
        with self.wake:
            self.reserved -= rows.pop(key).request.reserved
            self.running = len(rows)
            self.wake.notify_all()

    def metrics(self) -> dict[str, float]:
        """What /metrics reports (Prometheus names without the hermes_ prefix)."""
        from ..engine.memory import peak_rss

        return {"requests_total": self.requests_total, "generated_tokens_total": self.tokens_total,
                "queue_length": len(self.waiting), "running_rows": self.running,
                "kv_reserved_bytes": self.reserved, "kv_pool_bytes": self.pool,
                "budget_bytes": self.session.budget or 0, "peak_rss_bytes": peak_rss(), "passes_total": self.passes,
                "streamed_bytes_total": self.passes * self.streamed_per_pass}
