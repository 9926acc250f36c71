"""The engine thread of hermes serve without HTTP: a request submitted while another runs joins the batch
and finishes first; a cancelled row leaves and gives its reservation back; admission waits for room."""
from __future__ import annotations

import threading

import pytest

import hermes_ort
from hermes_ort.convert import convert_gguf
from hermes_ort.generation.sampling import Sampling
from hermes_ort.serve.scheduler import QueueFull, Request, Scheduler

from tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sched")
    write_tiny_gguf(root / "tiny.gguf")
    return convert_gguf(root / "tiny.gguf", root / "tiny", "fp32").directory


@pytest.fixture
def scheduler(model):
    session = hermes_ort.InferenceSession(model, memory_budget="1GiB")
    s = Scheduler(session, hermes_ort.Tokenizer.from_dir(model), parallel=2, context=64, max_queue=2)
    s.start()
    yield s
    s.stop()
    session.close()
    assert not s.thread.is_alive()


def job(events: list, name: str, max_tokens: int, done: threading.Event, prompt=(5, 17, 99), on_token=None):
    def emit(kind, value):
        events.append((name, kind))
        if kind == "text" and on_token:
            on_token(sum(1 for n, k in events if n == name and k == "text"))
        if kind in ("done", "error"):
            done.set()
    return Request(list(prompt), max_tokens, Sampling(), (), emit)


def test_a_request_joins_mid_generation_and_finishes_first(scheduler):
    events, a_done, b_done = [], threading.Event(), threading.Event()
    b = job(events, "b", 3, b_done, prompt=(7, 8))
    a = job(events, "a", 40, a_done, on_token=lambda n: n == 3 and scheduler.submit(b))
    scheduler.submit(a)
    assert a_done.wait(60) and b_done.wait(60)
    order = [n for n, k in events if k == "done"]
    assert order == ["b", "a"]  # b started while a ran, and ended before it
    first_b = events.index(("b", "text")) if ("b", "text") in events else events.index(("b", "done"))
    assert ("a", "text") in events[first_b:]  # a kept going after b's first token
    assert scheduler.reserved == 0


def test_a_cancelled_row_leaves_and_frees_its_reservation(scheduler):
    events, done = [], threading.Event()
    a = job(events, "a", 50, done, on_token=lambda n: n == 2 and a.cancelled.set())
    scheduler.submit(a)
    deadline = threading.Event()
    for _ in range(200):
        if scheduler.reserved == 0 and scheduler.running == 0 and events:
            break
        deadline.wait(0.05)
    assert scheduler.reserved == 0 and scheduler.running == 0
    assert sum(1 for n, k in events if k == "text") <= 4 and ("a", "done") not in events


def test_the_queue_is_bounded(scheduler):
    gate, events = threading.Event(), []
    long = [job(events, f"r{k}", 60, threading.Event()) for k in range(2)]
    for r in long:
        scheduler.submit(r)
    waiting = [job(events, f"w{k}", 60, threading.Event()) for k in range(3)]
    with pytest.raises(QueueFull):
        for r in waiting:
            scheduler.submit(r)
    for r in long + waiting:
        r.cancelled.set()
    gate.wait(0.1)
