"""Tiny seeded models, exported once per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # hermes_ort_export and the `export` shim are repo-root packages (`python -m export`)

TINY = ("tiny-gpt2", "tiny-bert", "tiny-vit", "tiny-llama", "tiny-qwen2", "tiny-mistral")


@pytest.fixture(scope="session", autouse=True)
def pack_dir(tmp_path_factory):
    """Saved packs (engine/packs.py) of this test session's models, apart from the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        where = tmp_path_factory.mktemp("packs")
        patch.setenv("HERMES_PACK_DIR", str(where))
        yield where


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def exported(models_dir):
    """name -> ExportResult of a tiny model, exported on first use."""
    from hermes_ort_export.build import export_model

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = export_model(name, models_dir / name, seed=0, progress=False, random_weights=True)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def torch_model():
    """name -> the seeded torch model the export of that name was built from."""
    from hermes_ort_export.families import load_source

    return lambda name: load_source(name, 0, random_weights=True)[1]


@pytest.fixture
def profiled_readings(monkeypatch):
    """(batched, decoding) of every stage `hermes profile` prepares without prepacking, as it asks."""
    from hermes_ort.planning import profiler

    seen, original = set(), profiler.prepare

    def recording(directory, stage, config, templates=None, batched=False, decoding=False):
        if not config.prepacking:
            seen.add((batched, decoding))
        return original(directory, stage, config, templates, batched, decoding)

    monkeypatch.setattr(profiler, "prepare", recording)
    return seen
