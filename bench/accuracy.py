"""python -m bench.accuracy FILE.gguf [--files TEXT...] [--out DIR]: how far hermes' native conversions of a GGUF
move the logits, beside llama.cpp on the same file, all measured in one run. Rows:

reference         the file's own weights dequantized to float32 by gguf-py, through the numpy Llama forward
                  (hermes_ort/convert/reference.py): what every row is compared with
level 0           `hermes convert --accuracy-level 0`: MatMulNBits in float32 arithmetic, all rows at once
level 4           `hermes convert --accuracy-level 4`: int8 activations per 32-block, all rows at once
level 4, 1 row    the same stages fed one token a run with the KV cache, as decoding runs them (onnxruntime
                  issue 29853: MatMulNBits wrong at one row with uint8 zero points on AVX2)
llama.cpp         llama-cpp-python (the `peers` extra) on the same ids, logits_all: its own kernels, Q8 activations

Each text (TEXTS below, or pieces of --files) is evaluated on its own from position 0 (no BOS added), within
the model's context length; every position's next-token logits are compared: top-1 agreement with the
reference, KL(reference || row) in nats (mean and max), max |logit diff|. ± is one standard error over
positions, as llama.cpp's `llama-perplexity --kl-divergence` prints it; level 4 and llama.cpp are also
compared position by position (top-1 missed by one and not the other). A second table compares level 4 one
row at a time with level 4 all rows at once (0 where they are identical).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np

from hermes_ort.convert import convert_gguf, reference
from hermes_ort.convert.convert import cached_tables
from hermes_ort.convert.gguf_model import GGUFModel
from hermes_ort.generation.tokenizer import Tokenizer
from hermes_ort.planning.report import table

from . import results
from .machine import describe

TEXTS = (  # ordinary English prose and code, each a separate sequence
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters.",
    "The train left the station a few minutes after nine. Most of the passengers were reading or looking out of "
    "the window at the fields, which were still wet from the rain of the night before. A child in the front row "
    "asked her mother how long it would take to reach the sea, and the mother said that they would be there "
    "before lunch if nothing went wrong.",
    "Water boils at 100 degrees Celsius at sea level, but at lower temperatures on a mountain, because the air "
    "pressure is lower there. This is why cooking instructions sometimes give longer times for people who live "
    "at high altitude.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n\n\nif __name__ == \"__main__\":\n    for i in range(10):\n"
    "        print(i, fibonacci(i))\n",
    "import json\nfrom pathlib import Path\n\n\ndef load_config(path: Path) -> dict:\n    with open(path) as f:\n"
    "        config = json.load(f)\n    if \"name\" not in config:\n        raise ValueError(f\"{path}: no name\")\n"
    "    return config\n",
    "#include <stdio.h>\n\nint main(void) {\n    int total = 0;\n    for (int i = 1; i <= 10; i++) {\n"
    "        total += i * i;\n    }\n    printf(\"%d\\n\", total);\n    return 0;\n}\n",
)
ROWS = ("level 0", "level 4", "level 4, 1 row", "llama.cpp")
ONE_ROW = "level 4, 1 row against all rows"
PIECE = 256  # tokens of each --files piece


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(want: np.ndarray, got: np.ndarray) -> dict[str, np.ndarray]:
    """want, got [S, V] -> per position KL(want || got) [S], top-1 agreement [S], max |diff| [S]."""
    p, q = log_softmax(want), log_softmax(got)
    return {"kl": (np.exp(p) * (p - q)).sum(-1), "same": want.argmax(-1) == got.argmax(-1),
            "abs": np.abs(want - got).max(-1)}


def summary(parts: list[dict[str, np.ndarray]]) -> dict:
    """One row's figures over every position of every text; _se: one standard error."""
    kl, same = np.concatenate([c["kl"] for c in parts]), np.concatenate([c["same"] for c in parts])
    n, top1 = len(kl), float(same.mean())
    return {"positions": n, "top1": top1, "top1_se": float(np.sqrt(top1 * (1 - top1) / n)),
            "mean_kl": float(kl.mean()), "mean_kl_se": float(kl.std() / np.sqrt(n)), "max_kl": float(kl.max()),
            "max_abs": float(max(c["abs"].max() for c in parts))}


