"""hermes serve against the openai client: a live server on 127.0.0.1 (an ephemeral port), started and
stopped by the fixture, every request bounded in count and time."""
from __future__ import annotations

import concurrent.futures
import os
import subprocess
import time

import pytest

openai = pytest.importorskip("openai", reason="the openai client tests hermes serve: pip install openai")
pytest.importorskip("uvicorn", reason="hermes serve needs the serve extra: pip install 'hermes-ort[serve]'")
httpx = pytest.importorskip("httpx")

import hermes_ort
from hermes_ort.convert import convert_gguf
from hermes_ort.serve.launch import launch

from tiny_gguf import write_tiny_gguf

KEY = "test-key"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    write_tiny_gguf(root / "tiny.gguf")
    return convert_gguf(root / "tiny.gguf", root / "tiny", "fp32").directory


def start(model, *extra: str):
    return launch(str(model), *extra, env={**os.environ, "HERMES_API_KEY": KEY}, timeout_s=90)


def stop(proc) -> str:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.stderr.read()


@pytest.fixture(scope="module")
def server(model):
    proc, port = start(model, "--parallel", "4")
    yield port
    stop(proc)


def client(port: int, key: str = KEY):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60)


def solo_text(model, prompt: str, n: int, **options) -> str:
    """The same request decoded alone, through the library's own text API."""
    generator = hermes_ort.TextGenerator(model, memory_budget="1GiB")
    try:
        return generator(prompt, n, **options)
    finally:
        generator.close()


def test_models_list_the_directory(server, model):
    listed = client(server).models.list().data
    assert [m.id for m in listed] == ["tiny"]
    assert listed[0].root == str(model) and listed[0].max_model_len == 128


def test_text_completion_is_the_greedy_decode(server, model):
    reply = client(server).completions.create(model="tiny", prompt="the cat in the hat", max_tokens=12,
                                              temperature=0)
    assert reply.choices[0].text == solo_text(model, "the cat in the hat", 12)
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens == len(
        hermes_ort.Tokenizer.from_dir(model).encode_prompt("the cat in the hat"))


def test_streamed_chat_equals_the_whole_reply_and_follows_the_wire(server):
    c = client(server)
    messages = [{"role": "user", "content": "hi there"}]
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finish = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].delta.content is None
    assert finish[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_concurrent_requests_each_equal_their_solo_decode(server, model):
    prompts = ["the cat", "in the hat the", "a", "the the the cat in"]
    c = client(server)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda p: c.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0),
                                prompts))
    for prompt, reply in zip(prompts, replies):
        assert reply.choices[0].text == solo_text(model, prompt, 16), prompt


def test_stop_strings_and_bad_requests(server, model):
    c = client(server)
    full = solo_text(model, "the cat", 20)
    stop = full[3:5]
    reply = c.completions.create(model="tiny", prompt="the cat", max_tokens=20, temperature=0, stop=[stop])
    assert reply.choices[0].text == solo_text(model, "the cat", 20, stop=[stop]) == full[:full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="context is 128"):
        c.completions.create(model="tiny", prompt="the cat", max_tokens=500)
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model="tiny", messages=[])


def test_a_wrong_key_is_401(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()


def test_a_full_queue_is_503_with_retry_after(model):
    proc, port = start(model, "--parallel", "1", "--max-queue", "1")
    try:
        def ask(_):
            try:
                client(port).completions.create(model="tiny", prompt="the cat", max_tokens=100, temperature=0)
                return 200
            except openai.APIStatusError as e:
                return (e.status_code, e.response.headers.get("retry-after"))
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(ask, range(6)))
        assert 200 in codes and (503, "1") in codes, codes
    finally:
        stop(proc)


def metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("hermes_")}


def test_a_client_gone_mid_stream_frees_its_row(server):
    with httpx.stream("POST", f"http://127.0.0.1:{server}/v1/completions", timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": "the cat", "max_tokens": 100, "temperature": 0.8, "seed": 1,
                            "stream": True}) as response:
        next(response.iter_lines())  # one chunk, then the client hangs up
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (metrics(server)["hermes_running_rows"] or
                                           metrics(server)["hermes_kv_reserved_bytes"]):
        time.sleep(0.05)
    seen = metrics(server)
    assert seen["hermes_running_rows"] == 0 and seen["hermes_kv_reserved_bytes"] == 0


def test_many_short_requests_leave_no_growth(server):
    """500 requests (bounded: 120 s): the process peak after the first 100 does not grow past a few MiB."""
    c = client(server)
    deadline = time.monotonic() + 120
    ask = lambda n: c.completions.create(model="tiny", prompt="the cat", max_tokens=2, temperature=0)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(ask, range(100)))
        warm = metrics(server)["hermes_peak_rss_bytes"]
        list(pool.map(ask, range(400)))
    assert time.monotonic() < deadline
    assert metrics(server)["hermes_peak_rss_bytes"] - warm < 8 << 20


