"""hermes update: a new version replaces a model directory atomically, copying only changed files, while
open sessions keep the version they opened."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

import hermes_ort
from hermes_ort.__main__ import main as hermes
from hermes_ort.engine.feeds import synthetic_feed
from hermes_ort.engine.plan import Plan
from hermes_ort.format import manifest as manifest_io
from hermes_ort.format import publish
from hermes_ort.format.manifest import FileSpec
from hermes_ort.format.update import update_model

STREAMED = Plan(budget=0, loaders=1, window=1, resident=(), prepacked=(), compute_threads=1, predicted_first_s=0,
                predicted_steady_s=0, predicted_peak_bytes=0)  # every stage read again on every run


@pytest.fixture
def versions(exported, tmp_path):
    """(model, new): a copy of tiny-gpt2, and a second version of it whose block_01 weights differ."""
    model, new = tmp_path / "models" / "tiny", tmp_path / "new"
    shutil.copytree(exported("tiny-gpt2").directory, model)
    (model / "NOTES.txt").write_text("deployed by hand")  # a file no manifest lists: linked when unchanged too
    shutil.copytree(model, new)
    data = new / "block_01.data"
    data.write_bytes((np.fromfile(data, np.float32) * 0.5).tobytes())
    manifest = manifest_io.load(new)
    stages = tuple(dataclasses.replace(s, weights=tuple(FileSpec.of(new, f.path) for f in s.weights))
                   if s.name == "block_01" else s for s in manifest.stages)
    manifest_io.save(dataclasses.replace(manifest, stages=stages), new)
    return model, new


def logits(directory, **options):
    with hermes_ort.InferenceSession(directory, **options) as session:
        return session.run(["logits"], feed(session))[0]


def feed(session):
    return synthetic_feed(session.manifest, {"sequence": 5})


def leftovers(model):
    return sorted(p.name for p in model.parent.iterdir() if p.is_dir() and p != model)


def test_only_changed_files_are_copied_and_an_open_session_keeps_its_version(versions):
    model, new = versions
    before, after = logits(model), logits(new)
    assert not np.array_equal(before, after)
    inodes = {p.name: p.stat().st_ino for p in model.iterdir()}
    session = hermes_ort.InferenceSession(model, plan_override=STREAMED)
    np.testing.assert_array_equal(session.run(["logits"], feed(session))[0], before)

    report = update_model(model, new)
    assert sorted(report.copied) == ["block_01.data", "manifest.json"]
    assert set(report.linked) == set(inodes) - {"block_01.data", "manifest.json"}
    assert all((model / name).stat().st_ino == inodes[name] for name in report.linked)  # not a byte copied
    np.testing.assert_array_equal(logits(model), after)  # a new session gets the new version
    np.testing.assert_array_equal(session.run(["logits"], feed(session))[0], before)  # the open one its own
    assert report.retired is not None and report.retired.is_dir() and leftovers(model) == [report.retired.name]
    session.close()  # the last reader of the old version removes it
    assert leftovers(model) == []
    manifest_io.load(model, deep=True)


STEPS = ("link", "fsync", "rename", "replace", "mkdir")  # every filesystem step update_model takes


def crash_at(step: int, model, new) -> int:
    """Runs update_model in a forked child that dies (os._exit, no cleanup) at its step-th filesystem call;
    returns how many calls it made when it does not die."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: count, then die mid-update as a power cut would
        calls = [0]

        def counted(real):
            def call(*args, **kwargs):
                calls[0] += 1
                if calls[0] == step:
                    os._exit(70)
                return real(*args, **kwargs)
            return call

        for name in STEPS:
            setattr(os, name, counted(getattr(os, name)))
        shutil.copy2 = counted(shutil.copy2)
        shutil.rmtree = counted(shutil.rmtree)
        publish.exchange = counted(publish.exchange)
        update_model(model, new)
        os.write(write, str(calls[0]).encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    made = os.read(read, 64)
    os.close(read)
    return int(made) if os.waitstatus_to_exitcode(status) == 0 else -1


def test_a_crash_at_any_step_leaves_the_old_or_the_new_version_and_a_rerun_finishes(versions, tmp_path):
    model, new = versions
    pristine = tmp_path / "pristine"
    shutil.copytree(model, pristine)
    versions_seen = {json.loads((pristine / "manifest.json").read_text())["stages"][2]["weights"][0]["sha256"]: "old",
                     json.loads((new / "manifest.json").read_text())["stages"][2]["weights"][0]["sha256"]: "new"}
    steps = crash_at(10**9, model, new)
    assert steps > 10
    seen = set()
    for step in range(1, steps + 1):
        shutil.rmtree(model)
        shutil.copytree(pristine, model)
        assert crash_at(step, model, new) == -1
        manifest = manifest_io.load(model, deep=True)  # whole: every file as its manifest says
        seen.add(versions_seen[dataclasses.asdict(manifest.stage("block_01"))["weights"][0]["sha256"]])
        update_model(model, new)  # the next update sweeps what the crash left and finishes
        assert manifest_io.load(model, deep=True) == manifest_io.load(new) and leftovers(model) == []
    assert seen == {"old", "new"}  # crashes fell both before and after the exchange


def test_cli_update_refuses_a_damaged_new_version_and_leaves_the_model(versions, capsys):
    model, new = versions
    data = bytearray((new / "block_00.data").read_bytes())
    data[7] ^= 0x10
    (new / "block_00.data").write_bytes(bytes(data))
    assert hermes(["update", str(model), str(new)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "block_00.data does not match its sha256" in err
    manifest_io.load(model, deep=True)
    assert leftovers(model) == []
    (new / "block_00.data").write_bytes(bytes(data[:7] + bytes([data[7] ^ 0x10]) + data[8:]))
    assert hermes(["update", str(model), str(new)]) == 0
    assert "2 files copied" in capsys.readouterr().out  # block_01.data and the manifest
    np.testing.assert_array_equal(logits(model), logits(new))


def test_copied_weight_files_are_cached_again_in_huge_pages_and_the_token_table_in_small_ones(versions, monkeypatch):
    """A plain copy leaves a file in small pages, where a streamed load maps it ~50x slower (page_cache.py)."""
    from hermes_ort.format import update

    model, new = versions
    table = new / "embeddings.data"  # wte: the embeddings look rows up in it
    table.write_bytes((np.fromfile(table, np.float32) * 0.5).tobytes())
    manifest = manifest_io.load(new)
    stages = tuple(dataclasses.replace(s, weights=tuple(FileSpec.of(new, f.path) for f in s.weights))
                   for s in manifest.stages)
    manifest_io.save(dataclasses.replace(manifest, stages=stages), new)
    seen, real = {}, update.recache

    def recorded(path, huge=True):
        seen[path.name] = huge
        real(path, huge)

    monkeypatch.setattr(update, "recache", recorded)
    report = update_model(model, new)
    assert sorted(report.copied) == ["block_01.data", "embeddings.data", "manifest.json"]
    assert seen == {"block_01.data": True, "embeddings.data": False}  # linked files are cached as they were
    np.testing.assert_array_equal(logits(model), logits(new))
