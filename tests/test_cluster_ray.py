"""Stage ranges on two boards of a one-machine Ray cluster (a 0-CPU head for the driver, two 1-CPU nodes with
custom resources "board0" and "board1"): outputs equal one process, greedy tokens equal hermes_ort.generate,
requests in flight come back right, each board opens only its own files and receives only hidden states, and
a lost board is named within a bounded time."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason='the cluster tests need Ray: pip install "hermes-ort[ray]"')
from ray.cluster_utils import Cluster  # noqa: E402

import hermes_ort  # noqa: E402
from hermes_ort.cluster import BoardError, Pipeline, StageRange  # noqa: E402
from hermes_ort.cluster.placement import Placement  # noqa: E402
from hermes_ort.format import manifest as manifest_io  # noqa: E402
from hermes_ort.generation.decoding import CacheLayout  # noqa: E402

from tiny_gguf import TinyConfig, converted  # noqa: E402

STORE = 80 << 20
HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 4}
SPLIT = Placement.given(("board0", StageRange(0, 3)), ("board1", StageRange(3, 6)))
BOARDS = [{"resources": {"board0": 1}, "memory_budget": "1GiB"}, {"resources": {"board1": 1}, "memory_budget": "1GiB"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    return converted(root, TinyConfig(layers=4))  # embeddings, 4 blocks, head


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                          "object_store_memory": STORE, "_system_config": HEALTH})
        for i in range(2):
            c.add_node(num_cpus=1, resources={f"board{i}": 1}, object_store_memory=STORE)
        ray.init(address=c.address, logging_level="ERROR")
        try:
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


@pytest.fixture(scope="module")
def pipeline(cluster, model):
    with Pipeline(model, BOARDS, SPLIT, timeout_s=60) as p:
        yield p


def prompt(batch=1, length=5, seed=1):
    return np.random.default_rng(seed).integers(1, 250, (batch, length))


def test_run_equals_one_process(pipeline, model):
    manifest = manifest_io.load(model)
    ids = prompt(2)
    feed = {"input_ids": ids, "position_ids": np.broadcast_to(np.arange(5), ids.shape).copy(),
            "attention_mask": np.ones(ids.shape, np.int64), **CacheLayout.of(manifest).empty(2)}
    with hermes_ort.InferenceSession(model, memory_budget="1GiB") as session:
        expected = session.run(None, feed)
    got = pipeline.run(None, feed)
    assert pipeline.ranges == (StageRange(0, 3), StageRange(3, 6))
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)
    logits, = pipeline.run(["logits"], feed)
    np.testing.assert_allclose(logits, expected[-1], atol=1e-5, rtol=0)


def test_16_greedy_tokens_equal_hermes_generate(pipeline, model):
    ids = prompt()
    expected = hermes_ort.generate(model, ids, 16, memory_budget="1GiB")
    np.testing.assert_array_equal(pipeline.generate(ids, 16), expected)
    streamed = list(pipeline.stream(ids, 4))
    assert [int(t[0]) for t in streamed] == expected[0, 5:9].tolist()


def test_left_padded_rows_and_sampling_equal_hermes_generate(pipeline, model):
    ids, mask = prompt(2, 6, seed=4), np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    options = dict(do_sample=True, top_k=20, temperature=0.8, seed=7, repetition_penalty=1.2)
    expected = hermes_ort.generate(model, ids, 6, attention_mask=mask, memory_budget="1GiB", **options)
    np.testing.assert_array_equal(pipeline.generate(ids, 6, attention_mask=mask, **options), expected)


def test_8_requests_in_flight_all_come_back_right(pipeline, model):
    prompts = [prompt(1, 3 + i % 4, seed=10 + i) for i in range(8)]
    expected = [hermes_ort.generate(model, p, 8, memory_budget="1GiB") for p in prompts]
    got: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, pipeline.generate(prompts[i], 8)))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(got) == list(range(8))
    for i in range(8):
        np.testing.assert_array_equal(got[i], expected[i])
    assert all(s["requests"] == 0 for s in pipeline.stats().values())  # every board let go of every cache


def test_each_board_opens_only_its_own_stage_files(pipeline):
    own = {"board0": {"embeddings.onnx", "embeddings.data", "block_00.onnx", "block_00.data", "block_01.onnx",
                      "block_01.data", "manifest.json"},
           "board1": {"block_02.onnx", "block_02.data", "block_03.onnx", "block_03.data", "head.onnx",
                      "embeddings.data", "manifest.json"}}  # the head reads the tied token table
    assert {b: set(r["files"]) for b, r in pipeline.boards.items()} == own
    assert pipeline.boards["board0"]["pid"] != pipeline.boards["board1"]["pid"]
    for board, stats in pipeline.stats().items():
        assert set(stats["opened"]) <= own[board]


def test_a_decode_step_sends_only_hidden_states(pipeline):
    batch, length, new = 2, 5, 4
    pipeline.generate(prompt(batch, length), new)
    got = pipeline.stats()["board1"]["last_received"]
    total = length + new - 1  # positions the last step attends to
    hidden, head_dim, kv_heads = 64, 16, 2
    assert got == {"hidden.2": batch * 1 * hidden * 4,  # the one new position's hidden state, float32
                   "rotary.cos": batch * head_dim * 4, "rotary.sin": batch * head_dim * 4,  # its rotary row
                   "attention.allowed": batch * (4 // kv_heads) * total}  # its mask row, bool
    assert not any(n.startswith(("past.", "present.")) for n in got)  # the KV cache stays on its board
    assert pipeline.stats()["board0"]["last_received"] == {}  # ids come from the driver, not a board


def test_a_board_without_a_node_is_named_in_bounded_time(cluster, model):
    boards = [BOARDS[0], {"resources": {"nowhere": 1}, "memory_budget": "1GiB"}]
    placement = Placement.given(("board0", StageRange(0, 3)), ("nowhere", StageRange(3, 6)))
    started = time.monotonic()
    with pytest.raises(BoardError, match=r"board 'nowhere' did not answer starting within 3 s"):
        Pipeline(model, boards, placement, timeout_s=3)
    assert time.monotonic() - started < 20


def test_a_lost_node_is_a_named_error_in_bounded_time(cluster, model):
    node = cluster.add_node(num_cpus=1, resources={"doomed": 1}, object_store_memory=STORE)
    cluster.wait_for_nodes()
    boards = [BOARDS[0], {"resources": {"doomed": 1}, "memory_budget": "1GiB"}]
    placement = Placement.given(("board0", StageRange(0, 3)), ("doomed", StageRange(3, 6)))
    with Pipeline(model, boards, placement, timeout_s=20) as p:
        p.generate(prompt(), 2)
        cluster.remove_node(node, allow_graceful=False)
        started = time.monotonic()
        with pytest.raises(BoardError, match="board 'doomed'"):
            for _ in range(100):  # calls may still be answered until Ray marks the node dead
                p.generate(prompt(), 2)
        assert time.monotonic() - started < 30
