"""SentencePiece ("llama") vocabularies of GGUF files (Llama 2, TinyLlama, Mistral v0.1-0.3, Gemma) as a
`tokenizers` BPE that gives llama.cpp's ids, the file being made for llama.cpp."""
from __future__ import annotations

import importlib.util

import pytest

from hermes_ort import __main__ as cli
from hermes_ort.convert import convert_gguf
from hermes_ort.generation.tokenizer import Tokenizer

from tiny_gguf import TinyConfig, write_tiny_gguf

STRINGS = ["the cat", " the cat", "  the  cat", "hello world", "\tthe\thello", "café 世界", "emoji 🙂 ok",
           "<s>the</s> cat", "<|user|>hello<|assistant|> hat", "THE Cat!?", "a\n\nb", "", " ", "hello<s> world",
           "12345 l'or"]
# llama.cpp's ids (llama-cpp-python 0.3.36, tokenize(special=True), no BOS) on the tiny vocabulary
KNOWN = {"the cat": [264, 269], "  the  cat": [260, 264, 259, 269], "café 世界": [268, 289, 294, 283, 259, 288],
         "emoji 🙂 ok": [259, 293, 301, 303, 298, 297, 259, 243, 162, 156, 133, 259, 303, 299]}


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    write_tiny_gguf(root / "spm.gguf", TinyConfig(vocabulary="llama"))
    result = convert_gguf(root / "spm.gguf", root / "model", "fp32")
    return root / "spm.gguf", Tokenizer.from_dir(result.directory)


def test_ids_equal_llama_cpp(spm):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python (the peers extra) is not installed: pip install 'hermes-ort[peers]'")
    import llama_cpp

    path, tok = spm
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in STRINGS:
        assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=True), repr(text)
    assert tok.encode_prompt("the cat") == llm.tokenize(b"the cat", add_bos=True, special=True)


def test_known_ids_round_trip_and_bos(spm):
    """Without llama.cpp at hand: its ids recorded, merges by score, byte fallback (the emoji, the tab)."""
    _, tok = spm
    for text, ids in KNOWN.items():
        assert tok.encode(text) == ids, text
    for text in STRINGS[:7] + STRINGS[9:11]:
        assert tok.decode(tok.encode(text)) == text, repr(text)
    assert tok.encode_prompt("the cat") == [1, 264, 269]  # add_bos_token from the file
    assert tok.encode_prompt("<s>the cat") == tok.encode("<s>the cat")[:1] + tok.encode("<s>the cat")[1:]
    assert tok.encode_prompt("<s>the cat")[:2] != [1, 1]  # a prompt that starts with BOS gets no second one
    assert tok.encode("<|user|>") == [tok.token_id("<|user|>")]
    assert 2 in tok.eos_token_ids


def test_a_vocabulary_without_scores_is_one_line(tmp_path, capsys):
    import struct

    write_tiny_gguf(tmp_path / "spm.gguf", TinyConfig(vocabulary="llama"))
    data = bytearray((tmp_path / "spm.gguf").read_bytes())
    key = b"tokenizer.ggml.scores"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8
    data[at:at + len(key)] = b"tokenizer.ggml.scorez"  # the key gone, as in a file written without scores
    (tmp_path / "noscores.gguf").write_bytes(bytes(data))
    assert cli.main(["convert", str(tmp_path / "noscores.gguf"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().split("\n")[-1]
    assert err.startswith("hermes: error: ") and "noscores.gguf" in err and "tokenizer.ggml.scores" in err
    assert not (tmp_path / "out").exists()
