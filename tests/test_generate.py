"""Greedy decoding through streamed stages equals transformers' greedy generate on the same weights."""
import numpy as np
import pytest
import torch

import hermes_ort
from hermes_ort.__main__ import main as hermes
from hermes_ort.errors import InputError
from hermes_ort.planner import Plan


def streaming_plan(manifest):
    return Plan(budget=0, loaders=2, window=2, resident=(), prepacked=(), compute_threads=1,
                predicted_first_s=0, predicted_steady_s=0, predicted_peak_bytes=0)


@pytest.mark.parametrize("streamed", [False, True])
def test_greedy_generate_equals_transformers(exported, torch_model, streamed):
    directory, model = exported("tiny-gpt2").directory, torch_model("tiny-gpt2")
    prompt = np.random.default_rng(5).integers(0, 2048, (2, 6))
    with torch.no_grad():
        want = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones(2, 6, dtype=torch.long),
                              max_new_tokens=10, do_sample=False, pad_token_id=0).numpy()
    manifest = hermes_ort.InferenceSession(directory).manifest
    with hermes_ort.InferenceSession(directory, plan_override=streaming_plan(manifest) if streamed else None) as s:
        got = hermes_ort.generate(s, prompt, max_new_tokens=10)
    assert np.array_equal(got, want)


def test_generate_stops_at_eos(exported):
    with hermes_ort.InferenceSession(exported("tiny-gpt2").directory) as session:
        free = hermes_ort.generate(session, np.array([[1, 2, 3]]), max_new_tokens=6)
        eos = int(free[0, 4])  # the second generated token
        stopped = hermes_ort.generate(session, np.array([[1, 2, 3]]), max_new_tokens=6, eos_token_id=eos)
    assert stopped[0, -1] == eos and stopped.shape[1] <= free.shape[1]
    assert np.array_equal(stopped[0, :stopped.shape[1]], free[0, :stopped.shape[1]])


def test_generate_needs_a_decoder_with_a_cache(exported):
    with hermes_ort.InferenceSession(exported("tiny-bert").directory) as session:
        with pytest.raises(InputError, match="generate needs a decoder"):
            hermes_ort.generate(session, np.array([[1, 2]]), 3)


def test_cli_generate(exported, capsys):
    assert hermes(["generate", str(exported("tiny-gpt2").directory), "--ids", "1,2,3", "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.strip().split(",")) == 4
    assert hermes(["generate", str(exported("tiny-gpt2").directory), "--ids", "one,two"]) == 2
