"""manifest.json: round trip, and clear errors for corrupt or incomplete model directories."""
import dataclasses
import json
import re
import shutil

import numpy as np
import pytest

import hermes_ort
from hermes_ort.format import manifest as manifest_io
from hermes_ort.errors import InputError, ManifestError, StageError
from hermes_ort.format.manifest import FileSpec


@pytest.fixture
def model_dir(exported, tmp_path):
    """A private copy of tiny-bert that a test may damage."""
    target = tmp_path / "tiny-bert"
    shutil.copytree(exported("tiny-bert").directory, target)
    return target


def feed(batch=1, seq=5):
    return {"input_ids": np.zeros((batch, seq), np.int64), "token_type_ids": np.zeros((batch, seq), np.int64),
            "attention_mask": np.ones((batch, seq), np.int64)}


def test_manifest_round_trips(model_dir):
    manifest = manifest_io.load(model_dir, deep=True)
    manifest_io.save(manifest, model_dir)
    assert manifest_io.load(model_dir) == manifest
    assert manifest.feeds("attention_mask") == ("block_00", "block_01")
    assert manifest.bytes == sum(p.stat().st_size for p in model_dir.iterdir() if p.suffix in {".onnx", ".data"})


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json is missing"):
        hermes_ort.InferenceSession(tmp_path)


def test_corrupt_manifest_json(model_dir):
    (model_dir / "manifest.json").write_text('{"format": "hermes-ort/model", "vers')
    with pytest.raises(ManifestError, match="manifest.json is corrupt"):
        hermes_ort.InferenceSession(model_dir)


def test_newer_manifest_version(model_dir):
    data = json.loads((model_dir / "manifest.json").read_text())
    (model_dir / "manifest.json").write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(ManifestError, match="version 99 is not supported"):
        hermes_ort.InferenceSession(model_dir)


def test_missing_stage_file(model_dir):
    (model_dir / "block_01.data").unlink()
    with pytest.raises(ManifestError, match="stage 'block_01' .*block_01.data is missing"):
        hermes_ort.InferenceSession(model_dir)


def test_truncated_stage_file(model_dir):
    data = (model_dir / "block_00.data").read_bytes()
    (model_dir / "block_00.data").write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match="stage 'block_00' .*block_00.data has .* bytes, manifest says"):
        hermes_ort.InferenceSession(model_dir)


def test_a_garbage_graph_is_found_by_the_deep_check_and_when_the_session_opens(model_dir):
    path = model_dir / "block_00.onnx"
    path.write_bytes(b"\xff" * path.stat().st_size)  # same size, garbage content
    with pytest.raises(ManifestError, match="does not match its sha256"):
        manifest_io.load(model_dir, deep=True)
    with pytest.raises(StageError, match="stage 'block_00' \\(block_00.onnx\\): cannot load"):
        hermes_ort.InferenceSession(model_dir).run(None, feed())


def test_stage_input_nobody_produces(model_dir):
    manifest = manifest_io.load(model_dir)
    block = manifest.stages[1]
    broken = dataclasses.replace(block, inputs=(dataclasses.replace(block.inputs[0], name="ghost"),))
    with pytest.raises(ManifestError, match="stage 'block_00'.*\\['ghost'\\]"):
        manifest_io.save(dataclasses.replace(manifest, stages=(manifest.stages[0], broken, *manifest.stages[2:])),
                         model_dir)


def test_stage_reading_a_later_stages_output_names_both(model_dir):
    manifest = manifest_io.load(model_dir)
    first, second = manifest.stages[1], manifest.stages[2]  # block_00 reads what block_01 makes
    broken = dataclasses.replace(first, inputs=(*first.inputs, second.outputs[0]))
    with pytest.raises(ManifestError, match=f"stage 'block_00' .* reads '{second.outputs[0].name}' from stage "
                                            "'block_01' .*runs after it"):
        manifest_io.save(dataclasses.replace(manifest, stages=(manifest.stages[0], broken, *manifest.stages[2:])),
                         model_dir)
    assert manifest_io.load(model_dir) == manifest  # the refused manifest was not written


