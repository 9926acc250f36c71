"""Where a benchmark keeps what it measured: bench/results/<date>-<host>/ (or --out) gets <kind>.json with
every figure, the machine, package versions and the exact command; <kind>.md with its tables; PNG plots
when matplotlib (the `bench` extra) is installed. Nothing a reader needs is left only in a terminal."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import psutil

from .machine import cpu_flags, cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("hermes-ort", "onnxruntime", "numpy", "onnx", "torch", "transformers", "llama_cpp_python")


@dataclass(frozen=True)
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in self.rows]) + "\n"


def results_dir(out: Path | None) -> Path:
    day = datetime.date.today().isoformat()
    directory = out or RESULTS / f"{day}-{platform.node() or 'host'}"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def machine(disk_bytes_per_s: dict[str, float] | None = None) -> dict:
    """The CPU (model, flags, cores), memory, OS, and the disk bandwidth each model's files read at."""
    return {"cpu": cpu_name(), "flags": cpu_flags(), "cores": os.cpu_count(),
            "memory_bytes": psutil.virtual_memory().total, "os": platform.platform(),
            "python": platform.python_version(), "disk_bytes_per_s": disk_bytes_per_s or {}}


def versions() -> dict[str, str]:
    import hermes_ort

    found = {"hermes-ort": hermes_ort.__version__}  # an editable install's metadata can be older than the code
    for name in PACKAGES[1:]:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def save(kind: str, out: Path, records: list[dict], tables: list[Table], facts: dict) -> list[Path]:
    """Writes <kind>.json and <kind>.md (and plots); returns the paths written."""
    document = {"kind": kind, "command": [Path(sys.executable).name, "-m", f"bench.{kind}", *sys.argv[1:]],
                "when": datetime.datetime.now().isoformat(timespec="seconds"), "machine": facts,
                "versions": versions(), "records": records, "tables": [asdict(t) for t in tables]}
    written = [out / f"{kind}.json", out / f"{kind}.md"]
    written[0].write_text(json.dumps(document, indent=1))
    header = (f"`{' '.join(document['command'])}` on {facts['cpu']} ({facts['cores']} cores; {facts['flags']}), "
              f"{facts['memory_bytes'] / 2**30:.0f} GiB, {document['when']}; "
              + ", ".join(f"{k} {v}" for k, v in document["versions"].items()))
    written[1].write_text(header + "\n\n" + "\n".join(t.markdown() for t in tables))
    try:
        from . import plots
    except ImportError:  # matplotlib is the bench extra
        print("bench: no plots (pip install 'hermes-ort[bench]' for matplotlib)", file=sys.stderr)
        return written
    return written + plots.draw(kind, records, out)


class progress:
    """A progress bar on stderr (tqdm, when installed), one step per measured process."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr)
        except ImportError:
            self.bar = None

    def __enter__(self):
        return self

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
