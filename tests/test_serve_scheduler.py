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


def test_while_draining_new_requests_are_503_and_health_says_so(scheduler):
    pytest.importorskip("starlette", reason="hermes serve needs the serve extra: pip install 'hermes-ort[serve]'")
    from starlette.testclient import TestClient

    from hermes_ort.serve.app import ServerConfig, build_app

    scheduler.ready.wait(30)
    http = TestClient(build_app(scheduler, ServerConfig("tiny", "tiny")))
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 2, "temperature": 0}
    assert http.post("/v1/completions", json=body).status_code == 200
    scheduler.drain()
    refused = http.post("/v1/completions", json=body)
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"
    assert http.get("/health").status_code == 503


def test_a_slow_token_gets_sse_pings_and_the_stream_goes_on():
    """A board can take seconds per token: the stream sends `: ping` comments meanwhile."""
    import asyncio

    from hermes_ort.serve.app import sse
    from hermes_ort.serve.logprobs import LogprobWire

    async def collect():
        pieces = asyncio.Queue()
        job = Request([1], 1, Sampling(), (), lambda kind, value: None)
        loop = asyncio.get_running_loop()
        loop.call_later(0.35, pieces.put_nowait, ("text", "hi"))
        loop.call_later(0.4, pieces.put_nowait, ("done", "length"))
        return [frame async for frame in sse(job, pieces, "cmpl-1", False, False, 1, "tiny", LogprobWire(None, False),
                                             ping_s=0.1)]

    frames = asyncio.run(collect())
    assert frames[0] == ": ping\n\n" and 2 <= frames.count(": ping\n\n") <= 4
    data = [f for f in frames if f.startswith("data: ")]
    assert '"text": "hi"' in data[0] and data[-1] == "data: [DONE]\n\n"


def test_a_prompt_fed_in_chunks_decodes_as_it_would_alone(model):
    """A prompt longer than the prefill chunk rides several passes beside a running row; both rows' text is
    that of each prompt decoded alone (greedy)."""
    import numpy as np

    tokenizer = hermes_ort.Tokenizer.from_dir(model)
    session = hermes_ort.InferenceSession(model, memory_budget="1GiB")
    s = Scheduler(session, tokenizer, parallel=2, context=64, max_queue=2, prefill_chunk=3)
    prompts = {"a": ([5, 17, 99], 12), "b": ([40, 41, 42, 43, 44, 45, 46, 47, 12, 200], 6)}
    text = {name: [] for name in prompts}
    done = {name: threading.Event() for name in prompts}

    def request(name):
        def emit(kind, value):
            if kind == "text":
                text[name].append(value)
            if kind in ("done", "error"):
                done[name].set()
        return Request(prompts[name][0], prompts[name][1], Sampling(), (), emit)

    s.start()
    try:
        s.submit(request("a"))
        s.submit(request("b"))
        assert done["a"].wait(60) and done["b"].wait(60)
    finally:
        s.stop()
        session.close()
    for name, (prompt, n) in prompts.items():
        ids = hermes_ort.generate(model, np.array([prompt]), n, tokenizer.eos_token_ids,
                                  memory_budget="1GiB")[0, len(prompt):]
        assert "".join(text[name]) == tokenizer.decode(ids), name