def test_sigterm_drains_and_exits_0(model):
    proc, port = start(model)
    assert client(port).completions.create(model="tiny", prompt="a", max_tokens=3, temperature=0).choices
    proc.terminate()
    assert proc.wait(timeout=30) == 0, proc.stderr.read()


def test_tokenize_and_detokenize_round_trip(server, model):
    auth = {"Authorization": f"Bearer {KEY}"}
    got = httpx.post(f"http://127.0.0.1:{server}/tokenize", json={"prompt": "the cat"}, headers=auth, timeout=10).json()
    assert got["tokens"] == hermes_ort.Tokenizer.from_dir(model).encode_prompt("the cat")
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == 128
    back = httpx.post(f"http://127.0.0.1:{server}/detokenize", json={"tokens": got["tokens"]}, headers=auth,
                      timeout=10).json()
    assert back["prompt"] == "the cat"
    bad = httpx.post(f"http://127.0.0.1:{server}/detokenize", json={"tokens": [10 ** 9]}, headers=auth, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_logprobs_are_the_models_log_softmax(server, model):
    """chat's logprobs.content and text completions' legacy lists: the chosen token's log-probability under
    the model's own logits, its rivals likeliest first (greedy: the chosen one leads them)."""
    import numpy as np

    from hermes_ort.generation.decoding import CacheLayout
    from hermes_ort.generation.sampling import log_softmax

    tokenizer = hermes_ort.Tokenizer.from_dir(model)
    ids = tokenizer.encode_prompt("the cat")
    with hermes_ort.InferenceSession(model, memory_budget="1GiB") as session:
        feed = {"input_ids": np.array([ids]), "position_ids": np.arange(len(ids))[None],
                "attention_mask": np.ones((1, len(ids)), np.int64), **CacheLayout.of(session.manifest).empty(1)}
        want = log_softmax(session.run(["logits"], feed)[0][0, -1].astype(np.float64)[None])[0]
    c = client(server)
    text = c.completions.create(model="tiny", prompt="the cat", max_tokens=3, temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 3 and lp.text_offset[0] == 0
    assert abs(lp.token_logprobs[0] - want.max()) < 1e-4
    assert list(lp.top_logprobs[0].values()) == sorted(lp.top_logprobs[0].values(), reverse=True)
    # the legacy format keys rivals by their text: two byte tokens both shown as U+FFFD make one key
    rivals = sorted(lp.top_logprobs[0].values(), reverse=True)
    assert 1 <= len(rivals) <= 2 and np.allclose(rivals, np.sort(want)[::-1][:len(rivals)], atol=1e-4)
    messages = [{"role": "user", "content": "the cat"}]
    chat = c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                     top_logprobs=3)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in entries)
    assert all(e.logprob == e.top_logprobs[0].logprob and e.token == e.top_logprobs[0].token for e in entries)
    streamed = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True))
    got = [e for ch in streamed if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in got] == [(e.token, round(e.logprob, 5)) for e in entries]
    with pytest.raises(openai.BadRequestError, match="logprobs must be in"):
        c.completions.create(model="tiny", prompt="the cat", max_tokens=2, logprobs=9)


def test_the_budget_holds_under_concurrent_requests(tmp_path):
    """OS peak (the server's VmHWM) within --budget while four long requests share the batch: a model whose
    KV cache at four rows of 2048 positions is 128 MiB, served at exactly the peak its plan predicts."""
    from tiny_gguf import TinyConfig

    write_tiny_gguf(tmp_path / "wide.gguf", TinyConfig(hidden=256, heads=4, kv_heads=4, ffn=256, layers=4,
                                                       context=2048))
    wide = convert_gguf(tmp_path / "wide.gguf", tmp_path / "wide", "fp32").directory
    proc, port = start(wide, "--parallel", "4", "--budget", "2GiB", "--context", "2048")
    line = stop(proc)
    predicted = line.split("predicted peak ")[1].split(")")[0]
    proc, port = start(wide, "--parallel", "4", "--budget", predicted.replace(" ", ""), "--context", "2048")
    try:
        c = client(port)
        prompts = [" ".join(["the cat in the hat"] * (130 + 10 * k)) for k in range(4)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # joins at different steps: each copies the cache
            replies = list(pool.map(lambda p: c.completions.create(model="wide", prompt=p, max_tokens=40,
                                                                   temperature=0), prompts))
        assert all(r.choices for r in replies)
        seen = metrics(port)
        assert seen["hermes_kv_pool_bytes"] >= 4 * 2048 * 4 * 2 * 256 * 4  # every row's reservation counted
        assert seen["hermes_peak_rss_bytes"] <= seen["hermes_budget_bytes"], seen
    finally:
        stop(proc)
