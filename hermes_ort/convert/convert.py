"""`hermes convert FILE.gguf --out DIR`: a Llama-family GGUF to a model directory, on the board (no torch).

Tensors are read from the memory-mapped file one stage at a time and written as the stages of the exporter's
format. The directory is built beside its target and published only after it checks itself: every block
against the numpy reference of that layer on random inputs, then the chained stages against the reference
forward of the whole model on a few tokens. The tolerance and the measured differences go in the manifest.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..format import manifest as manifest_io
from ..format.manifest import FileSpec, Manifest, StageSpec
from ..format.publish import building
from ..engine.sessions import SessionConfig, open_stage, run_stage
from ..format.stage_files import write_stage
from ..format.weights import WeightWriter, head_splits, source_reader
from . import llama_graph, reference
from .float_weights import Float32Weights
from .gguf_model import ConvertError, GGUFModel
from .gguf_tokenizer import UnsupportedVocabulary, write_tokenizer

PRECISIONS = ("native", "fp32", "int8", "int4")
MAX_HEAD_PARTS = 8  # every stage costs a run call per token: a 3 MB native block would cut a head into 37
# Relative to the largest magnitude of the output checked: real layers reach |x| ~ 150-500 on random inputs,
# where float32 summation order alone moves the last digits (SmolLM2 fp32 blocks: up to 7e-6 here). int8
# activations (MatMulNBits accuracy level 4) move them by a few %: SmolLM2 Q4_1 at level 4 checks at 0.044
# (blocks) and 0.033 (logits) in the runs of `python -m bench.accuracy SmolLM2-135M-Instruct.Q4_1.gguf
# [--files ...]` (README) where its logits on real text were as close to float32 as llama.cpp's on the same
# file (3,072 positions: top-1 96.9% against 96.5%, mean KL 3.6e-3 against 3.9e-3). 0.1 leaves room for
# other models and rejects float32 block sums under the Q4_1 minimums there (5.5x llama.cpp's KL; blocks up
# to 0.20). A wrong graph is off by O(1). The logits' top-1 must agree in every case.
TOLERANCE = {"fp32": 1e-4, "native": 1e-3, "int8 activations": 0.1}
# MatMulNBits arithmetic when none is asked: native runs at llama.cpp's (int8 activations, bench.accuracy);
# int8/int4 re-quantize through hermes quantize, whose block sums are the float input's (float32 arithmetic).
DEFAULT_LEVEL = {"native": 4, "fp32": 0, "int8": 0, "int4": 0}


@dataclass(frozen=True)
class ConvertResult:
    manifest: Manifest
    directory: Path
    seconds: float
    max_diff: float
    notes: tuple[str, ...]  # what was left out (a tokenizer we cannot build)


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike, precision: str = "native",
                 accuracy_level: int | None = None, check_tokens: int = 6, progress=None) -> ConvertResult:
    """accuracy_level: MatMulNBits arithmetic, 0 float32 (Q8_0 as two exact 4-bit halves) or 4 int8 activations
    per 32-block (native_weights.py); None: DEFAULT_LEVEL of the precision."""
    if precision not in PRECISIONS:
        raise ConvertError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    accuracy_level = DEFAULT_LEVEL[precision] if accuracy_level is None else accuracy_level
    if precision in ("int8", "int4"):
        return requantized(path, out, int(precision[3:]), accuracy_level, progress)
    start, model = time.perf_counter(), GGUFModel(path)
    weights = weights_for(model, precision, accuracy_level)
    with building(out) as tmp:
        stages = write_stages(model, weights, tmp, progress)
        files, notes = tokenizer_files(model, tmp)
        notes += tuple(weights.notes)
        manifest = describe(model, stages, files, precision)
        if precision == "native":  # the arithmetic, and the kernel form each quantized tensor took
            manifest = dataclasses.replace(manifest, extra={**manifest.extra, "accuracy_level": accuracy_level,
                                                            "tensor_forms": weights.forms})
        manifest_io.save(manifest, tmp)
        tolerance = TOLERANCE["int8 activations" if weights.int8_activations else precision]
        try:
            diffs = self_check(model, tmp, check_tokens, tolerance)
        except ConvertError as e:
            raise ConvertError(f"{model.path}: {e}") from e
        manifest = dataclasses.replace(manifest, extra={**manifest.extra, "tolerance": tolerance, **diffs})
        manifest_io.save(manifest, tmp)
    return ConvertResult(manifest, Path(out), time.perf_counter() - start, max(diffs.values()), notes)


def requantized(path, out, bits: int, accuracy_level: int, progress) -> ConvertResult:
    """The fp32 conversion (checked), quantized by hermes quantize into `out`; the fp32 copy is removed."""
    import tempfile

    from .quantize import QuantizeSettings, quantize_dir

    start = time.perf_counter()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(out).parent, prefix=f".{Path(out).name}.fp32-") as scratch:
        fp32 = convert_gguf(path, Path(scratch) / "fp32", "fp32", progress=progress)
        manifest = quantize_dir(fp32.directory, out, QuantizeSettings(bits=bits, accuracy_level=accuracy_level))
    return ConvertResult(manifest, Path(out), time.perf_counter() - start, fp32.max_diff, fp32.notes)


def weights_for(model: GGUFModel, precision: str, accuracy_level: int):
    if precision == "fp32":
        return Float32Weights(model)
    from .native_weights import NativeWeights

    return NativeWeights(model, accuracy_level)


def write_stages(model: GGUFModel, weights, directory: Path, progress) -> list[StageSpec]:
    s, writer, read = model.settings, WeightWriter(directory), source_reader(directory)
    write = lambda graph, name, kind: write_stage(graph, directory, name, kind, writer, read)
    specs = [write(llama_graph.embeddings(weights, s), "embeddings", "embeddings")]
    for i in range(s.layers):
        specs.append(write(llama_graph.block(weights, i, s), f"block_{i:02d}", "block"))
        progress and progress(i + 1, s.layers)
    head_bytes = s.vocab * weights.row_bytes()  # parts of a block's size, but at most MAX_HEAD_PARTS of them:
    block_bytes = specs[min(1, s.layers)].bytes  # block_00, or the embeddings of a model without blocks
    splits = head_splits(s.vocab, weights.row_bytes(), max(block_bytes, head_bytes // MAX_HEAD_PARTS))
    for table in weights.shared_rows():
        writer.register_rows(table, splits)
    for j in range(len(splits)):
        name = f"head_{j:02d}" if len(splits) > 1 else "head"
        specs.append(write(llama_graph.head_part(weights, s, j, splits), name, "head"))
    return specs


def tokenizer_files(model: GGUFModel, directory: Path) -> tuple[tuple[FileSpec, ...], tuple[str, ...]]:
    try:
        names = write_tokenizer(model, directory)
    except UnsupportedVocabulary as e:
        return (), (str(e),)
    except ConvertError:
        raise
    except Exception as e:  # `tokenizers` refusing a damaged vocabulary
        raise ConvertError(f"{model.path}: the vocabulary cannot be built ({type(e).__name__}: {e})") from e
    return tuple(FileSpec.of(directory, n) for n in names), ()


def describe(model: GGUFModel, stages: list[StageSpec], files: tuple[FileSpec, ...], precision: str) -> Manifest:
    produced = {t.name for st in stages for t in st.outputs}
    consumed = {t.name for st in stages for t in st.inputs}
    inputs = {t.name: t for st in stages for t in st.inputs if t.name not in produced}
    outputs = [t for st in stages for t in st.outputs if t.name not in consumed]
    return Manifest(family=model.settings.architecture, config=model.settings.as_config(),
                    inputs=tuple(inputs.values()), outputs=tuple(outputs), stages=tuple(stages),
                    tokenizer="tokenizer.json" if files else None,
                    extra={"source": str(model.path), "precision": precision,
                           "gguf_name": model.field("general.name")}, files=files)


def self_check(model: GGUFModel, directory: Path, tokens: int, tolerance: float) -> dict[str, float]:
    """Max abs differences of every block and of the whole chain against the numpy reference."""
    from ..session import InferenceSession

    s, rng = model.settings, np.random.default_rng(0)
    rows = cached_tables(model)
    with InferenceSession(directory, memory_budget=None) as session:
        worst_block = 0.0
        shared = shared_tables(session.manifest, directory, tokens)
        for i in range(s.layers):
            x = rng.standard_normal((tokens, s.hidden)).astype(np.float32)
            stage = session.manifest.stage(f"block_{i:02d}")
            got = run_stage(stage, open_stage(directory, stage, SessionConfig()), {**shared, **block_feed(s, i, x)})
            want = reference.block(rows, i, s, x)
            diff = max(relative_diff(got[t.name][0], w) for t, w in zip(stage.outputs, want))
            worst_block = check(diff, tolerance, f"block_{i:02d} against the numpy reference", worst_block)
        ids = rng.integers(0, s.vocab, tokens)
        feed = {"input_ids": ids[None], "position_ids": np.arange(tokens)[None], "attention_mask": np.ones((1, tokens),
                                                                                                           np.int64)}
        feed |= {f"past.{i}.{kv}": np.zeros((1, s.kv_heads, 0, s.head_dim), np.float32)
                 for i in range(s.layers) for kv in ("key", "value")}
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))["logits"][0]
        want = reference.logits(rows, s, ids)
        chain = check(relative_diff(got, want), tolerance, "the chained stages against the numpy forward", 0.0)
        int8 = tolerance > TOLERANCE["native"]
        clear = clear_positions(want, float(np.max(np.abs(got - want)))) if int8 else np.ones(len(ids), bool)
        if not np.array_equal(got.argmax(-1)[clear], want.argmax(-1)[clear]):
            raise ConvertError(f"conversion check failed: the chained stages' top-1 tokens {got.argmax(-1).tolist()} "
                               f"differ from the numpy forward's {want.argmax(-1).tolist()}")
    return {"max_rel_diff_blocks": worst_block, "max_rel_diff_logits": chain}


def clear_positions(want: np.ndarray, deviation: float) -> np.ndarray:
    """Positions whose top two logits are further apart than twice the deviation: where int8 activations
    (which move every logit by up to `deviation`) cannot swap them. A wrong graph changes the top-1 there."""
    top2 = np.sort(want, -1)[:, -2:]
    return top2[:, 1] - top2[:, 0] > 2 * deviation


def relative_diff(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| over max(1, max |want|)."""
    return float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))


