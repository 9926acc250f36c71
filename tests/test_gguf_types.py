"""Every GGUF tensor type a downloaded file holds, read into codes and run on ORT's kernels: the weights the
converted graphs multiply are gguf-py's dequantized float32 weights, bit for bit (no torch involved)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from hermes_ort.convert.gguf_blocks import TYPES, repack
from hermes_ort.convert.gguf_model import GGUFModel
from hermes_ort.convert.native_weights import NativeWeights, split_arrays
from hermes_ort.convert.block_codes import unpack
from hermes_ort.convert.onnx_builder import GraphBuilder, value

from tiny_gguf import K_QUANT, TinyConfig, stored, write_tiny_gguf

ALL_TYPES = sorted(TYPES)
# one tiny model holding every type with an exact form (K a multiple of 256 for the K-quants)
EVERY_TYPE = TinyConfig(hidden=256, heads=4, kv_heads=2, ffn=512, matrix_type="Q4_K", table_type="Q4_K",
                        types=(("attn_q", "Q2_K"), ("attn_k", "Q3_K"), ("attn_v", "Q5_K"), ("attn_output", "IQ4_XS"),
                               ("ffn_gate", "IQ4_NL"), ("ffn_up", "Q5_1"), ("ffn_down", "Q6_K")))


def matrix(kind: str, rows: int = 24, k: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(the GGUF bytes [rows, bytes per row], gguf-py's float32 dequantization [rows, k])."""
    w = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32) * 0.3
    raw, held = stored(w, kind)
    return np.asarray(raw).view(np.uint8).reshape(rows, -1), held


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_every_type_reads_into_the_exact_weights(kind):
    raw, held = matrix(kind)
    b = repack(kind, raw)
    assert np.array_equal(b.dequantized(), held)
    assert b.codes.max() < (1 << b.bits) and b.codes.dtype == np.uint8


@pytest.mark.parametrize("kind", [k for k in ALL_TYPES if TYPES[k].bits == 8])
def test_the_4_plus_4_split_is_the_8_bit_codes_exactly(kind):
    """low + 16 * (high - 8) at scales d and 16 d: each weight d * (code - 128), for the doubled-K node."""
    raw, held = matrix(kind)
    b = repack(kind, raw)
    codes, scales, zeros = split_arrays(b)
    q = unpack(codes, 4).astype(np.float64)
    z = unpack(zeros, 4)[:, :q.shape[1]].astype(np.float64)
    w = (q - z[..., None]) * scales[..., None]
    blocks = b.codes.shape[1]
    exact = (w[:, :blocks] + w[:, blocks:]).reshape(b.rows, -1) + (0 if b.mins is None else np.repeat(b.mins, b.block, 1))
    assert np.array_equal(exact.astype(np.float32), held)


