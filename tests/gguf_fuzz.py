"""Mutated tiny GGUF files through `hermes convert`, one child process for the lot (address space capped, so a
huge allocation fails instead of swapping): prints one JSON line per mutation, {"kind", "outcome", "line"}.

python tests/gguf_fuzz.py SOURCE.gguf WORKDIR COUNT SEED
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np


def mutations(data: bytes, count: int, seed: int):
    """(kind, mutated bytes): bit flips in the header and metadata, 8-byte counts and offsets set huge,
    truncation at random points."""
    rng = np.random.default_rng(seed)
    header_end = tensor_data_start(data)
    kinds = ("flip", "huge", "truncate")
    for n in range(count):
        kind = kinds[n % 3]
        out = bytearray(data)
        if kind == "flip":
            for _ in range(int(rng.integers(1, 4))):
                at = int(rng.integers(4, header_end))
                out[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == "huge":
            at = int(rng.integers(8, header_end - 8))
            out[at:at + 8] = struct.pack("<Q", int(rng.choice([2**63 - 1, 2**40, 2**32 + 7, 2**62])))
        else:
            out = out[:int(rng.integers(8, len(data)))]
        yield kind, bytes(out)


def tensor_data_start(data: bytes) -> int:
    """Where the metadata and tensor infos end: the mutations aim there (the tensors' bytes are data)."""
    from gguf import GGUFReader
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        return int(GGUFReader(f.name).data_offset)


def main(source: str, workdir: str, count: int, seed: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    from hermes_ort import __main__ as cli

    work = Path(workdir)
    for n, (kind, data) in enumerate(mutations(Path(source).read_bytes(), count, seed)):
        path, out = work / f"m{n}.gguf", work / f"out{n}"
        path.write_bytes(data)
        err, stdout = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
                code = cli.main(["convert", str(path), "--out", str(out), "--precision", "fp32"])
            outcome = "converted" if code == 0 else "error"
        except BaseException as e:  # a traceback: what must never happen
            code, outcome = None, f"traceback {type(e).__name__}: {e}"[:300]
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        print(json.dumps({"n": n, "kind": kind, "outcome": outcome, "stderr": lines[-3:],
                          "published": out.exists(), "leftovers": sorted(p.name for p in work.glob(f".out{n}*"))}),
              flush=True)
        shutil.rmtree(out, ignore_errors=True)
        path.unlink()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
