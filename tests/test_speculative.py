"""Speculative decoding: greedy ids equal plain greedy (lookup and draft, one row and a left-padded batch,
streamed and resident), the cache after a rejection is the accepted prefix's, sampling keeps the target's
distribution, and a proposer that is always wrong costs one extra verified position per pass (no torch:
tiny converted GGUF models)."""
from __future__ import annotations

import numpy as np
import pytest

import hermes_ort
from hermes_ort.__main__ import main as hermes
from hermes_ort.convert import convert_gguf
from hermes_ort.errors import InputError
from hermes_ort.generation.decode_plan import Workload
from hermes_ort.generation.decoding import CacheLayout, Decoder
from hermes_ort.generation.proposers import Proposals
from hermes_ort.generation.sampling import Chooser, Sampling
from hermes_ort.generation.speculative import (PROBE_EVERY, Lookup, PassCosts, SpeculationStats, judge, next_k,
                                               resample, worth_verifying)
from hermes_ort.generation.speculative_stream import verified
from hermes_ort.planning.planner import Plan

from tiny_gguf import TinyConfig, write_tiny_gguf

REPEATING = [12, 200, 31, 260, 7, 44, 12, 200, 31, 260, 7, 44, 12, 200]
SHORT = [5, 17, 99]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(target, a one-layer draft of the same vocabulary, a gemma3 model with sliding-window layers)."""
    root = tmp_path_factory.mktemp("speculative")
    write_tiny_gguf(root / "t.gguf", TinyConfig(layers=3))
    write_tiny_gguf(root / "d.gguf", TinyConfig(layers=1), seed=3)
    write_tiny_gguf(root / "s.gguf", TinyConfig(arch="gemma3", layers=6, window=3, rope_base=1e6, head_dim=16))
    return tuple(convert_gguf(root / f"{n}.gguf", root / n, "fp32").directory for n in "tds")


STREAMED = Plan(budget=0, loaders=2, window=2, resident=(), prepacked=(), compute_threads=1, predicted_first_s=0,
                predicted_steady_s=0, predicted_peak_bytes=0)


def session_of(directory, streamed: bool) -> hermes_ort.InferenceSession:
    if streamed:
        return hermes_ort.InferenceSession(directory, plan_override=STREAMED)
    return hermes_ort.InferenceSession(directory, memory_budget="1GiB")


def left_padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    ids, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
    for r, row in enumerate(rows):
        ids[r, width - len(row):], mask[r, width - len(row):] = row, 1
    return ids, mask


@pytest.mark.parametrize("streamed", [False, True], ids=["resident", "streamed"])
@pytest.mark.parametrize("rows", [[REPEATING], [REPEATING, SHORT]], ids=["one-row", "left-padded"])
@pytest.mark.parametrize("source", ["lookup", "self-draft", "other-draft"])
def test_greedy_ids_equal_plain_greedy(models, streamed, rows, source):
    target, draft, _ = models
    speculate = {"lookup": "lookup", "self-draft": target, "other-draft": draft}[source]
    ids, mask = left_padded(rows)
    with session_of(target, streamed) as session:
        plain = hermes_ort.generate(session, ids, 20, attention_mask=mask)
        stats = SpeculationStats()
        got = hermes_ort.generate(session, ids, 20, attention_mask=mask, speculate=speculate, draft_tokens=4,
                                  speculation_stats=stats)
    np.testing.assert_array_equal(got, plain)
    assert stats.tokens == 20
    if source == "self-draft":  # the target as its own draft: every proposal lands
        assert stats.accepted == stats.proposed > 0 and stats.passes < 20


class Oracle:
    """Proposes the plain greedy continuation, wrong wherever `wrong` says (the position in the text)."""

    def __init__(self, truth: list[int], wrong, vocab: int):
        self.truth, self.wrong, self.vocab, self.at = truth, wrong, vocab, 0

    def propose(self, k: int, seen: np.ndarray) -> Proposals:
        tokens = [(t + 1) % self.vocab if self.wrong(self.at + i) else t
                  for i, t in enumerate(self.truth[self.at:self.at + k])]
        tokens += [0] * (k - len(tokens))
        return Proposals(np.array([tokens], np.int64), None, np.array([k]))

    def advance(self, emitted: list[np.ndarray], accepted: int) -> None:
        self.at += len(emitted)


class Widths:
    """The engine, counting the positions each pass feeds; its clock advances by what `cost` says a pass
    of that width takes (seconds), so the loop's timing is the test's."""

    def __init__(self, engine, cost=lambda width: 1.0):
        self.engine, self.fed, self.cost, self.now = engine, [], cost, 0.0

    def run(self, feed, decoding=False, sink=None, **options):
        self.fed.append(feed["input_ids"].shape[1])
        self.now += self.cost(feed["input_ids"].shape[1])
        return self.engine.run(feed, decoding, sink=sink, **options)


def oracle_run(directory, wrong, new=16, most=4, cost=lambda width: 1.0):
    """(tokens, passes' fed widths, stats) of the loop with an Oracle proposer, and plain greedy's tokens."""
    prompt = np.array([SHORT])
    truth = hermes_ort.generate(directory, prompt, new, memory_budget="1GiB")[0, len(SHORT):].tolist()
    with hermes_ort.InferenceSession(directory, memory_budget="1GiB") as session:
        layout = CacheLayout.of(session.manifest)
        with session.engine(session.generation_plan(Workload(1, 8, 32)), every_position=True) as engine:
            counted = Widths(engine, cost)
            decoder = Decoder(counted, layout, prompt, np.ones_like(prompt), 32)
            choose = Chooser(Sampling(), prompt, np.ones_like(prompt), layout.vocab)
            first = choose(decoder.prefill())
            stats = SpeculationStats()
            oracle = Oracle(truth, wrong, layout.vocab)
            oracle.at = 1
            tokens = [int(t[0]) for t in verified(decoder, oracle, choose, first, new, np.zeros(0, np.int64), most,
                                                   stats, clock=lambda: counted.now)]
    return tokens, truth, counted.fed[1:], stats


def test_rejections_at_any_position_keep_greedy_exact(models):
    tokens, truth, fed, stats = oracle_run(models[0], lambda at: at % 3 == 2)
    assert tokens == truth
    assert stats.accepted < stats.proposed and stats.passes < len(truth)


def test_a_proposer_that_is_always_wrong_costs_one_extra_position_per_pass(models):
    tokens, truth, fed, stats = oracle_run(models[0], lambda at: True)
    assert tokens == truth
    assert max(fed) == 2  # the last token and one proposal: K falls back to one after each miss
    assert stats.passes == len(truth) - 1 and stats.accepted == 0  # as plain decoding: one pass per token


def test_where_wide_passes_cost_more_than_they_gain_most_passes_are_plain(models):
    """Wide passes cost 3x a plain step and every third proposal misses: verifying stops paying, so the loop
    steps plainly and tries again only every PROBE_EVERY plain steps; greedy stays exact."""
    new = 40
    tokens, truth, fed, stats = oracle_run(models[0], lambda at: at % 3 == 0, new=new, most=2,
                                           cost=lambda width: 3.0 if width > 1 else 1.0)
    assert tokens == truth
    wide = sum(w > 1 for w in fed)
    assert 2 <= wide <= 3 + new // PROBE_EVERY, fed
    cheap = oracle_run(models[0], lambda at: at % 3 == 0, new=new, most=2)[2]  # wide passes as cheap as plain ones
    assert sum(w > 1 for w in cheap) > wide


@pytest.mark.parametrize("one, wide, accepted, proposed, k, worth", [
    (None, None, 0, 0, 4, True),  # nothing measured yet: a wide pass first
    (1.0, None, 0, 10, 1, True),
    (None, 1.0, 10, 10, 4, False),  # then a plain step, to measure it
    (0.067, 0.120, 14, 32, 2, False),  # GPT-2 medium at 25%: 1.8x the cost, 44% acceptance
    (0.067, 0.120, 27, 29, 4, True),  # ... 93% acceptance
    (0.036, 0.044, 11, 41, 1, True),  # SmolLM2 at 250 MiB: 1.2x the cost
    (1.0, 1.0, 0, 50, 1, True),  # as cheap as a plain step: any proposal is free
])
def test_verifying_is_worth_it_when_the_tokens_it_gains_outweigh_its_cost(one, wide, accepted, proposed, k, worth):
    assert worth_verifying(PassCosts(one, wide), accepted, proposed, k) is worth


def test_the_cache_after_a_rejection_is_the_accepted_prefix_decoded_plainly(models):
    prompt = np.array([SHORT])
    with hermes_ort.InferenceSession(models[0], memory_budget="1GiB") as session:
        layout = CacheLayout.of(session.manifest)
        plan = session.generation_plan(Workload(1, 8, 32))
        with session.engine(plan, every_position=True) as engine:
            spec = Decoder(engine, layout, prompt, np.ones_like(prompt), 32)
            spec.prefill()
            spec.extend(np.array([[40, 41, 42, 43]]), every=True)
            before = dict(spec.past)
            spec.rollback(2)
            rolled = {name: array.copy() for name, array in spec.past.items()}
            same_memory = all(np.shares_memory(spec.past[n], before[n]) for n in before)
            next_spec = spec.step(np.array([50]))
        with session.engine(plan) as engine:
            plain = Decoder(engine, layout, prompt, np.ones_like(prompt), 32)
            plain.prefill()
            plain.step(np.array([40]))
            plain.step(np.array([41]))
            expected = {name: array.copy() for name, array in plain.past.items()}
            next_plain = plain.step(np.array([50]))
    assert same_memory  # compacted where it lay: no copy of the cache
    for name, array in expected.items():
        assert rolled[name].shape == array.shape
        np.testing.assert_allclose(rolled[name], array, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(next_spec, next_plain, atol=1e-4)


def test_speculative_sampling_keeps_the_target_distribution():
    """resample: p target, q draft over 6 tokens; 40000 draws. The tokens follow p, not q."""
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    rows = 40000
    choose = Chooser(Sampling(do_sample=True, seed=1), np.zeros((rows, 1), np.int64), np.ones((rows, 1)), 6)
    proposed = np.array([choose.rng.choice(6, p=q) for _ in range(rows)])
    token, _ = resample(choose, np.tile(p, (rows, 1)), proposed, np.tile(q, (rows, 1)))
    seen = np.bincount(token, minlength=6) / rows
    assert np.abs(seen - p).max() < 0.012, (seen, p, q)  # ~3 standard errors at 40000 draws
    assert np.abs(seen - q).max() > 0.05  # the test can tell p from q


def vocab_of(directory) -> int:
    with hermes_ort.InferenceSession(directory) as session:
        return CacheLayout.of(session.manifest).vocab


def marginals(directory, speculate, rows=600, new=3, seed=11):
    """Each position's token shares over `rows` seeded samples of one prompt (a batch of copies)."""
    ids = np.tile(np.array([SHORT]), (rows, 1))
    out = hermes_ort.generate(directory, ids, new, memory_budget="1GiB", speculate=speculate, draft_tokens=2,
                              do_sample=True, temperature=0.7, top_k=4, seed=seed)[:, len(SHORT):]
    return [np.bincount(out[:, j], minlength=vocab_of(directory)) / rows for j in range(new)]


def test_sampled_tokens_follow_plain_sampling_end_to_end(models):
    """600 seeded rows each way: the total variation between plain and speculative marginals stays under
    0.1 (sampling error ~0.04 at top_k 4), where a draft's own distribution would be far off."""
    target, draft, _ = models
    plain = marginals(target, None)
    for speculate in (draft, "lookup"):
        for j, (a, b) in enumerate(zip(plain, marginals(target, speculate))):
            assert 0.5 * np.abs(a - b).sum() < 0.1, (speculate, j)
    assert 0.5 * np.abs(plain[0] - marginals(draft, None, new=1)[0]).sum() > 0.3


def test_judge_stops_at_the_first_row_that_rejects():
    logits = np.full((2, 3, 8), -5.0)
    logits[0, [0, 1, 2], [3, 4, 5]] = 5.0  # row 0 wants 3, 4, 5
    logits[1, [0, 1, 2], [3, 6, 5]] = 5.0  # row 1 wants 3, 6, 5
    choose = Chooser(Sampling(), np.zeros((2, 1), np.int64), np.ones((2, 1)), 8)
    emitted, accepted = judge(choose, logits, np.array([[3, 4], [3, 4]]), None, np.zeros(2, bool))
    assert accepted == 1 and [t.tolist() for t in emitted] == [[3, 3], [4, 6]]
    done = np.array([False, True])  # a finished row never holds the others back
    emitted, accepted = judge(Chooser(Sampling(), np.zeros((2, 1), np.int64), np.ones((2, 1)), 8), logits,
                              np.array([[3, 4], [3, 4]]), None, done)
    assert accepted == 2 and emitted[-1][0] == 5


def test_lookup_takes_the_latest_longest_match_and_k_adapts():
    history = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert Lookup(3).propose(history, 2) == [7, 8]  # "2 3" last followed by 7 8 (the latest of two)
    assert Lookup(3).propose([4, 5, 6], 3) == []
    assert [next_k(2, 2, 2, 8), next_k(8, 8, 8, 8), next_k(4, 1, 4, 8), next_k(4, 0, 4, 8)] == [4, 8, 2, 1]


def test_bad_speculation_is_refused_before_anything_runs(models, tmp_path):
    target, draft, sliding = models
    with pytest.raises(InputError, match="'lookup' or a model directory"):
        hermes_ort.generate(target, np.array([SHORT]), 4, speculate="lokup")
    with pytest.raises(InputError, match="draft_tokens"):
        hermes_ort.generate(target, np.array([SHORT]), 4, speculate="lookup", draft_tokens=0)
    with pytest.raises(InputError, match="sliding-window"):  # stream() refuses before it is iterated
        hermes_ort.stream(sliding, np.array([SHORT]), 4, memory_budget="1GiB", speculate="lookup")
    write_tiny_gguf(tmp_path / "w.gguf", TinyConfig(layers=1, vocabulary="llama"))
    other = convert_gguf(tmp_path / "w.gguf", tmp_path / "w", "fp32").directory
    assert vocab_of(other) != vocab_of(target)
    with pytest.raises(InputError, match="same vocabulary"):
        hermes_ort.stream(target, np.array([SHORT]), 4, memory_budget="1GiB", speculate=other)


def test_hermes_generate_speculate_prints_tokens_in_passes(models, capsys):
    target, draft, _ = models
    ids = ",".join(map(str, REPEATING))
    hermes(["generate", str(target), "--ids", ids, "--max-new-tokens", "12", "--budget", "1GiB"])
    plain = capsys.readouterr().out.strip().splitlines()[-1]
    hermes(["generate", str(target), "--ids", ids, "--max-new-tokens", "12", "--budget", "1GiB",
            "--speculate", str(target), "--draft-tokens", "4"])
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == plain
    assert "12 tokens in " in out.err and "passes" in out.err and "accepted (100%)" in out.err


def test_a_draft_forgets_its_rejected_proposals_and_reads_what_the_target_emitted(models):
    from hermes_ort.generation.proposers import DraftProposer

    prompt = np.array([SHORT])
    with hermes_ort.InferenceSession(models[1], memory_budget="1GiB") as session:
        layout = CacheLayout.of(session.manifest)
        with session.engine(session.generation_plan(Workload(1, 8, 32))) as engine:
            draft = DraftProposer(engine, layout, prompt, np.ones_like(prompt), 32, Sampling())
            draft.advance([np.array([40])], 0)
            first = draft.propose(3, np.zeros((1, layout.vocab), bool)).tokens[0]
            draft.advance([np.array([first[0]]), np.array([77])], 1)  # one landed, then the target's own 77
            draft.propose(1, np.zeros((1, layout.vocab), bool))
            text = np.array([[*SHORT, 40, first[0], 77]])
            expected = Decoder(engine, layout, text, np.ones_like(text), 32).prefill()
    np.testing.assert_allclose(draft.logits, expected, atol=1e-4)


def test_the_cli_prints_a_warning_as_one_line(monkeypatch):
    import warnings

    from hermes_ort.__main__ import one_line_warning

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    text = one_line_warning(UserWarning("DIR has no batched layout"), UserWarning, "/x/generate.py", 41)
    assert text == "hermes: warning: DIR has no batched layout\n"
    assert hermes(["generate", "/nonexistent", "--ids", "1"]) == 2  # an error, after main set the format
    assert warnings.formatwarning is one_line_warning


PEAK_WITH_DRAFT = """
import json, sys
import numpy as np
import hermes_ort
from hermes_ort.engine.memory import peak_rss
from hermes_ort.generation.speculative import SpeculationStats
stats = SpeculationStats()
with hermes_ort.InferenceSession(sys.argv[1], memory_budget=int(sys.argv[3])) as s:
    ids = hermes_ort.generate(s, np.array([[5, 17, 99, 5, 17, 99, 5, 17]]), 12, speculate=sys.argv[2],
                              draft_tokens=4, speculation_stats=stats)
    plan = s.last_generation_plan
print(json.dumps({"peak": peak_rss(), "streamed": len(s.manifest.stages) - len(plan.resident),
                  "predicted": plan.predicted_peak_bytes, "proposed": stats.proposed, "ids": ids.tolist()}))
"""


def test_a_draft_model_is_held_inside_the_total_budget(tmp_path):
    """OS peak of a fresh process: the target streams under what the resident draft leaves of the budget,
    and the whole process stays under it (blocks of ~17 MiB, a one-block draft)."""
    import json
    import subprocess
    import sys

    wide = TinyConfig(layers=4, hidden=512, heads=8, kv_heads=8, ffn=2048, context=256)
    for name, cfg, seed in (("target", wide, 0), ("draft", TinyConfig(**{**wide.__dict__, "layers": 1}), 3)):
        write_tiny_gguf(tmp_path / f"{name}.gguf", cfg, seed=seed)
        convert_gguf(tmp_path / f"{name}.gguf", tmp_path / name, "fp32")
    target, draft = tmp_path / "target", tmp_path / "draft"
    budget = 150 << 20

    def run(speculate):
        out = subprocess.run([sys.executable, "-c", PEAK_WITH_DRAFT, str(target), speculate, str(budget)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    drafted, alone = run(str(draft)), run("lookup")
    assert drafted["ids"] == alone["ids"] and drafted["proposed"] > 0
    held = hermes_ort.InferenceSession(draft).manifest.bytes
    assert drafted["predicted"] <= budget - held  # the target planned without the draft's share
    assert drafted["streamed"] > alone["streamed"] > 0  # ... so it streams more than beside lookup
    assert drafted["peak"] <= budget, f"peak {drafted['peak'] >> 20} MiB over the {budget >> 20} MiB budget"
