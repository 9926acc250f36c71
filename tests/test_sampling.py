"""Sampling as transformers does it, checked against a plain numpy reference written independently."""
import numpy as np
import pytest

from hermes_ort.errors import InputError
from hermes_ort.generation.sampling import Chooser, Sampling, filtered_logits

VOCAB = 12


def reference_probs(logits, seen, temperature, top_k, top_p, penalty, min_p=0.0):
    """One row, loops and sorts only: penalty, temperature, top-k, top-p, min-p, softmax."""
    x = [float(v) for v in logits]
    x = [(v / penalty if v > 0 else v * penalty) if seen[i] else v for i, v in enumerate(x)]
    x = [v / temperature for v in x]
    if 0 < top_k < len(x):  # a k beyond the vocabulary keeps everything
        kth = sorted(x, reverse=True)[top_k - 1]
        x = [v if v >= kth else -np.inf for v in x]
    exp = np.exp(np.array(x) - max(x))
    probs = exp / exp.sum()
    order = sorted(range(len(x)), key=lambda i: -probs[i])
    kept, total = [], 0.0
    for i in order:  # the most likely tokens until their mass reaches top_p
        kept.append(i)
        total += probs[i]
        if total >= top_p:
            break
    masked = np.array([probs[i] if i in kept else 0.0 for i in range(len(x))])
    masked = np.array([p if p >= min_p * masked.max() else 0.0 for p in masked])
    return masked / masked.sum()


LOGITS = np.array([[2.0, -1.0, 0.5, 3.0, -2.5, 1.5, 0.0, 2.9, -0.3, 1.1, 0.7, -4.0],
                   [0.1, 0.2, -0.3, 5.0, 1.0, -1.0, 0.0, 0.3, 2.2, -2.0, 1.9, 0.4]], np.float32)


@pytest.mark.parametrize("temperature, top_k, top_p, penalty, min_p", [
    (1.0, 0, 1.0, 1.0, 0.0), (0.7, 5, 1.0, 1.0, 0.0), (1.3, 0, 0.8, 1.0, 0.0), (0.9, 4, 0.6, 1.3, 0.0),
    (1.0, 50, 0.95, 2.0, 0.0), (1.0, 0, 1.0, 1.0, 0.2), (0.8, 6, 0.9, 1.2, 0.05),
])
def test_filters_equal_the_reference(temperature, top_k, top_p, penalty, min_p):
    seen = np.zeros(LOGITS.shape, bool)
    seen[:, [0, 3, 4]] = True
    sampling = Sampling(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=penalty, min_p=min_p)
    scores = filtered_logits(LOGITS, seen, sampling)
    got = np.exp(scores - scores.max(-1, keepdims=True))
    got /= got.sum(-1, keepdims=True)
    for row in range(2):
        want = reference_probs(LOGITS[row], seen[row], temperature, top_k, top_p, penalty, min_p)
        assert np.allclose(got[row], want, atol=1e-9), (row, got[row], want)


def test_same_seed_same_tokens_and_draws_follow_the_distribution():
    prompt, mask = np.array([[1, 2]]), np.ones((1, 2), np.int64)
    draw = lambda seed: [int(Chooser(Sampling(do_sample=True, top_k=0, seed=seed), prompt, mask, VOCAB)(
        LOGITS[:1])[0]) for _ in range(1)]
    assert draw(7) == draw(7)
    chooser = Chooser(Sampling(do_sample=True, top_k=0, seed=1), prompt, mask, VOCAB)
    counts = np.bincount([int(chooser(LOGITS[:1])[0]) for _ in range(4000)], minlength=VOCAB) / 4000
    want = np.exp(LOGITS[0] - LOGITS[0].max()) / np.exp(LOGITS[0] - LOGITS[0].max()).sum()
    assert np.max(np.abs(counts - want)) < 0.03  # penalty 1.0: every draw sees the plain softmax


