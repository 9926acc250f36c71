"""Checking a caller's feed against the manifest before anything is loaded."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..errors import InputError
from ..format.manifest import Manifest, TensorSpec


def check_feed(manifest: Manifest, feed: Mapping[str, np.ndarray],
               index_bounds: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Returns the feed as numpy arrays; raises InputError naming the input, what was expected and what came.
    index_bounds: inputs that index a table's rows (token ids), with its row count. NaN in float inputs is
    the caller's business: it flows through as ORT would carry it."""
    known = {t.name: t for t in manifest.inputs}
    unknown = sorted(set(feed) - set(known))
    if unknown:
        raise InputError(f"unknown inputs {unknown}; the model takes {sorted(known)}")
    missing = sorted(set(known) - set(feed))
    if missing:
        raise InputError(f"missing inputs {missing}; the model takes {sorted(known)}")
    axes: dict[str, tuple[int, str]] = {}
    arrays = {name: np.asarray(value) for name, value in feed.items()}
    for name, spec in known.items():
        check_tensor(spec, arrays[name], axes)
    for name, rows in (index_bounds or {}).items():
        if name in arrays:
            check_indices(name, arrays[name], rows)
    return arrays


def check_indices(name: str, ids: np.ndarray, rows: int) -> None:
    """Every id must pick a row of a table with `rows` rows."""
    outside = (ids < 0) | (ids >= rows)
    if outside.any():
        where = tuple(int(i) for i in np.argwhere(outside)[0])
        raise InputError(f"input '{name}' holds {int(ids[where])} at {list(where)}, outside the {rows} rows of the "
                         f"table it indexes (valid ids: 0..{rows - 1})")


def check_tensor(spec: TensorSpec, array: np.ndarray, axes: dict[str, tuple[int, str]]) -> None:
    """One input: dtype, rank, fixed sizes, and symbolic axes consistent with the other inputs."""
    got = f"{array.dtype} [{', '.join(map(str, array.shape))}]"
    if array.dtype != np.dtype(spec.dtype) or array.ndim != len(spec.shape):
        raise InputError(f"input '{spec.name}' expects {spec.describe()}, got {got}")
    empty = [dim for dim, size in zip(spec.shape, array.shape) if size == 0 and not str(dim).startswith("past")]
    if empty:  # a KV cache of length 0 (past_sequence) is a first step; any other empty axis is a mistake
        raise InputError(f"input '{spec.name}' is empty along {empty[0]}: {got}")
    for dim, size in zip(spec.shape, array.shape):
        if isinstance(dim, int) and dim != size:
            raise InputError(f"input '{spec.name}' expects {spec.describe()}, got {got}")
        if isinstance(dim, str):
            seen = axes.setdefault(dim, (size, spec.name))
            if seen[0] != size:
                raise InputError(
                    f"input '{spec.name}' has {dim}={size} but input '{seen[1]}' has {dim}={seen[0]} ({got})"
                )
