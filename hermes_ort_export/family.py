"""The per-architecture record: how to build the torch model, cut it into stages, feed and check it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import torch

Feed = dict[str, np.ndarray]
RunChain = Callable[[Feed], Feed]  # model inputs -> model outputs, through the exported stages in ORT


@dataclass(frozen=True)
class StagePlan:
    """One stage to export: a torch module over named global tensors, with its dynamic axes."""

    name: str
    kind: str
    module: torch.nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    axes: dict[str, dict[int, str]]
    postprocess: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None  # graph surgery after export
    row_slices: tuple[np.ndarray, list[tuple[int, int]]] | None = None  # rows later stages reuse (tied head)


@dataclass(frozen=True)
class Case:
    """A check of the exported stages: torch's outputs (computed before export) and how to get ORT's."""

    name: str
    expected: Feed
    run: Callable[[RunChain], Feed]


@dataclass(frozen=True)
class Family:
    """What differs between GPT-2, BERT and ViT, as data and small functions."""

    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values this family reads
    build: Callable[[dict], torch.nn.Module]  # settings -> torch model with fresh (seeded) weights
    load: Callable[[str], torch.nn.Module]  # local transformers folder -> torch model
    stages: Callable[[torch.nn.Module], list[StagePlan]] | None  # traced by torch.onnx
    trace_feed: Callable[[object, np.random.Generator], Feed] | None  # example inputs used to trace the export
    cases: Callable[[torch.nn.Module, np.random.Generator], list[Case]]  # references, computed before export
    extra_files: tuple[str, ...] = field(default=())  # copied from a local folder, beside TOKENIZER_FILES
    keep_outputs: tuple[str, ...] = field(default=())  # stage outputs that are model outputs though consumed
    graphs: Callable[[torch.nn.Module], object] | None = None  # or: the converter's graphs over these tensors