@pytest.mark.parametrize("stage, name", [("head", "head.onnx"), ("block_01", "block_01.data")])
def test_a_file_altered_after_the_session_opened_is_found_at_its_first_load(model_dir, stage, name):
    session = hermes_ort.InferenceSession(model_dir, memory_budget="4GiB")
    path = model_dir / name
    intact = path.read_bytes()
    altered = bytearray(intact)
    altered[len(altered) // 2] ^= 0x01  # one bit, same size: only the sha256 can tell
    path.write_bytes(bytes(altered))
    with pytest.raises(StageError, match=f"stage '{stage}' .*: file {name} does not match its sha256"):
        session.run(None, feed())
    path.write_bytes(intact)  # the same session works once the file is mended
    (expected,) = hermes_ort.InferenceSession(model_dir).run(["pooler_output"], feed())
    np.testing.assert_array_equal(session.run(["pooler_output"], feed())[0], expected)
    session.close()


@pytest.mark.parametrize("change, message", [
    (lambda f: f.pop("token_type_ids"), "missing inputs \\['token_type_ids'\\]"),
    (lambda f: f.update(pixels=np.zeros(1)), "unknown inputs \\['pixels'\\]"),
    (lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)),
     "input 'input_ids' expects int64 \\[batch, sequence\\], got int32 \\[1, 5\\]"),
    (lambda f: f.update(attention_mask=np.ones((1, 1, 5), np.int64)),
     "input 'attention_mask' expects int64 \\[batch, sequence\\], got int64 \\[1, 1, 5\\]"),
    (lambda f: f.update(attention_mask=np.ones((1, 7), np.int64)), "sequence=7 but input '.*' has sequence=5"),
    (lambda f: f.update(input_ids=np.zeros((1, 0), np.int64), token_type_ids=np.zeros((1, 0), np.int64),
                        attention_mask=np.zeros((1, 0), np.int64)), "input 'input_ids' is empty along sequence"),
    (lambda f: f["input_ids"].__setitem__((0, 3), 10**6), "input 'input_ids' holds 1000000 at \\[0, 3\\], outside "
                                                          "the 1000 rows .*0..999"),
    (lambda f: f["token_type_ids"].__setitem__((0, 1), -1), "input 'token_type_ids' holds -1 at \\[0, 1\\]"),
])
def test_bad_inputs_are_named_before_anything_loads(model_dir, change, message):
    session = hermes_ort.InferenceSession(model_dir)
    (model_dir / "embeddings.onnx").unlink()  # a load would fail: the input check must come first
    bad = feed()
    change(bad)
    with pytest.raises(InputError, match=message):
        session.run(None, bad)


def test_nan_in_a_float_input_flows_through_without_an_error(exported):
    session = hermes_ort.InferenceSession(exported("tiny-vit").directory)
    pixels = np.zeros([1 if isinstance(d, str) else d for d in session.get_inputs()[0].shape], np.float32)
    pixels[0, 0, 0, 0] = np.nan
    (logits,) = session.run(["logits"], {session.get_inputs()[0].name: pixels})
    assert np.isnan(logits).all()  # the patch's NaN reaches every token through attention, as in ORT


def test_front_door_mirrors_onnxruntime(model_dir):
    session = hermes_ort.InferenceSession(model_dir)
    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [
        ("input_ids", "tensor(int64)", ["batch", "sequence"]), ("token_type_ids", "tensor(int64)",
                                                                 ["batch", "sequence"]),
        ("attention_mask", "tensor(int64)", ["batch", "sequence"])]
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "pooler_output"]
    (pooled,) = session.run(["pooler_output"], feed(batch=2))
    assert pooled.shape == (2, 64) and pooled.dtype == np.float32
    with pytest.raises(InputError, match="unknown outputs \\['logits'\\]"):
        session.run(["logits"], feed())