def shared_tables(manifest: Manifest, directory: Path, tokens: int) -> dict[str, np.ndarray]:
    """What the embeddings stage gives every block (rotary tables, allowed keys) for `tokens` fresh positions."""
    stage = manifest.stages[0]
    feed = {"input_ids": np.zeros((1, tokens), np.int64), "position_ids": np.arange(tokens)[None],
            "attention_mask": np.ones((1, tokens), np.int64)}
    out = run_stage(stage, open_stage(directory, stage, SessionConfig()), feed)
    return {name: array for name, array in out.items() if name != "hidden.0"}


def block_feed(s, i: int, x: np.ndarray) -> dict[str, np.ndarray]:
    empty = np.zeros((1, s.kv_heads, 0, s.head_dim), np.float32)
    return {f"hidden.{i}": x[None], f"past.{i}.key": empty, f"past.{i}.value": empty}


def check(diff: float, tolerance: float, what: str, worst: float) -> float:
    if not diff <= tolerance:
        raise ConvertError(f"conversion check failed: {what} differs by {diff:.3g} (tolerance {tolerance})")
    return max(worst, diff)


def cached_tables(model: GGUFModel):
    """model.rows with the [V, E] tables kept (the reference reads them for every token), nothing else."""
    table = functools.lru_cache(maxsize=2)(model.rows)
    return lambda name: table(name) if name in ("token_embd.weight", "output.weight") else model.rows(name)
