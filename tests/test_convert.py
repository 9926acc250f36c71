"""hermes convert: tiny GGUF files written by the gguf package's writer, converted with no torch involved."""
from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

import hermes_ort
from hermes_ort import __main__ as cli
from hermes_ort.convert import ConvertError, convert_gguf, reference
from hermes_ort.convert.gguf_blocks import repack
from hermes_ort.convert.gguf_model import LlamaSettings
from hermes_ort.planning.planner import Plan
from hermes_ort.generation.tokenizer import Tokenizer

from tiny_gguf import K_QUANT, TinyConfig, write_tiny_gguf

CASES = {  # name -> (file settings, precision, MatMulNBits accuracy level)
    "llama-q4_1-fp32": (TinyConfig(), "fp32", 0),
    "llama-q4_1-native": (TinyConfig(), "native", 0),
    "qwen2-q4_0-untied-native": (TinyConfig(arch="qwen2", matrix_type="Q4_0", table_type="Q4_0", tied=False),
                                 "native", 0),
    "llama-q8_0-native-exact": (TinyConfig(matrix_type="Q8_0"), "native", 0),
    "llama-q8_0-native-int8": (TinyConfig(matrix_type="Q8_0"), "native", 4),
    "llama-q4_k_m-native": (TinyConfig(**K_QUANT[1]), "native", 0),
    "llama-q4_k_m-native-int8": (TinyConfig(**K_QUANT[1]), "native", 4),
    "qwen2-q4_k_m-untied-fp32": (TinyConfig(arch="qwen2", tied=False, head_type="Q6_K", **K_QUANT[1]), "fp32", 0),
    "llama-q4_k-table-untied-native": (TinyConfig(**{**K_QUANT[1], "table_type": "Q4_K", "tied": False}), "native", 0),
    "phi3-partial-rotary-native": (TinyConfig(arch="phi3", tied=False, rotary_dim=12), "native", 0),
    "gemma3-sliding-native": (TinyConfig(arch="gemma3", layers=6, window=3, rope_base=1e6, head_dim=16), "native", 0),
    "qwen3-head-dim-native": (TinyConfig(arch="qwen3", head_dim=128, matrix_type="Q8_0"), "native", 0),
    "llama3-rope-freqs-native": (TinyConfig(rope_freqs=tuple(np.linspace(1.0, 8.0, 8))), "native", 0),
}


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    cfg, precision, level = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    values = write_tiny_gguf(root / "tiny.gguf", cfg)
    result = convert_gguf(root / "tiny.gguf", root / "model", precision, level)
    return cfg, precision, values, result


def settings_of(cfg: TinyConfig, vocab: int, values: dict | None = None) -> LlamaSettings:
    divisors = tuple(float(v) for v in values["rope_freqs.weight"]) if cfg.rope_freqs else ()
    return LlamaSettings(cfg.arch, cfg.layers, cfg.hidden, cfg.heads, cfg.kv_heads, cfg.ffn, vocab, 128, cfg.rope_base,
                         1e-5, tied_head=cfg.tied, gemma=cfg.arch == "gemma3", window=cfg.window,
                         sliding_pattern=6 if cfg.arch == "gemma3" else 0, qkv_bias=cfg.arch == "qwen2", qk_norm=cfg.arch in ("qwen3", "gemma3"),
                         key_length=cfg.head_dim, rope_divisors=divisors, fused=cfg.arch == "phi3",
                         rotary_dim=cfg.rotary_dim)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_blocks_repack_exactly(kind):
    w = np.random.default_rng(1).standard_normal((48, 96)).astype(np.float32)
    raw = quantize(w, GGMLQuantizationType[kind])
    got = repack(kind, raw.view(np.uint8).reshape(48, -1)).dequantized()
    assert np.array_equal(got, dequantize(raw, GGMLQuantizationType[kind]))