def test_top_k_one_is_greedy_and_the_penalty_applies_to_greedy_too():
    prompt, mask = np.array([[3, 5]]), np.array([[0, 1]])  # token 3 is padding: not a repeat
    sampled = Chooser(Sampling(do_sample=True, top_k=1, seed=3), prompt, mask, VOCAB)
    assert [int(sampled(LOGITS[:1])[0]) for _ in range(5)] == [3] * 5
    greedy = Chooser(Sampling(repetition_penalty=1.5), prompt, mask, VOCAB)
    assert int(greedy(LOGITS[:1])[0]) == 3  # 3.0 is not penalized: the pad does not count
    assert int(greedy(LOGITS[:1])[0]) == 7  # now 3 was produced: 3.0 / 1.5 = 2.0 < 2.9


@pytest.mark.parametrize("options, message", [
    (dict(temperature=0.0), "temperature must be > 0"), (dict(temperature=-1.0), "temperature must be > 0"),
    (dict(top_k=-1), "top_k must be >= 0"), (dict(top_p=0.0), "top_p must be in \\(0, 1\\]"),
    (dict(top_p=1.5), "top_p must be in \\(0, 1\\]"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(min_p=1.5), "min_p must be in \\[0, 1\\]"), (dict(min_p=-0.1), "min_p must be in"),
])
def test_bad_sampling_options_name_the_problem(options, message):
    with pytest.raises(InputError, match=message):
        Sampling(**options)


WARPER_CASES = [  # (temperature, top_k, top_p, repetition_penalty, min_p)
    (1.0, 5, 0.9, 1.0, 0.0), (0.7, 8, 0.6, 1.3, 0.0), (1.3, 3, 0.95, 0.8, 0.0), (1.0, 0, 0.5, 1.0, 0.0),
    (0.9, 20, 1.0, 1.2, 0.1), (1.0, 6, 0.75, 1.0, 0.05), (1.0, 50, 0.3, 1.0, 0.0)]


def tied_logits(rows: int = 6, vocab: int = 40) -> np.ndarray:
    """Seeded logits rounded to a coarse grid, so ties sit at the top-k and top-p cuts; the last row's four
    equal leaders hold 0.25 each, so top_p 0.75 cuts exactly at 1 - p (where `<` and `<=` differ)."""
    rng = np.random.default_rng(3)
    logits = np.round(rng.normal(0, 2, (rows, vocab)) * 2) / 2
    logits[-1] = -1e4
    logits[-1, [7, 11, 19, 30]] = 0.0
    return logits.astype(np.float32)


@pytest.mark.parametrize("temperature, top_k, top_p, penalty, min_p", WARPER_CASES)
def test_filters_equal_transformers_own_warpers(temperature, top_k, top_p, penalty, min_p):
    """transformers' processors in generate()'s order: repetition penalty, temperature, top-k, top-p, min-p."""
    torch = pytest.importorskip("torch")
    generation = pytest.importorskip("transformers.generation.logits_process")
    logits = tied_logits()
    prompt = np.random.default_rng(4).integers(0, logits.shape[1], (logits.shape[0], 5))
    seen = np.zeros(logits.shape, bool)
    np.put_along_axis(seen, prompt, True, axis=1)
    steps = [generation.RepetitionPenaltyLogitsProcessor(penalty), generation.TemperatureLogitsWarper(temperature)]
    steps += [generation.TopKLogitsWarper(top_k)] if top_k else []
    steps += [generation.TopPLogitsWarper(top_p)] if top_p < 1 else []
    steps += [generation.MinPLogitsWarper(min_p)] if min_p else []
    ids, scores = torch.from_numpy(prompt), torch.from_numpy(logits.copy())
    for step in steps:
        scores = step(ids, scores)
    want = scores.numpy()
    got = filtered_logits(logits, seen, Sampling(do_sample=True, temperature=temperature, top_k=top_k,
                                                 top_p=top_p, repetition_penalty=penalty, min_p=min_p))
    for row, (mine, theirs) in enumerate(zip(got, want)):
        # which of two equal logits a cut drops is torch's sort order, not a rule: compare what is kept as
        # values (a tie straddling the cut leaves the same values), and how many
        kept, expected = np.sort(mine[np.isfinite(mine)]), np.sort(theirs[np.isfinite(theirs)])
        assert kept.size == expected.size, (row, kept.size, expected.size)
        np.testing.assert_allclose(kept, expected, rtol=1e-5, err_msg=f"row {row}")
