"""Moving initializers into per-stage external-data files, one tensor at a time.

Large tensors start at 64 KiB-aligned offsets so ORT can memory-map them; tensors of at most
INLINE_MAX bytes stay inside the graph. A tensor whose bytes were already written for an earlier stage
(GPT-2's tied wte / lm_head) is referenced there instead of being stored twice.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

ALIGN = 64 * 1024
SMALL_ALIGN = 64
INLINE_MAX = 1024
SHARE_MIN = ALIGN  # reuse another stage's bytes only for large tensors (a tied embedding matrix), not for
# small ones that happen to be equal (freshly initialised LayerNorms): that would make stages read each other's files


ROW_ALIGN = 256  # head parts start every 256 rows: 64 KiB-aligned inside a tied table when E % 64 == 0


def head_splits(vocab: int, row_bytes: int, target_bytes: int) -> list[tuple[int, int]]:
    """Half-open row ranges of an LM head of about target_bytes each (a block's size, so no stage holds the
    whole [V, E] matrix), starting on ROW_ALIGN boundaries."""
    parts = max(1, round(vocab * row_bytes / target_bytes))
    step = -(-vocab // parts // ROW_ALIGN) * ROW_ALIGN or ROW_ALIGN
    return [(start, min(start + step, vocab)) for start in range(0, vocab, step)]


@dataclass(frozen=True)
class Placement:
    """Where a tensor's bytes live: a data file of the model directory, half-open [offset, offset+length)."""

    location: str
    offset: int
    length: int


def external_fields(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def source_reader(base_dir: Path) -> Callable[[onnx.TensorProto], bytes]:
    """Returns a reader of a tensor's raw bytes: inline, or read from its external file under base_dir."""

    def read(tensor: onnx.TensorProto) -> bytes:
        if not uses_external_data(tensor):
            return tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
        info = external_fields(tensor)
        with open(base_dir / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"])) if "length" in info else f.read()

    return read


class WeightWriter:
    """Writes the initializers of successive stages into one data file per stage, each distinct tensor once."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.placed: dict[str, Placement] = {}  # sha256 of bytes -> where they were written

    def externalize(self, graph: onnx.GraphProto, data_name: str, read: Callable) -> tuple[str, ...]:
        """Rewrites graph's large initializers to point into data files; returns the data files it uses."""
        used: list[str] = []
        with open(self.directory / data_name, "wb") as out:
            for tensor in graph.initializer:
                raw = read(tensor)
                if len(raw) <= INLINE_MAX:
                    _make_inline(tensor, raw)
                    continue
                place = self._place(raw, out, data_name)
                _point_to(tensor, place)
                if place.location not in used:
                    used.append(place.location)
        if data_name not in used:
            (self.directory / data_name).unlink()
        return tuple(used)

    def register_rows(self, array: np.ndarray, splits: list[tuple[int, int]]) -> None:
        """Lets later stages reference half-open row ranges [start, end) of an already written 2-D tensor
        (a tied LM head cut into parts) instead of writing those rows again. A tensor small enough to stay
        inside its graph has nothing to share."""
        whole = self.placed.get(hashlib.sha256(array.tobytes()).hexdigest())
        if whole is None:
            return
        row = array[0].nbytes
        for start, end in splits:
            raw = array[start:end].tobytes()
            self.placed.setdefault(hashlib.sha256(raw).hexdigest(),
                                   Placement(whole.location, whole.offset + start * row, len(raw)))

    def _place(self, raw: bytes, out, data_name: str) -> Placement:
        digest = hashlib.sha256(raw).hexdigest()
        if digest in self.placed and (self.placed[digest].location == data_name or len(raw) >= SHARE_MIN):
            return self.placed[digest]
        align = ALIGN if len(raw) >= ALIGN else SMALL_ALIGN
        offset = -out.tell() % align + out.tell()
        out.seek(offset)
        out.write(raw)
        self.placed[digest] = Placement(data_name, offset, len(raw))
        return self.placed[digest]


def _make_inline(tensor: onnx.TensorProto, raw: bytes) -> None:
    tensor.ClearField("external_data")
    tensor.data_location = onnx.TensorProto.DEFAULT
    _clear_payload(tensor)
    tensor.raw_data = raw


def _point_to(tensor: onnx.TensorProto, place: Placement) -> None:
    _clear_payload(tensor)
    tensor.ClearField("external_data")
    for key, value in (("location", place.location), ("offset", place.offset), ("length", place.length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _clear_payload(tensor: onnx.TensorProto) -> None:
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(name)