def test_logits_equal_the_float_weights_the_file_holds(converted):
    """Against the reference on the weights as written before llama.cpp's Q/K permutation: a wrong un-permute,
    rotary layout, GQA grouping or Q4_1 correction moves the logits by O(1)."""
    cfg, precision, values, result = converted
    s = settings_of(cfg, values["token_embd.weight"].shape[0], values)
    ids = np.array([5, 17, 260, 99, 3, 42, 7])
    want = reference.logits(lambda n: values[n], s, ids)
    with hermes_ort.InferenceSession(result.directory) as session:
        feed = {"input_ids": ids[None], "position_ids": np.arange(7)[None], "attention_mask": np.ones((1, 7), np.int64),
                **{t.name: np.zeros((1, cfg.kv_heads, 0, cfg.head_dim or cfg.hidden // cfg.heads), np.float32)
                   for t in session.manifest.inputs if t.name.startswith("past.")}}
        got = session.run(["logits"], feed)[0][0]
    int8 = result.manifest.extra["tolerance"] > 1e-2  # some matrix ran with int8 activations
    tolerance = 5e-2 if int8 else {"fp32": 1e-4, "native": 1e-3}[precision]
    deviation = np.max(np.abs(got - want))
    assert deviation <= tolerance * max(1.0, np.max(np.abs(want)))
    top2 = np.sort(want, -1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0] > 2 * deviation) if int8 else np.ones(len(ids), bool)  # int8: near-ties may flip
    assert clear.sum() >= len(ids) // 2 and np.array_equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def greedy_by_recompute(values, s: LlamaSettings, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(reference.logits(lambda name: values[name], s, np.array(ids))[-1].argmax()))
    return ids


def test_generation_streams_the_cache_and_matches_recompute(converted):
    cfg, precision, values, result = converted
    s = settings_of(cfg, values["token_embd.weight"].shape[0], values)
    prompt = [12, 200, 31, 260]
    if result.manifest.extra["tolerance"] > 1e-2:
        pytest.skip("int8 activations: greedy may take the other side of a near-tie on random weights")
    want = greedy_by_recompute(values, s, prompt, 10)
    names = tuple(st.name for st in result.manifest.stages)
    streamed = Plan(budget=0, loaders=2, window=2, resident=(), prepacked=names, compute_threads=1,
                    predicted_first_s=0, predicted_steady_s=0, predicted_peak_bytes=0)
    with hermes_ort.InferenceSession(result.directory, plan_override=streamed) as session:
        assert hermes_ort.generate(session, np.array([prompt]), 10)[0].tolist() == want
    assert hermes_ort.generate(result.directory, np.array([prompt]), 10, memory_budget="1GiB")[0].tolist() == want


def test_manifest_states_precision_and_the_measured_check(converted):
    cfg, precision, values, result = converted
    extra = result.manifest.extra
    assert extra["precision"] == precision
    assert extra["max_rel_diff_logits"] <= extra["tolerance"]
    assert result.manifest.family == cfg.arch
    assert {"embeddings", "block_00", "block_01"} <= {st.name for st in result.manifest.stages}
    hermes_ort.format.manifest.load(result.directory, deep=True)  # every file's sha256 as stated


def test_only_the_token_table_is_kept_in_small_pages(converted):
    """Looked up row by row, it would cost 2 MiB of RSS per row from huge pages (page_cache.py)."""
    from hermes_ort.format.page_cache import looked_up_files

    _, _, _, result = converted
    tables = looked_up_files(result.directory, result.manifest)
    embeddings = next(s for s in result.manifest.stages if s.kind == "embeddings")
    assert tables == {f.path for f in embeddings.weights}


def test_native_keeps_quantized_bytes(converted):
    cfg, precision, values, result = converted
    size = result.manifest.bytes
    floats = sum(v.nbytes for v in values.values())
    if precision == "native":  # every quantized type stays quantized, Q8_0 too (as two 4-bit halves)
        assert size < floats / 2
    else:
        assert size > floats * 0.5


def test_q8_0_runs_as_4_bit_halves_that_are_the_file_weights_exactly(tmp_path):
    """At accuracy level 0, every Q8_0 matrix and the tied Q8_0 head run on 4-bit MatMulNBits only (ORT 1.32
    has no fast float32 8-bit kernel): the 4+4 split, whose weights, low + 16 * (high - 8) at the scale, are
    the GGUF's dequantized weights bit for bit; the embeddings look up the very same bytes."""
    import onnx

    from hermes_ort.convert.native_weights import NativeWeights, halves, split_arrays
    from hermes_ort.convert.block_codes import unpack
    from hermes_ort.convert.gguf_model import GGUFModel

    values = write_tiny_gguf(tmp_path / "tiny.gguf", TinyConfig(matrix_type="Q8_0"))
    result = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "model", "native", 0)
    bits = [a.i for st in result.manifest.stages for n in onnx.load(str(result.directory / st.graph.path)).graph.node
            if n.op_type in ("MatMulNBits", "GatherBlockQuantized") for a in n.attribute if a.name == "bits"]
    assert bits and set(bits) == {4}
    b = NativeWeights(GGUFModel(tmp_path / "tiny.gguf")).blocks("token_embd.weight")
    high, low, zeros = halves(b)  # the tied table and head: two halves at one scale
    q = 16 * (unpack(high, 4).astype(np.float32) - 8) + (unpack(low, 4).astype(np.float32) - zeros.min())
    assert np.array_equal((q * b.scales[..., None]).reshape(b.codes.shape[0], -1), values["token_embd.weight"])
    codes, scales, zeros = split_arrays(NativeWeights(GGUFModel(tmp_path / "tiny.gguf")).read("blk.0.ffn_up.weight"))
    q = (unpack(codes, 4).astype(np.float32) - unpack(zeros, 4)[..., None]) * scales[..., None]  # a matrix: one node
    blocks = q.shape[1] // 2
    assert np.array_equal((q[:, :blocks] + q[:, blocks:]).reshape(q.shape[0], -1), values["blk.0.ffn_up.weight"])
    with hermes_ort.InferenceSession(result.directory) as session:
        ids = np.arange(values["token_embd.weight"].shape[0])[None]
        feed = {"input_ids": ids, "position_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids)}
        embeddings = session.manifest.stages[0]
        rows = hermes_ort.engine.sessions.run_stage(embeddings, hermes_ort.engine.sessions.open_stage(
            result.directory, embeddings, hermes_ort.engine.sessions.SessionConfig()), feed)["hidden.0"][0]
    assert np.array_equal(rows, values["token_embd.weight"])


def test_tokenizer_and_chat_template_from_the_vocabulary(converted):
    cfg, precision, values, result = converted
    tok = Tokenizer.from_dir(result.directory)
    ids = tok.encode("the cat in the hat")
    assert tok.decode(ids) == "the cat in the hat"
    assert 258 in ids  # "Ġthe", built by two merges
    im_end = tok.token_id("<|im_end|>")
    assert im_end in tok.eos_token_ids and tok.encode("<|im_end|>") == [im_end]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_not_a_gguf_is_one_line_and_leaves_nothing(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    assert cli.main(["convert", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.gguf" in err and "not a GGUF" in err
    assert not (tmp_path / "out").exists()


def test_truncated_file_names_itself(tmp_path, capsys):
    write_tiny_gguf(tmp_path / "whole.gguf")
    data = (tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 2 // 3])
    assert cli.main(["convert", str(tmp_path / "cut.gguf"), "--out", str(tmp_path / "out")]) == 2
    assert "cut.gguf" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_and_type(tmp_path):
    write_tiny_gguf(tmp_path / "falcon.gguf", TinyConfig(arch="falcon"))
    with pytest.raises(ConvertError, match="architecture 'falcon'"):
        convert_gguf(tmp_path / "falcon.gguf", tmp_path / "out")
    write_tiny_gguf(tmp_path / "q8k.gguf", TinyConfig(hidden=256, ffn=512, matrix_type="Q8_K"))
    with pytest.raises(ConvertError, match="q8k.gguf.*type Q8_K"):
        convert_gguf(tmp_path / "q8k.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_self_check_publishes_nothing(tmp_path, monkeypatch):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    real = reference.block
    monkeypatch.setattr(reference, "block", lambda *a: tuple(x * 1.01 for x in real(*a)))
    with pytest.raises(ConvertError, match="block_00"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", "fp32")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    monkeypatch.undo()
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", "fp32")  # re-running succeeds
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["extra"]["precision"] == "fp32"


def patched(source, target, key: str, value: bytes) -> None:
    """A copy of a GGUF with one metadata value's bytes replaced (same length)."""
    import struct

    data = bytearray(source.read_bytes())
    name = struct.pack("<Q", len(key)) + key.encode()
    at = data.index(name) + len(name) + 4  # after the value's type
    data[at:at + len(value)] = value
    target.write_bytes(bytes(data))


def test_metadata_that_contradicts_the_tensors_is_refused_naming_the_numbers(tmp_path, capsys):
    """A head count that does not divide the hidden size would reach ORT's Reshape (and its log lines)."""
    import struct

    write_tiny_gguf(tmp_path / "tiny.gguf")
    patched(tmp_path / "tiny.gguf", tmp_path / "heads.gguf", "llama.attention.head_count", struct.pack("<I", 5))
    assert cli.main(["convert", str(tmp_path / "heads.gguf"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "heads.gguf" in err and "head_count 5" in err and "64" in err
    assert not (tmp_path / "out").exists()


def test_invalid_utf8_in_the_vocabulary_is_one_line_naming_the_key(tmp_path, capsys):
    """The vocabulary is read after the blocks were written: the error ends the progress line first."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    data = bytearray((tmp_path / "tiny.gguf").read_bytes())
    data[data.index("<|im_start|>".encode())] = 0xFF
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    assert cli.main(["convert", str(tmp_path / "bad.gguf"), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().split("\n")
    assert len(lines) == 2 and lines[0].endswith("block 2/2")
    assert lines[1].startswith("hermes: error: ") and "bad.gguf" in lines[1] and "'tokenizer.ggml.tokens'" in lines[1]
    assert not (tmp_path / "out").exists()


def test_an_error_after_the_progress_is_a_line_of_its_own(tmp_path, capsys, monkeypatch):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    real = reference.block
    monkeypatch.setattr(reference, "block", lambda *a: tuple(x * 1.01 for x in real(*a)))
    assert cli.main(["convert", str(tmp_path / "tiny.gguf"), "--out", str(tmp_path / "out"), "--precision",
                     "fp32"]) == 2
    lines = capsys.readouterr().err.strip().split("\n")
    assert lines[0].endswith("block 2/2") and "error" not in lines[0]
    assert len(lines) == 2 and lines[1].startswith("hermes: error: ") and "tiny.gguf" in lines[1]


def test_fuzzed_files_give_one_line_errors_or_checked_models(tmp_path):
    """Seeded mutations of a tiny llama GGUF (bit flips in the header and metadata, 8-byte counts and offsets
    set huge, truncation), in a child with a capped address space and a time limit: each is a one-line error
    naming the file (nothing published, nothing left beside it) or a model that passed its self-check."""
    import subprocess
    import sys
    from pathlib import Path

    write_tiny_gguf(tmp_path / "source.gguf")
    fuzz = Path(__file__).with_name("gguf_fuzz.py")
    run = subprocess.run([sys.executable, str(fuzz), str(tmp_path / "source.gguf"), str(tmp_path), "60", "7"],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(rows) == 60
    outcomes = {r["outcome"] for r in rows}
    assert outcomes <= {"error", "converted"}, [r for r in rows if r["outcome"] not in ("error", "converted")]
    assert {"error", "converted"} <= outcomes
    for r in rows:
        assert not r["leftovers"], r
        if r["outcome"] == "error":
            errors = [line for line in r["stderr"] if "error" in line]
            assert len(errors) == 1 and errors[0].startswith("hermes: error: "), r
            assert f"m{r['n']}.gguf" in errors[0] and not r["published"], r
        else:
            assert r["published"], r


def test_gemma3_sliding_layers_keep_only_their_window(tmp_path):
    """Five of every six gemma3 layers attend over the last `window` positions: their present keeps the
    last window - 1 (the cache stays bounded as the context grows), the sixth keeps every position; the
    generation layout counts them so, and decoding through those caches equals recomputing (the CASES
    tests)."""
    from hermes_ort.generation.decoding import CacheLayout

    cfg = TinyConfig(arch="gemma3", layers=6, window=3, rope_base=1e6, head_dim=16)
    write_tiny_gguf(tmp_path / "g.gguf", cfg)
    result = convert_gguf(tmp_path / "g.gguf", tmp_path / "model", "fp32")
    ids = np.array([[5, 17, 260, 99, 3, 42, 7]])
    with hermes_ort.InferenceSession(result.directory) as session:
        feed = {"input_ids": ids, "position_ids": np.arange(7)[None], "attention_mask": np.ones((1, 7), np.int64),
                **{t.name: np.zeros((1, cfg.kv_heads, 0, 16), np.float32)
                   for t in session.manifest.inputs if t.name.startswith("past.")}}
        names = [o.name for o in session.get_outputs()]
        out = dict(zip(names, session.run(None, feed)))
    assert [out[f"present.{i}.key"].shape[2] for i in range(6)] == [2, 2, 2, 2, 2, 7]
    layout = CacheLayout.of(result.manifest)
    per_position = 2 * cfg.kv_heads * 16 * 4  # key and value, one layer
    assert layout.bytes(1, 100) == per_position * (5 * 2 + 100)