def test_cli_verify_checks_every_file(model_dir, capsys):
    from hermes_ort.__main__ import main as hermes

    assert hermes(["verify", str(model_dir)]) == 0 and "every size and sha256" in capsys.readouterr().out
    path = model_dir / "block_01.data"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    path.write_bytes(bytes(data))
    assert hermes(["verify", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "stage 'block_01' (block_01.onnx): file" in err and "does not match its sha256" in err


def flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def restate(model_dir, name, change):
    """Changes a stage's manifest entry and states its files' sizes and sha256 anew: a consistent manifest
    for files that are still wrong."""
    manifest = manifest_io.Manifest.from_json(json.loads((model_dir / "manifest.json").read_text()))
    stages = tuple(change(s) if s.name == name else s for s in manifest.stages)
    stages = tuple(dataclasses.replace(s, graph=FileSpec.of(model_dir, s.graph.path), weights=tuple(
        FileSpec.of(model_dir, w.path) for w in s.weights)) for s in stages)
    manifest_io.save(dataclasses.replace(manifest, stages=stages), model_dir)


def shorten(model_dir):
    path = model_dir / "block_00.data"
    path.write_bytes(path.read_bytes()[:-4096])
    restate(model_dir, "block_00", lambda s: s)


def extra_input(model_dir, name):
    mask = manifest_io.load(model_dir).inputs[2]
    restate(model_dir, name, lambda s: dataclasses.replace(s, inputs=(*s.inputs, mask)))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "manifest.json").unlink(), "is not a model directory: manifest.json is missing"),
    (lambda d: (d / "manifest.json").write_text("{"), "manifest.json is corrupt: JSONDecodeError"),
    (lambda d: (d / "manifest.json").write_text(json.dumps({**json.loads((d / "manifest.json").read_text()),
                                                             "version": 2})), "manifest version 2 is not supported"),
    (lambda d: (d / "block_01.onnx").unlink(), "stage 'block_01' \\(block_01.onnx\\): file .*block_01.onnx is missing"),
    (lambda d: (d / "head.data").write_bytes(b"\0" * 100), "stage 'head' .*head.data has 100 bytes, manifest says"),
    (lambda d: flip_a_bit(d / "block_01.data"), "stage 'block_01' .*: file block_01.data does not match its sha256"),
    (shorten, "stage 'block_00' \\(block_00.onnx\\): its weights need bytes up to \\d+ of block_00.data, which "
              "holds \\d+: the file is shorter than its tensors"),
    (lambda d: extra_input(d, "head"), "stage 'head' \\(head.onnx\\): graph takes .* but the manifest says"),
    (lambda d: extra_input(d, "block_00"), "stage 'block_00' \\(block_00.onnx\\): graph takes .* but the manifest says"),
])
def test_a_damaged_model_directory_is_one_line_naming_file_and_problem(model_dir, capsys, damage, message):
    from hermes_ort.__main__ import main as hermes

    damage(model_dir)
    assert hermes(["run", str(model_dir), "--budget", "4GiB", "--sequence", "5"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("hermes: error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err, err
    assert re.search(message, errors[0]), err
    assert "/proc/self" not in err  # the directory as the user named it


def test_a_file_found_intact_is_not_hashed_again_this_boot_unless_rewritten(model_dir, tmp_path, monkeypatch):
    from hermes_ort.format import integrity

    hashed = []
    real = integrity.sha256_mapped
    monkeypatch.setattr(integrity, "sha256_mapped", lambda path, huge: hashed.append(path.name) or real(path, huge))
    stamps = integrity.BootStamps(tmp_path / "stamps")
    stage = manifest_io.load(model_dir).stage("block_01")
    integrity.FirstLoadCheck(model_dir, stamps).stage(stage)
    assert sorted(hashed) == ["block_01.data", "block_01.onnx"]
    integrity.FirstLoadCheck(model_dir, stamps).stage(stage)  # another session, same boot: no hashing
    assert len(hashed) == 2
    data = model_dir / "block_01.data"
    flipped = bytearray(data.read_bytes())
    flipped[9] ^= 0x04
    data.write_bytes(bytes(flipped))  # rewritten: a new mtime, so hashed again, and found out
    with pytest.raises(StageError, match="block_01.data does not match its sha256"):
        integrity.FirstLoadCheck(model_dir, stamps).stage(stage)
    assert hashed[-1] == "block_01.data"
    other_boot = integrity.BootStamps(tmp_path / "stamps")
    other_boot.boot = "another"
    flipped[9] ^= 0x04
    data.write_bytes(bytes(flipped))
    integrity.FirstLoadCheck(model_dir, other_boot).stage(stage)
    assert sorted(hashed[-2:]) == ["block_01.data", "block_01.onnx"]  # the graph too: stamps are per boot
