"""`hermes quantize DIR --out DIR2 --bits 8|4`: weight-only quantized stages with ORT's own quantizer and
kernels (onnxruntime.quantization.matmul_nbits_quantizer -> MatMulNBits), stage by stage.

Gemm with a constant weight is rewritten to MatMul first (the quantizer converts MatMul only); the codes in
the nodes it made are then chosen by `recode` (block minimums by default, see block_codes: ORT's rounding
cost SmolLM2 2.5% of its next tokens at 8 bits). Heads are quantized symmetrically (no zero points), so a
tied LM head's 8-bit bytes double as the embedding table of a GatherBlockQuantized and are stored once, as
the fp32 table is. The LM head keeps 8 bits by default (a 4-bit head hurts small models most). The
directory is built beside its target, its drift against the source is measured on synthetic inputs and
written to the manifest, then it is published.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..format import manifest as manifest_io
from ..errors import HermesError
from ..format.manifest import FileSpec, Manifest, StageSpec
from ..format.publish import building
from ..format.stage_files import write_stage
from ..format.weights import WeightWriter, source_reader
from .recode import SCHEMES, matmul_weights, recode, replace_initializer


class QuantizeError(HermesError):
    """A model directory cannot be quantized as asked (already quantized, nothing to quantize, bad settings)."""


@dataclass(frozen=True)
class QuantizeSettings:
    bits: int = 4
    block_size: int = 32
    accuracy_level: int = 0  # MatMulNBits arithmetic: 0 float32, 4 int8 activations (fast 8-bit kernels)
    head_bits: int = 8
    scheme: str = "minmax"  # codes of the blocks' matrices (recode.SCHEMES); heads are always symmetric

    def check(self) -> None:
        if self.bits not in (4, 8) or self.head_bits not in (4, 8):
            raise QuantizeError(f"bits must be 4 or 8 (got {self.bits}, head {self.head_bits})")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise QuantizeError(f"block size must be a power of two from 16 to 256, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise QuantizeError(f"accuracy level must be 0-4, got {self.accuracy_level}")
        if self.scheme not in SCHEMES:
            raise QuantizeError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")

    @property
    def precision(self) -> str:
        return f"int{self.bits}"


@dataclass(frozen=True)
class TiedTable:
    """A tied head's quantized rows in row order: codes [V, E * bits / 8] (or, for an 8-bit head run as two
    4-bit halves, high and low [V, E / 2]) then scales [V, E / block]; and the half-open row ranges of the
    head parts that hold them."""

    arrays: list[np.ndarray]
    splits: list[tuple[int, int]]
    bits: int

    @property
    def halves(self) -> bool:
        return len(self.arrays) == 3


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in model.graph.node)


def load_stage(directory: Path, stage: StageSpec) -> onnx.ModelProto:
    """The stage graph with its weights read in (one stage at a time)."""
    return onnx.load(str(directory / stage.graph.path), load_external_data=True)


def quantized(model: onnx.ModelProto, bits: int, s: QuantizeSettings, scheme: str) -> onnx.ModelProto:
    """Gemm -> MatMul, then every MatMul with a constant weight -> MatMulNBits (block-wise along K)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.onnx_model import ONNXModel

    ONNXModel(model).replace_gemm_with_matmul()
    weights = matmul_weights(model)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=s.block_size, is_symmetric=True,
                                     accuracy_level=s.accuracy_level, op_types_to_quantize=("MatMul",))
    quantizer.process()
    recode(quantizer.model.model, weights, bits, s.block_size, scheme)
    return quantizer.model.model


def quantize_dir(src: str | os.PathLike, out: str | os.PathLike, s: QuantizeSettings = QuantizeSettings(),
                 check_drift: bool = True) -> Manifest:
    s.check()
    src, manifest = Path(src), manifest_io.load(src)
    if manifest.extra.get("precision", "fp32") not in ("fp32", "native") or any(
            is_quantized(onnx.load(str(src / st.graph.path), load_external_data=False)) for st in manifest.stages):
        raise QuantizeError(f"{src} is already quantized ({manifest.extra.get('precision', 'MatMulNBits stages')})"
                            f": quantize its fp32 source instead")
    with building(out) as tmp:
        heads = {st.name: quantized(load_stage(src, st), s.head_bits, s, "symmetric") for st in manifest.stages
                 if st.kind == "head"}
        tied = tied_table(src, manifest, heads)
        stages = write_stages(src, manifest, heads, tied, s, tmp)
        if all(not is_quantized(onnx.load(str(tmp / st.graph.path), load_external_data=False)) for st in stages):
            raise QuantizeError(f"{src}: no MatMul or Gemm with a constant weight to quantize")
        files = copy_files(src, manifest, tmp)
        extra = {**manifest.extra, "precision": s.precision, "bits": s.bits, "head_bits": s.head_bits,
                 "block_size": s.block_size, "scheme": s.scheme, "accuracy_level": s.accuracy_level,
                 "quantized_from": str(src)}
        result = dataclasses.replace(manifest, stages=tuple(stages), files=files, extra=extra)
        manifest_io.save(result, tmp)
        if check_drift:
            from .drift import measure_drift

            result = dataclasses.replace(result, extra={**extra, "drift": measure_drift(src, tmp)})
            manifest_io.save(result, tmp)
    return result