def paired(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> dict:
    """Two rows position by position: top-1 missed by a only, b only, both; mean KL(a) - KL(b) with its error."""
    same_a, same_b = (np.concatenate([c["same"] for c in x]) for x in (a, b))
    kl = np.concatenate([c["kl"] for c in a]) - np.concatenate([c["kl"] for c in b])
    return {"only_a": int((~same_a & same_b).sum()), "only_b": int((same_a & ~same_b).sum()),
            "both": int((~same_a & ~same_b).sum()), "kl_diff": float(kl.mean()),
            "kl_diff_se": float(kl.std() / np.sqrt(len(kl)))}


def empty_cache(session) -> dict[str, np.ndarray]:
    return {t.name: np.zeros((1, *(d if isinstance(d, int) else 0 for d in t.shape[1:])), np.float32)
            for t in session.manifest.inputs if t.name.startswith("past.")}


def prefill_logits(session, ids: np.ndarray) -> np.ndarray:
    """Every position of ids [S] in one run: logits [S, V]."""
    feed = {"input_ids": ids[None], "position_ids": np.arange(len(ids))[None], "attention_mask": np.ones((1, len(ids)),
                                                                                                        np.int64)}
    return session.run(["logits"], feed | empty_cache(session))[0][0]


def one_row_logits(session, ids: np.ndarray) -> np.ndarray:
    """ids [S] fed one token a run, the KV cache carried: logits [S, V], each from a one-row run."""
    past, out = empty_cache(session), []
    names = ["logits", *(n.replace("past.", "present.", 1) for n in past)]
    for t, token in enumerate(ids):
        feed = {"input_ids": np.array([[token]]), "position_ids": np.array([[t]]),
                "attention_mask": np.ones((1, t + 1), np.int64)}
        logits, *present = session.run(names, feed | past)
        out.append(logits[0, -1])
        past = dict(zip(past, present))
    return np.stack(out)


def llama_cpp(gguf: Path, length: int):
    """ids [S] -> logits [S, V] from llama-cpp-python, or None when it is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=length + 8, logits_all=True, seed=0, n_threads=os.cpu_count(), verbose=False)

    def logits(ids: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval(ids.tolist())
        return np.array(llm.scores[:len(ids)], np.float32)

    return logits


def token_texts(tokenizer: Tokenizer, files: list[Path], context: int) -> list[np.ndarray]:
    """TEXTS, or two PIECE-token pieces of each file (from its quarter and three-quarter points); within the
    model's positions."""
    if not files:
        return [np.array(tokenizer.encode(t)[:context]) for t in TEXTS]
    pieces = []
    for f in files:
        ids = tokenizer.encode(f.read_text())
        pieces += [np.array(ids[i:i + min(PIECE, context)]) for i in (len(ids) // 4, 3 * len(ids) // 4)]
    return pieces


def measure(gguf: Path, scratch: Path, files: list[Path]) -> tuple[list[dict], dict]:
    """(one record per row, then level 4's one row against all rows; facts: self-checks, level 4 against
    llama.cpp position by position)."""
    from hermes_ort import InferenceSession

    converted = {level: convert_gguf(gguf, scratch / f"level{level}", "native", level) for level in (0, 4)}
    model = GGUFModel(gguf)
    texts = token_texts(Tokenizer.from_dir(converted[0].directory), files, model.settings.context)
    rows, peer = cached_tables(model), llama_cpp(gguf, max(map(len, texts)))
    parts: dict[str, list] = {row: [] for row in (*ROWS, ONE_ROW)}
    with InferenceSession(converted[0].directory, memory_budget=None) as exact, \
            InferenceSession(converted[4].directory, memory_budget=None) as int8:
        for ids in texts:  # one text at a time: 3,000 positions of logits in float64 would be ~1.2 GB a row
            want = reference.logits(rows, model.settings, ids)
            got = {"level 0": prefill_logits(exact, ids), "level 4": prefill_logits(int8, ids),
                   "level 4, 1 row": one_row_logits(int8, ids)} | ({"llama.cpp": peer(ids)} if peer else {})
            for row, logits in got.items():
                parts[row].append(compare(want, logits))
            parts[ONE_ROW].append(compare(got["level 4"], got["level 4, 1 row"]))
    records = [{"row": row, **summary(p)} for row, p in parts.items() if p]
    checks = {f"level {level}": {k: r.manifest.extra[k] for k in ("tolerance", "max_rel_diff_blocks",
                                                                  "max_rel_diff_logits")}
              for level, r in converted.items()}
    against = paired(parts["level 4"], parts["llama.cpp"]) if peer else None
    return records, {"self_check": checks, "level4_against_llamacpp": against, "texts": len(texts),
                     "files": [str(f) for f in files]}


def accuracy_table(title: str, records: list[dict]) -> results.Table:
    rows = [[r["row"], str(r["positions"]), f"{100 * r['top1']:.1f} ± {100 * r['top1_se']:.1f}%",
             f"{r['mean_kl']:.2e} ± {r['mean_kl_se']:.1e}", f"{r['max_kl']:.2e}", f"{r['max_abs']:.3g}"]
            for r in records]
    return results.Table(title, ["row", "positions", "top-1", "mean KL", "max KL", "max |diff|"], rows)


def tables(records: list[dict], gguf: Path, texts: int) -> list[results.Table]:
    against = f"{gguf.name}: logits against the file's float32 weights (numpy forward), {texts} texts"
    return [accuracy_table(against, records[:-1]), accuracy_table("level 4 against itself", records[-1:])]


def report(facts: dict) -> list[str]:
    lines, m = [], facts["level4_against_llamacpp"]
    if m is None:
        lines.append("llama.cpp: not installed (pip install 'hermes-ort[peers]')")
    else:
        lines.append(f"level 4 against llama.cpp, position by position: top-1 missed by level 4 only {m['only_a']}, "
                     f"by llama.cpp only {m['only_b']}, by both {m['both']}; mean KL difference "
                     f"{m['kl_diff']:.2e} ± {m['kl_diff_se']:.1e}")
    for level, c in facts["self_check"].items():
        lines.append(f"self-check at {level}: blocks {c['max_rel_diff_blocks']:.3g}, logits "
                     f"{c['max_rel_diff_logits']:.3g} (tolerance {c['tolerance']})")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", type=Path, help="a Llama-family .gguf file")
    p.add_argument("--files", type=Path, nargs="+", default=[],
                   help=f"text files to read instead of the built-in texts: two {PIECE}-token pieces of each")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<date>-<host>/)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hermes-accuracy-") as scratch:
        records, facts = measure(args.gguf.resolve(), Path(scratch), args.files)
    shown = tables(records, args.gguf, facts["texts"])
    print(describe())
    for t in shown:
        print(f"{t.title}\n{table(t.header, t.rows)}")
    print("\n".join(report(facts)))
    written = results.save("accuracy", results.results_dir(args.out), records, shown, results.machine() | facts)
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