def run_graph(g: GraphBuilder, y: str, feed: dict, inputs: list) -> np.ndarray:
    model = g.model(inputs, [value(y, np.float32, None)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


@pytest.fixture(scope="module")
def every_type_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("every") / "every.gguf"
    return path, write_tiny_gguf(path, EVERY_TYPE)


@pytest.mark.parametrize("level", [0, 4])
def test_each_matrix_node_multiplies_the_file_weights(every_type_file, level):
    """The converter's own nodes fed the identity: at float32 arithmetic every output is one weight,
    bit for bit (each product and the block-sum offsets are exact); at int8 activations the identity is
    quantized as 127 / 127, so the weights come back to float32 rounding."""
    path, values = every_type_file
    weights = NativeWeights(GGUFModel(path), level)
    for suffix, kind in EVERY_TYPE.types:
        name = f"blk.0.{suffix}.weight"
        want = values[name]  # [out, in], transformers' layout
        g = GraphBuilder("one")
        y = weights.linear(g, "x", name)
        eye = np.eye(want.shape[1], dtype=np.float32)[None]
        got = run_graph(g, y, {"x": eye}, [value("x", np.float32, [1, "n", want.shape[1]])])[0].T
        if level == 0:
            assert np.array_equal(got, want), (kind, np.abs(got - want).max())
        else:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=kind)


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("table_type", ["Q4_K", "Q6_K"])
def test_the_table_lookup_and_the_tied_head_share_the_file_weights(tmp_path, table_type, level):
    """A Q4_K table (minimums added) or a Q6_K one (8-bit; two 4-bit halves at float32 arithmetic) looked up
    row by row is the file's table exactly, and the tied head's parts multiply the same weights (their
    bytes are the table's, stored once)."""
    path = tmp_path / "tied.gguf"
    values = write_tiny_gguf(path, TinyConfig(**{**K_QUANT[1], "table_type": table_type}))
    table = values["token_embd.weight"]
    weights = NativeWeights(GGUFModel(path), level)
    g = GraphBuilder("lookup")
    rows = weights.lookup(g, "ids")
    ids = np.arange(table.shape[0])[None]
    got = run_graph(g, rows, {"ids": ids}, [value("ids", np.int64, [1, "n"])])[0]
    assert np.array_equal(got, table)
    g = GraphBuilder("head")
    logits = weights.head_rows(g, "x", 8, 72)
    eye = np.eye(table.shape[1], dtype=np.float32)
    got = run_graph(g, logits, {"x": eye}, [value("x", np.float32, ["n", table.shape[1]])]).T
    if level == 0:
        assert np.array_equal(got, table[8:72])
    else:
        np.testing.assert_allclose(got, table[8:72], rtol=1e-6, atol=1e-6 * np.abs(table).max())
    from onnx import numpy_helper

    table_codes = weights.shared_rows()[0]
    head_codes = max((numpy_helper.to_array(t) for t in g.initializers if t.data_type == 2), key=np.size)
    assert head_codes.tobytes() == table_codes[8:72].tobytes()


@pytest.mark.parametrize("kind", ["Q6_K", "Q8_0", "Q5_0"])
def test_an_8_bit_table_at_float32_arithmetic_untied_is_looked_up_in_8_bits(tmp_path, kind):
    """No head shares an untied table's bytes, so it keeps one 8-bit lookup (exact) rather than the split."""
    cfg = TinyConfig(hidden=256, heads=4, kv_heads=2, ffn=512, matrix_type="Q4_K", table_type=kind, tied=False,
                     head_type="Q4_K")
    values = write_tiny_gguf(tmp_path / "t.gguf", cfg)
    weights = NativeWeights(GGUFModel(tmp_path / "t.gguf"), 0)
    g = GraphBuilder("lookup")
    rows = weights.lookup(g, "ids")
    assert [n.op_type for n in g.nodes] == ["GatherBlockQuantized"]
    assert [a.i for a in g.nodes[0].attribute if a.name == "bits"] == [8]
    ids = np.arange(values["token_embd.weight"].shape[0])[None]
    got = run_graph(g, rows, {"ids": ids}, [value("ids", np.int64, [1, "n"])])[0]
    assert np.array_equal(got, values["token_embd.weight"])


def test_int8_activations_take_no_zero_point_input(every_type_file):
    """onnxruntime issue 29853: AVX2 CompInt8 with zero points gives wrong results for one row; at level 4
    every zero that is not the implied one is folded into the block offsets."""
    path, _ = every_type_file
    weights = NativeWeights(GGUFModel(path), 4)
    g = GraphBuilder("all")
    for suffix, _ in EVERY_TYPE.types:
        weights.linear(g, "x", f"blk.0.{suffix}.weight")
    weights.head_rows(g, "x", 0, 64)
    nodes = [n for n in g.nodes if n.op_type == "MatMulNBits"]
    assert nodes and all(len(n.input) == 3 for n in nodes)
    assert {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"} == {4}


def test_a_file_read_in_part_maps_the_table_minimums_beside_it(tmp_path):
    """An untied Q4_K table: its codes and zero points are read by GatherBlockQuantized, its minimums by a
    Gather (looked up): one file, so the prepared stage maps every weight it holds (a map of only the read
    span left the minimums outside it: 'buffer is smaller than requested size')."""
    from hermes_ort.engine.prepared import MappedWeights, read_spans
    from hermes_ort.engine.templates import WeightRef

    data = np.arange(3 << 20, dtype=np.uint8)
    (tmp_path / "embeddings.data").write_bytes(data.tobytes())
    refs = (WeightRef("w_0", "embeddings.data", 0, 1 << 20, "uint8", (1 << 20,)),
            WeightRef("w_1", "embeddings.data", 2 << 20, 1 << 20, "uint8", (1 << 20,), looked_up=True))
    assert read_spans(refs) == {"embeddings.data": (0, 3 << 20)}
    weights = MappedWeights(tmp_path, refs, {"embeddings.data"})
    assert np.array_equal(weights.arrays["w_1"], data[2 << 20:])
    weights.close()


def test_a_type_with_no_exact_form_is_dequantized_with_one_note(tmp_path, capsys):
    """TQ2_0 (ternary) has no form on ORT's kernels here: native converts it to float32 and says so once;
    fp32 reads every type gguf-py dequantizes."""
    from hermes_ort import __main__ as cli
    from hermes_ort.convert import convert_gguf
    from hermes_ort.format import manifest

    cfg = TinyConfig(hidden=256, heads=4, kv_heads=2, ffn=512, matrix_type="Q4_K", types=(("ffn_up", "TQ2_0"),))
    write_tiny_gguf(tmp_path / "t.gguf", cfg)
    assert cli.main(["convert", str(tmp_path / "t.gguf"), "--out", str(tmp_path / "native")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert notes == ["note: TQ2_0 has no exact form on ORT's kernels: its tensors are dequantized to float32"]
    forms = manifest.load(tmp_path / "native").extra["tensor_forms"]
    assert forms["blk.0.ffn_up.weight"] == "TQ2_0 -> float32 (no exact form)"
    assert forms["blk.0.ffn_gate.weight"].startswith("Q4_K -> MatMulNBits 4-bit, block 32")
    assert convert_gguf(tmp_path / "t.gguf", tmp_path / "fp32", "fp32").max_diff <= 1e-4
