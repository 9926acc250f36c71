"""`--precision fp32`: every GGUF tensor dequantized to float32 (MatMul on [in, out], Gather and Gemm on the
[V, E] table, which a tied head's parts reference in place, stored once)."""
from __future__ import annotations

import numpy as np

from .gguf_model import GGUFModel
from .onnx_builder import GraphBuilder


class Float32Weights:
    int8_activations = False
    notes: tuple[str, ...] = ()  # what a reader of the conversion should know (a type dequantized)

    def __init__(self, model: GGUFModel):
        self.model = model
        self.tables: dict[str, np.ndarray] = {}

    def table(self, name: str) -> np.ndarray:
        """The [V, E] matrix, dequantized once (the embeddings and every head part read it)."""
        if name not in self.tables:
            self.tables[name] = self.model.rows(name)
        return self.tables[name]

    @property
    def head_name(self) -> str:
        return "token_embd.weight" if self.model.settings.tied_head else "output.weight"

    def linear(self, g: GraphBuilder, x: str, name: str) -> str:
        return g.op("MatMul", x, g.const(np.ascontiguousarray(self.model.rows(name).T), "weight"))

    def linears(self, g: GraphBuilder, x: str, names: list[str], split: bool = True) -> list[str] | str:
        """Matrices reading the same x as one MatMul on their rows stacked, then Split (or the fused output)."""
        rows = [self.model.rows(n) for n in names]
        fused = g.op("MatMul", x, g.const(np.ascontiguousarray(np.concatenate(rows).T), "weight"))
        return split_outputs(g, fused, [r.shape[0] for r in rows]) if split else fused

    def vector(self, name: str) -> np.ndarray:
        return self.model.rows(name)

    def lookup(self, g: GraphBuilder, ids: str) -> str:
        return g.op("Gather", g.const(self.table("token_embd.weight"), "table"), ids, axis=0)

    def head_rows(self, g: GraphBuilder, x2d: str, start: int, stop: int) -> str:
        return g.op("Gemm", x2d, g.const(self.table(self.head_name)[start:stop], "head"), transB=1)

    def shared_rows(self) -> list[np.ndarray]:
        """Arrays written with the embeddings whose row ranges the head parts reference (the tied table)."""
        return [self.table("token_embd.weight")] if self.model.settings.tied_head else []

    def row_bytes(self) -> int:
        return self.model.settings.hidden * 4


def split_outputs(g: GraphBuilder, fused: str, sizes: list[int]) -> list[str]:
    return g.op("Split", fused, g.ints(*sizes), axis=-1, outputs=len(sizes))
