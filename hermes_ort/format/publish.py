"""Building a model directory beside its target and renaming it into place only when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from ..errors import HermesError
from .manifest import MANIFEST_NAME


@contextlib.contextmanager
def building(out: str | os.PathLike) -> Iterator[Path]:
    """Yields a hidden temporary directory; on success it replaces `out`, on any error it is removed.

    A failed or interrupted build therefore leaves nothing at `out` that looks like a model.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise HermesError(f"{out} exists and is not a model directory: refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)