def write_stages(src: Path, manifest: Manifest, heads: dict, tied: TiedTable | None, s: QuantizeSettings,
                 tmp: Path) -> list[StageSpec]:
    writer, read, specs = WeightWriter(tmp), source_reader(tmp), []
    for st in manifest.stages:
        if st.name in heads:
            model = heads[st.name]
        elif st.kind == "embeddings":
            model = load_stage(src, st)
            if tied is not None:
                model = with_quantized_table(model, tied, s.block_size)
        else:
            model = quantized(load_stage(src, st), s.bits, s, s.scheme)
        specs.append(write_stage(model, tmp, st.name, st.kind, writer, read))
        if st.kind == "embeddings" and tied is not None:
            for array in tied.arrays:
                writer.register_rows(array, tied.splits)
    return specs


def head_weights(model: onnx.ModelProto) -> list[np.ndarray] | None:
    """A head part's codes [N, K/block, blob] (one MatMulNBits, or the two halves of an 8-bit one) and then
    their scales [N, K/block]; None for any other shape of graph."""
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if len(nodes) not in (1, 2) or len({n.input[2] for n in nodes}) != 1:
        return None
    inits = {t.name: t for t in model.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[1]]) for n in nodes] + [numpy_helper.to_array(inits[nodes[0].input[2]])]


def embedding_table(model: onnx.ModelProto) -> tuple[onnx.NodeProto, np.ndarray] | None:
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2:
            return n, numpy_helper.to_array(inits[n.input[0]])
    return None


def tied_table(src: Path, manifest: Manifest, heads: dict) -> TiedTable | None:
    """The quantized head parts, stacked, when the fp32 head rows are exactly the embedding table."""
    embeddings = next((st for st in manifest.stages if st.kind == "embeddings"), None)
    found = embedding_table(load_stage(src, embeddings)) if embeddings else None
    parts = [head_weights(heads[st.name]) for st in manifest.stages if st.name in heads]
    if found is None or not parts or any(p is None for p in parts):
        return None
    table = found[1]
    rows = np.cumsum([0] + [p[0].shape[0] for p in parts])
    splits = list(zip(rows[:-1].tolist(), rows[1:].tolist()))
    if rows[-1] != table.shape[0] or not all(same_rows(src, manifest, heads, table, splits)):
        return None
    if len({len(p) for p in parts}) != 1:
        return None
    arrays = [np.concatenate([p[i] for p in parts]).reshape(table.shape[0], -1) for i in range(len(parts[0]))]
    bits = 8 if len(arrays) == 3 else 8 * arrays[0].shape[1] // table.shape[1]
    return TiedTable(arrays, splits, bits)


def same_rows(src: Path, manifest: Manifest, heads: dict, table: np.ndarray, splits):
    """For each head part: were its fp32 weights rows [start, end) of the table (as Gemm(transB=1) or MatMul)?"""
    parts = [st for st in manifest.stages if st.name in heads]
    for st, (start, end) in zip(parts, splits):
        inits = [numpy_helper.to_array(t) for t in load_stage(src, st).graph.initializer if len(t.dims) == 2]
        yield any(w.shape == (end - start, table.shape[1]) and np.array_equal(w, table[start:end]) or (
            w.shape == (table.shape[1], end - start) and np.array_equal(w.T, table[start:end])) for w in inits)


def with_quantized_table(model: onnx.ModelProto, tied: TiedTable, block_size: int) -> onnx.ModelProto:
    """The embeddings' Gather over the fp32 table -> GatherBlockQuantized over the head's quantized bytes
    (for halves: 16 * lookup(high) + lookup(low) with zero points of 0, which is scale * (code - 128))."""
    gather, _ = embedding_table(model)
    name, ids, graph = gather.input[0], gather.input[1], model.graph
    codes, scales = tied.arrays[:-1], tied.arrays[-1]
    replace_initializer(model, name, None)
    for array, array_name in [(scales, name + "_scales")] + [(c, f"{name}_q{i or ''}") for i, c in enumerate(codes)]:
        replace_initializer(model, array_name, array)

    def lookup(i: int, output: str, bits: int, zero_points: str = ""):
        inputs = [f"{name}_q{i or ''}", ids, name + "_scales"] + ([zero_points] if zero_points else [])
        return helper.make_node("GatherBlockQuantized", inputs, [output], name=f"{gather.name or 'lookup'}{i or ''}",
                                domain="com.microsoft", bits=bits, block_size=block_size, gather_axis=0,
                                quantize_axis=1)

    out = gather.output[0]
    if not tied.halves:
        gather.CopyFrom(lookup(0, out, tied.bits))
    else:
        zeros = np.zeros((scales.shape[0], (scales.shape[1] + 1) // 2), np.uint8)
        graph.initializer.extend([numpy_helper.from_array(zeros, name + "_zero_points"),
                                  numpy_helper.from_array(np.array(16, np.float32), name + "_sixteen")])
        at = list(graph.node).index(gather)
        steps = [lookup(0, out + "_high", 4), lookup(1, out + "_low", 4, name + "_zero_points"),
                 helper.make_node("Mul", [out + "_high", name + "_sixteen"], [out + "_high16"], name=out + "_high16"),
                 helper.make_node("Add", [out + "_high16", out + "_low"], [out], name=out + "_halves")]
        graph.node.remove(gather)
        for offset, node in enumerate(steps):
            graph.node.insert(at + offset, node)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def copy_files(src: Path, manifest: Manifest, tmp: Path) -> tuple[FileSpec, ...]:
    """The tokenizer and generation files beside the stages, copied as they are."""
    for f in manifest.files:
        shutil.copyfile(src / f.path, tmp / f.path)
    return manifest.files
