"""A session refuses at construction a budget no input can run under, stating that floor as the planner
states its minimum; a budget at the floor is accepted (no torch: a tiny converted GGUF model, no profile)."""
from __future__ import annotations

import re

import pytest

import hermes_ort
from hermes_ort.convert import convert_gguf
from hermes_ort.engine.memory import format_bytes
from hermes_ort.engine.templates import Templates
from hermes_ort.errors import BudgetError
from hermes_ort.format import manifest as manifest_io
from hermes_ort.planning.estimate import estimate_profile
from hermes_ort.planning.planner import largest_stage

from tiny_gguf import TinyConfig, write_tiny_gguf


@pytest.fixture(scope="module")
def unprofiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("unprofiled")
    write_tiny_gguf(root / "m.gguf", TinyConfig(layers=2, hidden=256, heads=4, kv_heads=2, ffn=512))
    directory = convert_gguf(root / "m.gguf", root / "model", "fp32").directory
    assert not (directory / "profile.json").exists()
    return directory


def test_a_budget_below_any_inputs_floor_is_refused_at_construction(unprofiled):
    manifest = manifest_io.load(unprofiled)
    largest = largest_stage(estimate_profile(manifest, Templates(unprofiled, manifest)))
    with pytest.raises(BudgetError) as refused:
        hermes_ort.InferenceSession(unprofiled, memory_budget="1MiB")
    message = str(refused.value)
    assert message.startswith("budget 1.0 MiB is below what any input needs, ")
    assert f"+ largest stage {format_bytes(largest)} + 3% margin" in message
    floor, base, stage = (float(x) for x in re.search(
        r"needs, ([\d.]+) MiB: process base ([\d.]+) MiB \+ largest stage ([\d.]+) MiB", message).groups())
    assert abs(floor - (base + stage) / 0.97) < 0.1  # the margin on top of both
    # this process's RSS moves between calls (the suite's earlier tests), so the checks keep 10% apart
    with hermes_ort.InferenceSession(unprofiled, memory_budget=f"{floor * 1.1:.1f}MiB") as session:
        assert session.budget > floor * (1 << 20)
    with pytest.raises(BudgetError, match="below what any input needs"):
        hermes_ort.InferenceSession(unprofiled, memory_budget=f"{floor * 0.9:.1f}MiB")
