"""The sub-manifest of a stage range, on its own: ranges tile the model, each range's flow says what enters and
leaves it, a range directory opens as a model and the chained ranges give the whole model's outputs."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import hermes_ort
from hermes_ort.cluster.ranges import StageRange, check_ranges, flow, range_manifest, write_range
from hermes_ort.errors import ManifestError
from hermes_ort.format import manifest as manifest_io
from hermes_ort.generation.decoding import CacheLayout

from tiny_gguf import TinyConfig, converted

SPLITS = {"two": [(0, 3), (3, 6)], "three": [(0, 2), (2, 4), (4, 6)], "six": [(i, i + 1) for i in range(6)]}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranges")
    return converted(root, TinyConfig(layers=4))  # embeddings, 4 blocks, head


@pytest.fixture(scope="module")
def manifest(model):
    return manifest_io.load(model)


def prompt_feed(manifest, length=5):
    ids = np.random.default_rng(3).integers(1, 200, (2, length))
    return {"input_ids": ids, "position_ids": np.broadcast_to(np.arange(length), ids.shape).copy(),
            "attention_mask": np.ones(ids.shape, np.int64), **CacheLayout.of(manifest).empty(2)}


def test_flow_of_the_first_and_the_last_range(manifest):
    first, last = flow(manifest, StageRange(0, 3)), flow(manifest, StageRange(3, 6))
    assert first.from_model == ("input_ids", "position_ids", "attention_mask", "past.0.key", "past.0.value",
                                "past.1.key", "past.1.value")
    assert first.from_upstream == ()
    assert set(first.forward) == {"hidden.2", "rotary.cos", "rotary.sin", "attention.allowed"}
    assert first.model_outputs == ("present.0.key", "present.0.value", "present.1.key", "present.1.value")
    assert set(last.from_upstream) == set(first.forward)  # what one range sends is what the next reads
    assert last.from_model == ("past.2.key", "past.2.value", "past.3.key", "past.3.value")
    assert last.model_outputs[-1] == "logits" and last.forward == ()
    assert last.cache == {f"past.{i}.{kv}": f"present.{i}.{kv}" for i in (2, 3) for kv in ("key", "value")}


def test_a_middle_range_reads_tensors_from_ranges_before_the_previous(manifest):
    middle = flow(manifest, StageRange(3, 4))
    assert middle.from_model == ("past.2.key", "past.2.value")
    assert set(middle.from_upstream) == {"hidden.2", "rotary.cos", "rotary.sin", "attention.allowed"}
    assert middle.forward == ("hidden.3",)  # the rotary tables and the mask reach the next range from range 0
    assert middle.model_outputs == ("present.2.key", "present.2.value")


@pytest.mark.parametrize("split", list(SPLITS))
def test_ranges_tile_and_every_model_input_and_output_belongs_to_one_range(manifest, split):
    ranges = [StageRange(*r) for r in SPLITS[split]]
    check_ranges(manifest, ranges)
    flows = [flow(manifest, r) for r in ranges]
    outputs = [n for f in flows for n in f.model_outputs]
    assert sorted(outputs) == sorted(t.name for t in manifest.outputs)
    assert {n for f in flows for n in f.from_model} == {t.name for t in manifest.inputs}
    assert sum(len(r) for r in ranges) == len(manifest.stages)


@pytest.mark.parametrize("split", list(SPLITS))
def test_chained_range_sessions_equal_the_whole_model(model, manifest, split, tmp_path):
    feed = prompt_feed(manifest)
    with hermes_ort.InferenceSession(model, memory_budget="1GiB") as whole:
        expected = dict(zip([t.name for t in manifest.outputs], whole.run(None, feed)))
    tensors = dict(feed)
    for i, (start, stop) in enumerate(SPLITS[split]):
        sub = write_range(model, manifest, StageRange(start, stop), tmp_path / f"r{i}")
        with hermes_ort.InferenceSession(sub, memory_budget="1GiB") as session:
            assert session.manifest.stages == manifest.stages[start:stop]
            inputs = {t.name: tensors[t.name] for t in session.manifest.inputs}
            tensors |= zip([t.name for t in session.manifest.outputs], session.run(None, inputs))
    for name, value in expected.items():
        np.testing.assert_allclose(tensors[name], value, atol=1e-5, rtol=0)


def test_a_range_directory_holds_only_its_own_stage_files(model, manifest, tmp_path):
    sub = write_range(model, manifest, StageRange(1, 3), tmp_path / "r")
    assert sorted(os.listdir(sub)) == ["block_00.data", "block_00.onnx", "block_01.data", "block_01.onnx",
                                       "manifest.json"]
    assert os.stat(sub / "block_00.data").st_ino == os.stat(model / "block_00.data").st_ino  # linked, not copied
    loaded = manifest_io.load(sub)
    assert loaded.extra["range"] == [1, 3] and loaded.extra["stages_of_model"] == 6
    assert loaded == range_manifest(manifest, StageRange(1, 3))


def test_the_last_range_links_the_tied_table_it_shares_with_the_embeddings(model, manifest, tmp_path):
    sub = write_range(model, manifest, StageRange(5, 6), tmp_path / "head")
    assert sorted(os.listdir(sub)) == ["embeddings.data", "head.onnx", "manifest.json"]


def test_a_board_needs_only_its_own_files(model, manifest, tmp_path):
    own = tmp_path / "board"
    own.mkdir()
    for name in ("block_02.onnx", "block_02.data"):
        os.link(model / name, own / name)
    sub = write_range(own, manifest, StageRange(3, 4), tmp_path / "r")
    assert manifest_io.load(sub).stages[0].name == "block_02"
    with pytest.raises(ManifestError, match="block_03.onnx is missing: the board needs its range's files"):
        write_range(own, manifest, StageRange(3, 5), tmp_path / "r2")


@pytest.mark.parametrize("bad, message", [
    ((2, 2), r"a stage range needs 0 <= start < stop, got \[2, 2\)"),
    ((-1, 2), r"a stage range needs 0 <= start < stop, got \[-1, 2\)"),
    ((4, 3), r"a stage range needs 0 <= start < stop, got \[4, 3\)"),
])
def test_empty_or_backward_ranges_are_refused(bad, message):
    with pytest.raises(ManifestError, match=message):
        StageRange(*bad)


def test_a_range_beyond_the_model_is_refused(manifest):
    with pytest.raises(ManifestError, match=r"stages \[4, 7\) is beyond the model's 6 stages"):
        range_manifest(manifest, StageRange(4, 7))


@pytest.mark.parametrize("ranges", [[(0, 3)], [(0, 3), (4, 6)], [(0, 4), (3, 6)], [(3, 6), (0, 3)], []])
def test_ranges_that_do_not_tile_are_refused(manifest, ranges):
    with pytest.raises(ManifestError, match="do not tile the 6 stages of the model in order"):
        check_ranges(manifest, [StageRange(*r) for r in ranges])


def test_a_range_is_written_into_a_new_directory(model, manifest, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "block_04.onnx").write_bytes(b"stale")
    with pytest.raises(ManifestError, match="is not empty: a range is written into a new directory"):
        write_range(model, manifest, StageRange(0, 2), tmp_path / "used")


NO_RAY = """
import sys
sys.modules["ray"] = None  # as if Ray were not installed
import hermes_ort.cluster
try:
    hermes_ort.cluster.Pipeline("{model}", [{{"resources": {{"board0": 1}}}}])
except hermes_ort.HermesError as e:
    print("ERROR", e)
"""


def test_without_ray_the_cluster_module_imports_and_says_how_to_install_it(model):
    out = subprocess.run([sys.executable, "-c", NO_RAY.format(model=model)], capture_output=True, text=True,
                         check=True).stdout
    assert 'ERROR hermes_ort.cluster needs Ray, which is not installed: pip install "hermes-ort[ray]"' in out
