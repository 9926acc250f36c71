"""`hermes cluster plan`: the placement table for the boards named on the command line."""
from __future__ import annotations

import pytest

from hermes_ort.__main__ import main as hermes
from hermes_ort.cluster.boards import BoardSpec
from hermes_ort.convert import convert_gguf
from hermes_ort.errors import InputError

from tiny_gguf import TinyConfig, write_tiny_gguf


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    write_tiny_gguf(root / "m.gguf", TinyConfig(layers=4))
    return convert_gguf(root / "m.gguf", root / "model", "fp32").directory


def test_a_model_that_fits_gets_one_board(model, capsys):
    assert hermes(["cluster", "plan", str(model), "--board", "a=2GiB", "--board", "b=2GiB,disk=90"]) == 0
    out = capsys.readouterr().out
    assert "a      2.0 GiB  [0, 6)  embeddings  head" in out
    assert "every stage resident; 1 of 2 boards used" in out


def test_a_board_too_small_is_named(model, capsys):
    assert hermes(["cluster", "plan", str(model), "--board", "big=2GiB", "--board", "tiny=300MiB"]) == 2
    assert "hermes: error: board 'tiny' is too small for any stage" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [
    ("a=2GiB", BoardSpec("a", {"a": 1}, 2 << 30)),
    ("b=512MiB,disk=90,speed=0.5", BoardSpec("b", {"b": 1}, 512 << 20, 90e6, 0.5)),
])
def test_board_arguments(text, expected):
    assert BoardSpec.parse(text) == expected


@pytest.mark.parametrize("text, message", [("a", "NAME=BUDGET"), ("=1GiB", "NAME=BUDGET"),
                                           ("a=1GiB,fast=1", "unknown option 'fast=1'")])
def test_bad_board_arguments_say_the_form(text, message):
    with pytest.raises(InputError, match=message):
        BoardSpec.parse(text)
