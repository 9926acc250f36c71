"""A run imports only what it needs: every budget counts the process floor, and `onnx` (its protobuf runtime),
`gguf`, `jinja2`, `tokenizers` and the stage-making graph tools are no part of streaming stages. Each case
runs in a fresh interpreter, as a user's process starts."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import hermes_ort
from hermes_ort.__main__ import main as hermes
from hermes_ort.convert import convert_gguf
from hermes_ort.planning.planner import Plan

from tiny_gguf import TinyConfig, write_tiny_gguf

FORBIDDEN = ("onnx", "google.protobuf", "ml_dtypes", "gguf", "jinja2", "tokenizers", "torch", "transformers",
             "hermes_ort.convert", "hermes_ort.graphs.split", "hermes_ort.graphs.cuts",
             "hermes_ort.format.stage_files", "hermes_ort.format.weights")

REPORT = """
import json, sys
FORBIDDEN = {forbidden!r}
found = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
print("LOADED=" + json.dumps(found))
"""

API_RUN = """
import sys
import numpy as np
import hermes_ort
from hermes_ort.engine.feeds import synthetic_feed
from hermes_ort.planning.planner import Plan

def streamed(batched=False):
    return Plan(budget=0, loaders=1, window=2, resident=(), prepacked=(), compute_threads=1, predicted_first_s=0,
                predicted_steady_s=0, predicted_peak_bytes=0, batched_layout=batched)

gpt2, native = sys.argv[1], sys.argv[2]
ids = np.array([[5, 17, 260, 99], [3, 42, 7, 8], [1, 2, 3, 4]])
with hermes_ort.InferenceSession(gpt2) as session:  # every stage resident: merged sessions
    session.run(None, synthetic_feed(session.manifest))
    hermes_ort.generate(session, ids[:1], 3)
with hermes_ort.InferenceSession(gpt2, plan_override=streamed()) as session:  # templates, streamed
    session.run(None, synthetic_feed(session.manifest))
    assert session._resident.templates.forms
with hermes_ort.InferenceSession(gpt2, plan_override=streamed(batched=True)) as session:  # transposed templates
    hermes_ort.generate(session, ids, 3)
for plan in (None, streamed()):  # 4-bit stages: merged, then streamed on their saved packs
    with hermes_ort.InferenceSession(native, plan_override=plan) as session:
        hermes_ort.generate(session, ids, 3)
"""

CLI_RUN = """
import sys
from hermes_ort.__main__ import main
assert main(sys.argv[1:]) == 0
"""


def loaded_after(script: str, *args: str) -> list[str]:
    """The forbidden modules a fresh interpreter holds after running `script` with `args`."""
    code = script + REPORT.format(forbidden=FORBIDDEN)
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("LOADED="))
    return json.loads(line.removeprefix("LOADED="))


@pytest.fixture(scope="module")
def gpt2(exported, tmp_path_factory):
    """tiny-gpt2 (Gemm blocks, shared templates) with its batched layout written."""
    directory = tmp_path_factory.mktemp("floor") / "gpt2"
    shutil.copytree(exported("tiny-gpt2").directory, directory)
    assert hermes(["batched", str(directory)]) == 0
    return directory


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """A tiny GGUF converted natively (MatMulNBits stages). Its packs (engine/packs.py) are built here first:
    building one reads the saved graph with onnx."""
    root = tmp_path_factory.mktemp("floor-native")
    write_tiny_gguf(root / "tiny.gguf", TinyConfig(layers=2))
    directory = convert_gguf(root / "tiny.gguf", root / "model", "native", 0).directory
    plan = Plan(budget=0, loaders=1, window=2, resident=(), prepacked=(), compute_threads=1, predicted_first_s=0,
                predicted_steady_s=0, predicted_peak_bytes=0)
    with hermes_ort.InferenceSession(directory, plan_override=plan) as session:
        hermes_ort.generate(session, np.array([[5, 17, 260, 99]] * 3), 3)
    return directory


def test_importing_hermes_ort_loads_none_of_them():
    assert loaded_after("import hermes_ort\n") == []


def test_runs_and_generations_through_the_python_api_load_none_of_them(gpt2, native):
    """Merged resident sessions, streamed templates, transposed templates, quantized stages on packs."""
    assert loaded_after(API_RUN, str(gpt2), str(native)) == []


@pytest.mark.parametrize("argv", [["run", "{gpt2}"],
                                  ["generate", "{gpt2}", "--ids", "5,17,260", "--max-new-tokens", "3"],
                                  ["generate", "{native}", "--ids", "5,17,260", "--max-new-tokens", "3"]],
                         ids=["run", "generate-gpt2-ids", "generate-native-ids"])
def test_cli_runs_given_ids_load_none_of_them(gpt2, native, argv):
    args = [a.format(gpt2=gpt2, native=native) for a in argv]
    assert loaded_after(CLI_RUN, *args) == []


def test_text_loads_the_tokenizer_and_a_chat_template_jinja2(native):
    """What a run needs for text, and only then."""
    text = loaded_after(CLI_RUN, "generate", str(native), "--prompt", "the", "--max-new-tokens", "2")
    assert {m.split(".")[0] for m in text} == {"tokenizers"}
    chat = loaded_after(CLI_RUN, "generate", str(native), "--chat", "--prompt", "hi", "--max-new-tokens", "2")
    assert {m.split(".")[0] for m in chat} == {"tokenizers", "jinja2"}
