"""Text in, text out: a tokenizer trained here travels through export, TextGenerator streams stable text,
and the CLI prints it with a stats line; bad input gets one line and exit 2."""
import json
import subprocess
import sys

import numpy as np
import pytest

import hermes_ort
from hermes_ort.errors import InputError
from hermes_ort.generation.text import RowText
from text_model import CORPUS, write_folder

@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """tests/text_model.py's folder (a trained tokenizer, a seeded GPT-2 of its vocabulary), exported with
    `python -m export FOLDER`: (model directory, source folder)."""
    from hermes_ort_export.build import export_model

    folder = write_folder(tmp_path_factory.mktemp("gpt2-folder"))
    out = tmp_path_factory.mktemp("text") / "model"
    export_model(str(folder), out, progress=False)
    return out, folder


def test_tokenizer_files_travel_with_the_export(text_model):
    out, folder = text_model
    manifest = hermes_ort.InferenceSession(out).manifest
    assert manifest.tokenizer == "tokenizer.json"
    assert {f.path for f in manifest.files} == {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    from tokenizers import Tokenizer as Backend

    ours, theirs = hermes_ort.Tokenizer.from_dir(out), Backend.from_file(str(folder / "tokenizer.json"))
    for text in CORPUS[:4]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text).ids and ours.decode(ids) == text
    assert ours.eos_token_ids == [0, 2]
    chat = ours.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_stream_joined_equals_generate_and_batches_equal_single_prompts(text_model):
    out, _ = text_model
    with hermes_ort.TextGenerator(out, memory_budget="1GiB") as gen:
        whole = gen("The quick brown", max_new_tokens=12)
        pieces = list(gen.stream("The quick brown", max_new_tokens=12))
        batch = gen(["The quick brown", "A man is"], max_new_tokens=12)
        alone = gen("A man is", max_new_tokens=12)
        sampled = [gen("The quick", max_new_tokens=8, do_sample=True, top_k=20, seed=s) for s in (1, 1, 2)]
    assert "".join(pieces) == whole and len(pieces) > 1 and whole
    assert batch == [whole, alone]
    assert sampled[0] == sampled[1]  # same seed, same text


def test_streamed_text_never_splits_a_character(text_model):
    out, _ = text_model
    tokenizer = hermes_ort.Tokenizer.from_dir(out)
    text = "ça va? 日本 🚀 naïve café"  # 日, 本 and 🚀 are not in the training text: one token per byte
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode(ids[:n]) for n in range(len(ids)))  # some prefix ends mid-character
    row = RowText(tokenizer, stop=())
    pieces = [row.add(i, eos=()) for i in ids] + [row.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_stop_strings_end_a_row_and_are_not_emitted(text_model):
    out, _ = text_model
    tokenizer = hermes_ort.Tokenizer.from_dir(out)
    row = RowText(tokenizer, stop=["lazy"])
    pieces = [row.add(i, eos=()) for i in tokenizer.encode("jumps over the lazy dog")]
    assert "".join(pieces) == "jumps over the " and row.finished


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "hermes_ort", "generate", *map(str, args)], capture_output=True,
                          text=True)


def test_cli_streams_text_and_prints_the_stats_line(text_model):
    out, _ = text_model
    with hermes_ort.TextGenerator(out) as gen:
        want = gen("The quick brown", max_new_tokens=6)
    result = run_cli(out, "--prompt", "The quick brown", "--max-new-tokens", "6", "--budget", "1GiB")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == want
    stats = result.stderr.strip().splitlines()[-1]
    assert "first token" in stats and "tokens/s" in stats and "peak RSS" in stats and "resident" in stats


def test_cli_prompts_file_decodes_one_batch(text_model, tmp_path):
    out, _ = text_model
    (tmp_path / "prompts.txt").write_text("The quick brown\n\nA man is\n")
    with hermes_ort.TextGenerator(out) as gen:
        want = gen(["The quick brown", "A man is"], max_new_tokens=5)
    result = run_cli(out, "--prompts-file", tmp_path / "prompts.txt", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"--- prompt 0: The quick brown\n{want[0]}\n--- prompt 1: A man is\n{want[1]}\n"
    assert "10 tokens" in result.stderr  # two rows of five


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", "word " * 200], "exceeds the model's 128 positions"),
    (["--prompt", "hi", "--top-p", "1.5"], "top_p must be in \\(0, 1\\]"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature must be > 0"),
    (["--prompt", "hi", "--top-k", "-2"], "top_k must be >= 0"),
])
def test_cli_bad_input_gets_one_line_and_exit_2(text_model, args, message):
    import re

    result = run_cli(text_model[0], *args)
    assert result.returncode == 2 and re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_chat_and_text_need_what_the_model_lacks(exported):
    plain = exported("tiny-gpt2").directory  # exported from a name: no tokenizer
    result = run_cli(plain, "--prompt", "hi")
    assert result.returncode == 2 and "has no tokenizer.json" in result.stderr
    assert run_cli(plain, "--ids", "1,2,3", "--max-new-tokens", "2").returncode == 0  # ids still work


def test_chat_without_a_template_is_refused(text_model, tmp_path):
    import shutil

    target = tmp_path / "m"
    shutil.copytree(text_model[0], target)
    (target / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    from hermes_ort.format import manifest as manifest_io
    from hermes_ort.format.manifest import FileSpec

    with pytest.raises(hermes_ort.ManifestError, match="tokenizer_config.json has 30 bytes"):
        manifest_io.load(target)  # the manifest lists the tokenizer's files with their sizes
    data = json.loads((target / "manifest.json").read_text())
    data["files"] = [f if f["path"] != "tokenizer_config.json" else FileSpec.of(target, f["path"]).__dict__
                     for f in data["files"]]
    (target / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="no chat template"):
        hermes_ort.Tokenizer.from_dir(target).apply_chat_template([{"role": "user", "content": "hi"}])
    result = run_cli(target, "--prompt", "hi", "--chat")
    assert result.returncode == 2 and result.stderr.strip().endswith("has no chat template (tokenizer_config.json "
                                                                     "or chat_template.jinja)")
