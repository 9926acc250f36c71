"""The wheel as users install it: hermes_ort, the exporter (hermes_ort_export) and LICENSE; `hermes --help` from a
fresh venv; `hermes export` of a tiny model from the installed files where torch is installed (~40 s in all)."""
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "hermes_ort", "hermes_ort_export")  # what the build reads


def run(*command, **kwargs):
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built offline from a copy of the sources, so the checkout gets no build/ or egg-info."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools (the build backend) is not installed, and an isolated build needs the network")
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree
                                          else {}))
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src)
    assert built.returncode == 0, built.stderr[-3000:]
    (found,) = dist.glob("hermes_ort-*.whl")
    return found


def test_the_wheel_holds_the_package_the_exporter_and_the_license(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {"hermes_ort/__main__.py", "hermes_ort_export/__main__.py", "hermes_ort_export/build.py"} <= set(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert {n.split("/")[0] for n in names if "/" in n and ".dist-info" not in n} == {"hermes_ort", "hermes_ort_export"}
    assert "License-Expression: Apache-2.0" in meta and "Author: hermes-ort developers" in meta
    assert "Project-URL: Repository, https://github.com/hermes-ort/hermes-ort" in meta
    assert "Provides-Extra: export" in meta and "Classifier: Programming Language :: Python :: 3" in meta


def test_hermes_runs_from_a_fresh_venv_and_names_the_extra_hermes_export_needs(wheel, tmp_path):
    env = tmp_path / "venv"
    made = run(sys.executable, "-m", "venv", env)  # its own site-packages: nothing of this checkout's venv
    assert made.returncode == 0, made.stderr
    installed = run(env / "bin" / "python", "-m", "pip", "install", "-q", wheel)
    if installed.returncode != 0 and "No matching distribution" in installed.stderr:
        pytest.skip(f"the wheel's dependencies cannot be installed here (no package index): {installed.stderr[-300:]}")
    assert installed.returncode == 0, installed.stderr[-3000:]
    helped = run(env / "bin" / "hermes", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "export" in helped.stdout and "generate" in helped.stdout, helped.stderr
    if run(env / "bin" / "python", "-c", "import torch").returncode == 0:
        return  # the index gave the fresh venv torch after all: nothing missing to report
    refused = run(env / "bin" / "hermes", "export", "tiny-gpt2", "--out", tmp_path / "m", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert 'pip install "hermes-ort[export]"' in refused.stderr and not (tmp_path / "m").exists()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch (the export extra) is not installed")
def test_hermes_export_from_the_installed_files_exports_a_tiny_model(wheel, tmp_path):
    """This venv's torch and transformers, but hermes_ort and hermes_ort_export from the wheel, not the checkout."""
    target = tmp_path / "site"
    installed = run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel)
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = run(sys.executable, "-c", "import hermes_ort, hermes_ort_export as e; print(e.__file__, hermes_ort.__file__)",
                cwd=tmp_path, env=env)
    assert where.stdout.split() and all(p.startswith(str(target)) for p in where.stdout.split()), where
    out = tmp_path / "tiny-gpt2"
    exported = run(sys.executable, target / "bin" / "hermes", "export", "tiny-gpt2", "--random-weights", "--out", out,
                   cwd=tmp_path, env=env)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert exported.stdout.startswith("exported tiny-gpt2") and (out / "manifest.json").is_file()
