"""Running stages in order on a shared tensor table, dropping each tensor after its last consumer."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Mapping

import numpy as np
import onnxruntime as ort

from .manifest import Manifest
from .sessions import run_stage

SessionFor = Callable[[int], ort.InferenceSession]  # stage index -> a ready session


def run_chain(manifest: Manifest, feed: Mapping[str, np.ndarray], session_for: SessionFor,
              after_run: Callable[[int], None] = lambda i: None,
              span: Callable[[int], ContextManager] = lambda i: contextlib.nullcontext()) -> dict[str, np.ndarray]:
    """Runs every stage once; returns the model outputs. Each tensor is kept once, however many stages read it."""
    tensors = dict(feed)
    last_use = manifest.last_use()
    for i, stage in enumerate(manifest.stages):
        session = session_for(i)
        with span(i):
            tensors.update(run_stage(stage, session, tensors))
        del session
        after_run(i)
        for name in [n for n in tensors if last_use.get(n, -1) <= i]:
            del tensors[name]
    return {t.name: tensors[t.name] for t in manifest.outputs}
